"""Side-by-side cost and accuracy of the reference and the fast configuration.

    python benchmark.py [--n-images 1000] [--n-fhe 3] [--json runs/benchmark.json]

For each config (each in its own process, so that peak memory is its own): top-1 in torch
and in FHE simulation on the first --n-images test images, PBS count per crypto parameter
set, maximum bit width, key sizes, compile and keygen seconds, peak memory, and FHE seconds
per image. The FHE time is measured (median over --n-fhe images, through the client /
server path of fhe_inference.py) where --max-fhe-s allows; otherwise it is ESTIMATED as
sum(PBS count x per-PBS seconds), each per-PBS cost measured here on a synthetic lookup
circuit that Concrete compiles to the same (polynomial size, GLWE dimension, level), or the
closest comparable one scaled by a PBS cost model (see per_pbs_seconds; none comparable: no
estimate). The estimator also runs on the
measured configs, to validate it.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cli import UserError, opt, parse_config, run_main
from pbs_cost import estimate_fhe_seconds
from provenance import provenance, write_json

# The rows: <checkpoint-dir>/<model>.pt (model: the row's name unless given), compiled with
# the settings deployed in the checkpoint, except those given here. "reference" is the
# published reference's own setting (no rounding, p_error 0.05 as its binary search found);
# "reference_r6" the reference checkpoint at its deployed setting (rounded lookups).
SETTINGS = {
    "reference": {"p_error": 0.05, "rounding_bits": 0},
    "reference_r6": {"model": "reference"},
    "fast": {},
    "tiny": {"p_error": 1e-9, "rounding_bits": 4, "rounding_method": "exact", "n_calib": 40},  # tests
}


@dataclass
class BenchConfig:
    configs: str = opt("reference,reference_r6,fast", "comma-separated configs to benchmark (see SETTINGS in benchmark.py)")
    checkpoint_dir: str = opt("checkpoints", "folder holding <config>.pt")
    n_images: int = opt(1000, "test images for the torch / simulation top-1")
    n_fhe: int = opt(3, "images run in real FHE for the measured time (median)")
    max_fhe_s: float = opt(300.0, "measure FHE only if the estimate per image is below this many seconds")
    data_dir: str | None = opt(None, "CIFAR-10 location (default: $CIFAR10_DIR, else ./data)")
    json: str | None = opt("runs/benchmark.json", "write the table to this JSON file")
    only: str | None = opt(None, "internal: benchmark one config in this process and print JSON")

    def __post_init__(self):
        unknown = [c for c in self.configs.split(",") if c not in SETTINGS]
        if unknown or (self.only and self.only not in SETTINGS):
            raise UserError(f"unknown config(s) {unknown or [self.only]}; known: {sorted(SETTINGS)}")
        if self.n_images < 1 or self.n_fhe < 0:
            raise UserError("--n-images must be >= 1 and --n-fhe >= 0")


# ---------------------------------------------------------------- one config


def bench_one(name: str, cfg: BenchConfig) -> dict:
    import data
    from checkpoints import INITIAL_DEPLOYMENT
    from deployment import FHEServer, classify, deploy_local
    from fhe import CompileOptions, compile_checkpoint, evaluate, resolve_settings

    settings = dict(SETTINGS[name])
    model_name = settings.pop("model", name)
    settings = {"checkpoint": str(Path(cfg.checkpoint_dir) / f"{model_name}.pt"), **settings}
    o = CompileOptions(data_dir=cfg.data_dir, **settings)
    images, labels = data.stack(data.dataset("test", cfg.data_dir, n=cfg.n_images))
    if Path(o.checkpoint).is_file():
        model, ckpt, qm, report = compile_checkpoint(o)
        acc = evaluate(model, qm, images, labels)
        top1 = {"torch_top1": acc["torch"]["top1"], "sim_top1": acc["simulate"]["top1"], "epochs_trained": ckpt.get("epoch")}
    else:
        # No trained checkpoint: the cost columns (PBS, bit widths, crypto parameters, keys,
        # time) do not need one; the accuracy columns do, and stay empty.
        print(f"no {o.checkpoint}: costs from an untrained {name} model at the initial settings, no accuracy")
        resolve_settings(o, {"deployment": INITIAL_DEPLOYMENT})
        model, qm, report = untrained_compiled(model_name, o)
        top1 = {"torch_top1": None, "sim_top1": None, "epochs_trained": 0}
    estimate, parts = estimate_fhe_seconds(qm.fhe_circuit.statistics["programmable_bootstrap_count_per_parameter"], cache=False)
    row = {
        "config": name,
        "settings": {**settings, **{k: getattr(o, k) for k in ("p_error", "global_p_error", "rounding_bits", "rounding_method")}},
        **top1,
        "n_images": len(labels),
        **{k: report[k] for k in ("pbs_count", "pbs_per_parameter", "max_bit_width", "key_sizes", "compile_seconds")},
        "fhe_s_estimate": estimate,
        "estimate_parts": parts,
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
    return row


def untrained_compiled(name: str, o):
    """A freshly initialised, pruned model with batch-norm statistics from 512 training images."""
    import torch

    import data
    from fhe import calibration_set, compile_model, cost_report
    from models import CONFIGS, SplitNet
    from pruning import apply_pruning, folded_state_dict

    torch.manual_seed(0)
    net = SplitNet(CONFIGS[name])
    apply_pruning(net, net.cfg.accumulator_bits)
    x, _ = data.stack(data.dataset("train", o.data_dir, n=512))
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


def fmt_time(row) -> str:
    if row.get("fhe_s_median") is not None:
        return f"{row['fhe_s_median']:.1f} (measured)"
    if row.get("fhe_s_estimate") is not None:
        return f"{row['fhe_s_estimate']:.0f} (ESTIMATE)"
    return "n/a"


def print_table(rows: list[dict]) -> None:
    lines = [
        ("checkpoint epochs", lambda r: str(r["epochs_trained"]) if r["epochs_trained"] else "untrained"),
        ("top-1 torch", lambda r: f"{r['torch_top1']:.4f}" if r["torch_top1"] is not None else "n/a"),
        ("top-1 simulation", lambda r: f"{r['sim_top1']:.4f}" if r["sim_top1"] is not None else "n/a"),
        ("PBS per image", lambda r: f"{r['pbs_count']:,}"),
        ("max bit width", lambda r: str(r["max_bit_width"])),
        ("crypto params (N, k, level: PBS)", lambda r: "; ".join(f"{p['parameters']['polynomial_size']},{p['parameters']['glwe_dimension']},{p['parameters']['level']}: {p['pbs']:,}" for p in r["estimate_parts"])),
        ("keys (MiB)", lambda r: f"{r['key_sizes']['total_bytes'] / 2**20:,.0f}"),
        ("compile s", lambda r: f"{r['compile_seconds']:.1f}"),
        ("keygen s", lambda r: f"{r['keygen_seconds']:.1f}" if r.get("keygen_seconds") is not None else "not run"),
        ("peak memory GiB", lambda r: f"{r['peak_memory_gib']:.2f}"),
        ("FHE s / image", fmt_time),
        ("estimate s / image", lambda r: f"{r['fhe_s_estimate']:.1f}" if r.get("fhe_s_estimate") is not None else "n/a"),
    ]
    width = max(len(l) for l, _ in lines)
    print(f"{'':<{width}}  " + "  ".join(f"{r['config']:>24}" for r in rows))
    for label, get in lines:
        print(f"{label:<{width}}  " + "  ".join(f"{get(r):>24}" for r in rows))
    for r in rows:
        for part in r["estimate_parts"]:
            if part["seconds"] is None:
                print(f"{r['config']}: {part['pbs']:,} PBS at N={part['parameters']['polynomial_size']}: {part['note']}")
    t = {r["config"]: r.get("fhe_s_median") or r.get("fhe_s_estimate") for r in rows}
    if t.get("fast"):
        for name, seconds in t.items():
            if name != "fast" and seconds:
                print(f"FHE time ratio {name} / fast: {seconds / t['fast']:,.0f}x")


def main(argv=None) -> list[dict] | dict:
    cfg = parse_config(BenchConfig, argv, __doc__.split("\n")[0])
    if cfg.only:
        row = bench_one(cfg.only, cfg)
        print("BENCH_ROW " + json.dumps(row, default=str))
        return row
    rows = []
    for name in cfg.configs.split(","):
        print(f"--- {name}: {SETTINGS[name]}", flush=True)  # a few minutes each
        args = [sys.executable, __file__, "--only", name, "--n-images", str(cfg.n_images), "--n-fhe", str(cfg.n_fhe),
                "--max-fhe-s", str(cfg.max_fhe_s), "--checkpoint-dir", cfg.checkpoint_dir]
        if cfg.data_dir:
            args += ["--data-dir", cfg.data_dir]
        proc = subprocess.run(args, capture_output=True, text=True)
        found = [l for l in proc.stdout.splitlines() if l.startswith("BENCH_ROW ")]
        if proc.returncode != 0 or not found:
            raise UserError(f"benchmark of {name} failed:\n{proc.stderr.strip()[-2000:]}")
        rows.append(json.loads(found[-1][len("BENCH_ROW "):]))
    print_table(rows)
    if cfg.json:
        write_json(cfg.json, {"rows": rows, **provenance(cfg)})
    return rows


if __name__ == "__main__":
    run_main(main)
