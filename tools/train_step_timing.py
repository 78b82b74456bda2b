"""Time one distillation step of train.py (student forward and backward, teacher forward, AdamW
step) on random images, four ways: the eager teacher or its traced, frozen graph
(models.traced_teacher), and the student's clear layer in the default (NCHW) or channels_last
(NHWC) memory format. train.py uses both speed-ups in float32 runs; this shows what each buys
on the machine at hand (RESULTS.md, "Training speed on CPU").

    python tools/train_step_timing.py --json results/train_step_timing_<machine>.json

Run it on an idle machine: each row is the median of --steps timed steps after one warm-up step,
the four setups taking turns so that a change in the machine's speed reaches all of them.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import UserError, check_output_file, opt, parse_config, run_main  # noqa: E402
from models import CONFIGS  # noqa: E402

SETUPS = (("eager", False, False), ("traced teacher", True, False), ("channels_last", False, True), ("both", True, True))


@dataclass
class StepTimingConfig:
    model: str = opt("fast10g_c128", "student config to time (random weights)", choices=sorted(CONFIGS))
    teacher: str = opt("checkpoints/resnet_w.pt", "float teacher checkpoint (train.py --model resnet*)")
    batch_size: int = opt(128, "images per step, as train.py's --batch-size")
    steps: int = opt(5, "timed steps per setup, after one warm-up step")
    threads: int = opt(2, "torch threads")
    json: str | None = opt(None, "write the rows, the command and the hardware to this JSON file")

    def __post_init__(self):
        if self.batch_size < 1 or self.steps < 1 or self.threads < 1:
            raise UserError("--batch-size, --steps and --threads must be >= 1")
        if not Path(self.teacher).is_file():
            raise UserError(f"--teacher {self.teacher}: no such file")
        if self.json:
            check_output_file(self.json, "--json")


def main(argv=None) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from checkpoints import load_checkpoint
    from models import SplitNet, traced_teacher
    from provenance import provenance, write_json

    cfg = parse_config(StepTimingConfig, argv, __doc__.split("\n\n")[0])
    print(f"config: {cfg}", flush=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    teacher, ckpt = load_checkpoint(cfg.teacher, teacher_ok=True)
    if ckpt.get("kind") != "teacher":
        raise UserError(f"--teacher {cfg.teacher} is a split model; give a float teacher")
    teacher.eval()
    teachers = {False: teacher, True: traced_teacher(teacher)}
    student = SplitNet(CONFIGS[cfg.model]).train()
    students = {False: student, True: copy.deepcopy(student)}
    students[True].clear.to(memory_format=torch.channels_last)
    opts = {k: torch.optim.AdamW(s.parameters(), lr=1e-6) for k, s in students.items()}
    c = student.cfg
    x = torch.randn(cfg.batch_size, c.in_channels, c.image_size, c.image_size)
    y = torch.randint(0, 10, (cfg.batch_size,))

    def step(traced: bool, nhwc: bool) -> float:
        t0 = time.perf_counter()
        out = students[nhwc](x)
        with torch.no_grad():
            soft = teachers[traced](x)
        loss = F.cross_entropy(out, y) + F.kl_div(F.log_softmax(out, 1), F.log_softmax(soft, 1), log_target=True, reduction="batchmean")
        opts[nhwc].zero_grad(set_to_none=True)
        loss.backward()
        opts[nhwc].step()
        return time.perf_counter() - t0

    times = {name: [] for name, _, _ in SETUPS}
    for _, traced, nhwc in SETUPS:
        step(traced, nhwc)  # warm-up: oneDNN picks and caches its kernels
    for _ in tqdm(range(cfg.steps), desc="rounds", file=sys.stderr):
        for name, traced, nhwc in SETUPS:
            times[name].append(step(traced, nhwc))
    base = statistics.median(times["eager"])
    rows = []
    print(f"{'setup':>15} {'s / step':>9} {'vs eager':>9}")
    for name, traced, nhwc in SETUPS:
        med = statistics.median(times[name])
        rows.append({"setup": name, "traced_teacher": traced, "channels_last": nhwc, "seconds_per_step": med, "seconds": times[name], "vs_eager": med / base})
        print(f"{name:>15} {med:9.3f} {med / base:9.2f}")
    if cfg.json:
        write_json(cfg.json, {**provenance(cfg), "rows": rows})
    return rows


if __name__ == "__main__":
    run_main(main)
