"""Binary search of p_error with FHE simulation, then a validation of the value found.

    python p_error_search.py --checkpoint checkpoints/fast.pt --rounding-bits 6
    python p_error_search.py --workers 8 --n-validation 40   # simulations on 8 Dask workers

Finds the largest p_error whose simulated top-1 on the first --n-images training images
stays within --tolerance of the clear quantized model (fhe="disable", same images), then
reruns the simulation --n-validation times at that value and reports the mean and the
maximum accuracy drop. The bisection judges each value on --n-sim draws only, so a lucky draw
can pass a value that loses more: when the validation's mean drop exceeds --tolerance, the
next smaller value that passed the bisection is validated in turn, until one holds. When none
holds (all the bisection passed was, say, --upper itself), it bisects again from one step below
the smallest value validated, and validates what passes there, up to REBISECTIONS times (none
holding then is an error). Writes a JSON (value, search trace, validations) and a plot.

    python p_error_search.py --checkpoint checkpoints/fast_kd.pt --from-search results/p_error_search_fast_kd.json

reuses an earlier search's bisection (its JSON) and only validates: the way to apply the
validation rule to a search made before it, without bisecting again.

    python p_error_search.py --checkpoint checkpoints/fast.pt --cost-slack 0.1

then walks down from the value found while Concrete's complexity stays within 10 % of its own
(its crypto parameters often stay the same over a decade of p_error, the errors do not), and
keeps the lowest such value if it holds its validation too.

    python p_error_search.py --checkpoint checkpoints/in_training/fast10g_h256_kdw.pt --max-complexity 6.06e10

caps the cost instead: when the value found makes a circuit whose Concrete complexity is over the
cap (FHE time grows with it: `complexity` in a cost report or a benchmark JSON), raises p_error
until it fits and keeps that value whatever its validation loses (the loss is reported); the
cap bounds --cost-slack's walk too. Checked before any simulation: even --upper over the cap is
an error.

    python p_error_search.py --checkpoint checkpoints/fast10g_2x80_kdw.pt --max-seconds 10

caps the FHE seconds per image instead, as estimated on this machine with this process's threads
(pbs_cost.py, the estimate fhe_inference.py prints; it measures each new crypto parameter set on
synthetic circuits first, about a minute each, cached per machine). Concrete's complexity ranks
parameter sets only roughly (at equal complexity, (1024, 2) ran 8 % slower than (2048, 1) here,
RESULTS.md) and leaves out the inputs' reading and expansion; the estimate counts both, but holds
for the machine that made it. --cost-slack then walks within (1 + slack) times the seconds.

Why not Concrete ML's BinarySearch (concrete.ml.search_parameters): it compiles with
p_error alone, without rounding_threshold_bits, so it would tune a different circuit than
the rounded one we deploy; it also bisects linearly on (0, 0.9), where p_error values that
matter span several decades. This search bisects log10(p_error) and compiles exactly as
fhe_inference.py does.
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import data
from checkpoints import load_checkpoint, write_deployment
from cli import UserError, check_output_file, opt, parse_config, run_main
from fhe import SETTING_ABSENT, calibration_set, clear_features, compile_model, compile_options, quantized_logits, resolve_settings
from metrics import topk_accuracy
from parallel import ParallelOptions, simulators
from pbs_cost import estimate_fhe_seconds, input_ciphertexts
from provenance import atomic_write, provenance, write_json


@dataclass
class SearchConfig(ParallelOptions):
    n_images: int = opt(1000, "search on the first N training images")
    tolerance: float = opt(0.01, "largest allowed top-1 drop vs the clear quantized model (0.01 = 1 point)")
    lower: float = opt(1e-6, "lower end of the p_error search range (and of --cost-slack's walk)")
    upper: float = opt(0.5, "upper end of the p_error search range")
    max_iter: int = opt(8, "bisection steps (each: one compile + --n-sim simulations)")
    n_sim: int = opt(3, "simulations averaged at each candidate p_error (simulation is random)")
    n_validation: int = opt(40, "simulations at the value found, to measure the spread and check its mean drop (again at each smaller passing value while it exceeds --tolerance)")
    json: str = opt("runs/p_error_search.json", "result file (a .png plot is written beside it)")
    write: bool = opt(False, "store the p_error found, with these rounding settings, in the checkpoint as its deployed setting")
    from_search: str | None = opt(None, "an earlier search's JSON: reuse its bisection (same model, images, calibration and rounding: checked; --upper, --max-iter and --n-sim unused, --lower bounds --cost-slack's walk) and only validate")
    cost_slack: float = opt(0.0, "then lower the value found while Concrete's complexity for the circuit stays within (1 + this) times its own (0.1: 10 %%): fewer lookup errors for that much more cost at most; the lowest is validated and kept if it holds; 0: off")
    max_complexity: float | None = opt(None, "cap on Concrete's complexity for the circuit (`complexity` in a cost report or benchmark JSON; FHE time grows with it): a value found over it is raised to the smallest p_error within it, validated, and kept whatever it loses; also bounds --cost-slack")
    max_seconds: float | None = opt(None, "cap on the FHE seconds per image estimated on this machine with this process's threads (pbs_cost.py; about a minute to measure each new crypto parameter set): as --max-complexity, in seconds (--cost-slack then in seconds too); not with --max-complexity")

    def __post_init__(self):
        super().__post_init__()
        if self.p_error is not None or self.global_p_error is not None:
            raise UserError("p_error_search.py searches p_error: do not pass --p-error / --global-p-error")
        if not 0 < self.lower < self.upper < 1:
            raise UserError("need 0 < --lower < --upper < 1")
        if min(self.n_images, self.max_iter, self.n_sim) < 1 or min(self.n_validation, self.tolerance, self.cost_slack) < 0:
            raise UserError("--n-images, --max-iter and --n-sim must be >= 1, --n-validation, --tolerance and --cost-slack >= 0")
        for name in ("max_complexity", "max_seconds"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.max_complexity is not None and self.max_seconds is not None:
            raise UserError("give --max-complexity or --max-seconds, not both")
        check_output_file(self.json, "--json")
        if self.write:
            check_output_file(self.checkpoint, "--checkpoint")


def simulate_top1(qm, feats, labels, fhe: str = "simulate") -> float:
    return topk_accuracy(quantized_logits(qm, feats, fhe), labels, ks=(1,))["top1"]


def within(drop: float, tolerance: float) -> bool:
    """drop <= tolerance, but for float rounding: a top-1 is k / n, so a mean drop of exactly the
    tolerance (10 images in 1,000 at 0.01) can come out as 0.010000000000000009."""
    return drop <= tolerance + 1e-9


def bisect_log(accuracy_at, reference: float, tolerance: float, lower: float, upper: float, max_iter: int):
    """Largest p in [lower, upper] (bisection on log10 p) with accuracy_at(p) >= reference - tolerance.

    Returns (best p or None when even `lower` fails, trace of (p, accuracy, ok))."""
    trace = []
    acc = accuracy_at(upper)
    trace.append((upper, acc, within(reference - acc, tolerance)))
    if trace[-1][2]:
        return upper, trace
    acc = accuracy_at(lower)
    trace.append((lower, acc, within(reference - acc, tolerance)))
    if not trace[-1][2]:
        return None, trace
    lo, hi = math.log10(lower), math.log10(upper)
    for _ in range(max_iter):
        mid = (lo + hi) / 2
        acc = accuracy_at(10**mid)
        ok = within(reference - acc, tolerance)
        trace.append((10**mid, acc, ok))
        lo, hi = (mid, hi) if ok else (lo, mid)
    return 10**lo, trace


def earlier_search(cfg, ckpt) -> dict:
    """The JSON of the earlier search cfg.from_search, checked to have searched what cfg searches
    (its clear top-1 is checked again once the circuit is compiled)."""
    try:
        old = json.loads(Path(cfg.from_search).read_text())
        old["trace"] = [(float(t["p_error"]), float(t["top1"])) for t in old["trace"]]
        old["reference_top1"] = float(old["reference_top1"])
        differ = [f"--{k.replace('_', '-')} {old['config'].get(k)} there" for k in ("n_images", "n_calib", "rounding_bits", "rounding_method", "fit_lookups")
                  if old["config"].get(k, SETTING_ABSENT.get(k)) != getattr(cfg, k)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"--from-search {cfg.from_search}: not a p_error search's result ({type(e).__name__}: {e})")
    if old.get("model_config") != json.loads(json.dumps(ckpt["model_config"])):
        differ.append("another model config")
    if differ:
        raise UserError(f"--from-search {cfg.from_search} searched something else: {', '.join(differ)}")
    return old


def summarize_validation(p: float, drops) -> dict:
    """What a validation at p_error p found: {"p_error", "runs", "mean_drop", "max_drop"} (None without runs)."""
    return {"p_error": p, "runs": len(drops), "mean_drop": float(np.mean(drops)) if len(drops) else None,
            "max_drop": float(np.max(drops)) if len(drops) else None}


def validate_down(drops_at, trace, tolerance: float):
    """Validate the bisection's passing values, largest first, until one's mean drop is within tolerance.

    drops_at(p) returns the validation drops at p (empty: no validation, the largest is kept).
    Returns (p or None when none holds, [{"p_error", "runs", "mean_drop", "max_drop"} per value tried])."""
    tried = []
    for p in sorted({p for p, _, ok in trace if ok}, reverse=True):
        tried.append(summarize_validation(p, drops_at(p)))
        if tried[-1]["mean_drop"] is None or within(tried[-1]["mean_drop"], tolerance):
            return p, tried
    return None, tried


# Bisections again below the values that failed their validation, at most (validate_rebisecting)
REBISECTIONS = 3


def validate_rebisecting(drops_at, bisect_below, trace, tolerance: float, lower: float, rounds: int = REBISECTIONS):
    """validate_down, and when no passing value holds, bisect_below(upper) (a bisection: (best p or
    None, its trace)) from one SLACK_STEP below the smallest value validated, whose passes are
    validated in turn; up to `rounds` times. The few draws of a bisection can pass a value that
    loses more over many, and then every value it tried below was a pass too, or never tried:
    the largest that holds lies below what failed, where the first bisection did not look.
    Returns (p or None when none holds, every bisection's trace, every validation in order)."""
    chosen, validations = validate_down(drops_at, trace, tolerance)
    for _ in range(rounds):
        if chosen is not None or not validations:
            break
        upper = min(v["p_error"] for v in validations) * SLACK_STEP
        if upper <= lower:
            break
        best, more = bisect_below(upper)
        trace = trace + more
        if best is None:
            break
        chosen, tried = validate_down(drops_at, more, tolerance)
        validations += tried
    return chosen, trace, validations


def estimated_seconds(circuit, p: float) -> float:
    """FHE seconds per image of a compiled circuit, estimated on this machine with this
    process's threads (pbs_cost.py); inf where there is no estimate (no comparable synthetic
    circuit), so that a cap never keeps a value it cannot price. Notes (a cost measured while
    the machine was busy: an overestimate) are printed."""
    seconds, parts, linear, inputs = estimate_fhe_seconds(circuit.statistics, *input_ciphertexts(circuit))
    for note in [part.get("note") for part in parts] + [linear.get("note"), inputs.get("note")]:
        if note:
            tqdm.write(f"p_error {p:.4g}: {note}")
    return math.inf if seconds is None else seconds


# The walk down from the value found: 8 steps per decade of p_error
SLACK_STEP = 10 ** (-1 / 8)


def lower_within_cost(complexity_at, p: float, slack: float, lower: float, cap: float = math.inf, measure: str = "complexity"):
    """The smallest p_error below p, in steps of SLACK_STEP down to `lower`, whose circuit's
    complexity_at(p) is at most (1 + slack) times p's own, and at most cap: Concrete picks crypto parameters for
    the p_error asked, and below a value found its cost often stays flat (the same polynomial size
    and level, a few more LWE dimensions) while the lookup errors fall with it; the walk stops at
    the first step over the budget (a level or polynomial size up).
    Returns (that p_error, p itself when no step fits; [{"p_error", measure, "within_budget"}]:
    measure names what complexity_at returns, Concrete's complexity or estimated seconds)."""
    own = complexity_at(p)
    budget = min((1 + slack) * own, cap)
    walk, best = [{"p_error": p, measure: own, "within_budget": True}], p
    q = p * SLACK_STEP
    while q >= lower:
        c = complexity_at(q)
        walk.append({"p_error": q, measure: c, "within_budget": c <= budget})
        if c > budget:
            break
        best, q = q, q * SLACK_STEP
    return best, walk


def raise_within_cost(complexity_at, p: float, cap: float, upper: float, refine: int = 4, measure: str = "complexity"):
    """The smallest p_error from p up to `upper` whose circuit's complexity_at(p) is at most cap:
    steps of 1 / SLACK_STEP up to the first one within the cap, then `refine` bisections of log10
    p_error between it and the step before. A larger p_error lets Concrete pick cheaper crypto
    parameters (a level or a polynomial size down), for more lookup errors.
    Returns (that p_error, or None when even `upper` is over the cap; [{"p_error", measure, "within_budget"}] in the order compiled)."""
    walk = []

    def fits(q) -> bool:
        c = complexity_at(q)
        walk.append({"p_error": q, measure: c, "within_budget": c <= cap})
        return c <= cap

    over, q = None, p
    while not fits(q):
        if q >= upper:
            return None, walk
        over, q = q, min(q / SLACK_STEP, upper)
    if over is not None:
        lo, hi = over, q
        for _ in range(refine):
            mid = math.sqrt(lo * hi)  # halfway in log10 p_error
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        q = hi
    return q, walk


def plot(trace, reference: float, tolerance: float, chosen, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps, accs, oks = zip(*sorted(trace))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.semilogx(ps, accs, "o-", color="tab:blue", label="simulated top-1")
    ax.axhline(reference, color="gray", ls="--", label="clear quantized model")
    ax.axhline(reference - tolerance, color="tab:red", ls=":", label=f"tolerance ({tolerance:g})")
    if chosen:
        ax.axvline(chosen, color="tab:green", label=f"chosen p_error {chosen:.3g}")
    ax.set_xlabel("p_error")
    ax.set_ylabel("top-1 accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def trace_origin(earlier: dict, path: str) -> dict:
    """Where a reused bisection was measured: the earlier search's command, code and JSON, or,
    when that search had itself reused one, the origin it recorded."""
    return earlier.get("trace_from") or {"command": earlier.get("command"), "code": earlier.get("code"), "json": path}


def main(argv=None) -> dict:
    cfg = parse_config(SearchConfig, argv, __doc__.split("\n")[0])
    print("config:", asdict(cfg))
    model, ckpt = load_checkpoint(cfg.checkpoint)
    resolve_settings(cfg, ckpt, p_error=False)  # p_error is searched; rounding from the checkpoint unless given
    earlier = earlier_search(cfg, ckpt) if cfg.from_search else None
    calib = calibration_set(model, cfg)
    images, labels = data.stack(data.dataset("train", cfg.data_dir, n=cfg.n_images))
    feats = clear_features(model, images)

    @functools.lru_cache(maxsize=None)  # --upper is compiled for the reference and searched
    def compiled(p):
        return compile_model(model, calib, compile_options(cfg, p_error=p))

    # What the cost walks compare and cap: Concrete's complexity, or with --max-seconds the
    # estimated seconds per image
    measure, flag, cap = ("seconds", "--max-seconds", cfg.max_seconds) if cfg.max_seconds else ("complexity", "--max-complexity", cfg.max_complexity)
    cap = cap or math.inf

    @functools.lru_cache(maxsize=None)  # the cost walks keep numbers, not circuits
    def cost(p) -> float:
        qm = compiled(p) if p == cfg.upper else compile_model(model, calib, compile_options(cfg, p_error=p))
        return estimated_seconds(qm.fhe_circuit, p) if measure == "seconds" else float(qm.fhe_circuit.statistics["complexity"])

    if cost(cfg.upper) > cap:
        raise UserError(f"{flag} {cap:.4g}: even --upper {cfg.upper:g} compiles to {cost(cfg.upper):.4g}: raise the cap, "
                        "or give the model fewer or narrower lookups")
    reference = simulate_top1(compiled(cfg.upper), feats, labels, fhe="disable")
    print(f"clear quantized model (fhe=disable) top-1 on {len(labels)} training images: {reference:.4f}")
    if earlier and abs(reference - earlier["reference_top1"]) > 1e-9:
        raise UserError(f"--from-search {cfg.from_search} measured a clear top-1 of {earlier['reference_top1']:.4f} on these images, "
                        f"this checkpoint {reference:.4f}: other weights or other images")
    with simulators(cfg, batch=250) as workers:  # None: simulate in this process
        on_workers = [None]  # the p_error the workers hold compiled

        def top1s(p, n: int, desc: str) -> list[float]:
            """n simulated top-1 at p_error p."""
            if workers is None:
                qm = compiled(p)
                return [simulate_top1(qm, feats, labels) for _ in tqdm(range(n), desc=desc, leave=False)]
            if on_workers[0] != p:
                workers.compile(cfg.checkpoint, compile_options(cfg, p_error=p), calib)
                on_workers[0] = p
            return [topk_accuracy(d, labels, ks=(1,))["top1"] for d in workers.draws(feats, n, desc)]

        def accuracy_at(p):
            acc = float(np.mean(top1s(p, cfg.n_sim, f"p_error {p:.3g}")))
            tqdm.write(f"p_error {p:10.4g}  simulated top-1 {acc:.4f}  drop {reference - acc:+.4f}")
            return acc

        def bisect(upper: float, desc: str):
            """bisect_log from `upper` down to --lower, with a progress bar over its compiles."""
            with tqdm(total=cfg.max_iter + 2, desc=desc, leave=False) as bar:
                def counted(p):
                    acc = accuracy_at(p)
                    bar.update()
                    return acc
                return bisect_log(counted, reference, cfg.tolerance, cfg.lower, upper, cfg.max_iter)

        t0 = time.perf_counter()
        if earlier:  # its accuracies, judged against this --tolerance
            trace = [(p, a, within(reference - a, cfg.tolerance)) for p, a in earlier["trace"]]
            largest = max((p for p, _, ok in trace if ok), default=None)
            print(f"bisection of {cfg.from_search}: {len(trace)} values, largest passing p_error " + (f"{largest:.4g}" if largest else "none"))
        else:
            chosen, trace = bisect(cfg.upper, "p_error search")
            if chosen is None:
                raise UserError(f"even p_error={cfg.lower:g} loses more than {cfg.tolerance} top-1: lower --lower or raise --tolerance")
            print(f"bisection: largest passing p_error {chosen:.4g} ({time.perf_counter() - t0:.0f} s)")
            largest = chosen

        def drops_at(p):
            drops = [reference - a for a in top1s(p, cfg.n_validation, f"validation at {p:.3g}")] if cfg.n_validation else []
            if drops:
                print(f"validation at p_error {p:.4g} over {len(drops)} simulations: mean drop {np.mean(drops):+.4f}, max drop {np.max(drops):+.4f}"
                      + ("" if within(np.mean(drops), cfg.tolerance) else f": more than --tolerance {cfg.tolerance}"))
            return drops

        if largest is not None and cost(largest) > cap:  # raised to the cap whatever it loses: validated there, not here
            chosen, validations = largest, []
        else:
            def bisect_below(upper):
                print(f"no value that passed holds its validation: bisecting again below, from p_error {upper:.4g}")
                return bisect(upper, "p_error search again")

            # a reused bisection is only validated (--from-search): no new one
            chosen, trace, validations = validate_rebisecting(drops_at, bisect_below, trace, cfg.tolerance, cfg.lower,
                                                              rounds=0 if earlier else REBISECTIONS)
        if chosen is None:
            raise UserError("no p_error that passed the bisection" + ("" if earlier else "s") + f" holds --tolerance {cfg.tolerance} over "
                            f"{cfg.n_validation} validation simulations (mean drops {[round(v['mean_drop'], 4) for v in validations]}): "
                            "raise --tolerance" + (", or bisect anew without --from-search" if earlier else " or lower --lower"))

        def show(walk, over: str) -> None:
            for w in walk:
                print(f"p_error {w['p_error']:10.4g}  {measure} {w[measure]:.4g}" + ("" if w["within_budget"] else f": over {over}"))

        slack = capped = None
        if cost(chosen) > cap:
            raised, walk = raise_within_cost(cost, chosen, cap, cfg.upper, measure=measure)
            show(walk, f"{flag} {cap:.4g}")
            capped = {f"max_{measure}": cap, "searched_p_error": chosen, "walk": walk, "p_error": raised, "validation": summarize_validation(raised, drops_at(raised))}
            mean = capped["validation"]["mean_drop"]
            if mean is not None and not within(mean, cfg.tolerance):
                print(f"p_error {raised:.4g} loses more than --tolerance {cfg.tolerance}: kept for {flag}")
            chosen = raised
            validations.append(capped["validation"])
        elif cfg.cost_slack:
            lowest, walk = lower_within_cost(cost, chosen, cfg.cost_slack, cfg.lower, cap, measure=measure)
            show(walk, f"{1 + cfg.cost_slack:g} times {chosen:.4g}'s" + (f" or {flag} {cap:.4g}" if cap < math.inf else ""))
            slack = {"cost_slack": cfg.cost_slack, "searched_p_error": chosen, "walk": walk, "lowest": lowest, "kept": False}
            if lowest != chosen:
                slack["validation"] = summarize_validation(lowest, drops_at(lowest))
                if not slack["validation"]["runs"] or within(slack["validation"]["mean_drop"], cfg.tolerance):
                    chosen, slack["kept"] = lowest, True
                    validations.append(slack["validation"])
                else:  # fewer errors lose no more but by chance: the searched value stays
                    print(f"p_error {lowest:.4g} lost more than --tolerance in validation: {chosen:.4g} stays")
    print(f"chosen p_error {chosen:.4g}" + (f": {measure} {cost(chosen):.4g}, within {flag} {cap:.4g}" if cap < math.inf else ""))
    validation = {k: validations[-1][k] for k in ("runs", "mean_drop", "max_drop")}
    result = {
        "p_error": chosen,
        "reference_top1": reference,
        "trace": [{"p_error": p, "top1": a, "within_tolerance": bool(ok)} for p, a, ok in trace],
        "validation": validation,  # at the chosen value
        "validations": validations,  # every value validated, in that order (the last: the chosen one)
        **({"cost_slack": slack} if slack else {}),
        **({f"max_{measure}": capped} if capped else {}),
        **({"cost": {measure: cost(chosen), "cap": cap}} if cap < math.inf else {}),  # the chosen value's, under a cap
        **({"trace_from": trace_origin(earlier, cfg.from_search)} if earlier else {}),
        "model_config": ckpt["model_config"],
        **provenance(cfg),
    }
    write_json(cfg.json, result)
    plot(trace, reference, cfg.tolerance, chosen, Path(cfg.json).with_suffix(".png"))
    print(f"wrote {cfg.json} and {Path(cfg.json).with_suffix('.png')}")
    if cfg.write:
        stored = write_deployment(cfg.checkpoint, p_error=chosen, rounding_bits=cfg.rounding_bits, rounding_method=cfg.rounding_method,
                                  fit_lookups=cfg.fit_lookups, source=cfg.json)
        print(f"stored in {cfg.checkpoint} as its deployed setting: {stored}")
    return result


if __name__ == "__main__":
    run_main(main)
