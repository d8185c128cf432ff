"""`fa4 bench` without a GPU: fa4's Triton kernels under the interpreter on a tiny shape, against the reference.

The interpreter runs each kernel program in numpy, about a second per tiny call, so the shapes are tiny and
fp16 (Triton 3.6's interpreter multiplies bf16 bit patterns in tl.dot). The caller sets TRITON_INTERPRET=1
before fa4's kernels are imported.
"""
import time

import torch

from .check import check_decode, check_training
from . import peers
from .peers import backend_kwargs

TINY_TRAINING = dict(B=1, S=128, H=2, D=64, causal=True)
TINY_DECODE = dict(B=3, L=128, Hq=4, Hkv=2, D=64, page_size=32)


def run_cpu(args, out=print):
    backend = args.backend or "triton"
    out(f"fa4 bench: no CUDA device. Checking fa4 (backend {backend!r}; Triton kernels run under the "
        f"interpreter, TRITON_INTERPRET=1) in fp16 on a tiny {args.suite} shape against fa4.reference.")
    try:
        api = peers.load_fa4()
    except Exception as exc:
        out(f"fa4 could not be imported: {type(exc).__name__}: {exc}")
        return 1
    t0 = time.perf_counter()
    try:
        if args.suite == "training":
            checks = check_training(api, **TINY_TRAINING, dtype=torch.float16, device="cpu", backend=backend,
                                    with_backward=not args.fwd_only)
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
    return 0 if passed else 1
