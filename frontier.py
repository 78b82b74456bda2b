"""The frontier's presentation: the side-by-side table, the frontier lines (ours and the
published anchors, fastest first) and the plot of top-1 against FHE seconds per image, from
benchmark rows (benchmark.py measures them; `benchmark.py --from-json` shows saved ones)."""

from __future__ import annotations

from pathlib import Path

# Published CIFAR-10 results under FHE with a time per image: their figures, on their hardware.
PUBLISHED = [
    {"label": "Concrete ML split example (the reference)", "top1": 0.6234, "seconds": 1738, "cores": 128,
     "hardware": "128-vCPU c6i.metal",
     "source": "zama-ai/concrete-ml use_case_examples/cifar/cifar_brevitas_with_model_splitting/README.md"},
    {"label": "Concrete ML ternary VGG (CNV 2W2A), 6-bit rounding", "top1": 0.860, "seconds": 40, "cores": 128,
     "hardware": "128-core m6i.metal",
     "source": "zama-ai/concrete-ml use_case_examples/cifar/cifar_brevitas_training/README.md (top-1 in simulation)"},
]


def seconds(row) -> float | None:
    """FHE seconds per image: measured where the benchmark ran it, else the estimate."""
    return row.get("fhe_s_median") or row.get("fhe_s_estimate")


def machine(row) -> str:
    """The CPU a row was measured on, short ("Intel(R) Xeon(R) Processor" -> "Intel Xeon"), with
    "AVX-512" where the row records it (two CPUs both named "AMD EPYC" differed by it, and by a
    fifth in FHE seconds), and its cores."""
    cpu = " ".join(w for w in (row.get("cpu") or "unknown CPU").replace("(R)", "").replace("(TM)", "").split() if w != "Processor")
    if "avx512f" in (row.get("cpu_features") or []):
        cpu += " AVX-512"
    return f"{cpu}, {row['cores']} cores" if row.get("cores") else cpu


def fmt_sim(row) -> str:
    if row["sim_top1"] is None:
        return "n/a"
    n = len(row.get("sim_top1_draws") or [1])
    return f"{row['sim_top1']:.4f} +- {row.get('sim_top1_sd') or 0:.4f} ({n})"


def fmt_setting(row) -> str:
    s = row["settings"]
    p = f"{s['p_error']:.3g}" if s.get("p_error") is not None else f"global {s['global_p_error']:.3g}"
    return f"{p} / {s['rounding_bits']}"


def fmt_time(row) -> str:
    if row.get("fhe_s_median") is not None:
        return f"{row['fhe_s_median']:.1f} (measured)"
    if row.get("fhe_s_estimate") is not None:
        return f"{row['fhe_s_estimate']:.0f} (ESTIMATE)"
    return "n/a"


def fmt_term(key: str, field: str = "seconds"):
    """A column of one term of the estimate: its seconds (rows from before it existed: n/a).
    Rows from before the input reading was measured have the expansion alone as their input
    term's "seconds" (and no "encrypted_inputs"): their reading is n/a, their expansion that."""

    def fmt(row) -> str:
        term = row.get(key) or {}
        if key == "estimate_inputs" and "encrypted_inputs" not in term:
            term = {"expand_seconds": term.get("seconds")}
        s_ = term.get(field)
        return f"{s_:.1f}" if s_ is not None else "n/a"

    return fmt


def fmt_reads(row) -> str:
    """PBS by the bits their lookups read, widest first: "128 x 7, 442 x 6" (rows from before
    the benchmark recorded it: n/a)."""
    if "lookup_reads" not in row:
        return "n/a"
    by_bits: dict[int, int] = {}
    for t in row["lookup_reads"]:
        by_bits[t["bits"]] = by_bits.get(t["bits"], 0) + t["lookups"]
    return ", ".join(f"{n:,} x {b}" for b, n in sorted(by_bits.items(), reverse=True))


def print_table(rows: list[dict]) -> None:
    lines = [
        ("machine", machine),
        ("checkpoint epochs", lambda r: str(r["epochs_trained"]) if r["epochs_trained"] else "untrained"),
        ("test images (top-1)", lambda r: f"{r['n_images']:,}"),
        ("p_error / rounding bits", fmt_setting),
        ("top-1 torch", lambda r: f"{r['torch_top1']:.4f}" if r["torch_top1"] is not None else "n/a"),
        ("top-1 simulation", fmt_sim),
        ("PBS per image", lambda r: f"{r['pbs_count']:,}"),
        ("multiply-adds per image", lambda r: f"{r['multiply_add_count']:,}" if "multiply_add_count" in r else "n/a"),
        ("max bit width", lambda r: str(r["max_bit_width"])),
        ("lookups x bits they read", fmt_reads),
        ("crypto params (N, k, level: PBS)", lambda r: "; ".join(f"{p['parameters']['polynomial_size']},{p['parameters']['glwe_dimension']},{p['parameters']['level']}: {p['pbs']:,}" for p in r["estimate_parts"])),
        ("keys (MiB)", lambda r: f"{r['key_sizes']['total_bytes'] / 2**20:,.0f}"),
        ("compile s", lambda r: f"{r['compile_seconds']:.1f}"),
        ("keygen s", lambda r: f"{r['keygen_seconds']:.1f}" if r.get("keygen_seconds") is not None else "not run"),
        ("peak memory GiB", lambda r: f"{r['peak_memory_gib']:.2f}"),
        ("FHE s / image", fmt_time),
        ("core-seconds / image", lambda r: f"{seconds(r) * r['cores']:,.0f}" if seconds(r) and r.get("cores") else "n/a"),
        ("estimate s / image", lambda r: f"{r['fhe_s_estimate']:.1f}" if r.get("fhe_s_estimate") is not None else "n/a"),
        ("  of which multiply-adds", fmt_term("estimate_multiply_adds")),
        ("  of which reading the inputs", fmt_term("estimate_inputs", "read_seconds")),
        ("  of which expanding the inputs", fmt_term("estimate_inputs", "expand_seconds")),
    ]
    width = max(len(l) for l, _ in lines)
    print(f"{'':<{width}}  " + "  ".join(f"{r['config']:>24}" for r in rows))
    for label, get in lines:
        print(f"{label:<{width}}  " + "  ".join(f"{get(r):>24}" for r in rows))
    for r in rows:
        for part in r["estimate_parts"]:
            if part.get("note"):
                print(f"{r['config']}: {part['pbs']:,} PBS at N={part['parameters']['polynomial_size']}: {part['note']}")
        for key in ("estimate_multiply_adds", "estimate_inputs"):
            if (r.get(key) or {}).get("note"):
                print(f"{r['config']}: {r[key]['note']}")
    t = {r["config"]: seconds(r) for r in rows}
    if t.get("fast"):
        for name, s_ in t.items():
            if name != "fast" and s_:
                ratio = s_ / t["fast"]
                print(f"FHE time ratio {name} / fast: {ratio:,.{0 if ratio >= 10 else 2}f}x")


def print_frontier(rows: list[dict]) -> None:
    """Ours and the published anchors, fastest first: top-1, seconds and core-seconds per image."""
    points = [(seconds(r), r["sim_top1"], r.get("cores"), f"{r['config']} ({machine(r)})", "measured" if r.get("fhe_s_median") else "ESTIMATE")
              for r in rows if seconds(r) and r["sim_top1"] is not None]
    points += [(a["seconds"], a["top1"], a["cores"], f"{a['label']} ({a['hardware']})", "published") for a in PUBLISHED]
    print("frontier (top-1: simulated, mean of the draws; s/image: FHE seconds to classify one image, "
          "our median where measured, else our estimate; core-s: s/image x cores used):")
    print(f"  {'model':<72} {'top-1':>6} {'s/image':>9} {'core-s':>9}  time")
    for s_, top1, cores, label, kind in sorted(points):
        core_s = f"{s_ * cores:9,.0f}" if cores else f"{'n/a':>9}"
        print(f"  {label:<72} {top1:6.4f} {s_:9,.1f} {core_s}  {kind}")


# Where a model's name may go beside its point, in points from it: right, above right, below
# right, then the same on the left, then one line higher on either side (clear of a neighbour's
# marker just above); the first that stays inside the axes and overlaps no point and no label
# placed before it wins.
LABEL_PLACES = [((7, -3), "left"), ((6, 4), "left"), ((6, -11), "left"),
                ((-7, -3), "right"), ((-6, 4), "right"), ((-6, -11), "right"),
                ((6, 11), "left"), ((-6, 11), "right")]


def spread_labels(fig, ax, labels: list, fixed: list, points: list) -> None:
    """Move each of `labels` (annotations, in order) to the first of LABEL_PLACES where its
    drawn box lies inside the axes and overlaps none of `fixed`, of the markers at `points`
    (data coordinates) and of the labels before it; where none is free, the first."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = [a.get_window_extent(renderer) for a in fixed]
    taken += [Bbox.from_bounds(x - 4, y - 4, 8, 8) for x, y in ax.transData.transform(points)]  # a marker: ~8 px
    for label in labels:
        for offset, align in LABEL_PLACES + LABEL_PLACES[:1]:  # none free: the first
            label.set_position(offset)
            label.set_horizontalalignment(align)
            box = label.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if inside and not any(box.overlaps(t) for t in taken):
                break
        taken.append(box)


def plot_frontier(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ours = [r for r in rows if seconds(r) and r["sim_top1"] is not None]
    color = {m: f"C{2 * i}" for i, m in enumerate(sorted({machine(r) for r in ours}))}  # seconds compare within one machine
    labels = []
    for r in sorted(ours, key=seconds):
        measured, c = bool(r.get("fhe_s_median")), color[machine(r)]
        ax.errorbar(seconds(r), r["sim_top1"], yerr=r.get("sim_top1_sd") or 0, fmt="o", color=c, capsize=3,
                    mfc=c if measured else "white")
        labels.append(ax.annotate(r["config"], (seconds(r), r["sim_top1"]), textcoords="offset points", xytext=(6, 4), fontsize=8))
    for m, c in color.items():
        ax.plot([], [], "o", color=c, label=f"ours: {m}")
    anchors = []
    for a in PUBLISHED:
        ax.plot(a["seconds"], a["top1"], "x", color="C3")
        anchors.append(ax.annotate(f"{a['label']}\n{a['hardware']} (published)", (a["seconds"], a["top1"]),
                                   textcoords="offset points", xytext=(6, -14), fontsize=7, color="C3"))
    ax.set_xscale("log")
    xs = [seconds(r) for r in ours] + [a["seconds"] for a in PUBLISHED]
    ax.set_xlim(min(xs) / 2, max(xs) * 5)  # room for the labels
    ax.set_xlabel("FHE seconds per image (log scale)")
    n = sorted({r["n_images"] for r in ours})
    ax.set_ylabel(f"CIFAR-10 top-1, simulated (ours: first {'/'.join(map(str, n))} test images)", fontsize=8)
    ax.set_title("Accuracy against FHE latency (ours: filled, measured time; open, estimated)", fontsize=9)
    if color:
        ax.legend(fontsize=7, loc="lower left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    # once the axes are final: the boxes are measured where they are drawn
    spread_labels(fig, ax, labels, anchors, [(seconds(r), r["sim_top1"]) for r in ours])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def show(rows: list[dict], plot: str | None) -> None:
    print_table(rows)
    print_frontier(rows)
    if plot:
        plot_frontier(rows, plot)
