"""Every command line rejects bad arguments with a message and a non-zero exit."""

from __future__ import annotations

import pytest

import benchmark
import fhe_inference
import infer_torch
import infer_vl
import p_error_search
import train
from common import run_main

SCRIPTS = [train, infer_torch, infer_vl, fhe_inference, p_error_search, benchmark]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_unknown_option_is_rejected(script, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(script.main, ["--no-such-option", "1"])
    assert e.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_help_explains_every_option(script, capsys):
    with pytest.raises(SystemExit) as e:
        script.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--data-dir" in out and "default" in out


@pytest.mark.parametrize(
    "script,args,message",
    [
        (train, ["--epochs", "two"], "invalid int value"),
        (train, ["--epochs", "0"], "--epochs"),
        (train, ["--model", "resnet"], "invalid choice"),
        (infer_torch, ["--n-images", "0"], "--n-images"),
        (infer_torch, ["--checkpoint", "/nonexistent.pt"], "not found"),
        (infer_vl, ["--p-error", "0.1", "--global-p-error", "0.1"], "not both"),
        (infer_vl, ["--p-error", "2"], "(0, 1)"),
        (infer_vl, ["--rounding-method", "floor"], "invalid choice"),
        (fhe_inference, ["--n-images", "-3"], "--n-images"),
        (p_error_search, ["--p-error", "0.01"], "searches p_error"),
        (p_error_search, ["--lower", "0.5", "--upper", "0.1"], "--lower"),
        (benchmark, ["--configs", "resnet"], "unknown config"),
    ],
)
def test_bad_values_are_rejected(script, args, message, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(script.main, args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
