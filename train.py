"""Quantization-aware training of the split VGG on CIFAR-10.

    python train.py --model fast --epochs 60 --out checkpoints/fast.pt
    python train.py --model fast --epochs 60 --out checkpoints/fast.pt --resume
    python train.py --model resnet --epochs 30                      # a float teacher
    python train.py --model fast --teacher checkpoints/resnet.pt    # distilled from it
    python train.py --model fast --teacher checkpoints/resnet.pt --bf16    # its clear layer and teacher in bfloat16
    python train.py --model fast10w --rounding-bits 5               # rounding-aware (rounding.py)
    python train.py --model fast --init checkpoints/fast.pt --rounding-bits 5 --epochs 5 --lr 5e-4
                                                                    # fine-tuned from trained weights
    python train.py --model fast10w --init checkpoints/fast10w.pt --rounding-bits 5 --rounding-noise 0.1 --epochs 4 --lr 5e-4
                                                                    # and with the lookups' errors

One line per epoch, on the terminal and in `<out>.log` (each start headed by its command, CPU
and code commit; a resume appends); a checkpoint every epoch (the self-describing `--out`, plus
`<out>.state.pt` with the optimizer for --resume). The last `--val-size` training images are
held out for validation: the test split is for final numbers only.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import data
from checkpoints import INITIAL_DEPLOYMENT, load_checkpoint, save_checkpoint
from cli import UserError, check_output_file, opt, parse_config, run_main
from fhe import ROUNDING_BITS
from models import BIT_WIDTH_FIELDS, CONFIGS, TEACHERS, SplitNet, TeacherNet, same_layers, traced_teacher
from provenance import STARTED_FROM, atomic_write, command_line, describe_cpu, hardware, versions
from pruning import accumulator_bits, apply_pruning, load_pruned_state, pruned_state
from rounding import round_accumulators


@dataclass
class TrainConfig:
    model: str = opt("fast", "model config to train (split models; resnet*: float teachers for --teacher)", choices=sorted(CONFIGS) + sorted(TEACHERS))
    out: str = opt("", "checkpoint path (default: checkpoints/<model>.pt)")
    epochs: int = opt(60, "number of epochs")
    batch_size: int = opt(128, "images per step")
    lr: float = opt(2e-3, "peak learning rate of AdamW (cosine decay to 0, 1 epoch warm-up)")
    weight_decay: float = opt(5e-5, "AdamW weight decay")
    label_smoothing: float = opt(0.0, "cross-entropy label smoothing")
    val_size: int = opt(5000, "last N training images held out for validation")
    n_train: int | None = opt(None, "use only the first N training images (quick runs, tests)")
    accumulator_bits: int | None = opt(None, "override the config's pruning target in bits (0: no pruning)")
    data_dir: str | None = opt(None, "CIFAR-10 location (default: $CIFAR10_DIR, else ./data)")
    seed: int = opt(0, "random seed")
    threads: int = opt(0, "torch CPU threads (0: torch's default)")
    workers: int = opt(2, "data-loading worker processes")
    teacher: str | None = opt(None, "distill from this float teacher checkpoint (train one with --model resnet)")
    distill_alpha: float = opt(0.7, "with --teacher: weight of the teacher's soft targets in the loss (the rest: labels)")
    distill_temperature: float = opt(4.0, "with --teacher: softmax temperature of the soft targets")
    init: str | None = opt(None, "start from the weights of this checkpoint (fine-tuning), not from random ones: a model with "
                           "--model's layers, its bit widths may differ")
    rounding_bits: int = opt(0, "train with every encrypted accumulator rounded to N bits as Concrete ML will round it "
                             "(rounding.py; 2 to 8), and deploy at N bits; 0: no rounding while training, deployed at 6")
    rounding_noise: float = opt(0.0, "with --rounding-bits: move each rounded accumulator one step up or down with this probability "
                                "while training, as a lookup at p_error P reads it under FHE (0 to 0.5; 0: exact)")
    bf16: bool = opt(False, "compute in bfloat16 while training (CPU autocast; faster where the CPU has AMX or AVX-512 BF16): "
                     "a float teacher (--model resnet*) whole, a split model's clear layer (conv, batch norm, pooling) and "
                     "its --teacher; quantizers, validation and checkpoints stay float32")
    resume: bool = opt(False, "continue from <out>.state.pt")
    max_steps: int | None = opt(None, "stop each epoch after N steps (smoke tests)")

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UserError("--epochs and --batch-size must be >= 1 and --lr > 0")
        self.out = self.out or f"checkpoints/{self.model}.pt"
        check_output_file(self.out, "--out")
        check_output_file(state_path(self.out), "--out")
        check_output_file(log_path(self.out), "--out")
        if not 0 <= self.distill_alpha <= 1 or self.distill_temperature <= 0:
            raise UserError("--distill-alpha must be in [0, 1] and --distill-temperature > 0")
        if self.teacher and self.model in TEACHERS:
            raise UserError(f"--model {self.model} is a teacher: it learns from the labels, not from --teacher")
        if self.rounding_bits and self.rounding_bits not in ROUNDING_BITS:
            raise UserError(f"--rounding-bits must be 0 or {ROUNDING_BITS.start} to {ROUNDING_BITS.stop - 1}, got {self.rounding_bits}")
        if self.rounding_bits and self.model in TEACHERS:
            raise UserError(f"--model {self.model} is a float teacher: it has no accumulators to round (--rounding-bits)")
        if not 0 <= self.rounding_noise <= 0.5 or (self.rounding_noise and not self.rounding_bits):
            raise UserError(f"--rounding-noise must be in [0, 0.5] and needs --rounding-bits, got {self.rounding_noise}")
        if self.init and not Path(self.init).is_file():
            raise UserError(f"--init {self.init}: no such file")
        if self.teacher and not Path(self.teacher).is_file():
            raise UserError(f"--teacher {self.teacher}: no such file")


def initial_deployment(cfg: TrainConfig) -> dict:
    """The FHE settings a new checkpoint carries until p_error_search.py --write replaces them."""
    if not cfg.rounding_bits:
        return dict(INITIAL_DEPLOYMENT)
    noise = f" --rounding-noise {cfg.rounding_noise}" if cfg.rounding_noise else ""
    return {**INITIAL_DEPLOYMENT, "rounding_bits": cfg.rounding_bits,
            "source": f"train.py --rounding-bits {cfg.rounding_bits}{noise} (trained with it), p_error not searched"}


def state_path(out: str) -> Path:
    return Path(out).with_suffix(".state.pt")


def log_path(out: str) -> Path:
    return Path(out).with_suffix(".log")


def open_log(cfg: TrainConfig):
    """`<out>.log`, begun anew by a new run and appended to by a resume, opened with a line
    naming this start: the checkpoint history has the epochs, not the machine each ran on."""
    hw, code = hardware(), STARTED_FROM
    commit = f"{code['commit'][:10]}{' (modified)' if code['modified'] else ''}" if code else "unknown"
    path = log_path(cfg.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a" if cfg.resume else "w")
    f.write(f"# {time.strftime('%Y-%m-%d %H:%M %Z')}: {command_line()} | {describe_cpu(hw)}, {hw['cores']} cores, "
            f"torch threads {cfg.threads or torch.get_num_threads()} | code {commit}\n")
    return f


def runtime_stats(model: nn.Module) -> dict:
    """The raw state of Brevitas' runtime-statistics scalings. For their first steps they
    collect activation statistics in a counter and a buffer; state_dict() leaves the counter
    out and folds the buffer into the scale, so that a model loaded from it counts its
    statistics as done. A resume restores them as they were, or epoch 2 of a resumed run
    would train differently from epoch 2 of an uninterrupted one."""
    from brevitas.core.scaling.standalone import ParameterFromRuntimeStatsScaling

    return {n: {"counter": int(m.counter), "buffer": m.buffer.detach().clone(), "value": m.value.detach().clone()}
            for n, m in model.named_modules() if isinstance(m, ParameterFromRuntimeStatsScaling)}


def load_runtime_stats(model: nn.Module, stats: dict) -> None:
    with torch.no_grad():
        for name, s in stats.items():
            m = model.get_submodule(name)
            m.counter = s["counter"]
            m.buffer.copy_(s["buffer"])
            m.value.copy_(s["value"])


STATE_KEYS = ("model", "optimizer", "scheduler", "rng", "loader_rng", "epoch", "history", "train_config")


def read_state(path: Path) -> dict:
    """The training state for --resume, or one clear UserError if it is damaged."""
    try:
        st = torch.load(path, map_location="cpu")
    except Exception as e:  # a truncated file: zip / pickle / runtime errors from torch
        raise UserError(f"--resume: cannot read the training state {path} ({type(e).__name__}); "
                        f"delete it to start again, or restore it") from None
    missing = [k for k in STATE_KEYS if not isinstance(st, dict) or k not in st]
    if missing:
        raise UserError(f"--resume: {path} is not a training state of this project (missing {', '.join(missing)})")
    return st


def distillation_loss(logits, teacher_logits, labels, alpha: float, temperature: float, ce) -> torch.Tensor:
    """(1 - alpha) x ce(logits, labels) + alpha x T^2 x KL(teacher || student), both softmaxes
    at temperature T (Hinton et al., 2015; T^2 keeps the soft term's gradients at the scale
    of the hard one's)."""
    t = temperature
    soft = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1), log_target=True, reduction="batchmean")
    return (1 - alpha) * ce(logits, labels) + alpha * t * t * soft


def load_teacher(path: str) -> tuple[nn.Module, dict]:
    """The teacher in eval mode, frozen, and what the student's checkpoint records of it."""
    from provenance import sha256_file

    teacher, ckpt = load_checkpoint(path, teacher_ok=True)
    if ckpt.get("kind") != "teacher":
        raise UserError(f"--teacher {path} is a split model; give a float teacher (train.py --model resnet)")
    for p_ in teacher.parameters():
        p_.requires_grad_(False)
    return teacher, {"path": path, "sha256": sha256_file(path), "model": ckpt["model_config"]["name"],
                     "val_acc": (ckpt.get("metrics") or {}).get("val_acc")}


def load_init(model: nn.Module, path: str) -> dict:
    """Copy the weights of checkpoint `path` into `model`, for --init: a model of the same
    layers, whose bit widths may differ (models.same_layers; e.g. a 3-bit model fine-tuned to
    4-bit activations). Returns what the new checkpoint records of it."""
    from provenance import sha256_file

    init, ckpt = load_checkpoint(path, teacher_ok=True)
    if type(init) is not type(model) or not same_layers(init.cfg, model.cfg):
        raise UserError(f"--init {path} holds a {ckpt['model_config'].get('name')!r} model whose layers differ from --model's "
                        f"(only the bit widths {', '.join(BIT_WIDTH_FIELDS)} may differ)")
    model.load_state_dict(init.state_dict())
    return {"path": path, "sha256": sha256_file(path), "model": init.cfg.name, "epoch": ckpt.get("epoch"),
            "val_acc": (ckpt.get("metrics") or {}).get("val_acc")}


def evaluate(model: nn.Module, loader, desc: str = "eval") -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in tqdm(loader, desc=desc, leave=False):
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return correct / max(total, 1)


def cpu_has_bf16() -> bool:
    """Whether oneDNN has bfloat16 kernels for this CPU (AVX-512 or AMX); without them autocast to bfloat16 runs
    in slow reference code (measured on a 2-core AMD EPYC with AVX2 only: 15 s per step instead of 1 s in float32)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN: no bfloat16 kernels either
        return False


def train(cfg: TrainConfig) -> dict:
    bf16_dropped = cfg.bf16 and not cpu_has_bf16()
    if bf16_dropped:  # the same run in float32: slower per step only where bfloat16 would have been faster
        cfg.bf16 = False
    # loaded before seeding: building it draws initial weights, which would change the student's
    teacher, teacher_info = load_teacher(cfg.teacher) if cfg.teacher else (None, None)
    if teacher is not None and not cfg.bf16:
        teacher = traced_teacher(teacher)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    is_teacher = cfg.model in TEACHERS
    if is_teacher:  # a float network: nothing to prune, no accumulators, never deployed
        model, bits = TeacherNet(dataclasses.replace(TEACHERS[cfg.model])), 0
    else:
        model_cfg = dataclasses.replace(CONFIGS[cfg.model])
        if cfg.accumulator_bits is not None:
            model_cfg.accumulator_bits = cfg.accumulator_bits
        model, bits = SplitNet(model_cfg), model_cfg.accumulator_bits
        model.clear.low_precision = cfg.bf16
    init_info = load_init(model, cfg.init) if cfg.init else None  # a resume then loads its own weights over these
    resume_state = None
    if cfg.resume:
        sp = state_path(cfg.out)
        if not sp.is_file():
            raise UserError(f"--resume: no training state at {sp}")
        resume_state = read_state(sp)
        for key in ("model", "init", "teacher", "distill_alpha", "distill_temperature", "rounding_bits", "rounding_noise"):  # what the run learns from
            was = resume_state["train_config"].get(key, getattr(TrainConfig, key))
            if was != getattr(cfg, key):
                raise UserError(f"--resume: {sp} was trained with --{key.replace('_', '-')} {was}, not {getattr(cfg, key)}")
        load_pruned_state(model, resume_state["model"])
        load_runtime_stats(model, resume_state.get("runtime_stats", {}))
    else:
        apply_pruning(model, bits)
    if cfg.rounding_bits:
        round_accumulators(model, cfg.rounding_bits, noise=cfg.rounding_noise)  # in every forward pass of this run, validation included

    train_ds, val_ds = data.train_val_datasets(cfg.data_dir, cfg.val_size, cfg.n_train)
    g = torch.Generator().manual_seed(cfg.seed)
    train_dl = torch.utils.data.DataLoader(
        train_ds, cfg.batch_size, shuffle=True, generator=g, num_workers=cfg.workers, drop_last=len(train_ds) > cfg.batch_size
    )
    val_dl = torch.utils.data.DataLoader(val_ds, 500, num_workers=cfg.workers)

    steps_per_epoch = len(train_dl) if cfg.max_steps is None else min(cfg.max_steps, len(train_dl))
    total = cfg.epochs * steps_per_epoch
    if not is_teacher:  # its full-resolution conv, batch norm and pooling run faster in NHWC on CPU: with the traced
        # teacher, a quarter less time per step (tools/train_step_timing.py, RESULTS.md "Training speed in float32")
        model.clear.to(memory_format=torch.channels_last)
    opt_ = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = steps_per_epoch

    def lr_at(step):  # linear warm-up for one epoch, then cosine to 0
        return (step + 1) / warm if step < warm else 0.5 * (1 + np.cos(np.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt_, lr_at)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    start_epoch, history = 0, []
    if resume_state is not None:
        st = resume_state
        opt_.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng"])
        g.set_state(st["loader_rng"])
        start_epoch, history = st["epoch"], st["history"]

    if start_epoch >= cfg.epochs:  # e.g. `make training` run again after this run's last epoch: its log stays as it was
        print(f"{cfg.out}: already trained for {start_epoch} epochs (--epochs {cfg.epochs}); nothing to train")
        return finish(model, history, cfg.out, is_teacher)
    log = open_log(cfg)

    def say(line: str) -> None:  # to the terminal and to <out>.log, which is flushed line by line
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    say(f"config: {asdict(cfg)}")
    if bf16_dropped:
        say("--bf16 ignored: this CPU has no bfloat16 kernels (AVX-512 or AMX), float32 is faster here")
    if cfg.resume:
        say(f"resumed from {state_path(cfg.out)} after epoch {start_epoch}")
    say(f"{'epoch':>5} {'loss':>7} {'train':>6} {'val':>6} {'lr':>9} {'sec':>6}")
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        model.train()
        apply_pruning(model, bits)  # re-select the kept weights
        loss_sum = correct = seen = 0
        bar = tqdm(train_dl, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for step, (x, y) in enumerate(bar):
            if step >= steps_per_epoch:
                break
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16 and is_teacher):  # a split model: ClearModule's own
                out = model(x).float()
            if teacher is None:
                loss = loss_fn(out, y)
            else:
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                    soft = teacher(x).float()  # the same augmented images
                loss = distillation_loss(out, soft, y, cfg.distill_alpha, cfg.distill_temperature, loss_fn)
            opt_.zero_grad(set_to_none=True)
            loss.backward()
            opt_.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        val_acc = evaluate(model, val_dl, "val")
        row = {
            "epoch": epoch + 1,
            "loss": loss_sum / seen,
            "train_acc": correct / seen,
            "val_acc": val_acc,
            "lr": opt_.param_groups[0]["lr"],
            "seconds": time.time() - t0,
        }
        history.append(row)
        say(f"{row['epoch']:>5} {row['loss']:7.4f} {row['train_acc']:6.4f} {row['val_acc']:6.4f} {row['lr']:9.2e} {row['seconds']:6.1f}")
        extra = {"kind": "teacher"} if is_teacher else {"accumulators": accumulator_bits(model), "deployment": initial_deployment(cfg)}
        if teacher_info:
            extra["distilled_from"] = teacher_info
        if init_info:
            extra["init_from"] = init_info
        save_checkpoint(cfg.out, model, train_config=asdict(cfg), epoch=epoch + 1, metrics=row, history=history, **extra)
        st = {
            "model": pruned_state(model),  # weights and pruning masks, to resume exactly
            "runtime_stats": runtime_stats(model),
            "optimizer": opt_.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": torch.get_rng_state(),
            "loader_rng": g.get_state(),
            "epoch": epoch + 1,
            "history": history,
            "train_config": asdict(cfg),
            "versions": versions(),
        }
        atomic_write(state_path(cfg.out), lambda tmp: torch.save(st, tmp))
    log.close()
    return finish(model, history, cfg.out, is_teacher)


def finish(model, history: list, out: str, is_teacher: bool) -> dict:
    """train()'s result; for a split model, its worst-case accumulators, also printed."""
    if is_teacher:
        return {"history": history, "out": out}
    acc = accumulator_bits(model)
    print("worst-case accumulator per encrypted layer (signed bits):")
    for name, r in acc.items():
        print(f"  {name:<16} {r['bits']:>3} bits  max|acc| {r['max_abs']:>6}  non-zero weights/neuron <= {r['nonzero_per_neuron_max']}/{r['fan_in']}")
    return {"history": history, "accumulators": acc, "out": out}


def main(argv=None):
    cfg = parse_config(TrainConfig, argv, __doc__.split("\n")[0])
    return train(cfg)


if __name__ == "__main__":
    run_main(main)
