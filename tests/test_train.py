"""QAT training on tiny data: one log line per epoch, self-describing checkpoints, resume,
and an accumulator bound that holds in the compiled circuit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import train
from checkpoints import load_checkpoint, save_checkpoint
from cli import UserError
from models import TEACHERS, TINY, SplitNet, TeacherNet, traced_teacher
from provenance import hardware


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


def test_checkpoint_gets_the_usual_file_mode(tiny_checkpoint):
    """Written through a temporary file, but readable as a plain open() would make it (a
    checkpoint on a shared cluster disk is read by other users' workers)."""
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(tiny_checkpoint).st_mode & 0o777 == 0o666 & ~umask


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
    # <out>.log: each run's start and config (the resume's appended), then each epoch's line once, as printed
    log = (tmp_path / "resumed.log").read_text().splitlines()
    assert [line.startswith("# ") for line in log].count(True) == 2 and hardware()["cpu"] in log[0]
    assert [("'resume': True" in line) for line in log if line.startswith("config:")] == [False, True]
    assert "resumed from" in log[log.index(next(line for line in log if "'resume': True" in line)) + 1]
    printed = [[str(r["epoch"])] + [f"{r[k]:.4f}" for k in ("loss", "train_acc", "val_acc")] for r in b["history"]]
    assert [line.split()[:4] for line in log if line.split()[0].isdigit()] == printed
    assert (tmp_path / "straight.log").read_text().count("\n# ") == 0
    # resumed again after its last epoch (a training queue run twice): nothing trained, its log untouched
    before = (tmp_path / "resumed.log").read_text()
    again = train.main(args + ["--epochs", "2", "--out", str(tmp_path / "resumed.pt"), "--resume"])
    assert [r["epoch"] for r in again["history"]] == [1, 2] and again["accumulators"] == result["accumulators"]
    assert (tmp_path / "resumed.log").read_text() == before and torch.load(tmp_path / "resumed.state.pt")["epoch"] == 2


def test_resume_without_state_fails_clearly(tmp_path, tiny_data_dir):
    with pytest.raises(UserError, match="no training state"):
        train.main(["--model", "tiny", "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "none.pt"), "--resume", "--val-size", "10"])


def test_distillation_loss():
    ce = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g), torch.arange(8) % 10
    torch.testing.assert_close(train.distillation_loss(s, t, y, 0.0, 4.0, ce), ce(s, y))  # labels only
    assert train.distillation_loss(t, t, y, 1.0, 4.0, ce).abs() < 1e-6  # the teacher itself: nothing to learn
    p_s, p_t = torch.softmax(s / 4, 1), torch.softmax(t / 4, 1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    torch.testing.assert_close(train.distillation_loss(s, t, y, 0.25, 4.0, ce), 0.75 * ce(s, y) + 0.25 * 16 * kl)
    # its gradient pulls the student's softened outputs toward the teacher's
    s = s.clone().requires_grad_(True)
    train.distillation_loss(s, t, y, 1.0, 2.0, ce).backward()
    with torch.no_grad():
        p = lambda z: torch.softmax(z / 2.0, 1)  # noqa: E731
        closer = (p(s - 0.1 * s.grad) - p(t)).abs().sum() < (p(s) - p(t)).abs().sum()
    assert closer


def test_teacher_trains_and_a_student_learns_from_it(tmp_path, tiny_data_dir, tiny_checkpoint):
    import infer_torch

    args = ["--data-dir", str(tiny_data_dir), "--val-size", "10", "--batch-size", "16", "--workers", "0", "--epochs", "1"]
    teacher = tmp_path / "teacher.pt"
    train.main(["--model", "resnet_tiny", "--out", str(teacher)] + args)
    _, ckpt = load_checkpoint(teacher, teacher_ok=True)
    assert ckpt["kind"] == "teacher" and "deployment" not in ckpt and "val_acc" in ckpt["metrics"]
    assert infer_torch.main(["--checkpoint", str(teacher), "--data-dir", str(tiny_data_dir)])["n_images"] > 0
    with pytest.raises(UserError, match="float teacher"):  # nothing compiles it for FHE
        load_checkpoint(teacher)
    # the same student, trained with and without the teacher's soft targets, ends up different
    train.main(["--model", "tiny", "--out", str(tmp_path / "plain.pt")] + args)
    train.main(["--model", "tiny", "--out", str(tmp_path / "kd.pt"), "--teacher", str(teacher), "--distill-alpha", "1"] + args)
    (_, plain), (_, kd) = load_checkpoint(tmp_path / "plain.pt"), load_checkpoint(tmp_path / "kd.pt")
    assert kd["distilled_from"]["path"] == str(teacher) and len(kd["distilled_from"]["sha256"]) == 64
    assert "distilled_from" not in plain
    assert any(not torch.equal(plain["model"][k], kd["model"][k]) for k in plain["model"])
    with pytest.raises(UserError, match="was trained with --teacher"):  # a resume keeps learning from the same teacher
        train.main(["--model", "tiny", "--out", str(tmp_path / "kd.pt"), "--resume"] + args[:-1] + ["2"])
    for bad, match in ((["--teacher", str(tiny_checkpoint)], "split model"), (["--teacher", str(tmp_path / "no.pt")], "no such file"),
                       (["--teacher", str(teacher), "--distill-alpha", "2"], "distill-alpha")):
        with pytest.raises(UserError, match=match):
            train.main(["--model", "tiny", "--out", str(tmp_path / "bad.pt")] + args + bad)
    assert not (tmp_path / "bad.pt").exists()


def test_init_starts_from_a_checkpoint_of_the_same_config(tmp_path, tiny_data_dir, tiny_checkpoint):
    """--init fine-tunes: one step at a negligible learning rate leaves the encrypted weights
    where the checkpoint had them (a fresh start does not), and the new checkpoint says so."""
    args = ["--model", "tiny", "--data-dir", str(tiny_data_dir), "--val-size", "10", "--batch-size", "16", "--workers", "0",
            "--epochs", "1", "--max-steps", "1", "--lr", "1e-12"]
    train.main(args + ["--init", str(tiny_checkpoint), "--out", str(tmp_path / "tuned.pt")])
    train.main(args + ["--out", str(tmp_path / "fresh.pt")])
    (base, _), (tuned, ckpt), (fresh, _) = (load_checkpoint(p) for p in (tiny_checkpoint, tmp_path / "tuned.pt", tmp_path / "fresh.pt"))
    weights = lambda m: [layer.weight for layer, _ in m.weight_layers()]  # noqa: E731
    for a, b, c in zip(weights(base), weights(tuned), weights(fresh)):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
        assert not torch.allclose(c, a, atol=1e-3)
    assert ckpt["init_from"]["path"] == str(tiny_checkpoint) and ckpt["init_from"]["epoch"] == 1
    with pytest.raises(UserError, match="layers differ"):
        train.main(["--model", "fast10"] + args[2:] + ["--init", str(tiny_checkpoint), "--out", str(tmp_path / "bad.pt")])
    assert not (tmp_path / "bad.pt").exists()


def test_init_may_change_the_bit_widths(tiny_checkpoint):
    """--init into a model of the same layers at other bit widths (a 3-bit model fine-tuned to
    4-bit activations): every weight and quantizer scale is copied, and the model quantizes at
    its own widths."""
    base, _ = load_checkpoint(tiny_checkpoint)
    wider = SplitNet(dataclasses.replace(base.cfg, name="tiny_a4", split_bits=4, act_bits=4))
    info = train.load_init(wider, str(tiny_checkpoint))
    assert info["model"] == "tiny"
    for (k, a), b in zip(base.state_dict().items(), wider.state_dict().values()):
        torch.testing.assert_close(b, a, msg=k)
    assert int(wider.encrypted.layers[0].act_quant.bit_width()) == 4 != int(base.encrypted.layers[0].act_quant.bit_width())
    narrower = SplitNet(dataclasses.replace(base.cfg, fcs=[8]))
    with pytest.raises(UserError, match="layers differ"):
        train.load_init(narrower, str(tiny_checkpoint))


def test_init_of_a_float_teacher_needs_its_own_config(tmp_path):
    """A teacher has no bit widths: --init copies a teacher of the same config, refuses another."""
    save_checkpoint(tmp_path / "t.pt", TeacherNet(dataclasses.replace(TEACHERS["resnet_tiny"])), kind="teacher")
    assert train.load_init(TeacherNet(dataclasses.replace(TEACHERS["resnet_tiny"])), str(tmp_path / "t.pt"))["model"] == "resnet_tiny"
    with pytest.raises(UserError, match="layers differ"):
        train.load_init(TeacherNet(dataclasses.replace(TEACHERS["resnet"])), str(tmp_path / "t.pt"))


def test_traced_teacher_gives_the_eager_teachers_logits():
    """The frozen graph a float32 distillation runs (batch norms folded in) gives the eager
    teacher's logits in eval mode, at a batch size other than the one it was traced with."""
    torch.manual_seed(0)
    teacher = TeacherNet(dataclasses.replace(TEACHERS["resnet_tiny"]))
    for m in teacher.modules():  # running statistics far from the initial (0, 1), so that folding them matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    teacher.eval()
    traced = traced_teacher(teacher)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), teacher(x), rtol=1e-4, atol=1e-4)


def test_make_training_resumes_each_run_and_evaluates_each_student(tmp_path):
    """`make training` (the background queue of long runs) passes --resume to exactly the
    train.py runs whose training state exists, so that running it again after an interruption
    continues instead of starting over or failing on a missing state; and after each student
    it searches p_error into that student's checkpoint and benchmarks it from the same folder
    (a row benchmark.py knows)."""
    import subprocess

    import benchmark
    from conftest import ROOT

    def dry_run():  # -B: every step, also those whose output a finished run has left
        out = subprocess.run(["make", "-B", "-n", "-C", str(ROOT), "training", f"TRAINING={tmp_path}", "PY=python"],
                             capture_output=True, text=True, check=True).stdout.replace("\\\n", " ")
        return [line for line in out.splitlines() if "python " in line]

    def runs(lines):
        return [line for line in lines if "train.py" in line]

    lines = dry_run()
    assert runs(lines) and not any("--resume" in line for line in runs(lines))
    students = [line for line in runs(lines) if "--teacher" in line]
    assert students
    # a student that starts from another's weights starts from one the queue has trained before it
    outs = [line.split("--out ")[1].split()[0] for line in runs(lines)]
    inits = [(i, line.split("--init ")[1].split()[0]) for i, line in enumerate(runs(lines)) if "--init " in line]
    assert inits and all(path in outs[:i] for i, path in inits)
    for line in students:
        out = Path(line.split("--out ")[1].split()[0])
        after = lines[lines.index(line) + 1:]
        search = next(i for i, l in enumerate(after) if "p_error_search.py" in l)
        assert f"--checkpoint {out}" in after[search] and "--write" in after[search]
        fitted = {"fast10g_c128_kdw", "fast10g_c128_2x80_kdw", "fast10g_c128_h256_kdw", "fast10g_c128_h256_2x80_kdw"}
        capped = {"fast10g_h256_2x80_kdw"} | fitted - {"fast10g_c128_kdw"}  # deployed at no more than the shipped fast model's cost
        assert ("--max-complexity 6.06e10" in after[search]) == (out.stem in capped), after[search]
        assert ("--fit-lookups" in after[search]) == (out.stem in fitted), after[search]
        bench = next(l for l in after[search:] if "benchmark.py" in l)
        assert f"--configs {out.stem}" in bench and f"--checkpoint-dir {tmp_path}" in bench and out.stem in benchmark.SETTINGS
    for line in runs(lines):
        (tmp_path / Path(line.split("--out ")[1].split()[0]).name).with_suffix(".state.pt").write_bytes(b"")
    resumed = runs(dry_run())
    assert len(resumed) == len(runs(lines)) and all(line.rstrip().endswith("--resume") for line in resumed)


def test_make_training_skips_a_finished_step_whatever_the_mtimes():
    """A step whose benchmark JSON is committed is done, even when the teacher's file looks newer
    (a checkout writes files in its own order): make must not train that student again from scratch."""
    import subprocess

    from conftest import ROOT

    done = sorted(ROOT.glob("results/benchmark_*_kdw.json"))
    assert done  # the queue's finished students are committed
    out = subprocess.run(["make", "-n", "-W", "checkpoints/resnet_w.pt", "-C", str(ROOT), "training", "PY=python"],
                         capture_output=True, text=True, check=True).stdout
    trained = [line.split("--out ")[1].split()[0] for line in out.replace("\\\n", " ").splitlines() if "train.py" in line]
    assert not {Path(t).stem for t in trained} & {f.stem.removeprefix("benchmark_") for f in done}


def test_bf16_computes_the_clear_layer_and_the_teachers_in_bfloat16_only_while_training(tmp_path, tiny_data_dir, monkeypatch):
    """--bf16: a split model's clear conv, batch norm and pooling run in bfloat16 in training
    mode only (validation, export and FHE see float32), the --teacher runs under autocast, a
    float teacher trains under it; each changes what is learned, and the checkpoints stay float32."""
    import models

    monkeypatch.setattr(train, "cpu_has_bf16", lambda: True)  # what is computed, whatever CPU runs the test
    net = SplitNet(TINY)
    net.clear.low_precision = True
    seen = []
    net.clear.bn.register_forward_hook(lambda m, i, o: seen.append(i[0].dtype))
    x = torch.randn(4, 3, 32, 32)
    out_train = net.train().clear(x)
    out_eval = net.eval().clear(x)
    assert seen == [torch.bfloat16, torch.float32] and out_train.dtype == out_eval.dtype == torch.float32

    args = ["--data-dir", str(tiny_data_dir), "--val-size", "10", "--batch-size", "16", "--workers", "0", "--epochs", "1"]
    ckpts = {}
    for model in ("tiny", "resnet_tiny"):
        for bf16 in ([], ["--bf16"]):
            out = tmp_path / f"{model}{len(bf16)}.pt"
            train.main(["--model", model, "--out", str(out)] + args + bf16)
            ckpts[model, bool(bf16)] = load_checkpoint(out, teacher_ok=True)[1]
    for model in ("tiny", "resnet_tiny"):
        plain, bf = ckpts[model, False], ckpts[model, True]
        assert bf["train_config"]["bf16"] and not plain["train_config"]["bf16"]
        assert all(v.dtype != torch.bfloat16 for v in bf["model"].values())
        assert any(not torch.equal(plain["model"][k], bf["model"][k]) for k in plain["model"]), model

    autocast = []
    forward = models.TeacherNet.forward
    monkeypatch.setattr(models.TeacherNet, "forward", lambda self, x: autocast.append(torch.is_autocast_cpu_enabled()) or forward(self, x))
    train.main(["--model", "tiny", "--out", str(tmp_path / "kd.pt"), "--teacher", str(tmp_path / "resnet_tiny0.pt"), "--bf16"] + args)
    assert autocast and all(autocast)


def test_bf16_is_dropped_with_a_note_on_a_cpu_without_bfloat16_kernels(tmp_path, tiny_data_dir, monkeypatch):
    """--bf16 on a CPU with no bfloat16 kernels (an AVX2-only AMD EPYC ran 15 times slower with it)
    trains in float32, exactly as without the flag, says so in its log and records bf16 off."""
    monkeypatch.setattr(train, "cpu_has_bf16", lambda: False)
    args = ["--model", "tiny", "--data-dir", str(tiny_data_dir), "--val-size", "10", "--batch-size", "16", "--workers", "0", "--epochs", "1"]
    train.main(args + ["--out", str(tmp_path / "plain.pt")])
    train.main(args + ["--out", str(tmp_path / "bf.pt"), "--bf16"])
    plain, bf = (load_checkpoint(tmp_path / f"{n}.pt")[1] for n in ("plain", "bf"))
    assert not bf["train_config"]["bf16"]
    assert all(torch.equal(plain["model"][k], bf["model"][k]) for k in plain["model"])
    assert "--bf16 ignored" in (tmp_path / "bf.log").read_text()
    assert "--bf16 ignored" not in (tmp_path / "plain.log").read_text()


def test_train_step_timing_tool_times_the_four_setups(tmp_path, capsys, monkeypatch):
    """tools/train_step_timing.py: a row for each of the eager and traced teacher with each
    memory format of the clear layer, the command and hardware in its JSON; a missing teacher
    or a bad count is refused before any model is built."""
    import json

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "tools"))
    import train_step_timing as tool

    save_checkpoint(tmp_path / "t.pt", TeacherNet(dataclasses.replace(TEACHERS["resnet_tiny"])), kind="teacher")
    out = tmp_path / "timing.json"
    rows = tool.main(["--model", "tiny", "--teacher", str(tmp_path / "t.pt"), "--batch-size", "4", "--steps", "2", "--threads", "1", "--json", str(out)])
    assert [(r["traced_teacher"], r["channels_last"]) for r in rows] == [(False, False), (True, False), (False, True), (True, True)]
    assert all(len(r["seconds"]) == 2 and r["seconds_per_step"] > 0 for r in rows) and rows[0]["vs_eager"] == 1
    saved = json.loads(out.read_text())
    assert saved["rows"] == rows and saved["config"]["model"] == "tiny" and saved["command"] and saved["hardware"]["cpu"]
    assert "traced teacher" in capsys.readouterr().out
    monkeypatch.setattr(tool, "CONFIGS", None)  # building a model now would fail
    for bad in (["--teacher", str(tmp_path / "none.pt")], ["--teacher", str(tmp_path / "t.pt"), "--steps", "0"]):
        with pytest.raises(UserError):
            tool.main(bad)
