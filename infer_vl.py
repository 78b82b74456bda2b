"""Accuracy under FHE simulation, next to torch and the clear quantized model on the same images.

    python infer_vl.py --checkpoint checkpoints/fast.pt [--n-images 1000] [--repeats 3] [--json out.json]
    python infer_vl.py --repeats 10 --workers 8          # the draws spread over 8 Dask workers

fhe="disable" runs Concrete ML's integer model in the clear (no noise, one result);
fhe="simulate" adds the PBS errors that p_error allows, as real FHE would. Simulation is
random and cannot be seeded, so it is drawn --repeats times: top-1/2/3 are reported as mean
+- standard deviation with min and max, with the paired simulate - torch difference per draw
and the agreement of two draws (what FHE-vs-simulation agreement should be compared with).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import data
from cli import UserError, check_output_file, opt, parse_config, run_main
from fhe import calibration_set, compile_checkpoint, compile_options, evaluate, print_report
from metrics import format_spread, format_topk
from parallel import ParallelOptions, simulators
from provenance import provenance, write_json


@dataclass
class SimConfig(ParallelOptions):
    n_images: int | None = opt(None, "evaluate only the first N test images (default: all 10,000)")
    batch_size: int = opt(200, "images per simulation call")
    repeats: int = opt(3, "independent simulations of the same images (simulation is random)")
    json: str | None = opt(None, "write accuracies, cost report and config to this JSON file")

    def __post_init__(self):
        super().__post_init__()
        if (self.n_images is not None and self.n_images < 1) or self.batch_size < 1 or self.repeats < 1:
            raise UserError("--n-images, --batch-size and --repeats must be >= 1")
        if self.json:
            check_output_file(self.json, "--json")


def main(argv=None) -> dict:
    cfg = parse_config(SimConfig, argv, __doc__.split("\n")[0])
    model, ckpt, qm, report = compile_checkpoint(cfg)  # fills cfg's p_error / rounding from the checkpoint
    print("config:", asdict(cfg))
    print_report(report)
    images, labels = data.stack(data.dataset("test", cfg.data_dir, n=cfg.n_images))
    with simulators(cfg, cfg.batch_size) as workers:  # None: the draws run in this process
        if workers:
            workers.compile(cfg.checkpoint, compile_options(cfg), calibration_set(model, cfg))
        acc = evaluate(model, qm, images, labels, cfg.batch_size, cfg.repeats, submit=workers.submit if workers else None)
    print(f"{ckpt['model_config']['name']} checkpoint {cfg.checkpoint}, {len(labels)} test images")
    for k in ("torch", "disable"):
        print(format_topk(k, acc[k]))
    for k, s in acc["simulate_spread"].items():
        print(f"simulate   {k} {format_spread(s)}")
    d = acc["sim_minus_torch_top1"]
    se = f" +- {100 * d['standard_error']:.2f}" if d["standard_error"] is not None else ""
    print(f"simulate vs torch: top-1 agreement {acc['sim_vs_torch_agreement']:.4f}, top-1 difference {100 * d['diff']:+.2f}{se} points "
          f"(mean over draws; paired standard error of one draw)")
    if "sim_vs_sim_agreement" in acc:
        print(f"two simulations agree on {acc['sim_vs_sim_agreement']:.4f} of images")
    result = {"n_images": len(labels), **acc, "cost": report, **provenance(cfg)}
    if cfg.json:
        write_json(cfg.json, result)
    return result


if __name__ == "__main__":
    run_main(main)
