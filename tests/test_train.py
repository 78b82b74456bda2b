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


def test_one_plus_one_epochs_equal_two(tmp_path, tiny_data_dir):
    """Training 1 epoch, then resuming for a 2nd, gives the same weights and optimizer state
    as 2 epochs in one go (a resume that re-initialised anything would not)."""
    args = ["--model", "tiny", "--data-dir", str(tiny_data_dir), "--val-size", "10", "--batch-size", "16", "--workers", "0"]
    train.main(args + ["--epochs", "2", "--out", str(tmp_path / "straight.pt")])
    train.main(args + ["--epochs", "1", "--out", str(tmp_path / "resumed.pt")])
    result = train.main(args + ["--epochs", "2", "--out", str(tmp_path / "resumed.pt"), "--resume"])
    assert [r["epoch"] for r in result["history"]] == [1, 2]
    a, b = (torch.load(tmp_path / f"{n}.state.pt") for n in ("straight", "resumed"))
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], msg=k)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    for p in sa:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(sb[p][k], sa[p][k])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]


def test_resume_without_state_fails_clearly(tmp_path, tiny_data_dir):
    with pytest.raises(UserError, match="no training state"):
        train.main(["--model", "tiny", "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "none.pt"), "--resume", "--val-size", "10"])
