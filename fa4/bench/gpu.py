"""`fa4 bench` on a CUDA device: check fa4, measure the card's ceilings, run the suite, report."""
import os
import re
import sys

import torch

from . import machine, report, runner, suites
from .check import check_decode, check_training
from . import peers
from .peers import Fa4, resolve
from .timing import QUICK_REPS, REPS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE = "cuda"  # the CPU test of this module's flow replaces it


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


# The longer check's sequence length: past the backward's route switches by length (the keys-as-rows chain from
# 2,048 rows, the causal chain's 2,048-row limit, D = 64's 1,024), so the timed rows' long routes are the ones checked.
LONG_CHECK_S = 4096
# Decode steps with the timed rows' split shapes: one sequence in 16 splits (the combine kernel) and a batch whose
# few splits merge in a thread-block cluster, besides the short mixed-length batch.
DECODE_CHECKS = ((4, 1024), (1, 16384), (8, 4096))


def correctness_checks(args, api, cases, dtype):
    """Per head dim, mask and GQA group of the selected training rows: a short shape (S = 512) and, when a selected
    row is at least LONG_CHECK_S long, one of that length with the row's group; per cache layout for decode, the
    shapes of DECODE_CHECKS."""
    checks = []
    if suites.is_training(args.suite):
        longest = {}  # (D, causal, GQA group) -> the longest selected row's S
        for c in cases:
            key = (c.D, c.causal, c.H // c.kv_heads)
            longest[key] = max(longest.get(key, 0), c.S)
        for (d, causal, group), s_max in sorted(longest.items()):
            # GQA rows: the row's group of query heads on one kv head (H = group); the plain rows 4 heads.
            heads, kv = (group, 1) if group > 1 else (4, None)
            shapes = [(2, 512)] + ([(1, LONG_CHECK_S)] if s_max >= LONG_CHECK_S else [])
            for b, s in shapes:
                checks += check_training(api, B=b, S=s, H=heads, D=d, causal=causal, dtype=dtype, device=DEVICE,
                                         backend=args.backend, with_backward=not args.fwd_only, Hkv=kv)
    else:
        for paged in sorted({c.paged for c in cases}):
            for b, length in DECODE_CHECKS:
                checks += check_decode(api, B=b, L=length, Hq=suites.DECODE_HQ, Hkv=suites.DECODE_HKV,
                                       D=suites.DECODE_D, page_size=suites.DECODE_PAGE, paged=paged, dtype=dtype,
                                       device=DEVICE, backend=args.backend)
    return checks


def output_stem(info, suite):
    card = re.sub(r"[^a-z0-9]+", "-", (info["card"] or "cpu").lower()).strip("-")
    date = info["date"]  # 2026-11-25T17:50:12Z
    return f"{card}-{suite}-{date[:10]}-{date[11:13]}{date[14:16]}"


def write_out_dir(directory, doc, details, table_text, header, out):
    stem = os.path.join(directory, output_stem(details["machine"], doc["suite"]))
    report.write_json(stem + ".json", {**doc, "details": details})
    with open(stem + ".md", "w") as f:
        f.write("\n".join(header) + "\n\n" + table_text + "\n")
    skipped = report.plot(stem + ".png", doc["suite"], doc["rows"],
                          f"{doc['card']}, torch {doc['torch']}, triton {doc['triton']}, {doc['date']}")
    out(f"wrote {stem}.json, {stem}.md" + (f", {stem}.png" if skipped is None else f"; plot skipped: {skipped}"))


def run_gpu(args, out=print, log=_log):
    dtype = DTYPES[args.dtype]
    cases = suites.select(suites.SUITES[args.suite](), args.filters)
    if not cases:
        out(f"no row of the {args.suite} suite matches --rows {' '.join(args.rows)}")
        return 1
    info = machine.describe()
    header = [f"fa4 bench --suite {args.suite}: {info['card']} ({info['sms']} SMs, compute capability "
              f"{info['capability']}), driver {info['driver']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}",
              f"torch {info['torch']}, triton {info['triton']}, fa4 {info['fa4']}, {args.dtype}, "
              f"fa4 backend {args.backend or 'auto'}, {info['date']}",
              f"timing: median of per-call CUDA-event times, L2 cleared before each call by "
              + ("a 256 MB memset (triton do_bench)" if args.l2_flush == "memset" else
                 "reading a 256 MB buffer (--l2-flush read: no dirty lines for the timed call to write back)")
              + (f"; paged rows rotate over {args.page_tables} random page tables" if args.page_tables > 1 else "")]
    for line in header:
        out(line)

    fa4 = Fa4(args.backend)
    reason = fa4.available()
    if reason is not None:
        out(f"fa4 could not be imported: {reason}")
        return 1
    api = peers.load_fa4()
    log("checking fa4 against fa4.reference ...")
    try:
        checks = correctness_checks(args, api, cases, dtype)
    except Exception as exc:
        out(f"fa4 raised during its correctness check: {type(exc).__name__}: {exc}\nNothing was timed.")
        return 2
    for c in checks:
        out(c.line())
    if not all(c.ok for c in checks):
        out("fa4 is WRONG on the shapes above (outside the numerics rule): nothing was timed.")
        return 2

    reps = (QUICK_REPS if args.quick else REPS)[args.suite]
    log("measuring the card's ceilings (bf16 8192^3 matmul, 1 GiB copy) ...")
    matmul, copy = machine.matmul_tflops(), machine.copy_gbps()
    header.append(f"ceilings: bf16 8192^3 matmul {matmul:.0f} TFLOP/s, 1 GiB copy {copy:.0f} GB/s (read + write)")
    out(header[-1])

    usable, missing = resolve(args.peer_names)
    out("peers: " + (", ".join(p.name for p in usable) or "none")
        + "".join(f"\n  not available: {name} ({why})" for name, why in missing.items()))
    backends = [fa4] + usable
    if suites.is_training(args.suite):
        outcome = runner.run_training(cases, backends, dtype=dtype, reps=reps, fwd_only=args.fwd_only, log=log,
                                     device=DEVICE, l2_flush=args.l2_flush)
    else:
        outcome = runner.run_decode(cases, backends, dtype=dtype, reps=reps, log=log, device=DEVICE,
                                    l2_flush=args.l2_flush, page_tables=args.page_tables)

    table_text = report.table(args.suite, outcome.rows, [b.name for b in backends])
    if outcome.failures:
        table_text += "\n\nMissing (the backend failed on that row):\n" + "\n".join(f"  {f}" for f in outcome.failures)
    if missing:
        table_text += "\n\nPeers not importable: " + ", ".join(missing)
    out("")
    out(table_text)

    doc = report.document(info, args.suite, matmul, copy, outcome.rows)
    if args.json:
        report.write_json(args.json, doc)
        out(f"wrote {args.json}")
    if args.out:
        details = {"machine": info, "argv": sys.argv, "dtype": args.dtype, "backend": args.backend,
                   "quick": args.quick, "reps_ms": vars(reps), "l2_flush": args.l2_flush,
                   "page_tables": args.page_tables,
                   "checks": [vars(c) for c in checks],
                   "missing_peers": missing, "rows": outcome.details, "failures": outcome.failures,
                   "not_applicable": outcome.not_applicable}
        write_out_dir(args.out, doc, details, table_text, header, out)
    return 0
