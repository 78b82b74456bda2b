"""Every command line rejects bad arguments with one message and status 2 before any work,
and keeps its exit status after Concrete has run a circuit."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import re
import textwrap

import pytest

import benchmark
import fhe_inference
import infer_torch
import infer_vl
import models
import p_error_search
import train
from cli import exit_status
from conftest import ROOT

SCRIPTS = [train, infer_torch, infer_vl, fhe_inference, p_error_search, benchmark]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_unknown_option_is_rejected(script, capsys):
    assert exit_status(script.main, ["--no-such-option", "1"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_help_explains_every_option(script, capsys):
    with pytest.raises(SystemExit) as e:
        script.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--data-dir" in out and "default" in out
    options = re.split(r"\n  (?=-)", out.split("options:", 1)[1])
    assert all(o.count("default") <= 1 for o in options), [o for o in options if o.count("default") > 1]


@pytest.fixture(scope="module")
def a_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("f") / "plain_file"
    f.write_text("x")
    return f


def bad_cases(a_file, tmp_path):
    state = tmp_path / "t.state.pt"
    state.write_bytes(b"PK\x03\x04 truncated")
    return [
        (train, ["--epochs", "two"], "invalid int value"),
        (train, ["--epochs", "0"], "--epochs"),
        (train, ["--model", "resnet50"], "invalid choice"),
        (train, ["--teacher", "/nonexistent.pt"], "no such file"),
        (train, ["--teacher", str(a_file), "--distill-temperature", "0"], "--distill-temperature"),
        (train, ["--model", "resnet", "--teacher", str(a_file)], "is a teacher"),
        (train, ["--out", f"{a_file}/m.pt"], "is a file, not a folder"),
        (train, ["--model", "tiny", "--out", str(tmp_path / "t.pt"), "--resume"], "cannot read the training state"),
        (infer_torch, ["--n-images", "0"], "--n-images"),
        (infer_torch, ["--checkpoint", "/nonexistent.pt"], "not found"),
        (infer_torch, ["--json", f"{a_file}/r.json"], "is a file, not a folder"),
        (infer_vl, ["--p-error", "0.1", "--global-p-error", "0.1"], "not both"),
        (infer_vl, ["--p-error", "2"], "(0, 1)"),
        (infer_vl, ["--rounding-method", "floor"], "invalid choice"),
        (infer_vl, ["--rounding-bits", "1"], "--rounding-bits must be 0"),
        (infer_vl, ["--rounding-bits", "9"], "--rounding-bits must be 0"),
        (infer_vl, ["--rounding-bits", "0", "--fit-lookups"], "no width to fit to"),
        (infer_vl, ["--json", f"{a_file}/r.json"], "is a file, not a folder"),
        (infer_vl, ["--repeats", "0"], "--repeats"),
        (fhe_inference, ["--n-images", "-3"], "--n-images"),
        (fhe_inference, ["--out-dir", str(a_file)], "is a file, not a folder"),
        (fhe_inference, ["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "not both"),
        (p_error_search, ["--p-error", "0.01"], "searches p_error"),
        (p_error_search, ["--lower", "0.5", "--upper", "0.1"], "--lower"),
        (p_error_search, ["--cost-slack", "-0.1"], "--cost-slack"),
        (p_error_search, ["--max-complexity", "0"], "--max-complexity must be > 0"),
        (p_error_search, ["--max-seconds", "-1"], "--max-seconds must be > 0"),
        (p_error_search, ["--max-seconds", "10", "--max-complexity", "6e10"], "not both"),
        (p_error_search, ["--json", f"{a_file}/r.json"], "is a file, not a folder"),
        (p_error_search, ["--from-search", "/nonexistent.json"], "not a p_error search's result"),
        (p_error_search, ["--from-search", str(a_file)], "not a p_error search's result"),
        (benchmark, ["--configs", "resnet"], "unknown config"),
        (benchmark, ["--repeats", "0"], "--repeats"),
        (benchmark, ["--from-json", "/nonexistent.json"], "no such file"),
        (benchmark, ["--plot", f"{a_file}/f.png"], "is a file, not a folder"),
    ]


def test_an_unset_switch_is_told_apart_from_one_turned_off():
    """A `bool | None` option (None: the checkpoint's setting) takes --x and --no-x, no value."""
    from cli import parse_config
    from fhe import CompileOptions

    assert [parse_config(CompileOptions, a, "").fit_lookups for a in ([], ["--fit-lookups"], ["--no-fit-lookups"])] == [None, True, False]
    with pytest.raises(SystemExit):
        parse_config(CompileOptions, ["--fit-lookups", "False"], "")


def test_bad_values_are_rejected_before_any_work(a_file, tmp_path, capsys, monkeypatch):
    """Each case ends in one `error:` line and status 2; none gets as far as loading data or
    a model (the loader is made to fail loudly if it is reached)."""
    import data

    monkeypatch.setattr(data, "load_split", lambda *a, **k: pytest.fail("work started before validation"))
    for script, args, message in bad_cases(a_file, tmp_path):
        status = exit_status(script.main, args)
        err = capsys.readouterr().err
        assert status == 2, (script.__name__, args, err)
        assert message in err, (script.__name__, args, err)
        assert "Traceback" not in err


def test_resume_state_from_another_project_is_refused(tmp_path, capsys):
    import torch

    torch.save({"epoch": 1}, tmp_path / "t.state.pt")
    assert exit_status(train.main, ["--model", "tiny", "--out", str(tmp_path / "t.pt"), "--resume"]) == 2
    assert "not a training state" in capsys.readouterr().err


def run_python(code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


CIRCUIT = """
    from concrete import fhe
    circuit = fhe.Compiler(lambda x: x + 1, {"x": "encrypted"}).compile(range(8), fhe.Configuration(fhe_simulation=True))
    assert circuit.simulate(1) == 2
"""


@pytest.mark.parametrize("error,status", [("UserError('bad input')", 2), ("RuntimeError('boom')", 1), ("SystemExit(3)", 3)])
def test_a_script_keeps_its_status_after_a_simulation(error, status):
    """Concrete's runtime turns every exit status into 0 once a circuit has run; run_main
    must not let it. The child simulates a circuit, then fails the way a script can."""
    proc = run_python(CIRCUIT + f"""
    from cli import UserError, run_main
    def main(argv):
        raise {error}
    run_main(main)
    """)
    assert proc.returncode == status, proc.stderr
    if status == 2:
        assert proc.stderr.strip() == "error: bad input"


def test_pytest_fails_when_a_test_fails_after_a_circuit_ran():
    """The test session keeps its status too (tests/conftest.py): one test runs a circuit,
    the next fails; pytest must exit 1, not 0."""
    probe = tempfile.mkdtemp(prefix="_exit_probe_", dir=ROOT / "tests")
    try:
        with open(f"{probe}/test_probe.py", "w") as f:
            f.write("def test_runs_a_circuit():\n" + textwrap.indent(textwrap.dedent(CIRCUIT), "    ")
                    + "\n\ndef test_fails_on_purpose():\n    assert False\n")
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", probe],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        import shutil

        shutil.rmtree(probe, ignore_errors=True)
    assert "1 failed, 1 passed" in proc.stdout, proc.stdout
    assert proc.returncode == 1


def test_result_files_name_the_commit_and_whether_the_code_was_modified(tmp_path):
    from provenance import code_version

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    assert code_version(tmp_path) is None  # not a checkout: nothing claimed
    git("init", "-q")
    (tmp_path / "model.py").write_text("width = 1\n")
    git("add", "model.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert code_version(tmp_path) == {"commit": head, "modified": False}
    (tmp_path / "notes.txt").write_text("untracked files do not change the code\n")
    assert code_version(tmp_path)["modified"] is False
    (tmp_path / "model.py").write_text("width = 2\n")
    assert code_version(tmp_path) == {"commit": head, "modified": True}


def test_result_files_tell_apart_two_cpus_of_one_name(tmp_path):
    """Two machines both called "AMD EPYC" here differed by AVX-512 and by a fifth in FHE time: the
    hardware block names the CPU's family, model and the instruction sets that matter, from the
    first processor's entry."""
    from provenance import describe_cpu, hardware

    block = "processor\t: {n}\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: {m}\nmodel name\t: AMD EPYC\nflags\t\t: fpu {f}\n"
    (tmp_path / "zen3").write_text(block.format(n=0, m=1, f="avx2 sha_ni") + "\n" + block.format(n=1, m=1, f="avx2 sha_ni"))
    (tmp_path / "zen4").write_text(block.format(n=0, m=17, f="avx2 avx512f avx512_bf16"))
    zen3, zen4 = hardware(str(tmp_path / "zen3")), hardware(str(tmp_path / "zen4"))
    assert zen3["cpu"] == zen4["cpu"] == "AMD EPYC" and zen3 != zen4
    assert (zen3["cpu_model"], zen3["cpu_features"]) == ("family 25 model 1", ["avx2"])
    assert (zen4["cpu_model"], zen4["cpu_features"]) == ("family 25 model 17", ["avx2", "avx512f", "avx512_bf16"])
    assert describe_cpu(zen4) == "AMD EPYC (family 25 model 17; avx2, avx512f, avx512_bf16)"
    missing = hardware(str(tmp_path / "none"))
    assert missing["cpu_model"] is None and missing["cpu_features"] is None and describe_cpu(missing) == missing["cpu"]


def test_every_step_of_the_training_queue_can_run_to_its_benchmark():
    """`make training` runs for hours before its last command: each student's layout must exist,
    its benchmark row must be known, and a student started from another's weights must come after it."""
    makefile = (ROOT / "Makefile").read_text()
    students = re.search(r"^STUDENTS := (.*)$", makefile, re.M).group(1).split()
    layouts = dict(re.findall(r"^MODEL_(\w+) := (\w+)$", makefile, re.M))
    inits = dict(re.findall(r"^INIT_(\w+) := \$\(TRAINING\)/(\w+)_kdw\.pt$", makefile, re.M))
    assert students and inits
    for s in students:
        assert layouts.get(s, s) in models.CONFIGS, s
        assert f"{s}_kdw" in benchmark.SETTINGS, s
    for s, source in inits.items():
        assert students.index(source) < students.index(s), (s, source)
