"""QAT training on tiny data: one log line per epoch, self-describing checkpoints, resume,
and an accumulator bound that holds in the compiled circuit."""

from __future__ import annotations

import pytest
import torch

import train
from checkpoints import load_checkpoint
from cli import UserError
from models import TINY


def test_one_epoch_checkpoint_describes_itself(tiny_checkpoint):
    model, ckpt = load_checkpoint(tiny_checkpoint)
    for key in ("model", "model_config", "train_config", "epoch", "metrics", "versions", "accumulators", "history"):
        assert key in ckpt
    assert ckpt["epoch"] == 1 and ckpt["train_config"]["model"] == "tiny"
    assert set(ckpt["metrics"]) >= {"loss", "train_acc", "val_acc", "lr", "seconds"}
    assert all(r["bits"] <= TINY.accumulator_bits for r in ckpt["accumulators"].values())


def test_bound_holds_in_the_compiled_circuit(tiny_checkpoint, tiny_data_dir):
    from fhe import CompileOptions, compile_checkpoint

    _, _, qm, report = compile_checkpoint(CompileOptions(checkpoint=str(tiny_checkpoint), data_dir=str(tiny_data_dir), n_calib=40, rounding_bits=0))
    assert report["max_bit_width"] <= TINY.accumulator_bits
    assert all(layer["bit_width"] <= TINY.accumulator_bits for layer in report["layers"].values())


def test_resume_continues_where_it_stopped(tmp_path, tiny_data_dir, capsys):
    out = tmp_path / "r.pt"
    args = ["--model", "tiny", "--data-dir", str(tiny_data_dir), "--val-size", "10", "--batch-size", "16", "--workers", "0", "--out", str(out)]
    train.main(args + ["--epochs", "1"])
    capsys.readouterr()
    result = train.main(args + ["--epochs", "2", "--resume"])
    log = capsys.readouterr().out
    assert "resumed from" in log and [r["epoch"] for r in result["history"]] == [1, 2]
    assert torch.load(out)["epoch"] == 2


def test_resume_without_state_fails_clearly(tmp_path, tiny_data_dir):
    with pytest.raises(UserError, match="no training state"):
        train.main(["--model", "tiny", "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "none.pt"), "--resume", "--val-size", "10"])
