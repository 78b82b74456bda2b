"""The cost of one programmable bootstrap (PBS), of one ciphertext multiply-add and of
expanding one compressed input ciphertext at given crypto parameters, measured on this machine,
and the FHE time of a circuit estimated from them: sum(PBS count x per-PBS seconds) +
multiply-adds x seconds per multiply-add + compressed inputs x seconds per input (Concrete ML
compresses inputs by default: the client sends each ciphertext's mask as a seed, and the server
expands it when it runs: 1.6 of the 8.1 s per image of fast10g_e80_kdw, RESULTS.md).

Each cost is measured on a synthetic circuit that Concrete compiles to the same (polynomial
size, GLWE dimension, level), or the closest comparable one scaled by a PBS cost model (see
per_pbs_seconds; none comparable: no estimate): table lookups alone for the PBS, the same
lookups behind an encrypted-by-clear matrix product for the multiply-add (the difference of
the two), and a sum of many inputs compressed and plain for the inputs' expansion (the
difference again). benchmark.py validates the estimate against measured FHE times;
fhe_inference.py prints it before a real-FHE run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from provenance import write_json

KEY_LIMIT_BYTES = 6 * 2**30  # never generate larger keys for a per-PBS measurement


def param_dict(p) -> dict:
    return {k: int(getattr(p, k)()) for k in ("polynomial_size", "glwe_dimension", "input_lwe_dimension", "level", "base_log")}


def _table(bits: int):
    """The synthetic circuits' table: any non-trivial function of a `bits`-bit input."""
    from concrete import fhe

    return fhe.LookupTable([(i * 5 + 1) % 16 for i in range(2**bits)])


def _one_hot_inputset(m: int, bits: int) -> list:
    """Inputs that are zero but the first, which takes every `bits`-bit value: a product or
    sum of them keeps `bits` bits."""
    return [np.eye(1, m, dtype=np.int64)[0] * v for v in range(2**bits)]


def _key_bytes(circuit) -> int:
    return sum(int(circuit.statistics[f"size_of_{k}"]) for k in ("bootstrap_keys", "keyswitch_keys"))


def synthetic_circuit(bits: int, p_error: float, n: int, m: int = 0):
    """n independent table lookups on `bits`-bit encrypted inputs: PBS and nothing else; with
    m > 0, each lookup reads a product of m encrypted inputs with a clear (m, n) matrix (m x n
    multiply-adds). The matrix's first row is ones and the other inputs are zero in the
    inputset, so the lookups' inputs keep `bits` bits (and the circuit its crypto parameters)."""
    from concrete import fhe

    table = _table(bits)
    if m == 0:
        compiler = fhe.Compiler(lambda x: table[x], {"x": "encrypted"})
        inputset = [np.arange(n) % 2**bits, np.full(n, 2**bits - 1)]
    else:
        w = np.random.default_rng(0).integers(-3, 4, (m, n))
        w[0] = 1
        compiler = fhe.Compiler(lambda x: table[x @ w], {"x": "encrypted"})
        inputset = _one_hot_inputset(m, bits)
    return compiler.compile(inputset, fhe.Configuration(p_error=p_error))


def pbs_cost_model(p: dict) -> float:
    """Relative cost of one PBS: n blind-rotation steps, each (k+1) x level forward FFTs of
    size N (the decomposed accumulator), (k+1)^2 x level products in the Fourier domain, and
    (k+1) inverse FFTs. The inverse FFTs do not grow with the level, so level 2 counts about
    1.5 times level 1 (an earlier model counted twice, and overestimated level-2 circuits)."""
    n_, lvl, k, N = p["input_lwe_dimension"], p["level"], p["glwe_dimension"], p["polynomial_size"]
    return n_ * (k + 1) * ((lvl + 1) * N * math.log2(N) + (k + 1) * lvl * N)


# Above 10 bits Concrete compiles a synthetic lookup to another kind of bootstrap (small
# polynomials, level 3-4) that costs ~100x a PBS: such circuits say nothing about a PBS.
SYNTHETIC_BITS = range(1, 11)
SYNTHETIC_P_ERRORS = (0.1, 0.05, 1e-3, 1e-6, 2**-40)


@functools.lru_cache(maxsize=None)
def synthetic_candidates(n: int) -> tuple:
    """(parameters, bits, p_error) that Concrete picks for synthetic lookups (compile only)."""
    out = []
    for bits in SYNTHETIC_BITS:
        for p_error in SYNTHETIC_P_ERRORS:
            (param,) = synthetic_circuit(bits, p_error, n).statistics["programmable_bootstrap_count_per_parameter"]
            out.append((tuple(param_dict(param).items()), bits, p_error))
    return tuple(out)


def match_tier(candidate: dict, target: dict) -> int | None:
    """How closely a synthetic circuit's parameters stand for the target's: 0 the same
    (polynomial size, GLWE dimension, level); 1 the same polynomial size and GLWE dimension;
    2 the same GLWE size (k x N); None: not comparable, the cost model is not trusted across."""
    same = lambda *ks: all(candidate[k] == target[k] for k in ks)  # noqa: E731
    glwe_size = lambda p: p["glwe_dimension"] * p["polynomial_size"]  # noqa: E731
    if same("polynomial_size", "glwe_dimension", "level"):
        return 0
    if same("polynomial_size", "glwe_dimension"):
        return 1
    return 2 if glwe_size(candidate) == glwe_size(target) else None


def per_pbs_seconds(target: dict, n: int = 128, cache: bool = True) -> dict:
    """The per-PBS cost at the target parameters ("seconds"; and per multiply-add,
    "multiply_add_seconds"): measured once per process and parameter
    set, and with cache=True kept on disk for this machine, thread count and Concrete version
    (fhe_inference.py's estimate then costs nothing after the first run)."""
    stored = {}
    if cache:  # the machine's description and the cache file only when the cache is used
        path, key = _cache_path(), json.dumps([sorted(target.items()), n, _machine(), CACHE_VERSION])
        with contextlib.suppress(OSError, ValueError):
            stored = json.loads(path.read_text())
        if key in stored:
            return stored[key]
    cost, load = _per_pbs_seconds(tuple(sorted(target.items())), n)
    if cost["seconds"] is not None and load >= BUSY_LOAD * (os.cpu_count() or 1):
        return {**cost, "note": f"measured while the machine was busy ({load:.1f} of {os.cpu_count()} cores in use): an overestimate"
                + (", not cached" if cache else "")}
    if cache:
        stored[key] = cost
        with contextlib.suppress(OSError):
            write_json(path, stored)
    return cost


# Cached costs carry this version. 2 = fastest of TIMED_RUNS runs, measured only on an idle
# machine (version 1 kept one run, whatever else was running, and overestimated by up to 2x).
CACHE_VERSION = 4  # 3: with the multiply-add cost; 4: with the input decompression cost
MULTIPLY_ADD_ROWS = 16  # the multiply-add circuit's product has 16 n rows: 16 n^2 multiply-adds
BUSY_LOAD = 0.25  # cores in use, per core, above which the machine counts as busy
BUSY_SAMPLE_S = 1.0
TIMED_RUNS = 3


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine so far, from /proc/stat; None without it."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(sample_s: float = BUSY_SAMPLE_S) -> float:
    """How many cores other work keeps busy right now: CPU use over the next `sample_s`
    seconds, while the caller waits (so its own earlier work, which a load average would
    still count for a minute, does not), times the core count. Where /proc/stat is missing,
    the 1-minute load average."""
    before = _cpu_jiffies()
    if before is None:
        return os.getloadavg()[0]
    time.sleep(sample_s)
    after = _cpu_jiffies()
    total = after[1] - before[1]
    return (after[0] - before[0]) / total * (os.cpu_count() or 1) if total > 0 else 0.0


def runtime_threads() -> int:
    """Threads Concrete's runtime uses in this process, which the costs measured here assume."""
    return int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))


def _cache_path():
    from data import cache_dir

    return cache_dir() / "pbs_cost.json"


def _machine() -> list:
    from provenance import hardware, versions

    hw = hardware()
    return [hw["cpu"], hw["cpu_model"], hw["cpu_features"], os.cpu_count(), os.environ.get("OMP_NUM_THREADS"), versions().get("concrete-python")]


@functools.lru_cache(maxsize=None)
def _per_pbs_seconds(target_items: tuple, n: int) -> tuple[dict, float]:
    """The measured cost, and the cores that other work kept busy just before it was measured
    (a measurement taken then is slow: per_pbs_seconds says so and keeps it out of the cache).
    Both are remembered together, so a repeated call neither waits for a new sample nor labels
    the remembered cost by the load of its own moment."""
    load = busy_cores()
    return _measure(dict(target_items), n), load


def _measure(target: dict, n: int) -> dict:
    """Measure one PBS on the synthetic circuit whose parameters best stand for the target's
    (see match_tier; among equals, the nearest in the cost model) and scale the time by the
    cost model's ratio, and one multiply-add on the same circuit behind a product: an estimate,
    validated in the benchmark on the configs whose FHE time is measured. No comparable
    circuit: seconds is None, and the row says so."""
    scored = []
    for items, bits, pe in synthetic_candidates(n):
        cand = dict(items)
        tier = match_tier(cand, target)
        if tier is not None:
            distance = abs(math.log(pbs_cost_model(cand) / pbs_cost_model(target)))
            scored.append(((tier, distance), cand, bits, pe))
    if not scored:
        return {"matched": None, "seconds": None, "note": f"no synthetic lookup compiles to N={target['polynomial_size']}, k={target['glwe_dimension']}: not estimated"}
    (tier, _), got, bits, p_error = min(scored, key=lambda c: c[0])
    circuit = synthetic_circuit(bits, p_error, n)
    key_bytes = _key_bytes(circuit)
    if key_bytes > KEY_LIMIT_BYTES:
        return {"matched": got, "seconds": None, "note": f"keys {key_bytes / 2**30:.1f} GiB: not measured"}
    lookups = _fastest_run(circuit, np.arange(n) % 2**bits)
    scale = pbs_cost_model(target) / pbs_cost_model(got)
    out = {"matched": got, "match_tier": tier, "measured_seconds": lookups / n, "seconds": lookups / n * scale, "bits": bits, "p_error": p_error}
    return {**out, **_multiply_add_seconds(bits, p_error, n, got, lookups, target), **_input_seconds(bits, p_error, target)}


def _fastest_run(circuit, x) -> float:
    """Seconds of the fastest of TIMED_RUNS runs (the least disturbed by anything else), after
    a key generation and a warm-up run."""
    circuit.keygen()
    enc = circuit.encrypt(x)
    circuit.run(enc)
    runs = []
    for _ in range(TIMED_RUNS):
        t0 = time.perf_counter()
        circuit.run(enc)
        runs.append(time.perf_counter() - t0)
    return min(runs)


def _multiply_add_seconds(bits: int, p_error: float, n: int, got: dict, lookups_s: float, target: dict) -> dict:
    """Seconds per multiply-add (clear weight x ciphertext, added to an encrypted sum): the
    lookup circuit behind a product with MULTIPLY_ADD_ROWS x n inputs, less the lookups alone,
    per multiply-add; scaled to the target by the ciphertexts' size (k x N + 1 numbers)."""
    m = MULTIPLY_ADD_ROWS * n
    circuit = synthetic_circuit(bits, p_error, n, m)
    (param,) = circuit.statistics["programmable_bootstrap_count_per_parameter"]
    if param_dict(param) != got:
        return {"multiply_add_seconds": None, "multiply_add_note": "the product changed the crypto parameters: not measured"}
    x = np.eye(1, m, dtype=np.int64)[0] * (2**bits - 1)
    extra = _fastest_run(circuit, x) - lookups_s
    if extra <= 0:  # the timing noise of the lookups hid the product: no figure, rather than 0
        return {"multiply_add_seconds": None, "multiply_add_note": f"the product added no measurable time ({extra:+.3f} s): not measured"}
    measured = extra / (m * n)
    return {"multiply_add_measured_seconds": measured, "multiply_add_seconds": measured * _ciphertext_size(target) / _ciphertext_size(got)}


def _ciphertext_size(p: dict) -> int:
    """Numbers in a ciphertext at these parameters' big key: k x N + 1."""
    return p["glwe_dimension"] * p["polynomial_size"] + 1


INPUT_ROWS = 4096  # inputs of the circuit that measures their expansion: ~0.4 s of its run here


def inputs_circuit(bits: int, p_error: float, m: int, compress: bool):
    """One table lookup on the sum of m encrypted inputs: a circuit whose run is mostly the
    expansion of its inputs when they arrive compressed (the inputset keeps the sum at `bits`)."""
    from concrete import fhe

    table = _table(bits)
    compiler = fhe.Compiler(lambda x: table[np.sum(x)], {"x": "encrypted"})
    return compiler.compile(_one_hot_inputset(m, bits), fhe.Configuration(p_error=p_error, compress_input_ciphertexts=compress))


def _input_seconds(bits: int, p_error: float, target: dict, m: int = INPUT_ROWS) -> dict:
    """Seconds to expand one compressed input ciphertext: inputs_circuit with compressed inputs,
    whose server draws each ciphertext's mask from its seed when it runs, less the same circuit
    on plain inputs, per input; scaled to the target by the ciphertexts' size (one
    pseudo-random number per number of the mask; the circuit's own size read from its plain
    inputs' bytes, 8 per number)."""
    plain = inputs_circuit(bits, p_error, m, compress=False)
    key_bytes = _key_bytes(plain)
    if key_bytes > KEY_LIMIT_BYTES:
        return {"input_seconds": None, "input_note": f"keys {key_bytes / 2**30:.1f} GiB: not measured"}
    x = np.eye(1, m, dtype=np.int64)[0]
    extra = _fastest_run(inputs_circuit(bits, p_error, m, compress=True), x) - _fastest_run(plain, x)
    if extra <= 0:
        return {"input_seconds": None, "input_note": f"compressed inputs added no measurable time ({extra:+.3f} s): not measured"}
    numbers = int(plain.statistics["size_of_inputs"]) / (8 * m)
    return {"input_seconds": extra / m * _ciphertext_size(target) / numbers}


def compressed_inputs(circuit) -> int:
    """How many input ciphertexts the server of this compiled circuit expands from seeds: all
    its encrypted input values where inputs are compressed, else 0."""
    if not circuit.configuration.compress_input_ciphertexts:
        return 0
    return sum(math.prod(node.output.shape) for node in circuit.graph.ordered_inputs() if node.output.is_encrypted)


def _pbs_weighted(parts: list, key: str) -> float | None:
    """A per-unit cost over the circuit's parameter sets, each weighted by its share of the
    PBS; None if a part lacks it."""
    each = [p.get(key) for p in parts]
    if not parts or None in each:
        return None
    return sum(p["pbs"] * e for p, e in zip(parts, each)) / sum(p["pbs"] for p in parts)


def estimate_fhe_seconds(statistics: dict, inputs: int, cache: bool = True) -> tuple[float | None, list, dict, dict]:
    """Seconds per image from a circuit's statistics (None when a parameter set has no
    comparable synthetic circuit), the PBS parts, the multiply-add term and the term of its
    `inputs` compressed input ciphertexts (compressed_inputs(circuit); 0: plain inputs, 0 s).
    A circuit's multiply-adds run on ciphertexts of its different parameter sets; each part's
    per-multiply-add cost is weighted by its share of the PBS, and so is its per-input cost."""
    total, parts = 0.0, []
    for param, count in statistics["programmable_bootstrap_count_per_parameter"].items():
        cost = per_pbs_seconds(param_dict(param), cache=cache)
        parts.append({"parameters": param_dict(param), "pbs": int(count), **cost})
        total = None if total is None or cost["seconds"] is None else total + count * cost["seconds"]
    count = int(statistics["clear_multiplication_count"])
    linear = {"multiply_adds": count, "seconds_each": _pbs_weighted(parts, "multiply_add_seconds"), "seconds": None}
    if linear["seconds_each"] is not None:
        linear["seconds"] = count * linear["seconds_each"]
        total = None if total is None else total + linear["seconds"]
    elif count:
        linear["note"] = "the multiply-add cost was not measured: the estimate counts the PBS only"
    expand = {"compressed_inputs": inputs, "seconds_each": None, "seconds": 0.0 if not inputs else None}
    each = _pbs_weighted(parts, "input_seconds")
    if inputs and each is not None:
        expand["seconds_each"] = each
        expand["seconds"] = inputs * each
        total = None if total is None else total + expand["seconds"]
    elif inputs:
        expand["note"] = "the cost of expanding compressed inputs was not measured: the estimate leaves it out"
    return total, parts, linear, expand
