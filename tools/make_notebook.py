"""Writes Cifar10.ipynb (without outputs); `make notebook` then executes it in place.

The notebook's code lives here so that it can be reviewed as a plain diff."""

import nbformat as nbf

cells = []
md = lambda s: cells.append(nbf.v4.new_markdown_cell(s.strip()))  # noqa: E731
code = lambda s: cells.append(nbf.v4.new_code_cell(s.strip()))  # noqa: E731

md("""
# Encrypted CIFAR-10 classification with a split VGG

The image's owner runs the first convolution in the clear, quantizes its output, encrypts it and
sends it to a server that runs the rest of the network under fully homomorphic encryption (FHE)
with [Concrete ML](https://github.com/zama-ai/concrete-ml). The server never sees the image, nor
the class: only the client can decrypt the logits.

This notebook walks through the pipeline with the project's own functions (`data.py`,
`models.py`, `train.py`, `fhe.py`, `deployment.py`, `checkpoints.py`): change the pipeline and
the notebook changes with it. Every number below was produced by running this notebook on the
machine named in the last cell. Data: the JPEG copy of CIFAR-10 in `../shared/datasets/cifar10`,
whose pixels differ slightly from the official files (accuracies here are comparable with each
other, and only approximately with numbers published on the official binaries).
""")

md("## Parameters\n`quick` finishes in a few minutes on 2 cores; `full` evaluates on the whole test split and trains for real (hours).")
code("""
import os

MODE = os.environ.get("NOTEBOOK_MODE", "quick")  # "quick" or "full"
SETTINGS = {
    "quick": dict(train_args=["--epochs", "1", "--max-steps", "5", "--n-train", "640", "--val-size", "500"],
                  n_eval=200, p_errors=[1e-3, 0.05, 0.3], rounding_bits=[4, 5, 6, 7]),
    "full": dict(train_args=["--epochs", "80", "--label-smoothing", "0.1", "--bf16"],  # the shipped default's schedule, per cycle
                 n_eval=10_000, p_errors=[1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.2, 0.3, 0.5], rounding_bits=[3, 4, 5, 6, 7, 8]),
}[MODE]
CHECKPOINT = "checkpoints/fast10g_h256_2x80_kdw.pt"  # the shipped default model; it stores its deployed p_error and rounding
MODEL = "fast10g_h256"  # its layout (models.py)
CYCLES = ["fast10g_h256_kdw", "fast10g_h256_2x80_kdw"]  # it was trained in two cycles, the second from the first's weights
TEACHER = "checkpoints/resnet_w.pt"  # the shipped float teacher it was distilled from
print(MODE, SETTINGS)
""")

code("""
import sys, time, tempfile
from pathlib import Path
sys.path.insert(0, str(Path.cwd()))
import numpy as np
import matplotlib.pyplot as plt
import torch

import data, deployment, fhe, train
from checkpoints import deployment as deployed_settings, load_checkpoint
from metrics import format_spread, topk_accuracy
from provenance import hardware, versions
torch.manual_seed(0);
""")

md("## Data\nOne loader for every script: the official files, an image-folder tree, or a `.tar.gz` of one (decoded once, then cached). Images are in one fixed shuffled order, so index prefixes are class-balanced.")
code("""
test = data.load_split("test")
print(len(test), "test images from", test.source)
fig, axes = plt.subplots(2, 8, figsize=(12, 3.4))
for ax, i in zip(axes.flat, range(16)):
    ax.imshow(test.images[i]); ax.set_title(data.CLASSES[test.labels[i]], fontsize=9); ax.axis("off")
plt.tight_layout(); plt.show()
""")

md("## The split model\nThe network is a config (a layer table plus bit widths) stored in every checkpoint. `model.clear` runs on the client in float; `model.encrypted` is what Concrete ML compiles.")
code("""
model, ckpt = load_checkpoint(CHECKPOINT)
print("model config:", ckpt["model_config"])
print("trained epochs:", ckpt["epoch"], " validation top-1:", round(ckpt["metrics"]["val_acc"], 4))
print("\\n".join(model.layer_table()))
DEPLOYED = deployed_settings(ckpt)  # p_error found by p_error_search.py --write, rounding bits and method
P_ERROR, ROUNDING_BITS = DEPLOYED["p_error"], DEPLOYED["rounding_bits"]
print("deployed FHE settings:", DEPLOYED)
""")

md("## Training\nQuantization-aware training with Brevitas, distilled from a float teacher (the shipped residual network): the loss mixes the teacher's softened outputs with the labels. The default model was trained in two cycles of 80 epochs, the second starting from the first's weights (`--init`): `python train.py --model fast10g_h256 --epochs 80 --label-smoothing 0.1 --teacher checkpoints/resnet_w.pt --bf16`, then the same with `--init` (`make training`, steps 10 and 11; RESULTS.md). In quick mode each cycle runs a few steps on a small subset, to show the loop (into a temporary folder); in full mode they train for real into `runs/notebook/`, kept (rerun the cell to resume).")
code("""
with tempfile.TemporaryDirectory() as tmp:
    out_dir = Path("runs/notebook" if MODE == "full" else tmp)
    init = []
    for cycle in CYCLES:
        out = str(out_dir / f"{cycle}.pt")
        resume = ["--resume"] if MODE == "full" and Path(out).with_suffix(".state.pt").exists() else []
        result = train.main(["--model", MODEL, "--teacher", TEACHER, "--workers", "0", "--out", out, *SETTINGS["train_args"], *init, *resume])
        init = ["--init", out]
""")
code("""
history = ckpt["history"]  # the shipped checkpoint's second cycle
plt.figure(figsize=(5, 3))
plt.plot([h["epoch"] for h in history], [h["train_acc"] for h in history], label="train (augmented)")
plt.plot([h["epoch"] for h in history], [h["val_acc"] for h in history], label="validation")
plt.xlabel("epoch"); plt.ylabel("top-1"); plt.title("shipped checkpoint's training"); plt.legend(); plt.show()
""")

md("## Compilation and cost\nThe calibration set is the clear part's output on the first training images, made C-contiguous: Concrete reads raw buffers and ignores strides.")
code("""
opts = fhe.CompileOptions(checkpoint=CHECKPOINT)  # p_error and rounding: the checkpoint's deployed ones
model, ckpt, qm, report = fhe.compile_checkpoint(opts)
fhe.print_report(report)
""")

md("## Accuracy: torch, clear quantized model, FHE simulation\nThe same test images through the three. Simulation is random (it cannot be seeded): it is drawn 3 times, and reported as mean +- standard deviation.")
code("""
images, labels = data.stack(data.dataset("test", n=SETTINGS["n_eval"]))
acc = fhe.evaluate(model, qm, images, labels, repeats=3)
print(f"{len(labels)} test images")
for k in ("torch", "disable"):
    print(f"{k:<9}", "  ".join(f"{m} {v:.4f}" for m, v in acc[k].items()))
for m, s in acc["simulate_spread"].items():
    print(f"simulate  {m} {format_spread(s)}")
""")

md("## The effect of p_error and of rounding\n`p_error` is the probability that one programmable bootstrap (PBS) returns a wrong value; larger values allow smaller, faster crypto parameters. Rounding the accumulators to fewer bits before each table lookup makes each PBS cheaper, at some cost in accuracy.")
code("""
feats = fhe.clear_features(model, images)
def sim_top1(q): return topk_accuracy(q.forward(feats, fhe="simulate"), labels, ks=(1,))["top1"]

calib = fhe.calibration_set(model, opts)  # the same for every compile below
rows_p = []
for p in SETTINGS["p_errors"]:
    q = fhe.compile_model(model, calib, fhe.compile_options(opts, p_error=p))
    rows_p.append((p, sim_top1(q), q.fhe_circuit.statistics["complexity"]))
rows_r = []
for r in SETTINGS["rounding_bits"]:
    q = fhe.compile_model(model, calib, fhe.compile_options(opts, rounding_bits=r))
    rows_r.append((r, sim_top1(q), q.fhe_circuit.statistics["complexity"]))

fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.5))
a.semilogx([r[0] for r in rows_p], [r[1] for r in rows_p], "o-"); a.set_xlabel("p_error"); a.set_ylabel("simulated top-1")
a.set_title(f"rounding {ROUNDING_BITS} bits")
b.plot([r[0] for r in rows_r], [r[1] for r in rows_r], "o-"); b.set_xlabel("rounding bits"); b.set_ylabel("simulated top-1")
b.set_title(f"p_error {P_ERROR}")
for ax, rows in ((a, rows_p), (b, rows_r)):
    ax2 = ax.twinx(); ax2.plot([r[0] for r in rows], [r[2] for r in rows], "s--", color="tab:red"); ax2.set_ylabel("Concrete cost model", color="tab:red")
    if ax is a: ax2.set_xscale("log")
plt.tight_layout(); plt.show()
for p, t, c in rows_p: print(f"p_error {p:<8g} simulated top-1 {t:.4f}  complexity {c:.3g}")
for r, t, c in rows_r: print(f"rounding {r} bits  simulated top-1 {t:.4f}  complexity {c:.3g}")
""")

md("## One image under real FHE\nThe client and the server only share files: `client/` keeps the secret key, `server/` receives the compiled model and the evaluation keys.")
code("""
with tempfile.TemporaryDirectory() as tmp:
    client, server_dir, keygen_s = deployment.deploy_local(qm, model, tmp)
    print("server holds:", sorted(p.name for p in server_dir.iterdir()))
    server = deployment.FHEServer(server_dir)
    eval_keys = server.load_keys((server_dir / "evaluation_keys.bin").read_bytes())
    image, label = data.dataset("test", n=1)[0]
    logits, t, nbytes = deployment.classify(client, server, eval_keys, image)
print(f"keygen {keygen_s:.1f} s; encrypted input {nbytes / 2**20:.1f} MiB")
for stage, s in t.items(): print(f"  {stage:<11} {s:8.3f} s")
clear_logits = model(image[None]).detach().numpy()[0]
print(f"label {data.CLASSES[label]}; FHE prediction {data.CLASSES[logits.argmax()]}; clear (torch) prediction {data.CLASSES[clear_logits.argmax()]}")
""")

code("""
print("hardware:", hardware()); print("versions:", versions())
""")

nb = nbf.v4.new_notebook(cells=cells)
nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}, "language_info": {"name": "python"}}
nbf.write(nb, "Cifar10.ipynb")
print("wrote Cifar10.ipynb")
