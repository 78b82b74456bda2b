"""Images per hour under real FHE on this machine, for several layouts of Dask workers.

    python throughput.py [--layouts 1x1,1x2,2x1] [--images-per-worker 3] [--json results/throughput_fast.json]

A layout WxT is W worker processes with T Concrete threads each (fhe_inference.py's
--workers W --threads-per-worker T); "local" is one server in this process with Concrete's
default threads (fhe_inference.py without --workers). The model is compiled at its deployed settings and the
keys generated once; the images are encrypted before the clock starts (encryption is the
client's work, about 1 s per image); then, per layout, the workers get server.zip and the
evaluation keys, and the clock runs from the first ciphertext submitted to the last result
back, W x --images-per-worker images in all. Every result is decrypted and compared with the
clear quantized model.

Scaling efficiency of a layout = its images per hour / (W x T x the 1x1 images per hour):
1.0 means every core used adds a whole single-thread server. The projection for a machine
or a cluster with more cores assumes that the per-core rate of the best layout using all the
cores measured here holds there;
it is printed and stored as a projection, not a measurement.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

import data
from checkpoints import read_checkpoint
from cli import UserError, check_output_file, opt, parse_config, run_main
from deployment import deploy_local
from fhe import CompileOptions, clear_features, compile_checkpoint, print_report, resolve_settings
from parallel import fhe_servers
from provenance import provenance, write_json

PROJECT_VCPUS = (16, 128)  # machines the projection is printed for (128: the reference's c6i.metal)


@dataclass
class ThroughputConfig(CompileOptions):
    layouts: str = opt("local,1x1,1x2,2x1", "comma-separated WxT (W Dask worker processes with T Concrete threads each) or local (this process, every core)")
    images_per_worker: int = opt(3, "images per worker in each layout (W x this many images are timed)")
    json: str | None = opt(None, "write the measurements and the projection to this JSON file")

    def __post_init__(self):
        super().__post_init__()
        parse_layouts(self.layouts)
        if self.images_per_worker < 1:
            raise UserError("--images-per-worker must be >= 1")
        if self.json:
            check_output_file(self.json, "--json")


def parse_layouts(text: str) -> list[tuple[int, int]]:
    """'local,1x1,2x1' -> [(0, cores), (1, 1), (2, 1)] (0 workers: in this process); a clear
    error for anything else."""
    out = []
    for item in text.split(","):
        if item.strip() == "local":
            out.append((0, os.cpu_count() or 1))
            continue
        w, _, t = item.strip().partition("x")
        if not (w.isdigit() and t.isdigit() and int(w) >= 1 and int(t) >= 1):
            raise UserError(f"--layouts: {item!r} is not WxT with W, T >= 1 (e.g. 2x1)")
        out.append((int(w), int(t)))
    return out


def cores(row: dict) -> int:
    return max(row["workers"], 1) * row["threads"]


def efficiency(rows: list[dict]) -> None:
    """Add each row's scaling efficiency against the 1x1 row (in place; None without one)."""
    base = next((r["images_per_hour"] for r in rows if (r["workers"], r["threads"]) == (1, 1)), None)
    for r in rows:
        r["efficiency"] = r["images_per_hour"] / (base * cores(r)) if base else None


def projection(rows: list[dict]) -> dict | None:
    """Images per hour on bigger machines at the per-core rate of the best layout that used
    the most cores here (with their contention for memory and cache): a projection."""
    most = max(map(cores, rows))
    best = max((r for r in rows if cores(r) == most), key=lambda r: r["images_per_hour"])
    per_core = best["images_per_hour"] / most
    return {"per_core_images_per_hour": per_core, "from_layout": best["layout"],
            "images_per_hour_at_vcpus": {str(n): per_core * n for n in PROJECT_VCPUS},
            "note": "projection: assumes the per-core rate measured here holds on every core"}


def time_layout(server_dir, eval_keys: bytes, payloads: list[bytes], workers: int, threads: int) -> tuple[list[bytes], float, list[float]]:
    """All payloads through W x T workers (W = 0: a server in this process): (results in
    payload order, wall seconds, server seconds)."""
    with fhe_servers(server_dir, eval_keys, workers, threads) as submit:  # workers are set up here
        t0 = time.perf_counter()
        futures = [submit(p) for p in payloads]
        bar = tqdm(cf.as_completed(futures), total=len(futures), desc=f"{workers}x{threads}", unit="img", leave=False)
        for done, _ in enumerate(bar, 1):
            bar.set_postfix_str(f"{done / (time.perf_counter() - t0) * 3600:.0f} img/h")
        wall = time.perf_counter() - t0
        results = [f.result() for f in futures]
    return [r for r, _ in results], wall, [s for _, s in results]


def main(argv=None) -> dict:
    cfg = parse_config(ThroughputConfig, argv, __doc__.split("\n")[0])
    layouts = parse_layouts(cfg.layouts)
    resolve_settings(cfg, read_checkpoint(cfg.checkpoint))
    n = max(max(w, 1) for w, _ in layouts) * cfg.images_per_worker
    images, _ = data.stack(data.dataset("test", cfg.data_dir, n=n))
    model, ckpt, qm, report = compile_checkpoint(cfg)
    print_report(report)
    clear_pred = qm.forward(clear_features(model, images), fhe="disable").argmax(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        client, server_dir, keygen_s = deploy_local(qm, model, tmp)
        eval_keys = client.evaluation_keys()
        payloads = [client.encrypt(im)[0] for im in tqdm(images, desc="encrypt", leave=False)]
        print(f"keygen {keygen_s:.1f} s; {n} images encrypted; evaluation keys {len(eval_keys) / 2**20:.1f} MiB")
        print(f"{'layout':>6} {'images':>6} {'wall s':>8} {'img/h':>8} {'server s median':>15} {'= clear':>7}")
        for w, t in layouts:
            k = max(w, 1) * cfg.images_per_worker
            results, wall, server_s = time_layout(server_dir, eval_keys, payloads[:k], w, t)
            pred = np.array([client.decrypt(r).argmax() for r in results])
            rows.append({"layout": f"{w}x{t}" if w else "local", "workers": w, "threads": t, "images": k, "wall_s": wall,
                         "images_per_hour": k / wall * 3600, "server_s_median": float(np.median(server_s)),
                         "agree_with_clear": int((pred == clear_pred[:k]).sum())})
            r = rows[-1]
            print(f"{r['layout']:>6} {k:>6} {wall:8.1f} {r['images_per_hour']:8.1f} {r['server_s_median']:15.2f} {r['agree_with_clear']:>4}/{k}", flush=True)
    efficiency(rows)
    proj = projection(rows)
    for r in rows:
        if r["efficiency"] is not None:
            print(f"{r['layout']}: scaling efficiency {r['efficiency']:.2f} (images per hour / (cores used x 1x1's))")
    print(f"PROJECTION, not measured ({proj['note']}): {proj['per_core_images_per_hour']:.1f} images per hour per core "
          f"(layout {proj['from_layout']}) -> " + ", ".join(f"{v:.0f} per hour on {k} vCPUs" for k, v in proj["images_per_hour_at_vcpus"].items()))
    result = {"model": ckpt["model_config"]["name"], "layouts": rows, "projection": proj, "keygen_seconds": keygen_s,
              "cost": report, **provenance(cfg)}
    if cfg.json:
        write_json(cfg.json, result)
    return result


if __name__ == "__main__":
    run_main(main)
