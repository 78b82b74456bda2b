"""Accuracy under FHE simulation, next to torch and the clear quantized model on the same images.

    python infer_vl.py --checkpoint checkpoints/fast.pt [--n-images 1000] [--json out.json]

fhe="disable" runs Concrete ML's integer model in the clear (no noise); fhe="simulate"
adds the PBS errors that p_error allows, as real FHE would.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

import data
from common import UserError, format_topk, opt, parse_config, provenance, run_main, topk_accuracy, torch_logits, write_json
from fhe import CompileOptions, clear_features, compile_checkpoint, print_report


@dataclass
class SimConfig(CompileOptions):
    n_images: int | None = opt(None, "evaluate only the first N test images (default: all 10,000)")
    batch_size: int = opt(200, "images per simulation call")
    json: str | None = opt(None, "write accuracies, cost report and config to this JSON file")

    def __post_init__(self):
        super().__post_init__()
        if (self.n_images is not None and self.n_images < 1) or self.batch_size < 1:
            raise UserError("--n-images and --batch-size must be >= 1")


def quantized_logits(qm, feats: np.ndarray, fhe: str, batch: int, desc: str) -> np.ndarray:
    out = [qm.forward(np.ascontiguousarray(feats[i : i + batch]), fhe=fhe) for i in tqdm(range(0, len(feats), batch), desc=desc, leave=False)]
    return np.concatenate(out)


def evaluate(model, qm, images, labels, batch: int = 200) -> dict:
    """Top-k of torch, fhe="disable" and fhe="simulate" on the same images."""
    feats = clear_features(model, images)
    logits = {
        "torch": torch_logits(model, images),
        "disable": quantized_logits(qm, feats, "disable", batch, "disable"),
        "simulate": quantized_logits(qm, feats, "simulate", batch, "simulate"),
    }
    acc = {k: topk_accuracy(v, labels) for k, v in logits.items()}
    acc["sim_vs_torch_agreement"] = float((logits["simulate"].argmax(1) == logits["torch"].argmax(1)).mean())
    acc["sim_minus_torch_top1"] = paired_difference(logits["simulate"], logits["torch"], labels)
    return acc


def paired_difference(logits_a: np.ndarray, logits_b: np.ndarray, labels) -> dict:
    """Top-1 of a minus top-1 of b on the same images, with its paired standard error: only
    images where one is right and the other wrong carry it, so on a few thousand images a
    1-point difference is often within noise (1,000 images at 80 % agreement: about 1.4)."""
    labels = np.asarray(labels)
    d = (logits_a.argmax(1) == labels).astype(float) - (logits_b.argmax(1) == labels)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None  # JSON has no NaN
    return {"diff": float(d.mean()), "standard_error": se}


def main(argv=None) -> dict:
    cfg = parse_config(SimConfig, argv, __doc__.split("\n")[0])
    print("config:", asdict(cfg))
    model, ckpt, qm, report = compile_checkpoint(cfg)
    print_report(report)
    images, labels = data.stack(data.dataset("test", cfg.data_dir, n=cfg.n_images))
    acc = evaluate(model, qm, images, labels, cfg.batch_size)
    print(f"{ckpt['model_config']['name']} checkpoint {cfg.checkpoint}, {len(labels)} test images")
    for k in ("torch", "disable", "simulate"):
        print(format_topk(k, acc[k]))
    d = acc["sim_minus_torch_top1"]
    se = f" +- {100 * d['standard_error']:.2f}" if d["standard_error"] is not None else ""
    print(f"simulate vs torch: top-1 agreement {acc['sim_vs_torch_agreement']:.4f}, top-1 difference {100 * d['diff']:+.2f}{se} points (paired standard error)")
    result = {"n_images": len(labels), **acc, "cost": report, **provenance(cfg)}
    if cfg.json:
        write_json(cfg.json, result)
    return result


if __name__ == "__main__":
    run_main(main)
