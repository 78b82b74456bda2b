"""The accuracy / latency frontier: every shipped model's cost and accuracy, side by side.

    python benchmark.py [--n-images 1000] [--repeats 3] [--n-fhe 5] [--json runs/benchmark.json] [--plot runs/frontier.png]
    python benchmark.py --from-json results/benchmark.json --plot results/frontier.png   # table and plot again

For each config (each in its own process, so that peak memory is its own): top-1 in torch and
in FHE simulation (mean and sd of --repeats draws) on the first --n-images test images, PBS
count per crypto parameter set, multiply-adds, maximum bit width, key sizes, compile and
keygen seconds, peak memory, FHE seconds per image, and core-seconds per image (seconds x the
cores the run had). The FHE time is measured (median over --n-fhe images, through the client /
server path of fhe_inference.py) where --max-fhe-s allows; otherwise it is ESTIMATED
(pbs_cost.py) as sum(PBS count x per-PBS seconds) + multiply-adds x seconds per multiply-add
+ compressed inputs x seconds to expand one, each cost measured here on a synthetic circuit
that Concrete compiles to the same (polynomial size, GLWE dimension, level), or the closest
comparable one scaled by a PBS cost model (none comparable: no estimate). The estimator also
runs on the measured configs, to validate it. The frontier table and plot (top-1 against
seconds per image, log scale) add the published anchors in frontier.PUBLISHED, labelled with
their hardware: their figures, not measured here.
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
from frontier import PUBLISHED, show
from pbs_cost import estimate_fhe_seconds, input_ciphertexts
from provenance import hardware, provenance, write_json

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
    "fast10g4_kdw": {},  # make training's students, distilled from resnet_w: benchmarked from checkpoints/in_training/
    "fast_kdw": {},
    "accurate60_kdw": {},
    "fast_a4_kdw": {},
    "accurate_kdw": {},
    "fast_e80_kdw": {},  # fast_kdw's run with 80 epochs; shipped, the default until 7 December (its p_error searched at fast_kd's tolerance)
    "fast10g_e80_kdw": {},  # fast10g_kd's layout with fast_e80_kdw's 80 epochs; shipped (p_error searched at tolerance 0.01)
    "fast10g_2x80_kdw": {},  # fast10g_e80_kdw trained through a second 80-epoch cycle; shipped (tolerance 0.01), the fast end until 7 December
    "fast10g_h256": {},  # fast10g with a hidden linear of 256 (models.py), untrained: its costs alone
    "fast10g_h256_kdw": {},  # fast10g_h256 distilled from resnet_w with fast10g_e80_kdw's 80 epochs
    "fast10g_h256_2x80_kdw": {},  # fast10g_h256_kdw trained through a second 80-epoch cycle (make training's step 11); shipped, the default
    "fast10g_c128": {},  # fast10g from half the encrypted inputs (a clear conv of 128 channels; models.py), untrained: its costs alone
    "fast10g_c128_kdw": {},  # fast10g_c128 distilled from resnet_w with fast10g_e80_kdw's 80 epochs (make training's step 12)
    "fast10g_c128_2x80_kdw": {},  # fast10g_c128_kdw trained through a second 80-epoch cycle (make training's step 13); shipped, the fast end
    "fast10g_c128_h256": {},  # the same with a hidden linear of 256, untrained
    "fast10g_c128_h256_kdw": {},  # fast10g_c128_h256 distilled from resnet_w with 80 epochs (make training's step 14)
    "fast10g_c128_h256_2x80_kdw": {},  # fast10g_c128_h256_kdw trained through a second 80-epoch cycle (step 15)
    "fast_e80_2x80_kdw": {},  # fast_e80_kdw trained through a second 80-epoch cycle (step 16)
    # "fit_lookups": lookups that would read more bits than rounding_bits drop the excess
    # (fhe.CompileOptions.fit_lookups), here for an untrained layout; a trained one stores it
    "fast10g_c128_fit": {"model": "fast10g_c128", "fit_lookups": True},
    "accurate": {},  # the 4,746-lookup layout (models.py) untrained: its costs alone (trained: accurate_kdw)
    "accurate60": {},  # the 4,106-lookup candidate for the 60 s target (models.py), untrained: its costs alone
    "tiny": {"p_error": 1e-9, "rounding_bits": 4, "rounding_method": "exact", "n_calib": 40},  # tests
}


@dataclass
class BenchConfig:
    configs: str = opt("reference,reference_r6,fast,fast_kd,fast_e80_kdw,fast10,fast10w,fast10w_r5,fast10g_kd,fast10g_e80_kdw,fast10g_2x80_kdw,"
                       "fast10g_c128_2x80_kdw,fast10g_h256_2x80_kdw",
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
    from fhe import SETTING_KEYS, CompileOptions, compile_checkpoint, evaluate, resolve_settings
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
        print(f"no {o.checkpoint}: costs from an untrained {name} model at the initial settings, no accuracy", file=sys.stderr)
        resolve_settings(o, {"deployment": INITIAL_DEPLOYMENT})
        model, qm, report = untrained_compiled(CONFIGS[model_name], o)
        top1 = {"torch_top1": None, "sim_top1": None, "sim_top1_sd": None, "sim_top1_draws": [], "epochs_trained": 0}
    estimate, parts, linear, inputs = estimate_fhe_seconds(qm.fhe_circuit.statistics, *input_ciphertexts(qm.fhe_circuit), cache=False)
    row = {
        "config": name,
        "settings": {**settings, **{k: getattr(o, k) for k in SETTING_KEYS}},
        **top1,
        "n_images": len(labels),
        **{k: report[k] for k in ("pbs_count", "lookup_reads", "pbs_per_parameter", "multiply_add_count", "complexity", "max_bit_width", "key_sizes", "compile_seconds")},
        "fhe_s_estimate": estimate,
        "estimate_parts": parts,
        "estimate_multiply_adds": linear,
        "estimate_inputs": inputs,
    }
    if cfg.n_fhe and estimate is not None and estimate <= cfg.max_fhe_s:
        with tempfile.TemporaryDirectory() as tmp:
            client, server_dir, keygen_s = deploy_local(qm, model, tmp)
            keys = FHEServer.load_keys(client.evaluation_keys())
            server = FHEServer(server_dir)
            runs = []
            for i in range(cfg.n_fhe):
                runs.append(classify(client, server, keys, images[i]))
                print(f"{name}: image {i + 1}/{cfg.n_fhe} in FHE, {runs[-1][1]['server']:.1f} s", file=sys.stderr, flush=True)
        row["keygen_seconds"] = keygen_s
        row["fhe_s_measured"] = [t["server"] for _, t, _ in runs]
        row["fhe_s_median"] = float(np.median(row["fhe_s_measured"]))
    row["peak_memory_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    row["cores"] = len(os.sched_getaffinity(0))  # the FHE run (and the per-PBS costs) used all of them
    hw = hardware()
    row["cpu"], row["cpu_features"] = hw["cpu"], hw["cpu_features"]
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
                for key in ("cores", "cpu", "cpu_features"):
                    r.setdefault(key, saved.get("hardware", {}).get(key))
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
        # its stderr (progress bars, one line per FHE image, errors) shows as it runs; stdout holds the row
        proc = subprocess.run(args, stdout=subprocess.PIPE, text=True)
        found = [l for l in proc.stdout.splitlines() if l.startswith("BENCH_ROW ")]
        if proc.returncode != 0 or not found:
            raise UserError(f"benchmark of {name} failed (exit status {proc.returncode}); its error is printed above")
        rows.append(json.loads(found[-1][len("BENCH_ROW "):]))
    if cfg.json:
        write_json(cfg.json, {"rows": rows, "published": PUBLISHED, **provenance(cfg)})
    show(rows, cfg.plot)
    return rows


if __name__ == "__main__":
    run_main(main)
