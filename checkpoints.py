"""Self-describing checkpoints: weights, the model config that rebuilds them, and the FHE
settings the model is deployed with (its `deployment` block), in one file."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from cli import UserError
from provenance import atomic_write, versions

DEFAULT_CHECKPOINT = "checkpoints/fast10g_h256_2x80_kdw.pt"  # fast10g_h256 distilled from checkpoints/resnet_w.pt in two 80-epoch cycles (RESULTS.md, "Against the targets")
# The FHE settings a freshly trained model starts with, until `p_error_search.py --write`
# stores the p_error it finds (0.05: what the published reference's search found).
INITIAL_DEPLOYMENT = {"p_error": 0.05, "rounding_bits": 6, "rounding_method": "approximate", "source": "train.py default, not searched"}
DEPLOYMENT_KEYS = ("p_error", "rounding_bits", "rounding_method")


def save_checkpoint(path, model, **extra) -> None:
    """A self-describing checkpoint: weights, model config, library versions, plus `extra`
    (training config, epoch, metrics, accumulator report, deployment, ...)."""
    import torch

    from pruning import folded_state_dict

    payload = {"model": folded_state_dict(model), "model_config": asdict(model.cfg), "versions": versions(), **extra}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def read_checkpoint(path) -> dict:
    """The checkpoint's dict, or one clear UserError for a missing, damaged or foreign file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found (train one with train.py, or pass --checkpoint)")
    try:
        ckpt = torch.load(path, map_location="cpu")
    except Exception as e:  # torch raises pickle / zip / runtime errors for a damaged file
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project (no 'model' / 'model_config')")
    return ckpt


def load_checkpoint(path, teacher_ok: bool = False):
    """Rebuild the model from the file alone (strict loading). Returns (model in eval mode,
    checkpoint). A float teacher (kind "teacher", see models.TeacherNet) loads only where
    teacher_ok: it has no encrypted part, so nothing compiles it."""
    from models import ModelConfig, SplitNet, TeacherConfig, TeacherNet

    ckpt = read_checkpoint(path)
    is_teacher = ckpt.get("kind") == "teacher"
    if is_teacher and not teacher_ok:
        raise UserError(f"{path} is a float teacher network (for train.py --teacher): it has no encrypted part to run under FHE")
    try:
        model = TeacherNet(TeacherConfig.from_dict(ckpt["model_config"])) if is_teacher else SplitNet(ModelConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"], strict=True)
    except (RuntimeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"checkpoint {path} does not match its model config: {first}") from None
    return model.eval(), ckpt


def deployment(ckpt: dict, path="the checkpoint") -> dict:
    """The deployed FHE settings stored in a checkpoint: p_error, rounding bits and method."""
    d = ckpt.get("deployment")
    if not isinstance(d, dict) or any(k not in d for k in DEPLOYMENT_KEYS):
        raise UserError(
            f"{path} stores no deployed FHE settings: pass --p-error and --rounding-bits, "
            f"or store them with p_error_search.py --write"
        )
    return d


def write_deployment(path, **settings) -> dict:
    """Store deployed settings in a checkpoint file (the rest of it unchanged)."""
    import torch

    ckpt = read_checkpoint(path)
    ckpt["deployment"] = {**ckpt.get("deployment", {}), **settings}
    deployment(ckpt, path)  # complete
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
    return ckpt["deployment"]
