"""Tables, the JSON document and the plot, all built from schema rows.

Schema rows (DESIGN.md): training {"backend","D","S","B","H","causal","fwd_tflops","bwd_tflops",
"fwd_extra_mib","bwd_extra_mib"}; decode {"backend","B","L","paged","gbps"}; gqa (fa4's own suite): training's
with "Hkv" after "H". A figure is None (JSON null) when
that backend failed on that row; a backend absent from a row could not express it (shown as n/a).
"""
import json
import os

from .suites import FILTER_KEYS

# A row's key fields are the suite's case fields, the ones --rows filters on.
TRAINING_KEYS, GQA_KEYS, DECODE_KEYS = FILTER_KEYS["training"], FILTER_KEYS["gqa"], FILTER_KEYS["decode"]
TRAINING_FIGURES = ("fwd_tflops", "bwd_tflops", "fwd_extra_mib", "bwd_extra_mib")
TRAINING_FIELDS = ("backend",) + TRAINING_KEYS + TRAINING_FIGURES
GQA_FIELDS = ("backend",) + GQA_KEYS + TRAINING_FIGURES
DECODE_FIELDS = ("backend",) + DECODE_KEYS + ("gbps",)
# Each suite's schema fields, by suite name (its row keys: FILTER_KEYS).
ROW_FIELDS = {"training": TRAINING_FIELDS, "gqa": GQA_FIELDS, "decode": DECODE_FIELDS}
DOCUMENT_FIELDS = ("card", "torch", "triton", "date", "suite", "matmul_tflops", "copy_gbps", "rows")


def _group(rows, keys, names=()):
    """{case tuple: {backend: row}} in first-seen order, and the backends in first-seen order (fa4 first); `names`:
    backends that get a column even without a row (a peer that could express none of them: all n/a)."""
    cases, backends = {}, list(names)
    for row in rows:
        cases.setdefault(tuple(row[k] for k in keys), {})[row["backend"]] = row
        if row["backend"] not in backends:
            backends.append(row["backend"])
    if "fa4" in backends:
        backends.remove("fa4")
        backends.insert(0, "fa4")
    return cases, backends


def best_peer(values):
    """values {backend: figure or None} -> (best peer name, figure), fa4 excluded; (None, None) if none."""
    peers = {name: v for name, v in values.items() if name != "fa4" and v is not None}
    if not peers:
        return None, None
    name = max(peers, key=peers.get)
    return name, peers[name]


def ratio(fa4_value, peer_value):
    if fa4_value is None or not peer_value:
        return None
    return fa4_value / peer_value


def training_ratios(rows, keys=TRAINING_KEYS):
    """{case: {"fwd": (ratio, best peer), "bwd": (ratio, best peer)}}: fa4's figure over the best peer's."""
    cases, _ = _group(rows, keys)
    out = {}
    for case, by_backend in cases.items():
        fa4 = by_backend.get("fa4", {})
        out[case] = {}
        for phase in ("fwd", "bwd"):
            name, value = best_peer({b: r[f"{phase}_tflops"] for b, r in by_backend.items()})
            out[case][phase] = (ratio(fa4.get(f"{phase}_tflops"), value), name)
    return out


def decode_ratios(rows):
    """{(B, L, paged): (ratio, best peer)}: fa4 in each layout against the best peer at (B, L) in any layout,
    since a serving system that can pick its cache layout compares against the fastest one."""
    cases, _ = _group(rows, DECODE_KEYS)
    fastest = {}  # (B, L) -> {backend: its best figure over both layouts}
    for (b, l, _), by_backend in cases.items():
        at = fastest.setdefault((b, l), {})
        for name, row in by_backend.items():
            if row["gbps"] is not None:
                at[name] = max(row["gbps"], at.get(name, 0.0))
    out = {}
    for (b, l, paged), by_backend in cases.items():
        name, value = best_peer(fastest[(b, l)])
        out[(b, l, paged)] = (ratio(by_backend.get("fa4", {}).get("gbps"), value), name)
    return out


def _num(value, spec=".0f"):
    return "--" if value is None else format(value, spec)


def _pair(row, field, spec):
    return f"{_num(row[f'fwd_{field}'], spec)} / {_num(row[f'bwd_{field}'], spec)}"


def _ratio_cell(r_and_name):
    r, name = r_and_name
    return "--" if r is None else f"{r:.2f} ({name})"


def _markdown(header, lines):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(l) for l in lines])


def training_table(rows, names=(), keys=TRAINING_KEYS):
    """TFLOP/s (fwd / bwd) per backend with fa4's ratio to the best peer, then extra MiB per backend (keys:
    GQA_KEYS for the gqa suite's rows)."""
    cases, backends = _group(rows, keys, names)
    ratios = training_ratios(rows, keys)
    speed, memory = [], []
    for case, by_backend in cases.items():
        lead = list(case[:-1]) + ["yes" if case[-1] else "no"]
        cell = lambda name, field, spec: (  # noqa: E731
            _pair(by_backend[name], field, spec) if name in by_backend else "n/a")
        speed.append(lead + [cell(n, "tflops", ".0f") for n in backends]
                     + [_ratio_cell(ratios[case]["fwd"]), _ratio_cell(ratios[case]["bwd"])])
        memory.append(lead + [cell(n, "extra_mib", ".1f") for n in backends])
    head = list(keys)
    return ("TFLOP/s, forward / backward (higher is better)\n"
            + _markdown(head + backends + ["fa4/best fwd", "fa4/best bwd"], speed)
            + "\n\nExtra memory per call, MiB, forward / backward (beyond inputs and outputs; lower is better)\n"
            + _markdown(head + backends, memory))


def decode_table(rows, names=()):
    cases, backends = _group(rows, DECODE_KEYS, names)
    ratios = decode_ratios(rows)
    lines = []
    for case, by_backend in cases.items():
        b, l, paged = case
        lines.append([b, l, "paged" if paged else "contiguous"]
                     + [_num(by_backend[n]["gbps"]) if n in by_backend else "n/a" for n in backends]
                     + [_ratio_cell(ratios[case])])
    return ("GB/s of K+V read per decode step (higher is better); fa4/best compares with the best peer at the same "
            "(B, L) in either layout\n"
            + _markdown(["B", "L", "cache"] + backends + ["fa4/best"], lines))


def table(suite, rows, names=()):
    """The suite's table; `names`: the run's backends, each a column even where it could express no row."""
    if suite == "decode":
        return decode_table(rows, names)
    return training_table(rows, names, FILTER_KEYS[suite])


def _rounded(row):
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}


def document(info, suite, matmul_tflops, copy_gbps, rows):
    """The `--json` object, exactly DESIGN.md's schema."""
    fields = ROW_FIELDS[suite]
    doc = {
        "card": info["card"], "torch": info["torch"], "triton": info["triton"], "date": info["date"],
        "suite": suite, "matmul_tflops": None if matmul_tflops is None else round(matmul_tflops, 1),
        "copy_gbps": None if copy_gbps is None else round(copy_gbps, 1),
        "rows": [_rounded({f: row[f] for f in fields}) for row in rows],
    }
    assert tuple(doc) == DOCUMENT_FIELDS
    return doc


def write_json(path, obj):
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def plot(path, suite, rows, title):
    """Grouped bars (one group per row of the table, one bar per backend). Returns None, or why it was skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not importable ({exc}); install fa4[bench]"
    cases, backends = _group(rows, FILTER_KEYS[suite])
    if suite != "decode":
        panels = [("fwd_tflops", "forward TFLOP/s"), ("bwd_tflops", "backward TFLOP/s")]
        kv = (lambda c: f" kv{c[4]}") if suite == "gqa" else (lambda c: "")
        labels = [f"D{c[0]} S{c[1]}{kv(c)}\n{'causal' if c[-1] else 'full'}" for c in cases]
    else:
        panels = [("gbps", "GB/s of K+V read")]
        labels = [f"B{b} L{l}\n{'paged' if p else 'contig'}" for b, l, p in cases]
    wide = max(8.0, 0.3 * len(cases) * max(1, len(backends)))
    fig, axes = plt.subplots(len(panels), 1, figsize=(wide, 4.2 * len(panels)), squeeze=False)
    width = 0.8 / max(1, len(backends))
    for ax, (field, ylabel) in zip(axes[:, 0], panels):
        for j, name in enumerate(backends):
            xs = [i + (j - (len(backends) - 1) / 2) * width for i in range(len(cases))]
            ys = [(by.get(name) or {}).get(field) or 0.0 for by in cases.values()]
            ax.bar(xs, ys, width, label=name)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_title(title, fontsize=9)
    axes[0, 0].legend(fontsize=7, ncol=min(6, max(1, len(backends))))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
