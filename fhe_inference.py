"""Real FHE inference with a client / server split, timed stage by stage.

    python fhe_inference.py --checkpoint checkpoints/fast.pt --n-images 10

Client: clear layer -> quantize -> encrypt -> serialize  ==>  server: FHE run  ==>
client: decrypt -> dequantize -> argmax. The server's directory holds the compiled model
and the evaluation keys only; the secret key never leaves the client's directory.

Writes <out-dir>/predictions.csv (one row per image: label, torch / simulated / FHE
predictions and logits side by side, per-stage seconds) and <out-dir>/metadata.json
(model and compile config, p_error, rounding, versions, CPU). A rerun with the same
settings skips the images already in the CSV.
"""

from __future__ import annotations

import csv
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import data
from common import UserError, opt, parse_config, provenance, run_main, write_json
from common import torch_logits as torch_logits_of
from fhe import CompileOptions, clear_features, compile_checkpoint, print_report

STAGES = ("clear", "quantize", "encrypt", "serialize", "server", "decrypt", "dequantize")
COLUMNS = ["index", "label", "torch_pred", "sim_pred", "fhe_pred", *[f"{s}_s" for s in STAGES], "input_bytes", "torch_logits", "sim_logits", "fhe_logits"]
# settings that must match for a rerun to append to an existing CSV
RESUME_KEYS = ("checkpoint", "p_error", "global_p_error", "rounding_bits", "rounding_method", "n_calib")


@dataclass
class FHEConfig(CompileOptions):
    n_images: int = opt(1, "number of test images to classify under FHE")
    start: int = opt(0, "index of the first test image")
    out_dir: str = opt("runs/fhe", "where predictions.csv, metadata.json, client/ and server/ go")

    def __post_init__(self):
        super().__post_init__()
        if self.n_images < 1 or self.start < 0:
            raise UserError("--n-images must be >= 1 and --start >= 0")


def deploy(qm, out_dir: Path):
    """Save the compiled model with FHEModelDev, then give the client and the server their parts."""
    from concrete.ml.deployment import FHEModelClient, FHEModelDev, FHEModelServer

    client_dir, server_dir = out_dir / "client", out_dir / "server"
    for d in (client_dir, server_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        FHEModelDev(tmp, qm).save()
        shutil.copy(Path(tmp) / "client.zip", client_dir / "client.zip")
        shutil.copy(Path(tmp) / "server.zip", server_dir / "server.zip")
    client = FHEModelClient(str(client_dir), key_dir=str(client_dir / "keys"))
    t0 = time.perf_counter()
    client.generate_private_and_evaluation_keys(force=True)
    keygen_s = time.perf_counter() - t0
    # the "upload": the server receives the evaluation keys as bytes, nothing else
    (server_dir / "evaluation_keys.bin").write_bytes(client.get_serialized_evaluation_keys())
    server = FHEModelServer(str(server_dir))
    server.load()
    return client, server, keygen_s


def load_eval_keys(server_dir: Path):
    from concrete import fhe

    return fhe.EvaluationKeys.deserialize((server_dir / "evaluation_keys.bin").read_bytes())


def classify(model, client, server, eval_keys, image) -> tuple[np.ndarray, dict, int]:
    """One image (3, 32, 32) through the whole client -> server -> client path."""
    t = {}
    t0 = time.perf_counter()
    feats = clear_features(model, image[None])  # (1, C, H, W), C-contiguous
    t["clear"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    q = np.ascontiguousarray(client.model.quantize_input(feats))
    t["quantize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    enc = client.client.encrypt(q)
    t["encrypt"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    payload = enc.serialize()
    t["serialize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = server.run(payload, eval_keys)  # bytes in, bytes out: what would cross the network
    t["server"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    q_out = client.deserialize_decrypt(result)
    t["decrypt"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = client.model.post_processing(client.model.dequantize_output(q_out))
    t["dequantize"] = time.perf_counter() - t0
    return np.asarray(logits).reshape(-1), t, len(payload)


def read_done(csv_path: Path) -> list[dict]:
    if not csv_path.exists():
        return []
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("fhe_logits")]  # a cut-off last line is dropped
    return rows


def check_resume(meta_path: Path, cfg: FHEConfig) -> None:
    import json

    if not meta_path.exists():
        return
    old = json.loads(meta_path.read_text())["config"]
    diff = [k for k in RESUME_KEYS if old.get(k) != getattr(cfg, k)]
    if diff:
        raise UserError(f"{meta_path.parent} holds results for other settings ({', '.join(diff)}): choose another --out-dir")


def fmt(v: np.ndarray) -> str:
    return " ".join(f"{x:.6g}" for x in v)


def summarize(rows: list[dict]) -> dict:
    label = np.array([int(r["label"]) for r in rows])
    fhe = np.array([int(r["fhe_pred"]) for r in rows])
    sim = np.array([int(r["sim_pred"]) for r in rows])
    torch_ = np.array([int(r["torch_pred"]) for r in rows])
    server = np.array([float(r["server_s"]) for r in rows])
    return {
        "n_images": len(rows),
        "fhe_top1": float((fhe == label).mean()),
        "sim_top1": float((sim == label).mean()),
        "torch_top1": float((torch_ == label).mean()),
        "fhe_sim_agreement": float((fhe == sim).mean()),
        "fhe_torch_agreement": float((fhe == torch_).mean()),
        "server_s_median": float(np.median(server)),
        "stage_s_median": {s: float(np.median([float(r[f"{s}_s"]) for r in rows])) for s in STAGES},
    }


def main(argv=None) -> dict:
    cfg = parse_config(FHEConfig, argv, __doc__.split("\n")[0])
    print("config:", asdict(cfg))
    out = Path(cfg.out_dir)
    csv_path, meta_path = out / "predictions.csv", out / "metadata.json"
    check_resume(meta_path, cfg)
    test = data.dataset("test", cfg.data_dir, n=cfg.n_images, start=cfg.start)
    done = {int(r["index"]) for r in read_done(csv_path)}
    todo = [i for i in range(len(test)) if int(test.indices[i]) not in done]
    print(f"{len(done)} images already in {csv_path}, {len(todo)} to run")

    model, ckpt, qm, report = compile_checkpoint(cfg)
    client, server, keygen_s = deploy(qm, out)
    report["keygen_seconds"] = keygen_s
    print_report(report)
    t0 = time.perf_counter()
    eval_keys = load_eval_keys(out / "server")
    report["server_key_load_seconds"] = time.perf_counter() - t0
    meta = {**provenance(cfg), "model_config": ckpt["model_config"], "cost": report, "dataset": test.arrays.source}
    write_json(meta_path, meta)

    new_file = not csv_path.exists() or not read_done(csv_path)
    with open(csv_path, "a" if not new_file else "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        if new_file:
            writer.writeheader()
        print(f"{'image':>6} {'label':>5} {'torch':>5} {'sim':>5} {'fhe':>5} {'server s':>9}")
        for i in tqdm(todo, desc="FHE images", leave=False):
            image, label = test[i]
            fhe_logits, t, nbytes = classify(model, client, server, eval_keys, image)
            feats = clear_features(model, image[None])
            sim_logits = qm.forward(feats, fhe="simulate").reshape(-1)
            torch_logits = torch_logits_of(model, image[None]).reshape(-1)
            row = {"index": int(test.indices[i]), "label": label, "torch_pred": int(torch_logits.argmax()),
                   "sim_pred": int(sim_logits.argmax()), "fhe_pred": int(fhe_logits.argmax()),
                   **{f"{s}_s": f"{t[s]:.4f}" for s in STAGES}, "input_bytes": nbytes,
                   "torch_logits": fmt(torch_logits), "sim_logits": fmt(sim_logits), "fhe_logits": fmt(fhe_logits)}
            writer.writerow(row)
            f.flush()
            tqdm.write(f"{row['index']:>6} {label:>5} {row['torch_pred']:>5} {row['sim_pred']:>5} {row['fhe_pred']:>5} {t['server']:9.2f}")

    summary = summarize(read_done(csv_path))
    meta["summary"] = summary
    write_json(meta_path, meta)
    print(
        f"{summary['n_images']} images: FHE top-1 {summary['fhe_top1']:.4f}, simulation {summary['sim_top1']:.4f}, "
        f"torch {summary['torch_top1']:.4f}; FHE = simulation on {summary['fhe_sim_agreement']:.1%} of images; "
        f"median server time {summary['server_s_median']:.2f} s"
    )
    print("median seconds per stage: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["stage_s_median"].items()))
    return summary


if __name__ == "__main__":
    run_main(main)
