"""`fa4 bench` without a GPU: fa4's Triton kernels under the interpreter on a tiny shape, against the reference.

The interpreter runs each kernel program in numpy, about a second per tiny call, so the shapes are tiny and
fp16 (Triton 3.6's interpreter multiplies bf16 bit patterns in tl.dot). The caller sets TRITON_INTERPRET=1
before fa4's kernels are imported.
"""
import os
import platform
import sys
import time

import torch

from . import machine, peers, report, suites
from .check import check_decode, check_training
from .peers import backend_kwargs

TINY_TRAINING = dict(B=1, S=128, H=2, D=64, causal=True)
TINY_DECODE = dict(B=3, L=128, Hq=4, Hkv=2, D=64, page_size=32)


def _unmeasured_rows(suite, cases):
    """Schema rows for fa4 on the selected cases with every figure null (nothing is timed without a GPU)."""
    if suites.is_training(suite):
        return [dict(backend="fa4", **c.key(), fwd_tflops=None, bwd_tflops=None, fwd_extra_mib=None,
                     bwd_extra_mib=None) for c in cases]
    return [dict(backend="fa4", **c.key(), gbps=None) for c in cases]


def _write_outputs(args, cases, checks, passed, out):
    """--json / --out without a GPU: DESIGN.md's document with the suite's rows and null figures (the card names the
    CPU and says nothing was timed), so that a caller reading PATH finds the schema; --out adds the checks."""
    info = machine.describe()
    info["card"] = f"CPU {platform.machine() or 'unknown'} (no CUDA device: nothing timed)"
    doc = report.document(info, args.suite, None, None, _unmeasured_rows(args.suite, cases))
    if args.json:
        report.write_json(args.json, doc)
        out(f"wrote {args.json} (figures null: timing needs a CUDA GPU)")
    if args.out:
        from .gpu import output_stem
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, output_stem(info, args.suite))
        details = {"machine": info, "argv": sys.argv, "backend": args.backend, "checks": [vars(c) for c in checks],
                   "passed": passed}
        report.write_json(stem + ".json", {**doc, "details": details})
        with open(stem + ".md", "w") as f:
            f.write(f"fa4 bench --suite {args.suite} without a CUDA device ({info['card']}), torch {info['torch']}, "
                    f"triton {info['triton']}, {info['date']}: correctness checks only\n\n"
                    + "\n".join(c.line() for c in checks) + "\n")
        out(f"wrote {stem}.json, {stem}.md")


def run_cpu(args, out=print):
    backend = args.backend or "triton"
    cases = suites.select(suites.SUITES[args.suite](), args.filters)
    if not cases:
        out(f"no row of the {args.suite} suite matches --rows {' '.join(args.rows)}")
        return 1
    out(f"fa4 bench: no CUDA device. Checking fa4 (backend {backend!r}; Triton kernels run under the "
        f"interpreter, TRITON_INTERPRET=1) in fp16 on a tiny {args.suite} shape against fa4.reference.")
    try:
        import numpy
        if tuple(int(x) for x in numpy.__version__.split(".")[:2]) >= (2, 4):
            out(f"note: numpy {numpy.__version__}: Triton 3.6's interpreter fails on numpy >= 2.4 (triton#9171); "
                f"`pip install 'numpy<2.4'` (the bench and test extras pin it) for this check")
    except (ImportError, ValueError):
        pass
    try:
        api = peers.load_fa4()
    except Exception as exc:
        out(f"fa4 could not be imported: {type(exc).__name__}: {exc}")
        return 1
    t0 = time.perf_counter()
    try:
        if suites.is_training(args.suite):
            checks = check_training(api, **TINY_TRAINING, dtype=torch.float16, device="cpu", backend=backend,
                                    with_backward=not args.fwd_only, Hkv=1 if args.suite == "gqa" else None)
        else:
            if not backend_kwargs(api.flash_attn_with_kvcache, backend):
                out("note: flash_attn_with_kvcache takes no backend argument; fa4 picks its own path for "
                    "CPU tensors")
            checks = [c for paged in (False, True)
                      for c in check_decode(api, **TINY_DECODE, paged=paged, dtype=torch.float16, device="cpu",
                                            backend=backend)]
    except Exception as exc:
        out(f"FAIL: fa4 raised {type(exc).__name__}: {exc}")
        return 1
    for c in checks:
        out(c.line())
    passed = all(c.ok for c in checks)
    out(f"{'PASS' if passed else 'FAIL'}: {sum(c.ok for c in checks)}/{len(checks)} checks within the numerics "
        f"rule (backend {backend!r}, {time.perf_counter() - t0:.1f} s)")
    out(f"Timing needs a CUDA GPU: run `fa4 bench --suite {args.suite}` on one.")
    if args.json or args.out:
        _write_outputs(args, cases, checks, passed, out)
    return 0 if passed else 1
