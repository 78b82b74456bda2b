"""Accuracy, paired differences and the spread of repeated (random) draws."""

from __future__ import annotations

import numpy as np


def topk_accuracy(logits, labels, ks=(1, 2, 3)) -> dict[str, float]:
    """{"top1": ..., "top2": ..., "top3": ...}: fraction of labels among the k largest logits."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    order = np.argsort(-logits, axis=1, kind="stable")
    return {f"top{k}": float((order[:, :k] == labels[:, None]).any(1).mean()) for k in ks}


def format_topk(name: str, acc: dict) -> str:
    return f"{name:<10} " + "  ".join(f"{k} {v:.4f}" for k, v in acc.items())


def paired_difference(pred_a, pred_b, labels) -> dict:
    """Top-1 of a minus top-1 of b on the same images (predicted classes), with its paired
    standard error: only images where one is right and the other wrong carry it, so on a few
    thousand images a 1-point difference is often within noise (1,000 images at 80 %
    agreement: about 1.4)."""
    labels = np.asarray(labels)
    d = (np.asarray(pred_a) == labels).astype(float) - (np.asarray(pred_b) == labels)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None  # JSON has no NaN
    return {"diff": float(d.mean()), "standard_error": se}


def proportion_ci(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95 % by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (float(centre - half), float(centre + half))


def spread(values) -> dict:
    """Mean, standard deviation (ddof 1; 0 for one draw), min and max of repeated draws."""
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "draws": [float(x) for x in v]}


def format_spread(s: dict) -> str:
    return f"{s['mean']:.4f} +- {s['sd']:.4f} (min {s['min']:.4f}, max {s['max']:.4f}, {len(s['draws'])} draws)"

