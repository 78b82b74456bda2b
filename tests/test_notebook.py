"""The notebook runs top to bottom in quick mode (a few minutes), and what it prints is what
the project's functions give on the same images."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT, SHARED, needs_dataset


@needs_dataset
def test_notebook_runs_in_quick_mode_and_prints_the_projects_accuracies(monkeypatch):
    import sys

    import data
    from fhe import CompileOptions, compile_checkpoint, evaluate

    sys.path.insert(0, str(ROOT / "tools"))
    from run_notebook import execute

    monkeypatch.setenv("CIFAR10_DIR", str(SHARED))
    nb = execute("quick", write=False)
    # stdout only: progress bars on stderr end in a bare "\r", which would glue onto the next line
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []) if o.get("name") == "stdout")
    n = int(re.search(r"^(\d+) test images$", outputs, re.M).group(1))
    printed = {k: {f"top{i}": float(v) for i, v in re.findall(r"top(\d) (\d\.\d{4})", re.search(rf"^{k} .*$", outputs, re.M).group(0))}
               for k in ("torch", "disable")}
    assert "FHE prediction" in outputs

    (checkpoint,) = re.findall(r'^CHECKPOINT = "(.+?)"', "".join(c.source for c in nb.cells), re.M)
    model, _, qm, _ = compile_checkpoint(CompileOptions(checkpoint=str(ROOT / checkpoint), data_dir=str(SHARED)))
    images, labels = data.stack(data.dataset("test", SHARED, n=n))
    acc = evaluate(model, qm, images, labels)
    for k in ("torch", "disable"):  # deterministic: equal to the printed 4 decimals
        assert printed[k] == {m: pytest.approx(v, abs=5e-5) for m, v in acc[k].items()}, k


def test_notebook_walks_through_the_default_model():
    """The notebook and `make run` (which passes no --checkpoint) show the same model."""
    import json

    from checkpoints import DEFAULT_CHECKPOINT

    cells = json.loads((ROOT / "Cifar10.ipynb").read_text())["cells"]
    source = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert re.findall(r'^CHECKPOINT = "(.+?)"', source, re.M) == [DEFAULT_CHECKPOINT]
    assert (ROOT / DEFAULT_CHECKPOINT).is_file()
    run = (ROOT / "Makefile").read_text().split("\nrun: install\n")[1].split("\n\n")[0]
    assert "fhe_inference.py" in run and "--checkpoint" not in run


def test_notebooks_full_mode_trains_the_default_models_recipe(monkeypatch):
    """In full mode the notebook's training cell runs the commands the shipped default was trained
    with, cycle by cycle (its checkpoint's train_config, then that of the checkpoint it started
    from, --init, and so on): the same layout, schedule, teacher and precision, each cycle from the
    notebook's previous one."""
    import json

    import train
    from checkpoints import DEFAULT_CHECKPOINT, read_checkpoint
    from cli import parse_config

    cells = ["".join(c["source"]) for c in json.loads((ROOT / "Cifar10.ipynb").read_text())["cells"] if c["cell_type"] == "code"]
    monkeypatch.setenv("NOTEBOOK_MODE", "full")
    params = {}
    exec(next(c for c in cells if c.lstrip().startswith("import os")), params)  # the parameters cell
    calls = []
    recorder = type("Train", (), {"main": staticmethod(lambda argv: calls.append(argv))})
    exec(next(c for c in cells if "train.main(" in c), {**params, "train": recorder, "Path": Path, "tempfile": tempfile})

    chain = [read_checkpoint(ROOT / DEFAULT_CHECKPOINT)]  # the shipped cycles, last first
    while chain[-1].get("init_from"):
        chain.append(read_checkpoint(ROOT / chain[-1]["init_from"]["path"]))
    assert len(calls) == len(chain) > 0
    recipe = ("model", "epochs", "batch_size", "lr", "weight_decay", "label_smoothing", "val_size", "n_train", "seed",
              "teacher", "distill_alpha", "distill_temperature", "rounding_bits", "rounding_noise", "bf16", "accumulator_bits")
    previous_out = None
    for argv, shipped in zip(calls, reversed(chain)):
        init = argv[argv.index("--init") + 1] if "--init" in argv else None
        assert init == previous_out  # the first from random weights, each next from the one before
        assert (shipped["train_config"]["init"] is None) == (init is None)
        argv = [a for i, a in enumerate(argv) if "--init" not in argv[max(i - 1, 0):i + 1]]
        notebook = vars(parse_config(train.TrainConfig, argv, ""))
        assert {k: notebook[k] for k in recipe} == {k: shipped["train_config"][k] for k in recipe}
        previous_out = notebook["out"]
