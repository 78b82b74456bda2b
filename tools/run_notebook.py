"""Execute Cifar10.ipynb top to bottom (nbclient), failing on the first failing cell.

    python tools/run_notebook.py [--mode quick|full] [--write]

--write stores the outputs back into the notebook, with clean metadata (no timings)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "Cifar10.ipynb"
CELL_TIMEOUT_S = 1800  # per cell; quick mode cells take seconds to a few minutes


def execute(mode: str = "quick", write: bool = False, path: Path = NOTEBOOK):
    nb = nbformat.read(path, as_version=4)
    os.environ["NOTEBOOK_MODE"] = mode
    NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    if write:
        for cell in nb.cells:
            cell.metadata = {}
        nbformat.write(strip_progress_bars(nb), path)
    return nb


def strip_progress_bars(nb):
    """Drop the stderr stream outputs of progress bars (tqdm redraws with carriage returns:
    dozens of outputs per bar, noise in a stored notebook); other outputs stay."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.get("name") == "stderr" and "\r" in o.get("text", ""))]
    return nb


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=["quick", "full"], default="quick", help="notebook parameter set")
    p.add_argument("--write", action="store_true", help="store the outputs in the notebook")
    args = p.parse_args(argv)
    execute(args.mode, args.write)
    print(f"executed {NOTEBOOK.name} ({args.mode})" + (", outputs written" if args.write else ""))


if __name__ == "__main__":
    main()
