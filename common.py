"""Small pieces every script shares: dataclass configs as command lines, checkpoints,
library versions and the hardware a result was measured on."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
from dataclasses import MISSING, asdict, fields
from pathlib import Path

DEFAULT_CHECKPOINT = "checkpoints/fast.pt"


class UserError(RuntimeError):
    """Bad input from the user; scripts print the message and exit with status 2."""


def opt(default, help: str, **kw):
    """A config field with its --help text (say the unit in it)."""
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def parse_config(cls, argv, description: str):
    """Build an argparse parser from a config dataclass; unknown or ill-typed options are rejected."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(cls):
        name = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        kw = {"help": f.metadata.get("help", ""), "default": default}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        ftype = f.type if isinstance(f.type, type) else eval(f.type, {"Path": Path})  # "int | None" etc.
        if ftype is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _scalar_type(ftype)
        parser.add_argument(name, **kw)
    args = parser.parse_args(argv)
    return cls(**vars(args))


def _scalar_type(t):
    if t in (int, float, str):
        return t
    args = [a for a in getattr(t, "__args__", ()) if a is not type(None)]
    return args[0] if args else str


def run_main(fn, argv=None):
    """Call fn(argv); turn a UserError or a data error into one message and exit status 2."""
    from data import DataError

    try:
        return fn(argv)
    except (UserError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "brevitas", "concrete-ml", "concrete-python", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem_gib, "platform": platform.platform()}


def provenance(config) -> dict:
    """What every result file carries: the command, its config, library versions, hardware."""
    return {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "config": asdict(config) if dataclasses.is_dataclass(config) else config,
        "versions": versions(),
        "hardware": hardware(),
    }


def atomic_write(path: str | os.PathLike, write) -> None:
    """write(tmp_path) then rename, so an interrupted run never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, default=str)
            f.write("\n")

    atomic_write(path, w)


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(path, model, **extra) -> None:
    """A self-describing checkpoint: weights, model config, library versions, plus `extra`
    (training config, epoch, metrics, accumulator report, ...)."""
    import torch

    from pruning import folded_state_dict

    payload = {"model": folded_state_dict(model), "model_config": asdict(model.cfg), "versions": versions(), **extra}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path):
    """Rebuild the model from the file alone (strict loading). Returns (model in eval mode, checkpoint)."""
    import torch

    from models import ModelConfig, SplitNet

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found (train one with train.py, or pass --checkpoint)")
    try:
        ckpt = torch.load(path, map_location="cpu")
    except Exception as e:  # torch raises pickle / zip / runtime errors for a damaged file
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project (no 'model' / 'model_config')")
    try:
        model = SplitNet(ModelConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"], strict=True)
    except (RuntimeError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"checkpoint {path} does not match its model config: {first}") from None
    return model.eval(), ckpt


# ---------------------------------------------------------------- metrics


def topk_accuracy(logits, labels, ks=(1, 2, 3)) -> dict[str, float]:
    """{"top1": ..., "top2": ..., "top3": ...}: fraction of labels among the k largest logits."""
    import numpy as np

    logits, labels = np.asarray(logits), np.asarray(labels)
    order = np.argsort(-logits, axis=1, kind="stable")
    return {f"top{k}": float((order[:, :k] == labels[:, None]).any(1).mean()) for k in ks}


def format_topk(name: str, acc: dict) -> str:
    return f"{name:<10} " + "  ".join(f"{k} {v:.4f}" for k, v in acc.items())


def torch_logits(model, images, batch: int = 500):
    """Logits of the full model (clear then encrypted part, float) as a numpy array."""
    import numpy as np
    import torch

    model.eval()
    with torch.no_grad():
        return np.concatenate([model(images[i : i + batch]).numpy() for i in range(0, len(images), batch)])
