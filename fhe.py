"""Compilation of the encrypted part with Concrete ML, shared by every FHE script, the
benchmark and the notebook; plus the clear-side helpers that feed it.

Every array handed to Concrete is made C-contiguous first: Concrete's encrypt and its
compiled simulator read a numpy array's raw buffer and ignore its strides, so a
channels-last or permuted view would be silently scrambled (fhe="disable" would still look
right, simulation and real FHE would fall to chance).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, fields

import numpy as np
import torch

import data
from checkpoints import DEFAULT_CHECKPOINT, deployment
from cli import UserError, opt

# Key generation above this many bytes of keys gets a warning before it starts; keygen
# needs several times the key size in working memory (here an untrained circuit with
# 12-bit lookups used 20 GB and never finished).
KEYGEN_WARN_BYTES = 2 * 2**30
# Concrete ML's rounding_threshold_bits accepts 2 to 8 bits; 0 here means no rounding.
ROUNDING_BITS = range(2, 9)


@dataclass
class CompileOptions:
    """Options shared by the scripts that compile the encrypted part. p_error, rounding and
    fit_lookups default to the settings stored in the checkpoint (its `deployment` block); the scripts
    fill them in (resolve_settings) so that every result file records what was used."""

    checkpoint: str = opt(DEFAULT_CHECKPOINT, "trained checkpoint (.pt) to compile")
    p_error: float | None = opt(None, "error probability of each PBS (default: the checkpoint's deployed p_error)")
    global_p_error: float | None = opt(None, "error probability of the whole circuit (not with --p-error)")
    rounding_bits: int | None = opt(None, "round accumulators to N bits (2 to 8) before each table lookup; 0: no rounding (default: the checkpoint's deployed setting)")
    rounding_method: str | None = opt(None, "Concrete ML rounding method (default: the checkpoint's deployed one)", choices=["approximate", "exact"])
    fit_lookups: bool | None = opt(None, "where a compiled lookup reads more bits than --rounding-bits, its layer drops the excess low bits and the circuit compiles again (fhe.fit_lookups_to_rounding) (default: the checkpoint's deployed setting; off where it stores none, and with --rounding-bits 0)")
    n_calib: int = opt(500, "calibration images: the first N training images")
    verbose: bool = opt(False, "print the Concrete optimizer's output")
    data_dir: str | None = opt(None, "CIFAR-10 location (default: $CIFAR10_DIR, else ./data)")

    def __post_init__(self):
        check_compile_options(self)


def compile_options(cfg, **overrides) -> CompileOptions:
    """The CompileOptions part of a script's config (a subclass), with some fields replaced."""
    return CompileOptions(**{f.name: overrides.get(f.name, getattr(cfg, f.name)) for f in fields(CompileOptions)})


def check_compile_options(o) -> None:
    if o.p_error is not None and o.global_p_error is not None:
        raise UserError("give --p-error or --global-p-error, not both")
    for name in ("p_error", "global_p_error"):
        v = getattr(o, name)
        if v is not None and not 0 < v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be in (0, 1), got {v}")
    if o.rounding_bits is not None and o.rounding_bits != 0 and o.rounding_bits not in ROUNDING_BITS:
        raise UserError(f"--rounding-bits must be 0 (no rounding) or {ROUNDING_BITS.start} to {ROUNDING_BITS.stop - 1} (what Concrete ML accepts), got {o.rounding_bits}")
    if o.n_calib < 1:
        raise UserError("--n-calib must be >= 1")
    if o.fit_lookups and o.rounding_bits == 0:
        raise UserError("--fit-lookups fits each lookup to --rounding-bits: with --rounding-bits 0 (no rounding) there is no width to fit to")


# The CompileOptions fields that change the compiled circuit, as results record them.
SETTING_KEYS = ("p_error", "global_p_error", "rounding_bits", "rounding_method", "fit_lookups")
# What a result or checkpoint written before a setting existed meant by its absence.
SETTING_ABSENT = {"fit_lookups": False}


def resolve_settings(o, ckpt: dict, p_error: bool = True) -> dict:
    """Fill the unset p_error (unless p_error=False), rounding and fit_lookups fields of `o` (in place)
    from the checkpoint's deployed settings, so that the config every result file records is
    the one compiled. Returns the effective settings."""
    given = o.p_error is not None or o.global_p_error is not None or not p_error
    if not given or o.rounding_bits is None or o.rounding_method is None:
        d = deployment(ckpt, o.checkpoint)
        if not given:
            o.p_error = float(d["p_error"])
        if o.rounding_bits is None:
            o.rounding_bits = int(d["rounding_bits"])
        if o.rounding_method is None:
            o.rounding_method = d["rounding_method"]
    if o.fit_lookups is None:  # needs no deployment block: absent, it is off; without rounding, nothing to fit
        stored = (ckpt.get("deployment") or {}).get("fit_lookups", SETTING_ABSENT["fit_lookups"])
        o.fit_lookups = bool(stored) and o.rounding_bits != 0
    check_compile_options(o)
    return {k: getattr(o, k) for k in SETTING_KEYS}


def to_concrete(x) -> np.ndarray:
    """A float64-free, C-contiguous numpy copy that Concrete reads correctly."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def batched(fn, x, batch: int, desc: str | None = None) -> np.ndarray:
    """fn over x in batches of `batch` rows, concatenated (a progress bar when desc is given)."""
    starts = range(0, len(x), batch)
    if desc:
        from tqdm import tqdm

        starts = tqdm(starts, desc=desc, leave=False)
    return np.concatenate([np.asarray(fn(x[i : i + batch])) for i in starts])


def torch_logits(model, images, batch: int = 500) -> np.ndarray:
    """Logits of the full model (clear then encrypted part, float, fake-quantized)."""
    model.eval()
    with torch.no_grad():
        return batched(lambda x: model(x).numpy(), images, batch)


def clear_features(model, images: torch.Tensor, batch: int = 500) -> np.ndarray:
    """Run the clear part (client side) on (N, 3, 32, 32) images -> C-contiguous (N, C, H, W)."""
    model.eval()
    with torch.no_grad():
        return to_concrete(batched(lambda x: model.clear(x).numpy(), images, batch))


def quantized_logits(qm, feats: np.ndarray, fhe: str, batch: int = 250, desc: str | None = None) -> np.ndarray:
    """The compiled encrypted part on clear-part outputs: fhe="disable" (integers in the
    clear, no noise) or "simulate" (with the PBS errors p_error allows). A fresh draw each call."""
    return batched(lambda x: qm.forward(to_concrete(x), fhe=fhe), feats, batch, desc)


def calibration_set(model, o: CompileOptions) -> np.ndarray:
    """Clear-part outputs of the first n_calib training images (no augmentation)."""
    images, _ = data.stack(data.dataset("train", o.data_dir, n=o.n_calib))
    return clear_features(model, images)


def rounding_arg(o):
    if not o.rounding_bits:
        return None
    return {"n_bits": o.rounding_bits, "method": o.rounding_method}


def compile_model(model, calib: np.ndarray, o: CompileOptions):
    """compile_brevitas_qat_model on the encrypted part; Concrete failures become one message.
    o.fit_lookups: where a lookup reads more bits than o.rounding_bits, drop the extra low bits
    and compile again (fit_lookups_to_rounding)."""
    from concrete.ml.torch.compile import compile_brevitas_qat_model

    if o.p_error is None and o.global_p_error is None or o.rounding_bits is None:
        raise ValueError("compile_model needs resolved settings (fhe.resolve_settings)")
    try:
        qm = compile_brevitas_qat_model(
            model.encrypted,
            to_concrete(calib),
            rounding_threshold_bits=rounding_arg(o),
            p_error=o.p_error,
            global_p_error=o.global_p_error,
            verbose=o.verbose,
        )
    except Exception as e:  # Concrete raises RuntimeError / ValueError with free-form text
        raise UserError(explain_compile_error(e, o)) from None
    if o.fit_lookups and o.rounding_bits:
        fit_lookups_to_rounding(qm, calib, o)
    warn_if_wide_lookups(lookup_reads(qm.fhe_circuit), o.rounding_bits)
    return qm


def fit_lookups_to_rounding(qm, calib: np.ndarray, o: CompileOptions) -> int:
    """Make every lookup read at most o.rounding_bits bits: where one reads more (lookup_reads),
    raise the low bits its layer drops by the excess and compile the module again at o's
    p_error. Concrete ML calibrates each layer's rounding on inputs computed without the
    earlier layers' rounding, so a deeper accumulator can compile a bit wider than it was
    calibrated (RESULTS.md, "Fewer encrypted inputs"); the clear quantized model
    (fhe="disable") drops the same bits, so accuracy measured after it is the fitted
    circuit's. Returns the number of lookups narrowed."""
    # The layers that round, in order: one per lookup of these sequential networks.
    ops = [op for _, op in qm.quant_layers_dict.values() if getattr(op, "lsbs_to_remove", None)]
    reads = lookup_reads(qm.fhe_circuit)
    if len(ops) != len(reads) or any(len(op.lsbs_to_remove) != 1 for op in ops) or any(
        next(iter(op.lsbs_to_remove.values())) != r["lsbs_removed"] for op, r in zip(ops, reads)
    ):
        raise UserError("cannot fit the lookups to --rounding-bits: the compiled lookups do not match the layers one to one")
    narrowed = 0
    for op, r in zip(ops, reads):
        if r["bits"] > o.rounding_bits:
            (key,) = op.lsbs_to_remove
            op.lsbs_to_remove[key] += r["bits"] - o.rounding_bits
            narrowed += r["lookups"]
    if narrowed:
        print(f"{narrowed:,} lookups read more than {o.rounding_bits} bits: their layers now drop the excess; compiling again", file=sys.stderr, flush=True)
        try:
            qm.compile(to_concrete(calib), p_error=o.p_error, global_p_error=o.global_p_error, verbose=o.verbose)
        except Exception as e:
            raise UserError(explain_compile_error(e, o)) from None
    return narrowed


def explain_compile_error(e: Exception, o) -> str:
    text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    low = str(e).lower()
    if "noparametersfound" in low or "no parameters found" in low or "parameters" in low and "found" in low:
        return (
            f"Concrete found no crypto parameters for this circuit ({text}). Lower --rounding-bits "
            f"(now {o.rounding_bits}), or allow more error with a larger --p-error / --global-p-error."
        )
    if "16" in low and "bit" in low:
        return (
            f"a table lookup is wider than Concrete's 16-bit limit ({text}). Set --rounding-bits "
            f"(e.g. 6) so accumulators are rounded before each lookup, or train with a lower "
            f"--accumulator-bits."
        )
    return f"compilation failed: {text}"


def warn_if_large_keys(qm) -> None:
    """Print a warning before a key generation that may not fit in memory."""
    key_bytes = key_sizes(qm)["total_bytes"]
    if key_bytes > KEYGEN_WARN_BYTES:
        print(
            f"warning: keys for this circuit take {key_bytes / 2**30:.1f} GiB and keygen needs "
            f"several times that in memory (max bit width {qm.fhe_circuit.graph.maximum_integer_bit_width()}); "
            f"lower --rounding-bits or raise --p-error to shrink them",
            flush=True,
        )


def key_sizes(qm) -> dict:
    s = qm.fhe_circuit.statistics
    out = {k: int(s[f"size_of_{k}"]) for k in ("secret_keys", "bootstrap_keys", "keyswitch_keys")}
    out["total_bytes"] = sum(out.values())
    return out


def lookup_reads(circuit) -> list[dict]:
    """Per table lookup of the compiled graph, in graph order: how many lookups (one per
    value of its output), the bit width of the accumulator before it, the low bits a
    rounding drops from it, and so the bits the lookup reads -- what sets its crypto
    parameters. Concrete ML sets the bits to drop from the accumulator's range in its
    calibration, which runs each layer on inputs without the earlier layers' rounding, while
    the graph's widths come from Concrete's bounds with that rounding; where they differ a
    lookup reads more bits than --rounding-bits, and one bit more doubles its polynomial size."""
    import networkx as nx

    graph = circuit.graph
    rows = []
    for node in nx.topological_sort(graph.graph):
        if not node.converted_to_table_lookup or node.properties.get("name") == "round_bit_pattern":
            continue  # an approximate rounding is not a lookup of its own: it shrinks the next one
        pred = next(p for p in graph.ordered_preds_of(node) if p.output.is_encrypted)
        rounded = pred.properties.get("name") == "round_bit_pattern"
        acc_bits = (pred.inputs[0] if rounded else node.inputs[0]).dtype.bit_width
        lsbs = pred.properties["kwargs"]["lsbs_to_remove"] if rounded else 0
        rows.append({"lookups": int(np.prod(node.output.shape)), "accumulator_bits": int(acc_bits),
                     "lsbs_removed": int(lsbs), "bits": int(acc_bits - lsbs)})
    return rows


_WIDE_WARNED: set = set()  # (lookups, bits, rounding) already warned about in this process


def warn_if_wide_lookups(reads: list[dict], rounding_bits: int | None) -> None:
    """Say so when lookups read more bits than --rounding-bits asked for (see lookup_reads);
    once per process for the same circuit's reads (a p_error search compiles it many times)."""
    wide = [r for r in reads if rounding_bits and r["bits"] > rounding_bits]
    n = sum(r["lookups"] for r in wide)
    bits = ", ".join(sorted({str(r["bits"]) for r in wide}))
    if wide and (n, bits, rounding_bits) not in _WIDE_WARNED:
        _WIDE_WARNED.add((n, bits, rounding_bits))
        print(f"warning: {n:,} lookups read {bits} bits, more than --rounding-bits {rounding_bits}: Concrete ML sets "
              f"the bits to drop before a lookup from its own calibration of the accumulator, which can be narrower "
              f"than the compiled one; each extra bit doubles their polynomial size (--fit-lookups "
              f"drops the excess; RESULTS.md, \"Fewer encrypted inputs\")",
              file=sys.stderr, flush=True)


def cost_report(qm, compile_s: float | None = None, keygen_s: float | None = None) -> dict:
    """Bit widths, ranges, the bits each lookup reads, PBS per crypto parameter set, key
    sizes, timings (JSON-able)."""
    s = qm.fhe_circuit.statistics
    per_param = {str(k): int(v) for k, v in s["programmable_bootstrap_count_per_parameter"].items()}
    return {
        "max_bit_width": int(qm.fhe_circuit.graph.maximum_integer_bit_width()),
        "layers": {k: {"range": list(map(int, v["range"])), "bit_width": int(v["bitwidth"])} for k, v in qm.bitwidth_and_range_report().items()},
        "lookup_reads": lookup_reads(qm.fhe_circuit),
        "pbs_count": int(s["programmable_bootstrap_count"]),
        "pbs_per_parameter": per_param,
        "key_switch_count": int(s["key_switch_count"]),
        "multiply_add_count": int(s["clear_multiplication_count"]),
        "complexity": float(s["complexity"]),
        "key_sizes": key_sizes(qm),
        "p_error": s.get("p_error"),
        "global_p_error": s.get("global_p_error"),
        "compile_seconds": compile_s,
        "keygen_seconds": keygen_s,
    }


def print_report(r: dict) -> None:
    print(f"max integer bit width {r['max_bit_width']} (accumulators; lookups read them rounded if --rounding-bits is set)")
    for name, layer in r["layers"].items():
        print(f"  {name:<40} {layer['bit_width']:>3} bits  range {layer['range']}")
    for t in r["lookup_reads"]:
        print(f"  {t['lookups']:>7,} lookups read {t['bits']} bits ({t['accumulator_bits']}-bit accumulator, {t['lsbs_removed']} low bits dropped)")
    print(f"PBS {r['pbs_count']}  key switches {r['key_switch_count']}  multiply-adds {r['multiply_add_count']:,}")
    for param, n in r["pbs_per_parameter"].items():
        print(f"  {n:>7} x {param}")
    ks = r["key_sizes"]
    print(
        f"keys: bootstrap {ks['bootstrap_keys'] / 2**20:.1f} MiB, keyswitch {ks['keyswitch_keys'] / 2**20:.1f} MiB, "
        f"secret {ks['secret_keys'] / 2**10:.1f} KiB"
    )
    if r.get("compile_seconds") is not None:
        print(f"compile {r['compile_seconds']:.1f} s" + (f", keygen {r['keygen_seconds']:.1f} s" if r.get("keygen_seconds") is not None else ""))


def compile_checkpoint(o: CompileOptions):
    """Load a checkpoint, fill o's unset FHE settings from it (in place), build the
    calibration set, compile.
    Returns (model, checkpoint, quantized module, cost report)."""
    from checkpoints import load_checkpoint

    model, ckpt = load_checkpoint(o.checkpoint)
    settings = resolve_settings(o, ckpt)
    calib = calibration_set(model, o)
    t0 = time.perf_counter()
    qm = compile_model(model, calib, o)
    compile_s = time.perf_counter() - t0
    return model, ckpt, qm, {**cost_report(qm, compile_s), "settings": settings}


def evaluate(model, qm, images, labels, batch: int = 200, repeats: int = 1, submit=None) -> dict:
    """Top-k of torch, fhe="disable" and `repeats` draws of fhe="simulate" on the same images;
    the clear layer runs once. "simulate" holds the first draw, "simulate_spread" all of them.
    submit(feats, repeats) -> collect, when given, makes the draws elsewhere (Dask workers,
    parallel.Simulators.submit): they run while this process does torch and "disable", and
    collect() returns their logits."""
    from metrics import paired_difference, spread, topk_accuracy

    feats = clear_features(model, images)
    collect = submit(feats, repeats) if submit is not None else None
    t_logits = torch_logits(model, images)
    disable = quantized_logits(qm, feats, "disable", batch, "disable")
    if collect is not None:
        draws = collect()
    else:
        draws = [quantized_logits(qm, feats, "simulate", batch, f"simulate {k + 1}/{repeats}") for k in range(repeats)]
    acc = {
        "torch": topk_accuracy(t_logits, labels),
        "disable": topk_accuracy(disable, labels),
        "simulate": topk_accuracy(draws[0], labels),
    }
    per_draw = [topk_accuracy(d, labels) for d in draws]
    acc["simulate_spread"] = {k: spread([a[k] for a in per_draw]) for k in per_draw[0]}
    t_pred = t_logits.argmax(1)
    acc["sim_vs_torch_agreement"] = float(np.mean([(d.argmax(1) == t_pred).mean() for d in draws]))
    diffs = [paired_difference(d.argmax(1), t_pred, labels) for d in draws]
    acc["sim_minus_torch_top1"] = {"diff": float(np.mean([d["diff"] for d in diffs])), "standard_error": diffs[0]["standard_error"],
                                   "per_draw": [d["diff"] for d in diffs]}
    if repeats > 1:
        acc["sim_vs_sim_agreement"] = float((draws[0].argmax(1) == draws[1].argmax(1)).mean())
    return acc
