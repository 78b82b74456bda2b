"""The accuracy / latency frontier: every shipped model's cost and accuracy, side by side.

    python benchmark.py [--n-images 1000] [--repeats 3] [--n-fhe 5] [--json runs/benchmark.json] [--plot runs/frontier.png]
    python benchmark.py --from-json results/benchmark.json --plot results/frontier.png   # table and plot again

For each config (each in its own process, so that peak memory is its own): top-1 in torch and
in FHE simulation (mean and sd of --repeats draws) on the first --n-images test images, PBS
count per crypto parameter set, multiply-adds, maximum bit width, key sizes, compile and
keygen seconds, peak memory, FHE seconds per image, and core-seconds per image (seconds x the
cores the run had). The FHE time is measured (median over --n-fhe images, through the client /
server path of fhe_inference.py) where --max-fhe-s allows; otherwise it is ESTIMATED
(pbs_cost.py) as sum(PBS count x per-PBS seconds) + multiply-adds x seconds per multiply-add,
each cost measured here on a synthetic circuit that Concrete compiles to the same (polynomial
size, GLWE dimension, level), or the closest comparable one scaled by a PBS cost model (none
comparable: no estimate). The estimator also runs on the measured configs, to validate it. The
frontier table and plot (top-1 against seconds per image, log scale) add the published anchors
in PUBLISHED, labelled with their hardware: their figures, not measured here.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cli import UserError, check_output_file, opt, parse_config, run_main
from pbs_cost import estimate_fhe_seconds
from provenance import hardware, provenance, write_json

# Published CIFAR-10 results under FHE with a time per image: their figures, on their hardware.
PUBLISHED = [
    {"label": "Concrete ML split example (the reference)", "top1": 0.6234, "seconds": 1738, "cores": 128,
     "hardware": "128-vCPU c6i.metal",
     "source": "zama-ai/concrete-ml use_case_examples/cifar/cifar_brevitas_with_model_splitting/README.md"},
    {"label": "Concrete ML ternary VGG (CNV 2W2A), 6-bit rounding", "top1": 0.860, "seconds": 40, "cores": 128,
     "hardware": "128-core m6i.metal",
     "source": "zama-ai/concrete-ml use_case_examples/cifar/cifar_brevitas_training/README.md (top-1 in simulation)"},
]

# The rows: <checkpoint-dir>/<model>.pt (model: the row's name unless given), compiled with
# the settings deployed in the checkpoint, except those given here. "reference" is the
# published reference's own setting (no rounding, p_error 0.05 as its binary search found);
# "reference_r6" the reference checkpoint at its deployed setting (rounded lookups).
SETTINGS = {
    "reference": {"p_error": 0.05, "rounding_bits": 0},
    "reference_r6": {"model": "reference"},
    "fast": {},
    "fast10": {},
    "fast10w": {},
    "fast10w_r5": {},  # fast10w fine-tuned for 5-bit rounding (train.py --init --rounding-bits 5 --rounding-noise)
    "fast10w_a4": {},  # fast10w fine-tuned to a 5-bit split and 4-bit activations (train.py --init)
    "fast_kd": {},  # fast's layout trained from scratch distilled from the teacher (train.py --teacher)
    "fast10g": {},  # the 570-lookup layout for the 10 s target (models.py) untrained: its costs alone
    "fast10g4": {},  # fast10g behind a clear conv of 512 channels, its encrypted conv in 4 groups (models.py): untrained
    "fast10g_kd": {},  # fast10g trained from scratch distilled from the teacher (train.py --teacher)
    "accurate": {},  # a frontier candidate (models.py) not trained yet: costs from an untrained model
    "tiny": {"p_error": 1e-9, "rounding_bits": 4, "rounding_method": "exact", "n_calib": 40},  # tests
}


@dataclass
class BenchConfig:
    configs: str = opt("reference,reference_r6,fast,fast_kd,fast10,fast10w,fast10w_r5,fast10g_kd",
                       "comma-separated configs to benchmark (see SETTINGS in benchmark.py); the default: every shipped model")
    checkpoint_dir: str = opt("checkpoints", "folder holding <config>.pt")
    n_images: int = opt(1000, "test images for the torch / simulation top-1")
    repeats: int = opt(3, "simulation draws for the simulated top-1 (mean and sd)")
    n_fhe: int = opt(5, "images run in real FHE for the measured time (median)")
    max_fhe_s: float = opt(300.0, "measure FHE only if the estimate per image is below this many seconds")
    data_dir: str | None = opt(None, "CIFAR-10 location (default: $CIFAR10_DIR, else ./data)")
    json: str | None = opt("runs/benchmark.json", "write the table to this JSON file")
    plot: str | None = opt("runs/frontier.png", "draw top-1 against FHE seconds per image to this PNG")
    from_json: str | None = opt(None, "print the table and draw the plot from earlier --json files (comma-separated: "
                                      "their rows side by side, a config in several files taken from the last); run nothing")
    only: str | None = opt(None, "internal: benchmark one config in this process and print JSON")

    def __post_init__(self):
        unknown = [c for c in self.configs.split(",") if c not in SETTINGS]
        if unknown or (self.only and self.only not in SETTINGS):
            raise UserError(f"unknown config(s) {unknown or [self.only]}; known: {sorted(SETTINGS)}")
        if self.n_images < 1 or self.n_fhe < 0 or self.repeats < 1:
            raise UserError("--n-images and --repeats must be >= 1, --n-fhe >= 0")
        missing = [f for f in (self.from_json or "").split(",") if f and not Path(f).is_file()]
        if missing:
            raise UserError(f"--from-json: no such file: {', '.join(missing)}")
        for path, option in ((None if self.from_json else self.json, "--json"), (self.plot, "--plot")):
            if path:
                check_output_file(path, option)


# ---------------------------------------------------------------- one config


def bench_one(name: str, cfg: BenchConfig) -> dict:
    import data
    from checkpoints import INITIAL_DEPLOYMENT
    from deployment import FHEServer, classify, deploy_local
    from fhe import CompileOptions, compile_checkpoint, evaluate, resolve_settings
    from models import CONFIGS

    settings = dict(SETTINGS[name])
    model_name = settings.pop("model", name)
    settings = {"checkpoint": str(Path(cfg.checkpoint_dir) / f"{model_name}.pt"), **settings}
    o = CompileOptions(data_dir=cfg.data_dir, **settings)
    images, labels = data.stack(data.dataset("test", cfg.data_dir, n=cfg.n_images))
    if Path(o.checkpoint).is_file():
        model, ckpt, qm, report = compile_checkpoint(o)
        acc = evaluate(model, qm, images, labels, repeats=cfg.repeats)
        sim = acc["simulate_spread"]["top1"]
        top1 = {"torch_top1": acc["torch"]["top1"], "sim_top1": sim["mean"], "sim_top1_sd": sim["sd"], "sim_top1_draws": sim["draws"],
                "epochs_trained": ckpt.get("epoch")}
    else:
        # No trained checkpoint: the cost columns (PBS, bit widths, crypto parameters, keys,
        # time) do not need one; the accuracy columns do, and stay empty.
        print(f"no {o.checkpoint}: costs from an untrained {name} model at the initial settings, no accuracy")
        resolve_settings(o, {"deployment": INITIAL_DEPLOYMENT})
        model, qm, report = untrained_compiled(CONFIGS[model_name], o)
        top1 = {"torch_top1": None, "sim_top1": None, "sim_top1_sd": None, "sim_top1_draws": [], "epochs_trained": 0}
    estimate, parts, linear = estimate_fhe_seconds(qm.fhe_circuit.statistics, cache=False)
    row = {
        "config": name,
        "settings": {**settings, **{k: getattr(o, k) for k in ("p_error", "global_p_error", "rounding_bits", "rounding_method")}},
        **top1,
        "n_images": len(labels),
        **{k: report[k] for k in ("pbs_count", "pbs_per_parameter", "multiply_add_count", "max_bit_width", "key_sizes", "compile_seconds")},
        "fhe_s_estimate": estimate,
        "estimate_parts": parts,
        "estimate_multiply_adds": linear,
    }
    if cfg.n_fhe and estimate is not None and estimate <= cfg.max_fhe_s:
        with tempfile.TemporaryDirectory() as tmp:
            client, server_dir, keygen_s = deploy_local(qm, model, tmp)
            keys = FHEServer.load_keys(client.evaluation_keys())
            server = FHEServer(server_dir)
            runs = [classify(client, server, keys, images[i]) for i in range(cfg.n_fhe)]
        row["keygen_seconds"] = keygen_s
        row["fhe_s_measured"] = [t["server"] for _, t, _ in runs]
        row["fhe_s_median"] = float(np.median(row["fhe_s_measured"]))
    row["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    row["cores"] = len(os.sched_getaffinity(0))  # the FHE run (and the per-PBS costs) used all of them
    row["cpu"] = hardware()["cpu"]
    return row


def untrained_compiled(model_cfg, o, n_stats: int = 512):
    """A freshly initialised, pruned model of this ModelConfig with batch-norm statistics from
    the first n_stats training images, compiled with the settings in o."""
    import torch

    import data
    from fhe import calibration_set, compile_model, cost_report
    from models import SplitNet
    from pruning import apply_pruning, folded_state_dict

    torch.manual_seed(0)
    net = SplitNet(model_cfg)
    apply_pruning(net, net.cfg.accumulator_bits)
    x, _ = data.stack(data.dataset("train", o.data_dir, n=n_stats))
    net.train()
    with torch.no_grad():
        for i in range(0, len(x), 64):
            net(x[i : i + 64])
    model = SplitNet(net.cfg)
    model.load_state_dict(folded_state_dict(net))
    model.eval()
    t0 = time.perf_counter()
    qm = compile_model(model, calibration_set(model, o), o)
    return model, qm, cost_report(qm, time.perf_counter() - t0)


# ---------------------------------------------------------------- the table


def seconds(row) -> float | None:
    """FHE seconds per image: measured where the benchmark ran it, else the estimate."""
    return row.get("fhe_s_median") or row.get("fhe_s_estimate")


def machine(row) -> str:
    """The CPU a row was measured on, short ("Intel(R) Xeon(R) Processor" -> "Intel Xeon"), and its cores."""
    cpu = " ".join(w for w in (row.get("cpu") or "unknown CPU").replace("(R)", "").replace("(TM)", "").split() if w != "Processor")
    return f"{cpu}, {row['cores']} cores" if row.get("cores") else cpu


def fmt_sim(row) -> str:
    if row["sim_top1"] is None:
        return "n/a"
    n = len(row.get("sim_top1_draws") or [1])
    return f"{row['sim_top1']:.4f} +- {row.get('sim_top1_sd') or 0:.4f} ({n})"


def fmt_setting(row) -> str:
    s = row["settings"]
    p = f"{s['p_error']:.3g}" if s.get("p_error") is not None else f"global {s['global_p_error']:.3g}"
    return f"{p} / {s['rounding_bits']}"


def fmt_time(row) -> str:
    if row.get("fhe_s_median") is not None:
        return f"{row['fhe_s_median']:.1f} (measured)"
    if row.get("fhe_s_estimate") is not None:
        return f"{row['fhe_s_estimate']:.0f} (ESTIMATE)"
    return "n/a"


def fmt_linear(row) -> str:
    """The estimate's multiply-add term (rows from before it existed: n/a)."""
    s_ = (row.get("estimate_multiply_adds") or {}).get("seconds")
    return f"{s_:.1f}" if s_ is not None else "n/a"


def print_table(rows: list[dict]) -> None:
    lines = [
        ("machine", machine),
        ("checkpoint epochs", lambda r: str(r["epochs_trained"]) if r["epochs_trained"] else "untrained"),
        ("test images (top-1)", lambda r: f"{r['n_images']:,}"),
        ("p_error / rounding bits", fmt_setting),
        ("top-1 torch", lambda r: f"{r['torch_top1']:.4f}" if r["torch_top1"] is not None else "n/a"),
        ("top-1 simulation", fmt_sim),
        ("PBS per image", lambda r: f"{r['pbs_count']:,}"),
        ("multiply-adds per image", lambda r: f"{r['multiply_add_count']:,}" if "multiply_add_count" in r else "n/a"),
        ("max bit width", lambda r: str(r["max_bit_width"])),
        ("crypto params (N, k, level: PBS)", lambda r: "; ".join(f"{p['parameters']['polynomial_size']},{p['parameters']['glwe_dimension']},{p['parameters']['level']}: {p['pbs']:,}" for p in r["estimate_parts"])),
        ("keys (MiB)", lambda r: f"{r['key_sizes']['total_bytes'] / 2**20:,.0f}"),
        ("compile s", lambda r: f"{r['compile_seconds']:.1f}"),
        ("keygen s", lambda r: f"{r['keygen_seconds']:.1f}" if r.get("keygen_seconds") is not None else "not run"),
        ("peak memory GiB", lambda r: f"{r['peak_memory_gib']:.2f}"),
        ("FHE s / image", fmt_time),
        ("core-seconds / image", lambda r: f"{seconds(r) * r['cores']:,.0f}" if seconds(r) and r.get("cores") else "n/a"),
        ("estimate s / image", lambda r: f"{r['fhe_s_estimate']:.1f}" if r.get("fhe_s_estimate") is not None else "n/a"),
        ("  of which multiply-adds", fmt_linear),
    ]
    width = max(len(l) for l, _ in lines)
    print(f"{'':<{width}}  " + "  ".join(f"{r['config']:>24}" for r in rows))
    for label, get in lines:
        print(f"{label:<{width}}  " + "  ".join(f"{get(r):>24}" for r in rows))
    for r in rows:
        for part in r["estimate_parts"]:
            if part.get("note"):
                print(f"{r['config']}: {part['pbs']:,} PBS at N={part['parameters']['polynomial_size']}: {part['note']}")
        if (r.get("estimate_multiply_adds") or {}).get("note"):
            print(f"{r['config']}: {r['estimate_multiply_adds']['note']}")
    t = {r["config"]: seconds(r) for r in rows}
    if t.get("fast"):
        for name, s_ in t.items():
            if name != "fast" and s_:
                ratio = s_ / t["fast"]
                print(f"FHE time ratio {name} / fast: {ratio:,.{0 if ratio >= 10 else 2}f}x")


def print_frontier(rows: list[dict]) -> None:
    """Ours and the published anchors, fastest first: top-1, seconds and core-seconds per image."""
    points = [(seconds(r), r["sim_top1"], r.get("cores"), f"{r['config']} ({machine(r)})", "measured" if r.get("fhe_s_median") else "ESTIMATE")
              for r in rows if seconds(r) and r["sim_top1"] is not None]
    points += [(a["seconds"], a["top1"], a["cores"], f"{a['label']} ({a['hardware']})", "published") for a in PUBLISHED]
    print("frontier (top-1: simulated, mean of the draws; s/image: FHE seconds to classify one image, "
          "our median where measured, else our estimate; core-s: s/image x cores used):")
    print(f"  {'model':<72} {'top-1':>6} {'s/image':>9} {'core-s':>9}  time")
    for s_, top1, cores, label, kind in sorted(points):
        core_s = f"{s_ * cores:9,.0f}" if cores else f"{'n/a':>9}"
        print(f"  {label:<72} {top1:6.4f} {s_:9,.1f} {core_s}  {kind}")


# Where a model's name may go beside its point, in points from it: right, above right, below
# right, then the same on the left; the first that overlaps no point and no label placed before
# it wins.
LABEL_PLACES = [((7, -3), "left"), ((6, 4), "left"), ((6, -11), "left"),
                ((-7, -3), "right"), ((-6, 4), "right"), ((-6, -11), "right")]


def spread_labels(fig, ax, labels: list, fixed: list, points: list) -> None:
    """Move each of `labels` (annotations, in order) to the first of LABEL_PLACES where its
    drawn box overlaps none of `fixed`, of the markers at `points` (data coordinates) and of
    the labels before it; where none is free, the first."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    taken = [a.get_window_extent(renderer) for a in fixed]
    taken += [Bbox.from_bounds(x - 4, y - 4, 8, 8) for x, y in ax.transData.transform(points)]  # a marker: ~8 px
    for label in labels:
        for offset, align in LABEL_PLACES + LABEL_PLACES[:1]:  # none free: the first
            label.set_position(offset)
            label.set_horizontalalignment(align)
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(t) for t in taken):
                break
        taken.append(box)


def plot_frontier(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ours = [r for r in rows if seconds(r) and r["sim_top1"] is not None]
    color = {m: f"C{2 * i}" for i, m in enumerate(sorted({machine(r) for r in ours}))}  # seconds compare within one machine
    labels = []
    for r in sorted(ours, key=seconds):
        measured, c = bool(r.get("fhe_s_median")), color[machine(r)]
        ax.errorbar(seconds(r), r["sim_top1"], yerr=r.get("sim_top1_sd") or 0, fmt="o", color=c, capsize=3,
                    mfc=c if measured else "white")
        labels.append(ax.annotate(r["config"], (seconds(r), r["sim_top1"]), textcoords="offset points", xytext=(6, 4), fontsize=8))
    for m, c in color.items():
        ax.plot([], [], "o", color=c, label=f"ours: {m}")
    anchors = []
    for a in PUBLISHED:
        ax.plot(a["seconds"], a["top1"], "x", color="C3")
        anchors.append(ax.annotate(f"{a['label']}\n{a['hardware']} (published)", (a["seconds"], a["top1"]),
                                   textcoords="offset points", xytext=(6, -14), fontsize=7, color="C3"))
    ax.set_xscale("log")
    xs = [seconds(r) for r in ours] + [a["seconds"] for a in PUBLISHED]
    ax.set_xlim(min(xs) / 2, max(xs) * 5)  # room for the labels
    ax.set_xlabel("FHE seconds per image (log scale)")
    n = sorted({r["n_images"] for r in ours})
    ax.set_ylabel(f"CIFAR-10 top-1, simulated (ours: first {'/'.join(map(str, n))} test images)", fontsize=8)
    ax.set_title("Accuracy against FHE latency (ours: filled, measured time; open, estimated)", fontsize=9)
    if color:
        ax.legend(fontsize=7, loc="lower left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    spread_labels(fig, ax, labels, anchors, [(seconds(r), r["sim_top1"]) for r in ours])  # once the axes are final: boxes are measured where they are drawn
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def show(rows: list[dict], plot: str | None) -> None:
    print_table(rows)
    print_frontier(rows)
    if plot:
        plot_frontier(rows, plot)


def main(argv=None) -> list[dict] | dict:
    cfg = parse_config(BenchConfig, argv, __doc__.split("\n")[0])
    if cfg.only:
        row = bench_one(cfg.only, cfg)
        print("BENCH_ROW " + json.dumps(row, default=str))
        return row
    if cfg.from_json:
        by_config = {}  # a config in several files: the last file's row, in the place of the first
        for path in cfg.from_json.split(","):
            saved = json.loads(Path(path).read_text())
            for r in saved["rows"]:  # files written before rows carried their cores and CPU: the run's machine
                r.setdefault("cores", saved.get("hardware", {}).get("cores"))
                r.setdefault("cpu", saved.get("hardware", {}).get("cpu"))
                by_config[r["config"]] = r
        rows = list(by_config.values())
        show(rows, cfg.plot)
        return rows
    rows = []
    for name in cfg.configs.split(","):
        print(f"--- {name}: {SETTINGS[name]}", flush=True)  # a few minutes each
        args = [sys.executable, __file__, "--only", name, "--n-images", str(cfg.n_images), "--n-fhe", str(cfg.n_fhe), "--repeats", str(cfg.repeats),
                "--max-fhe-s", str(cfg.max_fhe_s), "--checkpoint-dir", cfg.checkpoint_dir]
        if cfg.data_dir:
            args += ["--data-dir", cfg.data_dir]
        proc = subprocess.run(args, capture_output=True, text=True)
        found = [l for l in proc.stdout.splitlines() if l.startswith("BENCH_ROW ")]
        if proc.returncode != 0 or not found:
            raise UserError(f"benchmark of {name} failed:\n{proc.stderr.strip()[-2000:]}")
        rows.append(json.loads(found[-1][len("BENCH_ROW "):]))
    if cfg.json:
        write_json(cfg.json, {"rows": rows, "published": PUBLISHED, **provenance(cfg)})
    show(rows, cfg.plot)
    return rows


if __name__ == "__main__":
    run_main(main)
