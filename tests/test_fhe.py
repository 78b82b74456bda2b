"""Compilation, simulation, real FHE through the client / server artifacts, and the search."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import fhe_inference
from cli import UserError
from conftest import SHARED, TINY_G2, needs_dataset
from fhe import CompileOptions, clear_features, compile_checkpoint, compile_options, evaluate, quantized_logits
from models import TINY, conv_out
from p_error_search import SLACK_STEP, bisect_log, lower_within_cost, raise_within_cost, validate_down, validate_rebisecting, within
from provenance import hardware

# A very small p_error (over the ~450 PBS of the tiny circuit an error is ~1e-6 likely) and
# exact rounding: approximate rounding may be off by one at random, in FHE as in simulation.
TINY_FHE = ["--p-error", "1e-9", "--rounding-bits", "4", "--rounding-method", "exact", "--n-calib", "40"]


@pytest.fixture(scope="module")
def tiny_compiled(tiny_checkpoint, tiny_data_dir):
    o = CompileOptions(checkpoint=str(tiny_checkpoint), data_dir=str(tiny_data_dir), p_error=1e-9, rounding_bits=4, rounding_method="exact", n_calib=40)
    model, _, qm, report = compile_checkpoint(o)
    images, labels = data.stack(data.dataset("test", tiny_data_dir))
    return model, qm, report, images, labels


def test_cost_report(tiny_compiled, tiny_checkpoint, tiny_data_dir):
    _, _, r, _, _ = tiny_compiled
    assert sum(r["pbs_per_parameter"].values()) == r["pbs_count"]
    # without rounding: 8*4*4 conv activations + 16 hidden + 10 outputs, one lookup each
    # (exact rounding adds small lookups on top of these)
    o = CompileOptions(checkpoint=str(tiny_checkpoint), data_dir=str(tiny_data_dir), rounding_bits=0, n_calib=40)
    plain = compile_checkpoint(o)[3]
    assert plain["pbs_count"] == 8 * 4 * 4 + 16 + 10 < r["pbs_count"]
    assert r["key_sizes"]["bootstrap_keys"] > 0 and r["max_bit_width"] <= 10
    assert r["compile_seconds"] > 0 and len(r["layers"]) == 3
    # one row per layer's lookups; the rounded ones read the 4 bits asked for
    reads = r["lookup_reads"]
    assert [t["lookups"] for t in reads] == [8 * 4 * 4, 16, 10]
    assert all(t["bits"] == t["accumulator_bits"] - t["lsbs_removed"] for t in reads)
    assert {t["bits"] for t in reads if t["lsbs_removed"]} == {4}


def test_lookup_reads_subtract_the_rounded_bits():
    """The bits a lookup reads: its accumulator's width less what a rounding before it drops;
    a lookup with no rounding reads the whole accumulator. A read wider than --rounding-bits
    is reported, one at the asked width is not."""
    from concrete import fhe

    from fhe import lookup_reads, warn_if_wide_lookups

    table = fhe.LookupTable([v // 4 for v in range(2**10)])

    def f(x, y):
        return table[fhe.round_bit_pattern(x, lsbs_to_remove=3, exactness=fhe.Exactness.APPROXIMATE)], table[y]

    compiler = fhe.Compiler(f, {"x": "encrypted", "y": "encrypted"})
    circuit = compiler.compile([(np.array([0, 1000, 5]), np.array([0, 60])), (np.array([7, 3, 2]), np.array([1, 2]))])
    reads = sorted(lookup_reads(circuit), key=lambda r: -r["bits"])  # two independent lookups: either may come first
    assert reads == [{"lookups": 3, "accumulator_bits": 10, "lsbs_removed": 3, "bits": 7},
                     {"lookups": 2, "accumulator_bits": 6, "lsbs_removed": 0, "bits": 6}]
    assert sum(r["lookups"] for r in reads) == circuit.statistics["programmable_bootstrap_count"]
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        warn_if_wide_lookups(reads, 7)
        warn_if_wide_lookups(reads, 0)  # no rounding asked for: nothing to compare with
    assert buf.getvalue() == ""
    with contextlib.redirect_stderr(buf):
        warn_if_wide_lookups(reads, 6)
    assert buf.getvalue().startswith("warning: 3 lookups read 7 bits, more than --rounding-bits 6:")
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        warn_if_wide_lookups(reads, 5)  # an unrounded lookup wider than asked counts too
        warn_if_wide_lookups(reads, 5)  # the same reads again (the next compile of a search): said once
    assert buf.getvalue().startswith("warning: 5 lookups read 6, 7 bits, more than --rounding-bits 5:")
    assert buf.getvalue().count("warning:") == 1


def test_fitting_the_lookups_to_the_rounding_bits(tiny_checkpoint, tiny_data_dir):
    """The tiny model's output layer compiles to a 5-bit accumulator that Concrete ML calibrated
    within 4 bits, so at --rounding-bits 4 its lookups read 5 unrounded; fitted, every lookup
    reads 4 and the clear quantized model drops the same bits as the circuit."""
    from checkpoints import load_checkpoint
    from fhe import calibration_set, compile_model, lookup_reads

    o = CompileOptions(checkpoint=str(tiny_checkpoint), data_dir=str(tiny_data_dir), p_error=1e-9, rounding_bits=4, rounding_method="exact", n_calib=40)
    model, _ = load_checkpoint(o.checkpoint)
    calib = calibration_set(model, o)
    plain = compile_model(model, calib, o)
    wide = lookup_reads(plain.fhe_circuit)
    assert wide[-1] == {"lookups": 10, "accumulator_bits": 5, "lsbs_removed": 0, "bits": 5}
    qm = compile_model(model, calib, compile_options(o, fit_lookups=True))
    fitted = lookup_reads(qm.fhe_circuit)
    assert [t["lookups"] for t in fitted] == [t["lookups"] for t in wide] and {t["bits"] for t in fitted} == {4}
    assert fitted[-1]["lsbs_removed"] == 1 and fitted[:-1] == wide[:-1]
    feats = clear_features(model, data.stack(data.dataset("test", tiny_data_dir))[0])
    disable = quantized_logits(qm, feats, "disable")
    assert (disable != quantized_logits(plain, feats, "disable")).any()  # the clear model rounds the output layer too
    assert (quantized_logits(qm, feats, "simulate").argmax(1) == disable.argmax(1)).mean() >= 0.9


def test_without_rounding_there_is_nothing_to_fit():
    """A deployed fit is dropped (and recorded as off) where --rounding-bits 0 turns rounding
    off; asking for a fit without rounding, on the command line or through the checkpoint's
    rounding, is refused."""
    from fhe import resolve_settings

    deployed = {"p_error": 0.05, "rounding_bits": 6, "rounding_method": "approximate", "fit_lookups": True}
    assert resolve_settings(CompileOptions(checkpoint="m.pt"), {"deployment": deployed})["fit_lookups"] is True
    assert resolve_settings(CompileOptions(checkpoint="m.pt", rounding_bits=0), {"deployment": deployed})["fit_lookups"] is False
    with pytest.raises(UserError, match="no width to fit to"):
        resolve_settings(CompileOptions(checkpoint="m.pt", fit_lookups=True), {"deployment": {**deployed, "rounding_bits": 0}})


def test_a_searched_fit_is_stored_and_followed(tiny_checkpoint, tiny_data_dir, tmp_path):
    """p_error_search --fit-lookups --write stores the fit in the checkpoint's deployment; a
    compile that gives no --fit-lookups follows it, --no-fit-lookups overrides it, and a
    checkpoint that stores none (written before the setting existed) compiles unfitted."""
    import shutil

    import p_error_search
    from checkpoints import read_checkpoint
    from fhe import lookup_reads

    path = tmp_path / "tiny.pt"
    shutil.copy(tiny_checkpoint, path)
    args = ["--checkpoint", str(path), "--data-dir", str(tiny_data_dir), "--rounding-bits", "4", "--rounding-method", "exact",
            "--n-calib", "40", "--n-images", "20", "--tolerance", "1", "--n-validation", "0"]
    p_error_search.main(args + ["--fit-lookups", "--write", "--json", str(tmp_path / "fit.json")])
    assert read_checkpoint(path)["deployment"]["fit_lookups"] is True

    def bits(**given):
        _, _, qm, report = compile_checkpoint(CompileOptions(checkpoint=str(path), data_dir=str(tiny_data_dir), n_calib=40, **given))
        return report["settings"]["fit_lookups"], max(r["bits"] for r in lookup_reads(qm.fhe_circuit))

    assert bits() == (True, 4)
    assert bits(fit_lookups=False) == (False, 5)
    p_error_search.main(args + ["--no-fit-lookups", "--write", "--json", str(tmp_path / "plain.json")])
    assert bits() == (False, 5)
    ckpt = read_checkpoint(path)
    del ckpt["deployment"]["fit_lookups"]
    torch.save(ckpt, path)
    assert bits() == (False, 5)


def test_infer_vl_on_tiny_data(tiny_checkpoint, tiny_data_dir, tmp_path):
    """The script end to end: at a negligible p_error and exact rounding, simulation is the
    clear quantized model exactly; the JSON holds what the screen said."""
    import infer_vl

    out = tmp_path / "sim.json"
    r = infer_vl.main(["--checkpoint", str(tiny_checkpoint), "--data-dir", str(tiny_data_dir), "--batch-size", "7", "--json", str(out)] + TINY_FHE)
    n = len(data.dataset("test", tiny_data_dir))
    assert r["n_images"] == n and r["simulate"] == r["disable"]
    d = r["sim_minus_torch_top1"]
    assert d["diff"] == pytest.approx(r["simulate"]["top1"] - r["torch"]["top1"]) and d["standard_error"] >= 0
    assert json.loads(out.read_text())["simulate"] == r["simulate"]


def test_paired_difference_and_intervals():
    from metrics import paired_difference, proportion_ci, spread

    a, b = [0, 1, 2, 0], [0, 1, 1, 1]  # predictions: a right on 4 of 4, b on 2
    d = paired_difference(a, b, [0, 1, 2, 0])
    assert d["diff"] == 0.5 and d["standard_error"] == pytest.approx(np.std([0, 0, 1, 1], ddof=1) / 2)
    assert paired_difference(a[:1], b[:1], [0]) == {"diff": 0.0, "standard_error": None}
    lo, hi = proportion_ci(80, 100)
    assert 0.711 < lo < 0.712 and 0.866 < hi < 0.867  # Wilson interval of 80/100
    s = spread([0.70, 0.72, 0.74])
    assert s["mean"] == pytest.approx(0.72) and s["sd"] == pytest.approx(0.02) and (s["min"], s["max"]) == (0.70, 0.74)


def test_strided_inputs_are_scrambled_without_the_guard(tiny_compiled):
    """Concrete's simulator reads raw buffers and ignores strides: the same values in a
    channels-last view simulate to other logits (while fhe="disable" looks right), unless
    they go through the project's guard (quantized_logits -> to_concrete)."""
    model, qm, _, images, _ = tiny_compiled
    feats = clear_features(model, images)
    strided = np.ascontiguousarray(feats.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    assert not strided.flags["C_CONTIGUOUS"] and np.array_equal(strided, feats)
    expected = qm.forward(feats, fhe="simulate")
    assert not np.array_equal(qm.forward(strided, fhe="simulate"), expected), "Concrete now honours strides: the guard may go"
    assert np.array_equal(qm.forward(strided, fhe="disable"), qm.forward(feats, fhe="disable"))
    assert np.array_equal(quantized_logits(qm, strided, "simulate"), expected)
    # the clear part run in channels-last memory format still hands Concrete the right array
    model_cl = model.to(memory_format=torch.channels_last)
    feats_cl = clear_features(model_cl, images.to(memory_format=torch.channels_last))
    model.to(memory_format=torch.contiguous_format)
    assert np.array_equal(quantized_logits(qm, feats_cl, "simulate"), expected)


def test_simulation_is_deterministic_at_tiny_p_error(tiny_compiled):
    """What makes "FHE == simulation" below a meaningful check rather than luck."""
    model, qm, _, images, _ = tiny_compiled
    feats = clear_features(model, images)
    assert np.array_equal(qm.forward(feats, fhe="simulate"), qm.forward(feats, fhe="simulate"))


def test_real_fhe_client_server_equals_simulation(tiny_checkpoint, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "fhe"
    args = ["--checkpoint", str(tiny_checkpoint), "--data-dir", str(tiny_data_dir), "--n-images", "2", "--out-dir", str(out), *TINY_FHE]
    summary = fhe_inference.main(args)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [int(r["index"]) for r in rows] == [0, 1]
    for r in rows:
        # integers decrypted from FHE equal the simulated ones exactly, so the logits do too
        assert r["fhe_logits"] == r["sim_logits"] and r["fhe_pred"] == r["sim_pred"]
        assert float(r["server_s"]) > 0 and int(r["input_bytes"]) > 0
    assert summary["fhe_sim_agreement"] == 1.0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["config"]["p_error"] == 1e-9 and meta["hardware"]["cores"] and "concrete-ml" in meta["versions"] and "code" in meta
    # the server holds the compiled model and the evaluation keys, nothing else
    assert sorted(p.name for p in (out / "server").iterdir()) == ["evaluation_keys.bin", "server.zip"]
    assert not any("key" in n.lower() for n in zipfile.ZipFile(out / "server" / "server.zip").namelist())
    assert any((out / "client" / "keys").rglob("*")), "the secret key stays in the client's directory"
    # a rerun with the same settings skips what is done; other settings are refused
    capsys.readouterr()
    base = args[: args.index("--p-error")]
    fhe_inference.main([a if a != "2" else "3" for a in base] + TINY_FHE)
    assert "2 images already" in capsys.readouterr().out
    assert len(list(csv.DictReader(open(out / "predictions.csv")))) == 3
    from cli import UserError

    with pytest.raises(UserError, match="other settings"):
        fhe_inference.main(base + ["--p-error", "1e-6", "--rounding-bits", "4", "--rounding-method", "exact", "--n-calib", "40"])
    # the statistics of a run cut off after 2 of its 3 images, without running anything
    lines = (out / "predictions.csv").read_text().splitlines(keepends=True)
    (out / "predictions.csv").write_text("".join(lines[:3]))
    part = fhe_inference.main(base + TINY_FHE + ["--summary-only"])
    assert (part["n_images"], part["images_requested"], part["complete"]) == (2, 3, False)
    assert json.loads((out / "metadata.json").read_text())["summary"] == json.loads(json.dumps(part))
    assert "partial: 2 of 3 requested" in capsys.readouterr().out
    with pytest.raises(UserError, match="no finished image"):
        fhe_inference.main(args[:-len(TINY_FHE)] + TINY_FHE + ["--summary-only", "--out-dir", str(tmp_path / "empty")])


def test_search_finds_a_known_threshold():
    threshold = 0.0123
    calls = []

    def accuracy_at(p):
        calls.append(p)
        return 0.90 if p <= threshold else 0.50

    chosen, trace = bisect_log(accuracy_at, reference=0.90, tolerance=0.01, lower=1e-6, upper=0.5, max_iter=14)
    assert threshold / 1.01 < chosen <= threshold
    assert len(calls) == 16 and all(ok == (p <= threshold) for p, _, ok in trace)
    assert bisect_log(lambda p: 0.9, 0.9, 0.01, 1e-6, 0.5, 5)[0] == 0.5  # everything passes: upper
    assert bisect_log(lambda p: 0.1, 0.9, 0.01, 1e-6, 0.5, 5)[0] is None  # nothing passes


def test_validation_steps_down_past_a_lucky_pass():
    """The bisection's few draws passed 0.4 and 0.2 by luck: their validations lose more than the
    tolerance, so the next passing value, 0.1, is the one kept; failed values are never tried."""
    trace = [(0.5, 0.80, False), (1e-6, 0.90, True), (0.1, 0.90, True), (0.4, 0.90, True), (0.2, 0.90, True), (0.3, 0.80, False)]
    true_drop = {0.4: 0.03, 0.2: 0.012, 0.1: 0.004, 1e-6: 0.0}
    tried = []

    def drops_at(p):
        tried.append(p)
        return [true_drop[p] - 0.002, true_drop[p] + 0.002]

    chosen, validations = validate_down(drops_at, trace, tolerance=0.01)
    assert chosen == 0.1 and tried == [0.4, 0.2, 0.1]
    assert [v["p_error"] for v in validations] == tried and validations[-1]["runs"] == 2
    assert validations[0]["mean_drop"] == pytest.approx(0.03) and validations[0]["max_drop"] == pytest.approx(0.032)
    assert validate_down(drops_at, trace, tolerance=-1)[0] is None  # none holds
    assert validate_down(lambda p: [], trace, tolerance=0.01)[0] == 0.4  # no validation: the largest pass
    # a top-1 is k / n: 10 images lost in 1,000 is a drop of exactly the tolerance, which holds
    assert 0.851 - 0.841 > 0.01 and validate_down(lambda p: [0.851 - 0.845, 0.851 - 0.837], trace, tolerance=0.01)[0] == 0.4
    assert bisect_log(lambda p: 0.841, 0.851, 0.01, 1e-6, 0.5, 5)[0] == 0.5


def test_a_lucky_upper_is_bisected_again_below():
    """Step 11's search: --upper 0.5 passed its 2 draws, so the bisection tried nothing lower, and
    0.5 failed its 20-draw validation. The true drop grows past the tolerance above 0.3: a new
    bisection from one step below 0.5 (on draws that are right) finds the largest value under 0.3,
    which holds its validation."""
    threshold = 0.3

    def true_drop(p):
        return 0.004 if p <= threshold else 0.02

    def accuracy_at(p):  # after the lucky first draw, the draws show the true drop
        return 0.90 - (0.0 if p == 0.5 else true_drop(p))

    uppers, tried = [], []

    def bisect_below(upper):
        uppers.append(upper)
        return bisect_log(accuracy_at, 0.90, 0.01, 1e-6, upper, max_iter=10)

    def drops_at(p):
        tried.append(p)
        return [true_drop(p)] * 20

    first = bisect_log(accuracy_at, 0.90, 0.01, 1e-6, 0.5, max_iter=10)
    assert first[0] == 0.5 and len(first[1]) == 1  # nothing below was looked at
    chosen, trace, validations = validate_rebisecting(drops_at, bisect_below, first[1], tolerance=0.01, lower=1e-6)
    assert uppers == [pytest.approx(0.5 * SLACK_STEP)] and tried[0] == 0.5
    assert threshold / 1.01 < chosen <= threshold and tried[-1] == chosen
    assert [v["p_error"] for v in validations] == tried and len(trace) > len(first[1])
    assert within(validations[-1]["mean_drop"], 0.01) and not within(validations[0]["mean_drop"], 0.01)
    # off (rounds=0, as with --from-search) or nothing holding anywhere: none, after at most the rounds allowed
    assert validate_rebisecting(drops_at, bisect_below, first[1], 0.01, 1e-6, rounds=0)[0] is None
    lucky = []  # every bisection passes its --upper by luck, every validation fails

    def lucky_below(upper):
        lucky.append(upper)
        return bisect_log(lambda p: 0.90, 0.90, 0.01, 1e-6, upper, max_iter=10)

    assert validate_rebisecting(lambda p: [0.05], lucky_below, first[1], 0.01, 1e-6, rounds=3)[0] is None
    assert lucky == pytest.approx([0.5 * SLACK_STEP ** k for k in (1, 2, 3)])


def test_cost_slack_walks_down_while_the_cost_holds():
    """Flat complexity down to 0.05, 5 % more down to 0.01 (a few more LWE dimensions), then a
    level up: a 10 % slack keeps the last step above 0.01, a 1 % slack the last above 0.05."""
    def complexity(p):
        return 1.0 if p > 0.05 else 1.05 if p > 0.01 else 1.6

    best, walk = lower_within_cost(complexity, 0.179, 0.1, 1e-6)
    assert 0.01 < best and best * SLACK_STEP <= 0.01
    assert [w["within_budget"] for w in walk] == [True] * (len(walk) - 1) + [False] and walk[-1]["complexity"] == 1.6
    assert walk[0] == {"p_error": 0.179, "complexity": 1.0, "within_budget": True}
    best, _ = lower_within_cost(complexity, 0.179, 0.01, 1e-6)
    assert 0.05 < best < 0.179 and best * SLACK_STEP <= 0.05
    assert lower_within_cost(lambda p: 1 / p, 0.1, 0.1, 1e-6)[0] == 0.1  # no step fits: the value found stays
    best, walk = lower_within_cost(lambda p: 1.0, 0.1, 0.1, 0.05)  # flat all the way: stops at --lower
    assert 0.05 <= best < 0.05 / SLACK_STEP and all(w["within_budget"] for w in walk)


def test_max_complexity_raises_p_error_to_the_smallest_value_within_the_cap():
    """Level 2 below 0.05, level 1 above, a smaller polynomial above 0.2 (as Concrete picked for
    fast10g_h256): the cap walks up from the value found in steps, then bisects the last step, and
    bounds the cost-slack walk down too."""
    def complexity(p):
        return 1.6 if p < 0.05 else 1.0 if p < 0.2 else 0.8

    p, walk = raise_within_cost(complexity, 0.01, 1.0, 0.5)
    assert 0.05 <= p < 0.05 * (1 / SLACK_STEP) ** (1 / 16) and complexity(p) <= 1.0  # within a 16th of a step of the boundary
    assert walk[0] == {"p_error": 0.01, "complexity": 1.6, "within_budget": False} and len(walk) == 1 + 6 + 4  # the value found, 6 steps up, 4 bisections
    stepped = [w["p_error"] for w in walk[: next(i for i, w in enumerate(walk) if w["within_budget"]) + 1]]
    assert all(b / a == pytest.approx(1 / SLACK_STEP) for a, b in zip(stepped, stepped[1:]))
    assert 0.2 <= raise_within_cost(complexity, 0.01, 0.9, 0.5)[0] < 0.21
    assert raise_within_cost(complexity, 0.1, 1.0, 0.5) == (0.1, [{"p_error": 0.1, "complexity": 1.0, "within_budget": True}])
    assert raise_within_cost(complexity, 0.01, 0.5, 0.5)[0] is None  # even --upper costs more
    assert raise_within_cost(complexity, 0.01, 0.8, 0.3)[0] is not None and raise_within_cost(complexity, 0.01, 0.8, 0.19)[0] is None
    # 1 % more below 0.09: within the slack walk's own 10 %, not within a cap of 0.5 % more
    def flatter(p):
        return complexity(p) * (1.01 if p < 0.09 else 1)

    assert lower_within_cost(flatter, 0.1, 0.1, 1e-6)[0] < 0.09 and lower_within_cost(flatter, 0.1, 0.1, 1e-6, cap=1.005)[0] == 0.1


def test_a_search_whose_only_pass_fails_validation_bisects_again(tiny_checkpoint, tiny_data_dir, tmp_path, monkeypatch):
    """The search's own wiring of the re-bisection, on the tiny circuit with scripted accuracies:
    --upper passes its one draw, loses 0.1 in both validation draws, and the search bisects again
    from one step below, where the value passes and holds (as step 11's search should have)."""
    import p_error_search

    scripted = iter([0.9,  # fhe="disable": the reference
                     0.9, 0.8, 0.8,  # --upper's draw, then its validation
                     0.9, 0.9, 0.9])  # one step below: its draw and its validation
    monkeypatch.setattr(p_error_search, "simulate_top1", lambda *a, **k: next(scripted))
    r = p_error_search.main(["--checkpoint", str(tiny_checkpoint), "--data-dir", str(tiny_data_dir), "--rounding-bits", "4",
                             "--rounding-method", "exact", "--n-calib", "40", "--n-images", "20", "--upper", "0.5", "--n-sim", "1",
                             "--n-validation", "2", "--tolerance", "0.05", "--json", str(tmp_path / "again.json")])
    assert r["p_error"] == pytest.approx(0.5 * p_error_search.SLACK_STEP) and next(scripted, None) is None
    assert [(t["p_error"], t["within_tolerance"]) for t in r["trace"]] == [(0.5, True), (pytest.approx(r["p_error"]), True)]
    assert [v["mean_drop"] for v in r["validations"]] == [pytest.approx(0.1), pytest.approx(0.0)]


def test_a_search_revalidated_from_its_json(tiny_checkpoint, tiny_data_dir, tmp_path, monkeypatch):
    """--from-search takes the earlier bisection's accuracies, judges them against this
    --tolerance and validates from the largest passing value down; a search of other images or
    other weights is refused."""
    import p_error_search

    args = ["--checkpoint", str(tiny_checkpoint), "--data-dir", str(tiny_data_dir), "--rounding-bits", "4",
            "--rounding-method", "exact", "--n-calib", "40", "--n-images", "20"]
    first = p_error_search.main(args + ["--tolerance", "1", "--n-validation", "0", "--json", str(tmp_path / "first.json")])
    ref = first["reference_top1"]
    earlier = json.loads((tmp_path / "first.json").read_text())
    earlier["trace"] = [{"p_error": p, "top1": a, "within_tolerance": True}  # flags are judged again
                        for p, a in [(0.3, ref - 0.6), (1e-6, ref), (1e-4, ref - 0.1)]]
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    again = args + ["--from-search", str(tmp_path / "earlier.json"), "--n-validation", "2", "--json", str(tmp_path / "again.json")]
    r = p_error_search.main(again + ["--tolerance", "0.5"])
    assert r["p_error"] == 1e-4 and [v["p_error"] for v in r["validations"]] == [1e-4] and r["validation"]["runs"] == 2
    assert [(t["p_error"], t["within_tolerance"]) for t in r["trace"]] == [(0.3, False), (1e-6, True), (1e-4, True)]
    assert r["trace_from"]["json"] == str(tmp_path / "earlier.json") and r["trace_from"]["command"] == first["command"]
    assert p_error_search.main(again + ["--tolerance", "0.05"])["p_error"] == 1e-6  # 1e-4's drop of 0.1 fails now
    # revalidating a revalidation still names the bisection's own command, not the one before
    twice = p_error_search.main(args + ["--from-search", str(tmp_path / "again.json"), "--n-validation", "1", "--tolerance", "0.5",
                                        "--json", str(tmp_path / "twice.json")])
    assert twice["trace_from"] == r["trace_from"] and twice["trace"] == r["trace"]
    # --cost-slack walks down from 1e-4 to --lower (the tiny circuit's cost hardly moves) and keeps the lowest
    slack = p_error_search.main(again + ["--tolerance", "0.5", "--cost-slack", "10", "--lower", "1e-5", "--json", str(tmp_path / "slack.json")])
    assert 1e-5 <= slack["p_error"] < 1e-4 and slack["cost_slack"]["searched_p_error"] == 1e-4 and slack["cost_slack"]["kept"]
    assert slack["validations"][-1]["p_error"] == slack["p_error"] and slack["validation"]["runs"] == 2
    assert [w["p_error"] for w in slack["cost_slack"]["walk"] if w["within_budget"]][-1] == slack["p_error"]
    # --max-complexity: 1e-4's circuit costs more than the cap (the tiny circuit: 2.8e10 at 1e-4, 2.3e10 at 0.01, 2.1e10
    # at 0.05), so p_error rises to the smallest value within it, which is validated and kept whatever it loses
    capped = p_error_search.main(again + ["--tolerance", "0.5", "--max-complexity", "2.2e10", "--json", str(tmp_path / "capped.json")])
    walk = capped["max_complexity"]["walk"]
    assert capped["max_complexity"]["searched_p_error"] == 1e-4 and walk[0]["p_error"] == 1e-4 and not walk[0]["within_budget"]
    assert 0.01 < capped["p_error"] <= 0.05 and capped["max_complexity"]["p_error"] == capped["p_error"]
    assert min(w["p_error"] for w in walk if w["within_budget"]) == capped["p_error"]
    assert max(w["p_error"] for w in walk if not w["within_budget"]) < capped["p_error"]
    assert [v["p_error"] for v in capped["validations"]] == [capped["p_error"]] and capped["validation"]["runs"] == 2  # 1e-4 not validated
    with monkeypatch.context() as m:  # a cap that even --upper misses is refused before any simulation, nothing written
        m.setattr(p_error_search, "simulate_top1", lambda *a, **k: pytest.fail("simulated before the cap was checked"))
        with pytest.raises(UserError, match="even --upper"):
            p_error_search.main(again + ["--max-complexity", "1e10", "--json", str(tmp_path / "over.json")])
    assert not (tmp_path / "over.json").exists()
    # --max-seconds caps the estimated seconds the same way (here an estimate proportional to the complexity)
    with monkeypatch.context() as m:
        m.setattr(p_error_search, "estimated_seconds", lambda circuit, p: circuit.statistics["complexity"] / 1e10)
        secs = p_error_search.main(again + ["--tolerance", "0.5", "--max-seconds", "2.2", "--json", str(tmp_path / "secs.json")])
        with pytest.raises(UserError, match="--max-seconds 1: even --upper"):
            p_error_search.main(again + ["--max-seconds", "1", "--json", str(tmp_path / "over.json")])
    assert secs["p_error"] == capped["p_error"] and secs["max_seconds"]["max_seconds"] == 2.2 and "max_complexity" not in secs
    assert secs["cost"] == {"seconds": pytest.approx(capped["cost"]["complexity"] / 1e10), "cap": 2.2} and "cost" not in slack
    assert capped["cost"]["complexity"] == next(w["complexity"] for w in walk if w["p_error"] == capped["p_error"]) <= 2.2e10
    assert [(w["p_error"], w["seconds"]) for w in secs["max_seconds"]["walk"]] == [
        (w["p_error"], pytest.approx(w["complexity"] / 1e10)) for w in walk]
    with monkeypatch.context() as m:  # a circuit the estimator cannot price is over any cap
        m.setattr(p_error_search, "estimate_fhe_seconds", lambda stats, inputs, compressed: (None, [{"note": "no synthetic lookup"}], {}, {}))
        from pbs_cost import synthetic_circuit

        assert p_error_search.estimated_seconds(synthetic_circuit(5, 0.05, 4), 0.05) == math.inf

    def compile_model(*a, **k):
        raise AssertionError("compiled before the earlier search was checked")

    with monkeypatch.context() as m:
        m.setattr(p_error_search, "compile_model", compile_model)
        with pytest.raises(UserError, match="--n-images 20 there"):
            p_error_search.main(again + ["--n-images", "10"])
        with pytest.raises(UserError, match="--fit-lookups False there"):
            p_error_search.main(again + ["--fit-lookups"])
    earlier["reference_top1"] = ref - 0.05
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    (tmp_path / "again.json").unlink()
    with pytest.raises(UserError, match="other weights or other images"):
        p_error_search.main(again)
    assert not (tmp_path / "again.json").exists()


@needs_dataset
@pytest.mark.parametrize("rounding_bits,vs", [(7, "torch"), (6, "disable")])
def test_shipped_checkpoint_simulation(rounding_bits, vs):
    """Simulation stays within 1.5 points of torch with 7-bit rounding, and of the clear
    quantized model with the deployed 6-bit rounding (which itself costs ~1.5 points vs torch,
    see the README). Simulation is random (approximate rounding, p_error) and Concrete's
    simulator cannot be seeded: 1,000 images and the mean of 3 runs keep this from flaking."""
    ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / "fast.pt"
    o = CompileOptions(checkpoint=str(ckpt), data_dir=str(SHARED), p_error=0.05, rounding_bits=rounding_bits)
    model, _, qm, _ = compile_checkpoint(o)
    images, labels = data.stack(data.dataset("test", SHARED, n=1000))
    acc = evaluate(model, qm, images, labels, repeats=3)
    assert abs(acc["simulate_spread"]["top1"]["mean"] - acc[vs]["top1"]) <= 0.015


@needs_dataset
def test_shipped_reference_checkpoint_simulation():
    """The reference at its deployed setting (p_error 0.05, 6-bit approximate rounding) on the
    first 200 test images. Its simulation is noisy (about +-2 points from run to run on 500
    images, see results/p_error_search_reference.json), so the bounds leave room for that; a
    broken compile or a scrambled input (chance: 0.10 top-1) fails them by far."""
    ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / "reference.pt"
    o = CompileOptions(checkpoint=str(ckpt), data_dir=str(SHARED))  # its deployed setting, from the checkpoint
    model, _, qm, report = compile_checkpoint(o)
    assert report["max_bit_width"] <= model.cfg.accumulator_bits  # the pruning bound, compiled
    images, labels = data.stack(data.dataset("test", SHARED, n=200))
    assert (o.p_error, o.rounding_bits, o.rounding_method) == (0.05, 6, "approximate")
    acc = evaluate(model, qm, images, labels)
    assert acc["simulate"]["top1"] >= acc["torch"]["top1"] - 0.05
    assert acc["sim_vs_torch_agreement"] >= 0.7


def test_per_pbs_estimator_matches_parameters_and_measures():
    from pbs_cost import param_dict, per_pbs_seconds, synthetic_circuit

    circuit = synthetic_circuit(5, 0.05, 32)
    (param,) = circuit.statistics["programmable_bootstrap_count_per_parameter"]
    target = param_dict(param)
    cost = per_pbs_seconds(target, n=32, cache=False)
    assert cost["matched"]["polynomial_size"] == target["polynomial_size"] and cost["matched"]["level"] == target["level"]
    assert 0 < cost["seconds"] < 10
    # one multiply-add costs something, and far less than a PBS (a few k x N additions)
    assert 0 < cost["multiply_add_seconds"] < cost["seconds"] / 20
    # reading an input ciphertext, and expanding a compressed one from its seed, cost something, less than a PBS
    assert 0 < cost["input_read_seconds"] < cost["seconds"] and 0 < cost["input_expand_seconds"] < cost["seconds"]


def test_targets_that_one_synthetic_circuit_stands_for_share_its_measurement(monkeypatch):
    """A p_error walk compiles circuits a few LWE dimensions apart: each is scaled from the same
    synthetic measurement, made once per process, not once per target."""
    import pbs_cost
    from pbs_cost import param_dict, synthetic_circuit

    (param,) = synthetic_circuit(5, 0.05, 32).statistics["programmable_bootstrap_count_per_parameter"]
    target = param_dict(param)
    runs = []
    monkeypatch.setattr(pbs_cost, "_fastest_run", lambda circuit, x: runs.append(len(x)) or 1.0 + len(x) * 1e-4)
    pbs_cost._synthetic_costs.cache_clear()
    first = pbs_cost._measure(target, 32)
    measured = len(runs)
    second = pbs_cost._measure({**target, "input_lwe_dimension": target["input_lwe_dimension"] + 8}, 32)
    pbs_cost._synthetic_costs.cache_clear()
    assert measured >= 4 and len(runs) == measured and second["matched"] == first["matched"]
    assert second["seconds"] > first["seconds"]  # scaled by the cost model: a longer blind rotation


def test_multiply_add_cost_is_the_product_less_its_lookups_and_inputs(monkeypatch):
    """The product circuit's run less its lookups and the reading of its inputs, per
    multiply-add; when the timing noise hides the product, or the reading was not measured, the
    cost is unknown (the estimate then says it leaves it out) instead of 0."""
    import pbs_cost
    from pbs_cost import param_dict, synthetic_circuit

    monkeypatch.setattr(pbs_cost, "MULTIPLY_ADD_INPUTS", 16)
    monkeypatch.setattr(pbs_cost, "MULTIPLY_ADD_OUTPUTS", 4)
    (param,) = synthetic_circuit(5, 0.05, 4).statistics["programmable_bootstrap_count_per_parameter"]
    got, size = param_dict(param), param_dict(param)["glwe_dimension"] * param_dict(param)["polynomial_size"] + 1
    read = 0.01 / size  # per number of a ciphertext: 0.01 s per input
    monkeypatch.setattr(pbs_cost, "_fastest_run", lambda circuit, x: 1.0 + 16 * 0.01)  # 4 lookups of 0.25 s, 16 inputs read
    measured = pbs_cost._multiply_add_seconds(5, 0.05, got, 0.25, read, got)
    assert measured["multiply_add_seconds"] is None and "not measured" in measured["multiply_add_note"]
    monkeypatch.setattr(pbs_cost, "_fastest_run", lambda circuit, x: 1.64 + 16 * 0.01)
    measured = pbs_cost._multiply_add_seconds(5, 0.05, got, 0.25, read, got)
    assert measured["multiply_add_seconds"] == pytest.approx(0.64 / (16 * 4))
    measured = pbs_cost._multiply_add_seconds(5, 0.05, got, 0.25, None, got)
    assert measured["multiply_add_seconds"] is None and "reading an input was not measured" in measured["multiply_add_note"]


def test_estimate_adds_the_multiply_adds_and_the_inputs_to_the_lookups(monkeypatch):
    import pbs_cost
    from pbs_cost import estimate_fhe_seconds, input_ciphertexts, synthetic_circuit

    circuit = synthetic_circuit(5, 0.05, 4, m=8)
    stats = circuit.statistics
    assert stats["clear_multiplication_count"] == 32 and stats["programmable_bootstrap_count"] == 4
    assert input_ciphertexts(circuit) == (8, False)  # 8 plain inputs: read, nothing to expand
    assert input_ciphertexts(pbs_cost.inputs_circuit(5, 0.05, 8, compress=True)) == (8, True)
    cost = {"seconds": 0.5, "multiply_add_seconds": 0.01, "input_read_seconds": 0.002, "input_expand_seconds": 0.001}
    monkeypatch.setattr(pbs_cost, "per_pbs_seconds", lambda p, cache: cost)
    total, parts, linear, inputs = estimate_fhe_seconds(stats, 8, compressed=True)
    assert [p["pbs"] for p in parts] == [4] and linear["multiply_adds"] == 32
    assert linear["seconds"] == pytest.approx(0.32) and inputs["seconds"] == pytest.approx(8 * 0.003)
    assert total == pytest.approx(4 * 0.5 + 0.32 + 8 * 0.003)
    total, _, _, inputs = estimate_fhe_seconds(stats, 8, compressed=False)  # read, not expanded
    assert inputs["seconds"] == pytest.approx(8 * 0.002) and total == pytest.approx(4 * 0.5 + 0.32 + 8 * 0.002)
    monkeypatch.setattr(pbs_cost, "per_pbs_seconds", lambda p, cache: {"seconds": 0.5, "multiply_add_seconds": None, "input_read_seconds": None, "input_expand_seconds": 0.001})
    total, _, linear, inputs = estimate_fhe_seconds(stats, 8, compressed=True)
    assert total == pytest.approx(2.0 + 8 * 0.001) and "leaves it out" in linear["note"]
    assert "reading the input ciphertexts was not measured" in inputs["note"]


def test_input_costs_are_differences_of_runs(monkeypatch):
    """Reading: the plain circuit on many inputs less the same on few, per input more.
    Expansion: the many compressed less the many plain, per input. Each scaled to the target by
    the ciphertexts' size; a difference lost in the timing noise is no figure rather than 0 s."""
    import pbs_cost
    from pbs_cost import inputs_circuit, param_dict

    plain = inputs_circuit(5, 0.05, 8, compress=False)
    (param,) = plain.statistics["programmable_bootstrap_count_per_parameter"]
    own = param_dict(param)  # the inputs are ciphertexts of k N + 1 numbers of 8 bytes
    assert plain.statistics["size_of_inputs"] == 8 * 8 * (own["glwe_dimension"] * own["polynomial_size"] + 1)
    runs = {(False, 2): 0.4, (False, 8): 1.0, (True, 8): 1.3}
    fake = lambda circuit, x: runs[(circuit.configuration.compress_input_ciphertexts, len(x))]  # noqa: E731
    monkeypatch.setattr(pbs_cost, "_fastest_run", fake)
    got = pbs_cost._input_seconds(5, 0.05, own, m=8, few=2)
    assert got["input_read_seconds"] == pytest.approx(0.6 / 6) and got["input_expand_seconds"] == pytest.approx(0.3 / 8)
    assert got["read_per_number"] == pytest.approx(0.6 / 6 / (own["glwe_dimension"] * own["polynomial_size"] + 1))
    twice = {**own, "glwe_dimension": 2 * own["glwe_dimension"]}
    scale = (2 * own["glwe_dimension"] * own["polynomial_size"] + 1) / (own["glwe_dimension"] * own["polynomial_size"] + 1)
    assert pbs_cost._input_seconds(5, 0.05, twice, m=8, few=2)["input_expand_seconds"] == pytest.approx(0.3 / 8 * scale)
    runs[(True, 8)] = 0.99
    got = pbs_cost._input_seconds(5, 0.05, own, m=8, few=2)
    assert got["input_expand_seconds"] is None and "compressed inputs added no measurable time" in got["input_note"]
    assert got["input_read_seconds"] == pytest.approx(0.1)
    runs[(False, 2)] = 1.01
    got = pbs_cost._input_seconds(5, 0.05, own, m=8, few=2)
    assert got["input_read_seconds"] is None and got["read_per_number"] is None and "6 more plain inputs" in got["input_note"]
    monkeypatch.setattr(pbs_cost, "KEY_LIMIT_BYTES", 0)  # never a key generation it has not sized
    got = pbs_cost._input_seconds(5, 0.05, own, m=8, few=2)
    assert got["input_read_seconds"] is None and got["input_expand_seconds"] is None and "GiB: not measured" in got["input_note"]


def test_input_reading_tool_times_each_count_plain_and_compressed(tmp_path, monkeypatch, capsys):
    """tools/input_reading.py: one row per input count, the command and hardware in its JSON;
    a bad count is refused before any circuit is compiled."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))
    import input_reading as tool
    out = tmp_path / "sweep.json"
    rows = tool.main(["--inputs", "4,64", "--bits", "3", "--json", str(out)])
    assert [r["inputs"] for r in rows] == [4, 64] and all(r["plain_seconds"] > 0 and r["compressed_seconds"] > 0 for r in rows)
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["config"]["inputs"] == "4,64" and saved["command"] and saved["hardware"]["cpu"]
    assert "ms per input more (4 to 64 plain inputs)" in capsys.readouterr().out
    import pbs_cost

    monkeypatch.setattr(pbs_cost, "inputs_circuit", lambda *a, **k: pytest.fail("compiled before the options were checked"))
    for bad in (["--inputs", "4,x"], ["--inputs", "0"], ["--bits", "9"]):
        with pytest.raises(UserError):
            tool.main(bad)


def test_per_pbs_estimator_refuses_parameters_it_cannot_stand_for():
    """A (N, k) no synthetic lookup compiles to gets no estimate rather than a guess scaled
    from another ring size (the fault that once put a 4096-level-2 PBS at ~1 s)."""
    from pbs_cost import match_tier, per_pbs_seconds

    p = dict(polynomial_size=2048, glwe_dimension=1, level=1, input_lwe_dimension=800, base_log=23)
    assert match_tier(p, p) == 0
    assert match_tier(p, {**p, "level": 2}) == 1
    assert match_tier(p, {**p, "polynomial_size": 512, "glwe_dimension": 4}) == 2
    assert match_tier(p, {**p, "polynomial_size": 4096}) is None
    cost = per_pbs_seconds({**p, "polynomial_size": 2**20}, n=16, cache=False)
    assert cost["seconds"] is None and cost["matched"] is None and "not estimated" in cost["note"]


def test_per_pbs_cost_is_cached_only_when_measured_on_an_idle_machine(monkeypatch, tmp_path, request):
    """A measurement taken while other work runs is slow; cached, it would inflate every later
    estimate on this machine (as a cached cost once put the fast model at 63 s, not 38 s)."""
    import os

    import pbs_cost

    # a cache of its own: the session's shared one may already hold costs that earlier tests
    # measured on an idle machine (CI once failed here on such a file)
    monkeypatch.setenv("CIFAR10_CACHE", str(tmp_path))

    calls = []
    monkeypatch.setattr(pbs_cost, "_measure", lambda target, n: calls.append(target) or {"seconds": 0.01})
    pbs_cost._per_pbs_seconds.cache_clear()
    request.addfinalizer(pbs_cost._per_pbs_seconds.cache_clear)  # no patched cost left for later tests
    target = dict(polynomial_size=2048, glwe_dimension=1, level=2, input_lwe_dimension=769, base_log=15)
    monkeypatch.setattr(pbs_cost, "busy_cores", lambda: 1.0 * (os.cpu_count() or 1))
    busy = pbs_cost.per_pbs_seconds(target)
    assert busy["seconds"] == 0.01 and "busy" in busy["note"] and not pbs_cost._cache_path().exists()
    # within one process a cost is measured once, and keeps the load of its measurement
    monkeypatch.setattr(pbs_cost, "busy_cores", lambda: 0.0)
    assert "busy" in pbs_cost.per_pbs_seconds(target)["note"] and len(calls) == 1
    pbs_cost._per_pbs_seconds.cache_clear()  # a new process
    assert pbs_cost.per_pbs_seconds(target) == {"seconds": 0.01} and len(calls) == 2  # measured again, and kept
    pbs_cost._per_pbs_seconds.cache_clear()
    assert pbs_cost.per_pbs_seconds(target) == {"seconds": 0.01} and len(calls) == 2  # from the disk cache
    # the benchmark measures uncached: a busy machine is named there too, an idle one is not
    assert pbs_cost.per_pbs_seconds(target, cache=False) == {"seconds": 0.01} and len(calls) == 3
    pbs_cost._per_pbs_seconds.cache_clear()
    monkeypatch.setattr(pbs_cost, "busy_cores", lambda: 1.0 * (os.cpu_count() or 1))
    assert "busy" in pbs_cost.per_pbs_seconds(target, cache=False)["note"] and len(calls) == 4


def test_busy_cores_counts_use_during_its_sample_not_before(monkeypatch):
    """The benchmark measures right after its own simulations: a 1-minute load average still
    counted them and called every such measurement busy. busy_cores reads CPU time over its
    own sample: two /proc/stat readings 1 busy core-second apart on a 2-core machine over 1 s
    of wall time (2 core-seconds in all) mean 1 core in use."""
    import os

    import pbs_cost

    readings = iter([(1000, 5000), (1100, 5200)])  # busy +100 of total +200 jiffies
    monkeypatch.setattr(pbs_cost, "_cpu_jiffies", lambda: next(readings))
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 9.0, 9.0))  # a busy past minute that must not count
    assert pbs_cost.busy_cores(sample_s=0) == pytest.approx(1.0)


def test_cpu_jiffies_reads_this_machine():
    import os

    import pbs_cost

    got = pbs_cost._cpu_jiffies()
    if got is None:
        pytest.skip("no /proc/stat here")
    busy, total = got
    assert 0 < busy < total
    assert 0 <= pbs_cost.busy_cores(sample_s=0.2) <= (os.cpu_count() or 1) + 0.1


@needs_dataset
@pytest.mark.slow
def test_the_default_model_under_real_fhe(tmp_path):
    """One test image through the default model at its deployed setting (about 10 s of FHE on 2
    cores): the checkpoint `make run` and every script use when given none."""
    from checkpoints import DEFAULT_CHECKPOINT

    ckpt = Path(__file__).resolve().parents[1] / DEFAULT_CHECKPOINT
    fhe_inference.main(["--checkpoint", str(ckpt), "--data-dir", str(SHARED), "--n-images", "1", "--out-dir", str(tmp_path)])
    (row,) = csv.DictReader(open(tmp_path / "predictions.csv"))
    fhe_logits = np.array(row["fhe_logits"].split(), dtype=float)
    sim_logits = np.array(row["sim_logits"].split(), dtype=float)
    # approximate rounding and p_error make both noisy, but they are the same computation
    assert np.corrcoef(fhe_logits, sim_logits)[0, 1] > 0.9


def test_benchmark_frontier_on_the_tiny_model(tiny_checkpoint, tiny_data_dir, tmp_path, capfd):
    import benchmark
    import frontier

    out, plot = tmp_path / "bench.json", tmp_path / "frontier.png"
    args = ["--configs", "tiny", "--checkpoint-dir", str(tiny_checkpoint.parent), "--data-dir", str(tiny_data_dir),
            "--n-images", "20", "--repeats", "2", "--n-fhe", "1", "--json", str(out), "--plot", str(plot)]
    (row,) = benchmark.main(args)
    assert len(row["sim_top1_draws"]) == 2 and row["sim_top1"] == pytest.approx(np.mean(row["sim_top1_draws"]))
    assert row["fhe_s_median"] > 0 and row["cores"] >= 1 and row["n_images"] == 20
    assert row["complexity"] > 0  # the number p_error_search.py --max-complexity caps
    linear = row["estimate_multiply_adds"]  # the tiny model's encrypted conv and linear layers
    assert linear["multiply_adds"] == row["multiply_add_count"] > 0 and linear["seconds"] > 0
    inputs = row["estimate_inputs"]  # Concrete ML compresses the inputs: the server reads and expands each
    side = conv_out(TINY.image_size, *TINY.clear_conv[1:], TINY.clear_pool)
    assert inputs["encrypted_inputs"] == TINY.clear_conv[0] * side**2 and inputs["compressed"]
    assert inputs["read_seconds"] > 0 and inputs["expand_seconds"] > 0
    assert inputs["seconds"] == pytest.approx(inputs["read_seconds"] + inputs["expand_seconds"])
    assert row["fhe_s_estimate"] == pytest.approx(sum(p["pbs"] * p["seconds"] for p in row["estimate_parts"]) + linear["seconds"] + inputs["seconds"])
    printed, progress = capfd.readouterr()
    # the config's own process (simulation draws, FHE images) reports its progress as it runs
    assert "simulate 2/2" in progress and "tiny: image 1/1 in FHE" in progress
    assert f"{row['multiply_add_count']:,}" in printed.split("multiply-adds per image")[1].splitlines()[0]
    assert [t["lookups"] for t in row["lookup_reads"]] == [8 * 4 * 4, 16, 10]  # the tiny model's three layers
    assert frontier.fmt_reads(row) in printed.split("lookups x bits they read")[1].splitlines()[0]
    assert f"{row['fhe_s_median'] * row['cores']:,.0f}" in printed.split("core-seconds / image")[1].splitlines()[0]
    front = [l for l in printed.split("frontier")[1].splitlines()[2:] if l.startswith("  ")]
    assert row["cpu"] == hardware()["cpu"] and row["cores"] == len(os.sched_getaffinity(0))
    assert row["cpu_features"] == hardware()["cpu_features"]
    assert [l.split()[0] for l in front if f"({frontier.machine(row)})" in l] == ["tiny"]
    assert sum("published" in l for l in front) == len(frontier.PUBLISHED)
    secs = [float(l.split()[-3].replace(",", "")) for l in front]
    assert secs == sorted(secs)  # fastest first
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot.unlink()
    assert benchmark.main(["--from-json", str(out), "--plot", str(plot)]) == json.loads(out.read_text())["rows"]
    assert plot.is_file()
    # rows of two result files side by side, each keeping its own images and draws
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**json.loads(out.read_text()), "rows": [{**row, "config": "tiny_again", "n_images": 7}]}))
    both = benchmark.main(["--from-json", f"{out},{other}", "--plot", str(plot)])
    assert [(r["config"], r["n_images"]) for r in both] == [("tiny", 20), ("tiny_again", 7)]
    # a file from before rows carried their CPU: its rows are labelled with the file's machine, not this one
    old = {**json.loads(out.read_text()), "hardware": {"cpu": "Intel(R) Xeon(R) Processor", "cores": 16, "cpu_features": ["avx2", "avx512f"]}}
    old["rows"] = [{k: v for k, v in row.items() if k not in ("cpu", "cores", "cpu_features")} | {"config": "tiny_old"}]
    (tmp_path / "old.json").write_text(json.dumps(old))
    capfd.readouterr()
    benchmark.main(["--from-json", f"{out},{tmp_path / 'old.json'}", "--plot", str(plot)])
    front = capfd.readouterr().out.split("frontier")[1]
    assert "tiny_old (Intel Xeon AVX-512, 16 cores)" in front and f"tiny ({frontier.machine(row)})" in front
    rerun = tmp_path / "rerun.json"  # the same config measured again: the later file's row replaces it
    rerun.write_text(json.dumps({**json.loads(out.read_text()), "rows": [{**row, "n_images": 9}]}))
    assert [(r["config"], r["n_images"]) for r in benchmark.main(["--from-json", f"{out},{other},{rerun}", "--plot", str(plot)])] == [
        ("tiny", 9), ("tiny_again", 7)]
    with pytest.raises(UserError, match="no such file"):
        benchmark.main(["--from-json", str(tmp_path / "none.json")])


def test_frontier_names_avx512_apart_from_cpus_of_the_same_name():
    """Two "AMD EPYC" machines here differed by AVX-512 and by a fifth in FHE seconds: their rows
    get different labels (and colours); a row that recorded no instruction sets keeps the name alone."""
    import frontier

    row = {"cpu": "AMD EPYC", "cores": 2}
    assert frontier.machine(row) == "AMD EPYC, 2 cores"
    assert frontier.machine({**row, "cpu_features": ["avx2"]}) == "AMD EPYC, 2 cores"
    assert frontier.machine({**row, "cpu_features": ["avx2", "avx512f", "avx512_bf16"]}) == "AMD EPYC AVX-512, 2 cores"


def test_frontier_input_columns_read_rows_from_before_the_reading_term():
    """A row whose input term held the expansion alone (before the reading was measured) shows
    its reading as n/a and that figure as its expansion."""
    import frontier

    read, expand = frontier.fmt_term("estimate_inputs", "read_seconds"), frontier.fmt_term("estimate_inputs", "expand_seconds")
    new = {"estimate_inputs": {"encrypted_inputs": 8, "compressed": True, "read_seconds": 1.23, "expand_seconds": 0.44, "seconds": 1.67}}
    old = {"estimate_inputs": {"compressed_inputs": 8, "seconds_each": 0.1, "seconds": 0.8}}
    assert (read(new), expand(new)) == ("1.2", "0.4") and (read(old), expand(old)) == ("n/a", "0.8")
    assert frontier.fmt_term("estimate_multiply_adds")({}) == "n/a"


def test_frontier_counts_lookups_by_the_bits_they_read():
    import frontier

    reads = [{"lookups": 432, "bits": 6}, {"lookups": 128, "bits": 7}, {"lookups": 10, "bits": 6}]
    assert frontier.fmt_reads({"lookup_reads": reads}) == "128 x 7, 442 x 6"
    assert frontier.fmt_reads({}) == "n/a"  # a row from before the benchmark recorded them


def spread_on_a_frontier_plot(points: list, xlim: tuple, names: list | None = None):
    """Markers at `points` on a log-scale axes like the frontier's, each with a name spread by
    frontier.spread_labels; the figure, its axes, the drawn boxes of the names and a renderer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import frontier

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(*zip(*points), "o")
    names = names or [f"model_{i}_name" for i in range(len(points))]
    labels = [ax.annotate(name, p, textcoords="offset points", xytext=(6, 4), fontsize=8) for name, p in zip(names, points)]
    ax.set_xscale("log")
    ax.set_xlim(*xlim)
    ax.set_ylim(0.55, 0.87)
    fig.tight_layout()
    frontier.spread_labels(fig, ax, labels, [], points)
    renderer = fig.canvas.get_renderer()
    return fig, ax, [label.get_window_extent(renderer) for label in labels], renderer


def test_frontier_labels_overlap_no_point_and_no_other_label():
    """Neighbouring models on the frontier plot (fast10w, fast10, fast10w_r5 lie within a second
    and 2 points of each other) keep their names readable and beside their own points."""
    import matplotlib.pyplot as plt

    points = [(6.4, 0.764), (12.1, 0.760), (12.9, 0.745), (13.4, 0.736), (33.1, 0.786), (36.0, 0.793)]
    fig, ax, boxes, _ = spread_on_a_frontier_plot(points, (3, 20000))
    assert_apart_and_beside(ax, boxes, points, [f"label {i}" for i in range(len(points))], beside_y_px=12)
    plt.close(fig)


def assert_apart_and_beside(ax, boxes, points, names, beside_y_px):
    """No drawn name overlaps another or a marker (~8 px), and each is beside its own point: its
    nearest edge within 12 px of the marker's centre across, within beside_y_px of it up and down."""
    from matplotlib.transforms import Bbox

    markers = [Bbox.from_bounds(x - 4, y - 4, 8, 8) for x, y in ax.transData.transform(points)]
    for i, box in enumerate(boxes):
        assert not any(box.overlaps(other) for other in boxes[:i] + boxes[i + 1:] + markers), names[i]
        x, y = ax.transData.transform(points[i])
        assert min(abs(box.x0 - x), abs(box.x1 - x)) < 12 and (box.y0 - beside_y_px < y < box.y1 + beside_y_px), names[i]


def test_frontier_labels_clear_a_neighbours_marker_just_above():
    """7 December's frontier: the default's long name, right of its point at 9.2 s, would cross
    fast_e80_kdw's marker just above it at 21.4 s, and on the left it leaves the axes; it goes one
    line higher, still beside its point, and no name overlaps another or a marker."""
    import matplotlib.pyplot as plt

    rows = [("fast10g_c128_2x80_kdw", 6.9, 0.7972), ("fast10g_kd", 8.4, 0.7653), ("fast10g_h256_2x80_kdw", 9.2, 0.8082),
            ("fast10w", 12.1, 0.7597), ("fast_e80_kdw", 21.4, 0.8097), ("fast", 33.1, 0.786)]
    points = [(x, y) for _, x, y in rows]
    names = [n for n, _, _ in rows]
    fig, ax, boxes, _ = spread_on_a_frontier_plot(points, (3.45, 20000), names=names)
    assert_apart_and_beside(ax, boxes, points, names, beside_y_px=20)
    plt.close(fig)


def test_frontier_labels_stay_inside_the_axes():
    """A model at an edge of the plot gets its name on the side that the axes do not cut off:
    the first place (right of the point) for the one on the left edge, a left one for the one
    on the right edge."""
    import matplotlib.pyplot as plt

    points = [(5.0, 0.78), (20000.0, 0.60)]  # on the left and the right edge of the axes
    fig, ax, boxes, renderer = spread_on_a_frontier_plot(points, (5.0, 20000))
    frame = ax.get_window_extent(renderer)
    for box in boxes:
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1, (box, frame)
    plt.close(fig)


def test_run_estimate_scales_to_the_servers_threads(monkeypatch, capsys):
    """The per-image cost is measured with this process's threads (2 here); two one-thread
    workers each take twice as long per image, so 10 images take 10 x 20 / 2 s, not 10 x 10 / 2."""
    from types import SimpleNamespace

    import fhe_inference

    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setattr(fhe_inference, "estimate_fhe_seconds", lambda stats, inputs, compressed: (10.0, [], {"multiply_adds": 0}, {"encrypted_inputs": inputs, "compressed": compressed}))
    monkeypatch.setattr(fhe_inference, "input_ciphertexts", lambda circuit: (0, False))
    qm = SimpleNamespace(fhe_circuit=SimpleNamespace(statistics={}))
    cfg = lambda **kw: fhe_inference.FHEConfig(yes=True, **kw)  # noqa: E731
    two_workers = fhe_inference.check_estimate(qm, {"pbs_count": 1}, 10, cfg(workers=2, threads_per_worker=1))
    assert two_workers["per_server_image_s"] == 20.0 and two_workers["run_s"] == 100.0
    assert "on 2 server(s) of 1 thread(s)" in capsys.readouterr().out
    in_process = fhe_inference.check_estimate(qm, {"pbs_count": 1}, 10, cfg())
    assert in_process["per_server_image_s"] == 10.0 and in_process["run_s"] == 100.0
    with pytest.raises(UserError, match="pass --yes"):
        fhe_inference.check_estimate(qm, {"pbs_count": 1}, 400, fhe_inference.FHEConfig(workers=2, threads_per_worker=1))


def test_grouped_conv_under_concrete(tiny_data_dir):
    """Concrete ML compiles an encrypted conv in groups: its clear quantized logits are the torch
    model's, and the conv costs half the multiply-adds of the same conv in one group (the
    linears' stay)."""
    from benchmark import untrained_compiled

    o = CompileOptions(data_dir=str(tiny_data_dir), p_error=1e-9, rounding_bits=0, n_calib=40)
    model, qm, report = untrained_compiled(TINY_G2, o, n_stats=60)
    plain = untrained_compiled(TINY, o, n_stats=60)[2]
    conv_macs = 8 * 4 * 4 * 9 * 8  # outputs x (kernel area x input channels), in one group
    assert plain["multiply_add_count"] - report["multiply_add_count"] == conv_macs // 2
    assert report["pbs_count"] == plain["pbs_count"]  # the same activations
    images, _ = data.stack(data.dataset("test", tiny_data_dir))
    feats = clear_features(model, images)
    concrete = quantized_logits(qm, feats, "disable")
    with torch.no_grad():
        logits = model.encrypted(torch.from_numpy(feats)).numpy()
    step = np.min(np.diff(np.unique(concrete)))  # Concrete quantizes the logits
    assert np.abs(logits - concrete).max() <= step
