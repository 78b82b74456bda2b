"""The notebook runs top to bottom in quick mode (a few minutes)."""

from __future__ import annotations

from conftest import ROOT, SHARED, needs_dataset


@needs_dataset
def test_notebook_runs_in_quick_mode(monkeypatch):
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    from run_notebook import execute

    monkeypatch.setenv("CIFAR10_DIR", str(SHARED))
    nb = execute("quick", write=False)
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "FHE prediction" in outputs and "simulate" in outputs
