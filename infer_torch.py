"""Accuracy of a checkpoint in plain torch (float clear part, fake-quantized encrypted part;
or a float teacher network).

    python infer_torch.py --checkpoint checkpoints/fast.pt [--n-images 1000] [--json out.json]
"""

from __future__ import annotations

from dataclasses import dataclass

import data
from checkpoints import DEFAULT_CHECKPOINT, load_checkpoint
from cli import UserError, check_output_file, opt, parse_config, run_main
from fhe import torch_logits
from metrics import format_topk, topk_accuracy
from provenance import provenance, write_json


@dataclass
class TorchInferConfig:
    checkpoint: str = opt(DEFAULT_CHECKPOINT, "trained checkpoint (.pt)")
    n_images: int | None = opt(None, "evaluate only the first N test images (default: all 10,000)")
    data_dir: str | None = opt(None, "CIFAR-10 location (default: $CIFAR10_DIR, else ./data)")
    json: str | None = opt(None, "write the accuracies to this JSON file")

    def __post_init__(self):
        if self.n_images is not None and self.n_images < 1:
            raise UserError("--n-images must be >= 1")
        if self.json:
            check_output_file(self.json, "--json")


def main(argv=None) -> dict:
    cfg = parse_config(TorchInferConfig, argv, __doc__.split("\n")[0])
    model, ckpt = load_checkpoint(cfg.checkpoint, teacher_ok=True)
    test = data.dataset("test", cfg.data_dir, n=cfg.n_images)
    images, labels = data.stack(test)
    acc = topk_accuracy(torch_logits(model, images), labels)
    print(f"{ckpt['model_config']['name']} checkpoint {cfg.checkpoint}, {len(labels)} test images")
    print(format_topk("torch", acc))
    result = {"n_images": len(labels), "torch": acc, "dataset": test.arrays.source, **provenance(cfg)}
    if cfg.json:
        write_json(cfg.json, result)
    return result


if __name__ == "__main__":
    run_main(main)
