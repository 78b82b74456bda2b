"""The cost of one programmable bootstrap (PBS), of one ciphertext multiply-add, of reading
one input ciphertext and of expanding one compressed input ciphertext at given crypto
parameters, measured on this machine, and the FHE time of a circuit estimated from them:
sum(PBS count x per-PBS seconds) + multiply-adds x seconds per multiply-add + input ciphertexts
x seconds to read one (+ seconds to expand one, where inputs are compressed). Concrete's runtime
copies each input ciphertext on its way in (a profile of a run with plain inputs spends half its
time in Cap'n Proto copies), and Concrete ML compresses inputs by default: the client sends each
ciphertext's mask as a seed, and the server expands it when it runs. The two input terms are a
third of a small model's time with 16,384 inputs (RESULTS.md).

Each cost is measured on a synthetic circuit that Concrete compiles to the same (polynomial
size, GLWE dimension, level), or the closest comparable one scaled by a PBS cost model (see
per_pbs_seconds; none comparable: no estimate): table lookups alone for the PBS; a sum of many
plain inputs, and of few, for reading an input (the difference, per input); the many compressed
for the expansion (the difference again); the lookups behind an encrypted-by-clear matrix product
over as many inputs as a wide model's encrypted conv reads for the multiply-add (its run less the
lookups and the reading of its inputs). benchmark.py validates the estimate against measured FHE
times; fhe_inference.py prints it before a real-FHE run.
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
    return [_one_hot(m) * v for v in range(2**bits)]


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
CACHE_VERSION = 5  # 3: with the multiply-add cost; 4: with the input decompression cost; 5: with the input reading cost, out of the multiply-add's
# The multiply-add circuit's product: 16,384 inputs (the encrypted conv of fast10g and the other
# small models reads as many) into 128 lookups, 2.1M multiply-adds (~1.5 s of a 3.4 s run here;
# its inputs' reading ~2 s). A multiply-add costs more in a wider product (0.3 to 1.1 us at
# 16,384 inputs here, lost in the timing noise at 2,048): this errs high for narrower circuits.
MULTIPLY_ADD_INPUTS = 16384
MULTIPLY_ADD_OUTPUTS = 128
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
    cost model's ratio, and a multiply-add and an input's reading and expansion on circuits of the
    same table and p_error (_synthetic_costs), scaled by the ciphertexts' size: an estimate,
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
    raw = _synthetic_costs(bits, p_error, n)
    if raw["seconds"] is None:
        return {"matched": got, **raw}
    size = _ciphertext_size(target) / _ciphertext_size(got)
    out = {"matched": got, "match_tier": tier, "measured_seconds": raw["seconds"], "seconds": raw["seconds"] * pbs_cost_model(target) / pbs_cost_model(got),
           "bits": bits, "p_error": p_error}
    for key in ("multiply_add_seconds", "input_read_seconds", "input_expand_seconds"):
        out[key] = None if raw.get(key) is None else raw[key] * size
    return {**out, **{k: v for k, v in raw.items() if k.endswith("_note") or k == "multiply_add_measured_seconds"}}


@functools.lru_cache(maxsize=None)
def _synthetic_costs(bits: int, p_error: float, n: int) -> dict:
    """The costs measured on one synthetic lookup circuit, at its own parameters: per PBS, per
    multiply-add, per input read and expanded. Kept for the process, so that the targets it
    stands for (a p_error walk compiles many, a few LWE dimensions apart) share one measurement."""
    circuit = synthetic_circuit(bits, p_error, n)
    key_bytes = _key_bytes(circuit)
    if key_bytes > KEY_LIMIT_BYTES:
        return {"seconds": None, "note": f"keys {key_bytes / 2**30:.1f} GiB: not measured"}
    (param,) = circuit.statistics["programmable_bootstrap_count_per_parameter"]
    got = param_dict(param)
    lookup_s = _fastest_run(circuit, np.arange(n) % 2**bits) / n
    inputs = _input_seconds(bits, p_error, got)
    read = inputs.pop("read_per_number", None)
    return {"seconds": lookup_s, **_multiply_add_seconds(bits, p_error, got, lookup_s, read, got), **inputs}


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


def _multiply_add_seconds(bits: int, p_error: float, got: dict, lookup_s: float, read_per_number: float | None, target: dict) -> dict:
    """Seconds per multiply-add (clear weight x ciphertext, added to an encrypted sum): the
    lookup circuit (MULTIPLY_ADD_OUTPUTS lookups of lookup_s each) behind a product over
    MULTIPLY_ADD_INPUTS inputs, less the lookups and the reading of those inputs
    (read_per_number seconds per number of a ciphertext; None: not measured, and neither is
    this), per multiply-add; scaled to the target by the ciphertexts' size (k x N + 1 numbers).
    Most of a product's run is the reading of its inputs: with them counted as multiply-adds,
    a product over 2,048 inputs put one at 1.1 to 1.5 us here, where net of the reading it costs
    about 0.1 there and 0.3 to 1.1 over 16,384 inputs (RESULTS.md)."""
    if read_per_number is None:
        return {"multiply_add_seconds": None, "multiply_add_note": "the cost of reading an input was not measured, so neither is a multiply-add's"}
    n, m = MULTIPLY_ADD_OUTPUTS, MULTIPLY_ADD_INPUTS
    circuit = synthetic_circuit(bits, p_error, n, m)
    (param,) = circuit.statistics["programmable_bootstrap_count_per_parameter"]
    if param_dict(param) != got:
        return {"multiply_add_seconds": None, "multiply_add_note": "the product changed the crypto parameters: not measured"}
    x = _one_hot(m) * (2**bits - 1)
    extra = _fastest_run(circuit, x) - n * lookup_s - m * read_per_number * _ciphertext_size(got)
    if extra <= 0:  # the timing noise hid the product: no figure, rather than 0
        return {"multiply_add_seconds": None, "multiply_add_note": f"the product added no measurable time ({extra:+.3f} s): not measured"}
    measured = extra / (m * n)
    return {"multiply_add_measured_seconds": measured, "multiply_add_seconds": measured * _ciphertext_size(target) / _ciphertext_size(got)}


def _ciphertext_size(p: dict) -> int:
    """Numbers in a ciphertext at these parameters' big key: k x N + 1."""
    return p["glwe_dimension"] * p["polynomial_size"] + 1


INPUT_ROWS = 4096  # inputs of the circuits that measure their reading and expansion: ~0.5 s and ~0.4 s of their runs here
INPUT_ROWS_FEW = 256  # the plain circuit's few inputs: what its run costs besides reading them


def inputs_circuit(bits: int, p_error: float, m: int, compress: bool):
    """One table lookup on the sum of m encrypted inputs: a circuit whose run is mostly the
    reading of its inputs, and their expansion when they arrive compressed (the inputset keeps
    the sum at `bits`)."""
    from concrete import fhe

    table = _table(bits)
    compiler = fhe.Compiler(lambda x: table[np.sum(x)], {"x": "encrypted"})
    return compiler.compile(_one_hot_inputset(m, bits), fhe.Configuration(p_error=p_error, compress_input_ciphertexts=compress))


def input_run_seconds(bits: int, p_error: float, m: int, compress: bool) -> float:
    """The fastest run of inputs_circuit on m inputs (tools/input_reading.py sweeps m)."""
    return _fastest_run(inputs_circuit(bits, p_error, m, compress), _one_hot(m))


def _one_hot(m: int) -> np.ndarray:
    return np.eye(1, m, dtype=np.int64)[0]


def _input_seconds(bits: int, p_error: float, target: dict, m: int = INPUT_ROWS, few: int = INPUT_ROWS_FEW) -> dict:
    """Seconds to read one input ciphertext (inputs_circuit on m plain inputs less the same on
    `few`, per input more) and to expand one compressed from its seed (m compressed less m
    plain, per input); each scaled to the target by the ciphertexts' size (the circuit's own size
    read from its plain inputs' bytes, 8 per number). "read_per_number" is the reading's cost per
    number of a ciphertext, for the multiply-add measurement. A difference lost in the timing
    noise is no figure rather than 0 s."""
    plain = inputs_circuit(bits, p_error, m, compress=False)
    key_bytes = _key_bytes(plain)
    if key_bytes > KEY_LIMIT_BYTES:
        note = f"keys {key_bytes / 2**30:.1f} GiB: not measured"
        return {"input_read_seconds": None, "input_expand_seconds": None, "input_note": note}
    numbers = int(plain.statistics["size_of_inputs"]) / (8 * m)
    plain_s = _fastest_run(plain, _one_hot(m))
    per_number = {"read": (plain_s - input_run_seconds(bits, p_error, few, compress=False)) / (m - few) / numbers,
                  "expand": (input_run_seconds(bits, p_error, m, compress=True) - plain_s) / m / numbers}
    out, notes = {"read_per_number": per_number["read"] if per_number["read"] > 0 else None}, []
    for term, what in (("read", f"{m - few} more plain inputs"), ("expand", "compressed inputs")):
        each = per_number[term] * _ciphertext_size(target)
        out[f"input_{term}_seconds"] = each if each > 0 else None
        if each <= 0:
            notes.append(f"{what} added no measurable time ({each * m:+.3f} s): not measured")
    return {**out, **({"input_note": "; ".join(notes)} if notes else {})}


def input_ciphertexts(circuit) -> tuple[int, bool]:
    """How many input ciphertexts the server of this compiled circuit reads (all its encrypted
    input values), and whether it expands them from seeds (inputs compressed)."""
    count = sum(math.prod(node.output.shape) for node in circuit.graph.ordered_inputs() if node.output.is_encrypted)
    return count, bool(circuit.configuration.compress_input_ciphertexts)


def _pbs_weighted(parts: list, key: str) -> float | None:
    """A per-unit cost over the circuit's parameter sets, each weighted by its share of the
    PBS; None if a part lacks it."""
    each = [p.get(key) for p in parts]
    if not parts or None in each:
        return None
    return sum(p["pbs"] * e for p, e in zip(parts, each)) / sum(p["pbs"] for p in parts)


def estimate_fhe_seconds(statistics: dict, inputs: int, compressed: bool, cache: bool = True) -> tuple[float | None, list, dict, dict]:
    """Seconds per image from a circuit's statistics (None when a parameter set has no
    comparable synthetic circuit), the PBS parts, the multiply-add term and the term of its
    `inputs` input ciphertexts (read, and expanded where `compressed`: input_ciphertexts(circuit)).
    A circuit's multiply-adds run on ciphertexts of its different parameter sets; each part's
    per-multiply-add cost is weighted by its share of the PBS, and so are its per-input costs."""
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
        linear["note"] = "the multiply-add cost was not measured: the estimate leaves it out"
    read = _pbs_weighted(parts, "input_read_seconds")
    expand = _pbs_weighted(parts, "input_expand_seconds") if compressed else 0.0
    term = {"encrypted_inputs": inputs, "compressed": compressed, "read_seconds_each": read, "expand_seconds_each": expand,
            "read_seconds": None if read is None else inputs * read, "expand_seconds": None if expand is None else inputs * expand}
    missing = [verb for k, verb in (("read", "reading"), ("expand", "expanding")) if term[f"{k}_seconds"] is None]
    term["seconds"] = (term["read_seconds"] or 0.0) + (term["expand_seconds"] or 0.0)
    if inputs and missing:
        term["note"] = f"the cost of {' and '.join(missing)} the input ciphertexts was not measured: the estimate leaves it out"
    total = None if total is None else total + term["seconds"]
    return total, parts, linear, term
