"""Time how Concrete's server reads its input ciphertexts: one table lookup on the sum of N
encrypted inputs, sent plain and sent compressed, for several N; the differences between
runs are the reading and the expansion the estimator charges per input (pbs_cost,
RESULTS.md "Reading the inputs").

    python tools/input_reading.py --inputs 256,4096,16384 --json results/estimator_reading/input_sweep_<machine>.json

Run it on an idle machine: each row is the fastest of pbs_cost.TIMED_RUNS runs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cli import UserError, check_output_file, opt, parse_config, run_main  # noqa: E402


@dataclass
class InputReadingConfig:
    inputs: str = opt("256,4096,16384", "comma-separated numbers of encrypted inputs, each timed plain and compressed")
    bits: int = opt(6, "bit width of the lookup that reads the sum (sets the crypto parameters, with --p-error)")
    p_error: float = opt(0.05, "error probability of the lookup")
    json: str | None = opt(None, "write the rows, the command and the hardware to this JSON file")

    def __post_init__(self):
        try:
            self.counts = [int(v) for v in self.inputs.split(",")]
        except ValueError:
            raise UserError(f"--inputs must be comma-separated integers, got {self.inputs!r}") from None
        if any(n < 1 for n in self.counts):
            raise UserError(f"--inputs must be >= 1 each, got {self.inputs!r}")
        if not 1 <= self.bits <= 8:
            raise UserError(f"--bits must be 1 to 8, got {self.bits}")
        if not 0 < self.p_error < 1:
            raise UserError(f"--p-error must be in (0, 1), got {self.p_error}")
        if self.json:
            check_output_file(self.json, "--json")


def main(argv=None) -> list[dict]:
    from tqdm import tqdm

    import pbs_cost
    from provenance import provenance, write_json

    cfg = parse_config(InputReadingConfig, argv, __doc__.split("\n\n")[0])
    print(f"config: {cfg}", flush=True)
    rows = []
    print(f"{'inputs':>8} {'plain s':>9} {'compressed s':>13} {'ms / input':>11}")
    for n in tqdm(cfg.counts, desc="input counts", file=sys.stderr):
        plain = pbs_cost.input_run_seconds(cfg.bits, cfg.p_error, n, compress=False)
        compressed = pbs_cost.input_run_seconds(cfg.bits, cfg.p_error, n, compress=True)
        rows.append({"inputs": n, "plain_seconds": plain, "compressed_seconds": compressed})
        tqdm.write(f"{n:8,} {plain:9.3f} {compressed:13.3f} {1e3 * plain / n:11.3f}")
    if len(rows) > 1:  # reading per input: the slope between the fewest and the most inputs
        lo, hi = rows[0], rows[-1]
        slope = (hi["plain_seconds"] - lo["plain_seconds"]) / (hi["inputs"] - lo["inputs"])
        print(f"reading: {1e3 * slope:.3f} ms per input more ({lo['inputs']:,} to {hi['inputs']:,} plain inputs)")
    if cfg.json:
        write_json(cfg.json, {**provenance(cfg), "rows": rows})
    return rows


if __name__ == "__main__":
    run_main(main)
