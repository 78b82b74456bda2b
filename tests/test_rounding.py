"""Rounding-aware training: the torch model with its accumulators rounded (rounding.py)
computes what Concrete ML's rounded circuit computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import train
from checkpoints import load_checkpoint
from cli import UserError
from fhe import CompileOptions, calibration_set, compile_checkpoint, quantized_logits
from models import REFERENCE, TINY, SplitNet
from rounding import bit_width, round_accumulators, round_to_bits


def test_round_to_bits_keeps_the_top_bits_and_passes_the_gradient():
    acc = torch.tensor([-100.0, -9.0, 7.0, 8.0, 100.0], requires_grad=True)  # 8 signed bits
    out = round_to_bits(acc, 4)  # 4 lsbs dropped: multiples of 16, half up
    assert out.tolist() == [-96.0, -16.0, 0.0, 16.0, 96.0]
    out.sum().backward()
    assert acc.grad.tolist() == [1.0] * 5
    assert round_to_bits(acc, 8).tolist() == acc.tolist()  # nothing to drop


def concrete_lsbs(model, feats: np.ndarray, bits: int) -> list[int]:
    """The low bits Concrete ML drops at each accumulator: from the calibration images'
    ranges, propagated without rounding."""
    widths = []
    hooks = [m.register_forward_hook(lambda m, i, o: widths.append(bit_width(o / (i[0].scale * m.quant_weight().scale))))
             for m, _ in model.weight_layers()]
    with torch.no_grad():
        model.encrypted(torch.from_numpy(feats))
    for h in hooks:
        h.remove()
    return [max(0, w - bits) for w in widths]


def test_rounded_torch_model_computes_what_concrete_computes(tiny_checkpoint, tiny_data_dir):
    """Given Concrete's low bits per layer, the tiny model with its accumulators rounded to 4
    bits gives Concrete's fhe="disable" logits at 4-bit exact rounding, up to the output
    quantization; without the rounding it does not."""
    o = CompileOptions(checkpoint=str(tiny_checkpoint), data_dir=str(tiny_data_dir), p_error=1e-9, rounding_bits=4, rounding_method="exact", n_calib=40)
    model, _, qm, _ = compile_checkpoint(o)
    feats = calibration_set(model, o)
    lsbs = concrete_lsbs(model, feats, 4)
    assert lsbs == [op.lsbs_to_remove["matmul"] for _, op in qm.quant_layers_dict.values() if isinstance(getattr(op, "lsbs_to_remove", None), dict)]
    assert max(lsbs) > 0
    concrete = quantized_logits(qm, feats, "disable")
    with torch.no_grad():
        plain = model.encrypted(torch.from_numpy(feats)).numpy()
        handles = round_accumulators(model, 4, lsbs)
        rounded = model.encrypted(torch.from_numpy(feats)).numpy()
        for h in handles:
            h.remove()
        assert np.array_equal(model.encrypted(torch.from_numpy(feats)).numpy(), plain)  # the hooks are gone
    # Concrete quantizes the logits: a step, and a range calibrated without rounding
    step, lo, hi = np.min(np.diff(np.unique(concrete))), concrete.min(), concrete.max()
    assert np.abs(np.clip(rounded, lo, hi) - concrete).max() < step
    assert np.abs(np.clip(plain, lo, hi) - concrete).max() > 3 * step


def test_training_with_rounding_records_it_and_deploys_it(tmp_path, tiny_data_dir):
    args = ["--model", "tiny", "--data-dir", str(tiny_data_dir), "--val-size", "10", "--batch-size", "16", "--workers", "0", "--epochs", "1"]
    train.main(args + ["--rounding-bits", "5", "--out", str(tmp_path / "r5.pt")])
    _, ckpt = load_checkpoint(tmp_path / "r5.pt")
    assert ckpt["train_config"]["rounding_bits"] == 5
    assert ckpt["deployment"]["rounding_bits"] == 5 and "--rounding-bits 5" in ckpt["deployment"]["source"]
    with pytest.raises(UserError, match="rounding-bits"):  # a resume must learn the same way
        train.main(args + ["--rounding-bits", "4", "--out", str(tmp_path / "r5.pt"), "--resume"])
    with pytest.raises(UserError, match="rounding-bits"):
        train.main(args + ["--rounding-bits", "1", "--out", str(tmp_path / "r1.pt")])
    with pytest.raises(UserError, match="rounding-noise"):  # noise without rounding, or out of range
        train.main(args + ["--rounding-noise", "0.1", "--out", str(tmp_path / "r1.pt")])
    with pytest.raises(UserError, match="rounding-noise"):
        train.main(args + ["--rounding-bits", "5", "--rounding-noise", "0.6", "--out", str(tmp_path / "r1.pt")])
    assert not (tmp_path / "r1.pt").exists()


def test_encrypted_pooling_is_refused():
    with pytest.raises(UserError, match="average pooling"):
        round_accumulators(SplitNet(REFERENCE), 6)


def test_noise_moves_the_given_share_of_lookups_by_one_step():
    acc = torch.arange(-2048.0, 2048.0)  # 12 signed bits
    exact = round_to_bits(acc, 6)  # steps of 64
    torch.manual_seed(0)
    moved = round_to_bits(acc, 6, noise=0.1) - exact
    assert set(moved.unique().tolist()) == {-64.0, 0.0, 64.0}
    assert 0.085 < (moved != 0).float().mean().item() < 0.115
    moved = round_to_bits(acc, 12, noise=0.1) - acc  # nothing dropped: one step is 1
    assert set(moved.unique().tolist()) == {-1.0, 0.0, 1.0}


def test_noise_is_added_while_training_only():
    model = SplitNet(TINY).eval()
    layer = model.weight_layers()[0][0]
    seen = []
    pre = layer.register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    with torch.no_grad():
        model(torch.rand(4, 3, 32, 32))
    pre.remove()
    handles = round_accumulators(model, 3, noise=0.3)
    with torch.no_grad():
        evals = [layer(seen[0]) for _ in range(2)]
        layer.train()
        trains = [layer(seen[0]) for _ in range(2)]
    assert torch.equal(evals[0], evals[1])
    assert not torch.equal(trains[0], trains[1]) and not torch.equal(trains[0], evals[0])
    for h in handles:
        h.remove()
