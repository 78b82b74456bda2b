"""Real FHE inference with a client / server split, timed stage by stage, on one or many workers.

    python fhe_inference.py --n-images 10                      # one server in this process
    python fhe_inference.py --n-images 1000 --workers 2 --threads-per-worker 1 --yes
    python fhe_inference.py --n-images 1000 --scheduler tcp://HOST:8786   # an existing Dask cluster

This process is the client: it generates the keys, runs the clear layer, encrypts and later
decrypts. The servers (this process, or Dask workers) get server.zip and the evaluation keys
once, then only ciphertext bytes per image; the secret key never leaves <out-dir>/client.

Writes <out-dir>/predictions.csv (one row per image as it completes, in any order: label,
torch / two simulations / FHE predictions and logits, per-stage seconds) and
<out-dir>/metadata.json (command, effective FHE settings, costs, versions, CPU, and the
statistics of all rows so far). A rerun with the same settings skips the images already in
the CSV. Before any key generation it prints the estimated FHE time and stops unless --yes
when the run would take more than an hour.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import data
from checkpoints import read_checkpoint
from cli import UserError, check_output_dir, opt, parse_config, run_main
from deployment import STAGES, deploy_local
from fhe import SETTING_ABSENT, compile_checkpoint, print_report, resolve_settings
from metrics import paired_difference, proportion_ci
from parallel import ParallelOptions, fhe_servers
from pbs_cost import estimate_fhe_seconds, input_ciphertexts, runtime_threads
from provenance import provenance, write_json

COLUMNS = ["index", "label", "torch_pred", "sim_pred", "sim2_pred", "fhe_pred", *[f"{s}_s" for s in STAGES], "input_bytes",
           "torch_logits", "sim_logits", "fhe_logits"]
# settings that must match for a rerun to append to an existing CSV
RESUME_KEYS = ("checkpoint", "p_error", "global_p_error", "rounding_bits", "rounding_method", "fit_lookups", "n_calib")
CONFIRM_ABOVE_S = 3600  # a run estimated longer than this needs --yes


@dataclass
class FHEConfig(ParallelOptions):
    n_images: int = opt(1, "number of test images to classify under FHE")
    start: int = opt(0, "index of the first test image")
    out_dir: str = opt("runs/fhe", "where predictions.csv, metadata.json, client/ and server/ go")
    yes: bool = opt(False, "run even when the estimated time is above an hour")
    summary_only: bool = opt(False, "print the statistics of the images already in --out-dir and store them in its metadata.json; run nothing")

    def __post_init__(self):
        super().__post_init__()
        if self.n_images < 1 or self.start < 0:
            raise UserError("--n-images must be >= 1 and --start >= 0")
        check_output_dir(self.out_dir, "--out-dir")


def read_done(csv_path: Path) -> list[dict]:
    if not csv_path.exists():
        return []
    with open(csv_path, newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("fhe_logits")]  # a cut-off last line is dropped


def check_resume(meta_path: Path, cfg: FHEConfig) -> None:
    csv_path = meta_path.parent / "predictions.csv"
    if csv_path.exists():
        with open(csv_path, newline="") as f:
            header = next(csv.reader(f), None)
        if header and header != COLUMNS:
            raise UserError(f"{csv_path} has other columns (an older version of this script): choose another --out-dir")
    if not meta_path.exists():
        return
    old = json.loads(meta_path.read_text())["config"]
    diff = [k for k in RESUME_KEYS if old.get(k, SETTING_ABSENT.get(k)) != getattr(cfg, k)]
    if diff:
        raise UserError(f"{meta_path.parent} holds results for other settings ({', '.join(diff)}): choose another --out-dir")


def fmt(v: np.ndarray) -> str:
    return " ".join(f"{x:.6g}" for x in v)


def summarize(rows: list[dict]) -> dict:
    """FHE top-1 with its 95 % interval, the paired differences with simulation and torch,
    and FHE-vs-simulation agreement beside the agreement of two independent simulations."""
    col = lambda name: np.array([int(r[name]) for r in rows])  # noqa: E731
    label, fhe, sim, torch_ = col("label"), col("fhe_pred"), col("sim_pred"), col("torch_pred")
    server = np.array([float(r["server_s"]) for r in rows])
    n_right = int((fhe == label).sum())
    out = {
        "n_images": len(rows),
        "fhe_top1": n_right / len(rows),
        "fhe_top1_ci95": proportion_ci(n_right, len(rows)),
        "sim_top1": float((sim == label).mean()),
        "torch_top1": float((torch_ == label).mean()),
        "fhe_minus_sim": paired_difference(fhe, sim, label),
        "fhe_minus_torch": paired_difference(fhe, torch_, label),
        "fhe_sim_agreement": float((fhe == sim).mean()),
        "fhe_torch_agreement": float((fhe == torch_).mean()),
        "server_s_median": float(np.median(server)),
        "server_s_p10_p90": [float(np.percentile(server, 10)), float(np.percentile(server, 90))],
        "stage_s_median": {s: float(np.median([float(r[f"{s}_s"]) for r in rows])) for s in STAGES},
    }
    with_sim2 = [r for r in rows if r.get("sim2_pred") not in (None, "")]
    if with_sim2:  # rows of older runs have no second simulation
        out["sim_sim_agreement"] = float(np.mean([r["sim_pred"] == r["sim2_pred"] for r in with_sim2]))
        out["sim_sim_images"] = len(with_sim2)
    return out


def print_summary(s: dict) -> None:
    lo, hi = s["fhe_top1_ci95"]
    d_sim, d_torch = s["fhe_minus_sim"], s["fhe_minus_torch"]
    se = lambda d: f" +- {100 * d['standard_error']:.2f}" if d["standard_error"] is not None else ""  # noqa: E731
    partial = f" (partial: {s['n_images']} of {s['images_requested']} requested)" if not s.get("complete", True) else ""
    print(f"{s['n_images']} images{partial}: FHE top-1 {s['fhe_top1']:.4f} (95 % CI {lo:.4f}-{hi:.4f}), "
          f"simulation {s['sim_top1']:.4f}, torch {s['torch_top1']:.4f}")
    print(f"FHE - simulation {100 * d_sim['diff']:+.2f}{se(d_sim)} points, FHE - torch {100 * d_torch['diff']:+.2f}{se(d_torch)} points (paired standard errors)")
    print(f"agreement: FHE = simulation on {s['fhe_sim_agreement']:.1%} of images"
          + (f", two simulations agree on {s['sim_sim_agreement']:.1%}" if "sim_sim_agreement" in s else "")
          + f", FHE = torch on {s['fhe_torch_agreement']:.1%}")
    p10, p90 = s["server_s_p10_p90"]
    print(f"server seconds per image: median {s['server_s_median']:.2f} (10th-90th percentile {p10:.2f}-{p90:.2f})")
    print("median seconds per stage: " + ", ".join(f"{k} {v:.4f}" for k, v in s["stage_s_median"].items()))


def check_estimate(qm, report: dict, n_todo: int, cfg: FHEConfig) -> dict:
    """Print the estimated FHE time before any key generation; refuse a run of more than an
    hour without --yes. The per-image cost is measured with this process's threads; a server
    with fewer threads takes proportionally longer (core-seconds kept: a rough scaling, since
    one thread uses a core a little better than two). An existing --scheduler counts as one
    server: its size is not known before it is joined."""
    per_image, parts, linear, inputs = estimate_fhe_seconds(qm.fhe_circuit.statistics, *input_ciphertexts(qm.fhe_circuit))
    if per_image is None:
        print("estimated FHE time: not available for these crypto parameters (see benchmark.py)")
        return {"per_image_s": None}
    for part in parts:
        if part.get("note"):
            print(f"per-PBS cost at N={part['parameters']['polynomial_size']}: {part['note']}")
    for term in (linear, inputs):
        if term.get("note"):
            print(term["note"])
    threads = runtime_threads()
    servers = 1 if cfg.scheduler else max(1, cfg.workers)
    server_threads = cfg.threads_per_worker if cfg.workers and not cfg.scheduler else threads
    per_server = per_image * threads / server_threads
    total = per_server * n_todo / servers
    print(f"estimated FHE time: {per_image:.1f} s per image with {threads} thread(s) on this machine "
          f"({report['pbs_count']:,} PBS, {linear['multiply_adds']:,} multiply-adds, {inputs['encrypted_inputs']:,} {'compressed' if inputs['compressed'] else 'plain'} input ciphertexts); "
          f"{total / 3600:.2f} h for {n_todo} images on {servers} server(s) of {server_threads} thread(s)", flush=True)
    if total > CONFIRM_ABOVE_S and not cfg.yes and n_todo:
        raise UserError(f"this run is estimated at {total / 3600:.1f} h: pass --yes to run it (or fewer --n-images)")
    return {"per_image_s": per_image, "threads": threads, "per_server_image_s": per_server, "run_s": total,
            "parts": parts, "multiply_adds": linear, "inputs": inputs}


def main(argv=None) -> dict:
    cfg = parse_config(FHEConfig, argv, __doc__.split("\n")[0])
    resolve_settings(cfg, read_checkpoint(cfg.checkpoint))  # the effective settings, recorded and compared
    print("config:", asdict(cfg))
    out = Path(cfg.out_dir)
    csv_path, meta_path = out / "predictions.csv", out / "metadata.json"
    check_resume(meta_path, cfg)
    if cfg.summary_only:  # e.g. a run still going, or cut off: its statistics so far
        rows = read_done(csv_path)
        if not rows or not meta_path.is_file():
            raise UserError(f"{out} holds no finished image (predictions.csv and metadata.json)")
        meta = json.loads(meta_path.read_text())
        return store_summary(meta, meta_path, rows)
    test = data.dataset("test", cfg.data_dir, n=cfg.n_images, start=cfg.start)
    done = {int(r["index"]) for r in read_done(csv_path)}
    todo = [i for i in range(len(test)) if int(test.indices[i]) not in done]
    print(f"{len(done)} images already in {csv_path}, {len(todo)} to run")

    model, ckpt, qm, report = compile_checkpoint(cfg)
    print_report(report)
    report["estimate"] = check_estimate(qm, report, len(todo), cfg)
    client, server_dir, keygen_s = deploy_local(qm, model, out)
    report["keygen_seconds"] = keygen_s
    print(f"keygen {keygen_s:.1f} s")
    meta = {**provenance(cfg), "model_config": ckpt["model_config"], "cost": report, "dataset": test.arrays.source}
    write_json(meta_path, meta)

    new_file = not read_done(csv_path)
    eval_keys = client.evaluation_keys()
    with open(csv_path, "w" if new_file else "a", newline="") as f, \
            fhe_servers(server_dir, eval_keys, cfg.workers, cfg.threads_per_worker, cfg.scheduler) as submit:
        writer = csv.DictWriter(f, COLUMNS)
        if new_file:
            writer.writeheader()
        run_images(test, todo, client, qm, model, submit, writer, f, in_flight=2 * max(1, cfg.workers) if not cfg.scheduler else 64)

    return store_summary(meta, meta_path, read_done(csv_path))


def store_summary(meta: dict, meta_path: Path, rows: list[dict]) -> dict:
    """The statistics of the finished rows, printed and written into metadata.json, saying how
    many of the requested images they cover."""
    summary = summarize(rows)
    summary["images_requested"] = meta["config"]["n_images"]
    summary["complete"] = summary["n_images"] >= summary["images_requested"]
    meta["summary"] = summary
    write_json(meta_path, meta)
    print_summary(summary)
    return summary


def run_images(test, todo, client, qm, model, submit, writer, f, in_flight: int) -> None:
    """Encrypt and submit images (at most `in_flight` waiting at once); write each row as its
    result comes back, in whatever order, flushed."""
    print(f"{'image':>6} {'label':>5} {'torch':>5} {'sim':>5} {'fhe':>5} {'server s':>9}")
    bar = tqdm(total=len(todo), desc="FHE images", unit="img", leave=False)
    t_start, pending, queue = time.perf_counter(), {}, list(todo)
    while queue or pending:
        while queue and len(pending) < in_flight:
            i = queue.pop(0)
            image, label = test[i]
            times: dict = {}
            payload, feats = client.encrypt(image, times)
            with torch.no_grad():
                torch_logits = model.encrypted(torch.from_numpy(feats)).numpy().reshape(-1)
            sims = [qm.forward(feats, fhe="simulate").reshape(-1) for _ in range(2)]  # two independent draws
            row = {"index": int(test.indices[i]), "label": label, "torch_pred": int(torch_logits.argmax()),
                   "sim_pred": int(sims[0].argmax()), "sim2_pred": int(sims[1].argmax()), "input_bytes": len(payload),
                   "torch_logits": fmt(torch_logits), "sim_logits": fmt(sims[0])}
            pending[submit(payload)] = (row, times)
        finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
        for fut in finished:
            row, times = pending.pop(fut)
            result, times["server"] = fut.result()
            fhe_logits = client.decrypt(result, times)
            row.update({"fhe_pred": int(fhe_logits.argmax()), "fhe_logits": fmt(fhe_logits), **{f"{s}_s": f"{times[s]:.4f}" for s in STAGES}})
            writer.writerow(row)
            f.flush()
            bar.update()
            rate = bar.n / (time.perf_counter() - t_start) * 3600
            bar.set_postfix_str(f"{rate:.0f} img/h")
            tqdm.write(f"{row['index']:>6} {row['label']:>5} {row['torch_pred']:>5} {row['sim_pred']:>5} {row['fhe_pred']:>5} {times['server']:9.2f}")
    bar.close()


if __name__ == "__main__":
    run_main(main)
