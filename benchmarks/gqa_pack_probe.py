"""GQA packing in the Hopper forward (attention_fwd PACK): packed tiles against one query head a tile, by shape.

    python benchmarks/gqa_pack_probe.py [--reps 3]

Each shape runs packed (PACK = the group, forced even past configs.PACK_MAX_SEQLEN_Q), unpacked (PACK = 1) and
unpacked on paired units whatever the size (session 10's causal schedule) through fa4.kernels.sm90.forward, after an output check of the two against each other; the time is do_bench's
median (L2 flushed by its memset before each call), interleaved over --reps rounds. TFLOP/s counts the
attention FLOPs (4·B·Hq·Sq·Sk·D, causal: the visible pairs only). The threshold configs.PACK_MAX_SEQLEN_Q is
where packing stops paying.
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("FA4_SM90", "1")

from fa4.kernels import sm90  # noqa: E402
from fa4.kernels.sm90 import configs  # noqa: E402

# (B, Sq, Sk, Hq, Hkv, D, causal)
SHAPES = [
    (8, 1, 8192, 32, 8, 128, True),       # a decode step through flash_attn_func
    (4, 16, 8192, 32, 8, 128, True),      # speculative decoding / a small prefill chunk
    (4, 128, 8192, 32, 8, 128, True),     # chunked prefill
    (4, 512, 8192, 32, 8, 128, True),
    (2, 1024, 1024, 32, 8, 128, True),    # short prompts
    (1, 2048, 2048, 32, 8, 128, True),
    (1, 4096, 4096, 32, 8, 128, True),    # training lengths
    (1, 4096, 4096, 32, 8, 128, False),
    (4, 128, 8192, 32, 4, 64, True),      # group 8 at D = 64
    (4, 128, 8192, 16, 8, 256, True),     # group 2 at D = 256
    (2, 1024, 1024, 16, 8, 256, True),
    (1, 1024, 1024, 16, 16, 128, True),   # MHA (nothing to pack): the schedule alone
    (2, 2048, 2048, 8, 8, 128, True),
]


def flops(b, sq, sk, hq, d, causal):
    if not causal:
        return 4 * b * hq * sq * sk * d
    off = sk - sq
    pairs = sum(min(sk, max(0, i + off + 1)) for i in range(sq))
    return 4 * b * hq * pairs * d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}; TFLOP/s, do_bench median, best of {args.reps} interleaved rounds")
    print(f"{'B':>3} {'Sq':>5} {'Sk':>5} {'Hq':>3} {'Hkv':>3} {'D':>4} {'c':>2} | {'packed':>7} {'unpacked':>8} "
          f"{'paired':>7} {'pk/unp':>6} {'pk/paired':>9} {'auto':>5}")
    for b, sq, sk, hq, hkv, d, causal in SHAPES:
        torch.manual_seed(0)
        q = torch.randn(b, sq, hq, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16)
        opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0,
                    sink=None)
        group = hq // hkv
        # "paired": unpacked with the schedule session 10 shipped (paired units under causal at any size).
        variants = (("packed", dict(PACK=group)), ("unpacked", dict(PACK=1)),
                    ("paired", dict(PACK=1, SCHED="paired" if causal else "flat")))
        fns = {name: (lambda var=var: sm90.forward(q, k, v, variant=var, **opts)) for name, var in variants}
        o1, l1 = fns["packed"]()
        o2, l2 = fns["unpacked"]()
        err = (o1.float() - o2.float()).abs().max().item()
        lerr = (l1 - l2).abs().max().item()
        if err > 2e-2 or lerr > 1e-3:
            print(f"MISMATCH {b, sq, sk, hq, hkv, d, causal}: out {err:.2e} lse {lerr:.2e}", flush=True)
        best = {name: float("inf") for name in fns}
        for r in range(args.reps):
            names = list(fns)
            for name in names[r % len(names):] + names[:r % len(names)]:
                best[name] = min(best[name], triton.testing.do_bench(fns[name], warmup=25, rep=100))
        f = flops(b, sq, sk, hq, d, causal)
        tp = {name: f / ms / 1e9 for name, ms in best.items()}
        auto = configs.gqa_pack(group, sq)
        print(f"{b:>3} {sq:>5} {sk:>5} {hq:>3} {hkv:>3} {d:>4} {int(causal):>2} | {tp['packed']:7.1f} "
              f"{tp['unpacked']:8.1f} {tp['paired']:7.1f} {tp['packed'] / tp['unpacked']:6.2f} "
              f"{tp['packed'] / tp['paired']:9.2f} {auto:>5}", flush=True)
        del fns
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
