"""The split model, checkpoints and the accumulator-bounding pruning."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from checkpoints import deployment, load_checkpoint, read_checkpoint, save_checkpoint
from cli import UserError
from conftest import TINY_G2
from models import CONFIGS, FAST, REFERENCE, TEACHERS, TINY, ModelConfig, SplitNet, TeacherConfig
from pruning import accumulator_bits, apply_pruning


def clear_part_by_hand(model, x):
    """The clear part written out with torch.nn.functional and the split quantizer's scale,
    independently of ClearModule: conv, batch norm (running statistics), pooling, then
    round(x / scale) clamped to the quantizer's integer range, times the scale."""
    import torch.nn.functional as F

    from models import quant_range

    c, bn, cfg = model.clear.conv, model.clear.bn, model.cfg
    y = F.conv2d(x, c.weight, c.bias, stride=c.stride, padding=c.padding)
    y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
    if cfg.clear_pool:
        y = (F.max_pool2d if cfg.clear_pool_type == "max" else F.avg_pool2d)(y, cfg.clear_pool)
    lo, hi = quant_range(model.clear.quant)
    scale = model.clear.quant.act_quant.scale()
    return torch.clamp(torch.round(y / scale), lo, hi) * scale


@pytest.mark.parametrize("cfg", [TINY, TINY_G2, FAST, REFERENCE], ids=lambda c: c.name)
def test_split_equals_an_independent_composition(cfg, tmp_path):
    torch.manual_seed(0)
    model = SplitNet(cfg)
    apply_pruning(model, cfg.accumulator_bits)
    model.train()
    model(torch.randn(8, 3, 32, 32))  # initialise the learned quantizer scales and batch-norm statistics
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        feats = model.clear(x)
        assert feats.shape[1:] == model.encrypted.in_shape
        torch.testing.assert_close(feats, clear_part_by_hand(model, x), atol=1e-5, rtol=0)
        # the encrypted part of a model rebuilt from the checkpoint file, on those features
        save_checkpoint(tmp_path / "m.pt", model)
        rebuilt, _ = load_checkpoint(tmp_path / "m.pt")
        torch.testing.assert_close(rebuilt.encrypted(clear_part_by_hand(rebuilt, x)), model(x), atol=1e-4, rtol=0)


def test_reference_layer_table():
    m = SplitNet(REFERENCE)
    convs = [l for l in m.encrypted.layers if isinstance(l, torch.nn.Module) and type(l).__name__ == "QuantConv2d"]
    assert [c.out_channels for c in convs] == [64, 128, 128, 256, 256]
    assert m.clear.conv.out_channels == 64 and m.clear.conv.bias is not None
    linears = [l for l in m.encrypted.layers if type(l).__name__ == "QuantLinear"]
    assert [(l.in_features, l.out_features) for l in linears] == [(256, 512), (512, 512), (512, 10)]
    table = m.layer_table()
    assert len(table) == 3 + len(m.encrypted.layers) - 1  # the shared split quantizer listed once
    assert table[2].startswith("clear      quant QuantIdentity 3-bit, integers -4..3")
    assert sum("2-bit weights" in row for row in table) == 8


def test_checkpoint_round_trip_is_strict(tmp_path):
    torch.manual_seed(0)
    model = SplitNet(TINY)
    apply_pruning(model, TINY.accumulator_bits)
    model.train()
    model(torch.randn(8, 3, 32, 32))
    model.eval()
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, epoch=3, metrics={"val_acc": 0.5})
    loaded, ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 3 and ckpt["model_config"]["name"] == "tiny" and "torch" in ckpt["versions"]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_mismatched_checkpoint_is_refused(tmp_path):
    model = SplitNet(TINY)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model)
    ckpt = torch.load(path)
    ckpt["model_config"]["fcs"] = [32]  # weights no longer fit the config
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="does not match its model config"):
        load_checkpoint(path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")


def test_grouped_conv_reads_only_its_group():
    torch.manual_seed(0)
    model = SplitNet(TINY_G2).eval()
    conv = next(m for m in model.encrypted.layers if type(m).__name__ == "QuantConv2d")
    assert conv.groups == 2 and tuple(conv.weight.shape) == (8, 4, 3, 3)
    x = torch.rand(2, 8, 8, 8)
    y = x.clone()
    y[:, 4:] += 1  # change only the second group's inputs
    with torch.no_grad():
        a, b = conv(x), conv(y)
    a, b = (t.value if hasattr(t, "value") else t for t in (a, b))
    torch.testing.assert_close(a[:, :4], b[:, :4])  # the first group's outputs do not see them
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    assert accumulator_bits(model)["encrypted.layers.1"]["fan_in"] == 4 * 9  # the pruning bound's fan-in
    assert any(" g2," in row for row in model.layer_table())
    assert SplitNet(TINY).encrypted.layers[1].groups == 1  # five-entry rows: one group
    with pytest.raises(ValueError, match="3 groups do not divide"):
        SplitNet(dataclasses.replace(TINY, convs=[(9, 3, 2, 1, 0, 3)], clear_conv=(8, 3, 1, 1)))


def test_config_validation():
    with pytest.raises(ValueError, match="act"):
        ModelConfig(act="gelu")
    for row in [(8, 3, 2, 1, 0, 0), (8, 3, 0, 1, 0), (0, 3, 2, 1, 0), (8, 3, 2, -1, 0), (8, 3, 2, 1)]:
        with pytest.raises(ValueError, match="convs"):  # found in the config, not deep in a compile
            ModelConfig(convs=[row])
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({"name": "x", "colour": 3})
    assert ModelConfig.from_dict(dataclasses.asdict(FAST)) == FAST
    assert set(CONFIGS) >= {"reference", "fast", "tiny"}


@pytest.mark.parametrize("bits", [6, 8])
def test_pruning_bounds_the_worst_case_accumulator(bits):
    torch.manual_seed(0)
    model = SplitNet(dataclasses.replace(REFERENCE, accumulator_bits=bits))
    apply_pruning(model, bits)
    report = accumulator_bits(model)
    assert len(report) == 8  # 5 convs + 3 linears
    assert all(r["bits"] <= bits for r in report.values())
    # and the bound is not vacuous: without pruning the reference layers are far wider
    unpruned = accumulator_bits(SplitNet(REFERENCE))
    assert max(r["bits"] for r in unpruned.values()) > bits


ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(p for p in (ROOT / "checkpoints").glob("*.pt") if not p.name.endswith(".state.pt"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_checkpoint_describes_itself(path):
    """Every committed checkpoint rebuilds from its file alone as the config of its name in
    models.CONFIGS (a config edited after training would not deploy what was measured) and
    carries a complete deployed setting whose results files are committed. A float teacher
    (never deployed) only has to rebuild as its TEACHERS config."""
    _, ckpt = load_checkpoint(path, teacher_ok=True)  # strict: every weight matches the config the file names
    if ckpt.get("kind") == "teacher":
        assert TeacherConfig.from_dict(ckpt["model_config"]) in TEACHERS.values()
        return
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    assert cfg == CONFIGS[cfg.name], f"{path}: models.CONFIGS[{cfg.name!r}] changed since it was trained"
    d = deployment(ckpt, path)
    assert 0 < d["p_error"] < 1 and d["rounding_bits"] in range(0, 9)
    named = re.findall(r"results/[\w./-]*\w", d.get("source", ""))
    assert named and all((ROOT / n).exists() for n in named), f"{path}: its deployment names {named}"


CHECKPOINTS = sorted(p for p in (ROOT / "checkpoints").rglob("*.pt") if not p.name.endswith(".state.pt"))


@pytest.mark.parametrize("path", CHECKPOINTS, ids=lambda p: str(p.relative_to(ROOT / "checkpoints").with_suffix("")))
def test_a_checkpoint_deploys_the_p_error_its_search_chose(path):
    """A checkpoint, shipped or in training, whose deployment comes from a p_error search (its
    source starts with the search's JSON) holds the p_error that search wrote: a JSON moved, or
    overwritten by a later search of a copy, would leave it pointing at another result. (A
    source may mention a search it did not follow, as the reference's does, after other words.)"""
    d = read_checkpoint(path).get("deployment") or {}
    search = re.match(r"results/\S*p_error_search\S*\.json", d.get("source", ""))
    if search:
        assert json.loads((ROOT / search[0]).read_text())["p_error"] == d["p_error"], f"{path}: {search[0]}"


def test_every_shipped_model_is_found():
    assert {p.stem for p in SHIPPED} >= {"fast", "reference"}


def test_benchmark_by_default_covers_every_shipped_model():
    """`python benchmark.py` with no --configs prints the frontier of every shipped model: each
    checkpoint but the teacher is the file of one of its default rows."""
    import benchmark

    files = {benchmark.SETTINGS[c].get("model", c) for c in benchmark.BenchConfig().configs.split(",")}
    deployable = {p.stem for p in SHIPPED if load_checkpoint(p, teacher_ok=True)[1].get("kind") != "teacher"}
    assert deployable - files == set(), f"shipped but not in benchmark.py's default --configs: {sorted(deployable - files)}"
