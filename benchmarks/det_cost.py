"""deterministic=True against the default sm90 backward on training-suite rows (B·S = 16384, H·D = 2048, bf16):
do_bench median µs of the backend `backward` call, the two alternated over rounds in one process; prints the best
round of each and the slowdown (issue #4 allows deterministic=True at most 15% slower than the default).

    python benchmarks/det_cost.py [--rows D:S:causal,...] [--rounds 3]     (default: every training-suite row)
    python benchmarks/det_cost.py --group 4 ...    (GQA: H / 4 kv heads)
    python benchmarks/det_cost.py --packed ...     (the same rows as packed sequences: cu_seqlens, no batch dim)
"""
import argparse
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fa4.kernels import sm90  # noqa: E402
from fa4.kernels.sm90 import backward as bwd  # noqa: E402

# The training suite (fa4/bench): D 64 / 128 / 256 at the sequence lengths it runs, causal and not.
SUITE_ROWS = ",".join(f"{d}:{s}:{c}" for d, lengths in ((64, (4096, 16384)), (128, (1024, 4096, 16384)),
                                                          (256, (4096, 16384))) for s in lengths for c in (0, 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=SUITE_ROWS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--flip", default=None, help="a backward module switch (e.g. KT_DQ_CHAIN): both calls are also "
                    "timed with it flipped, in the same rounds")
    ap.add_argument("--group", type=int, default=1, help="query heads per kv head (GQA)")
    ap.add_argument("--packed", action="store_true", help="each row's B sequences packed (varlen call)")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "| us per backward call, default -> deterministic=True")
    for item in args.rows.split(","):
        d, s, causal = (int(x) for x in item.split(":"))
        b, h = 16384 // s, 2048 // d
        lead = (b * s,) if args.packed else (b, s)
        q, dout = (torch.randn(*lead, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(*lead, h // args.group, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0, sink=None)
        if args.packed:
            cu = torch.arange(0, b * s + 1, s, device="cuda", dtype=torch.int32)
            opts.update(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=s, max_seqlen_k=s)
        out, lse = sm90.forward(q, k, v, **opts)
        variants = [("default", False, None), ("deterministic", True, None)]
        if args.flip:
            variants += [(f"default, {args.flip} flipped", False, args.flip),
                         (f"deterministic, {args.flip} flipped", True, args.flip)]
        times = {name: [] for name, _, _ in variants}
        for _ in range(args.rounds):
            for name, det, off in variants:
                saved = getattr(bwd, off) if off else None
                if off:
                    setattr(bwd, off, not saved)
                try:
                    fn = lambda: bwd.backward(dout, q, k, v, out, lse, None, deterministic=det, **opts)  # noqa: E731
                    fn()
                    times[name].append(do_bench(fn, warmup=5, rep=40))
                finally:
                    if off:
                        setattr(bwd, off, saved)
        best = {name: min(t) * 1e3 for name, t in times.items()}
        base = best["default"]
        line = " | ".join(f"{name} {t:8.1f} us ({t / base - 1:+.1%})" for name, t in best.items() if name != "default")
        print(f"D={d} S={s:5d} causal={causal}: default {base:8.1f} us | {line}", flush=True)


if __name__ == "__main__":
    main()
