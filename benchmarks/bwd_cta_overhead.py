"""The sm90 backward main kernel's fixed cost per CTA, separated from its cost per step.

    python benchmarks/bwd_cta_overhead.py [--d 128] [--sk 1024] [--bh 256] [--sq 256,512,1024,2048,4096]
        [--kt] [--flag KT_PERSISTENT]

A CTA of the main kernel owns one key block and walks the query blocks, so with the key length and B·H fixed the
grid stays the same while the steps per CTA follow the query length. The main kernel's time (torch.profiler, the
median of 7 calls) is then `waves · (c + steps · t)`: a least-squares line over the query lengths gives t, the
time of a step, and c, what every CTA pays besides its steps (launch, K / V load and pipeline fill, epilogue and
the last stores' drain, the CTA's share of the wave tail). Non-causal, bf16, B = bh // 16 sequences of 16 heads.
--kt: at D = 128 the keys-as-rows tile (the causal default) instead of the shared-dQ one; --flag: a boolean module
switch of backward.py turned on (e.g. KT_PERSISTENT: then a "CTA" is a tile of the persistent grid, and waves are
tiles over SMs); --unset: one turned off (e.g. SHARED_PERSISTENT: the shared-dQ tile off the persistent grid).
"""
import argparse
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fa4.kernels import sm90  # noqa: E402
from fa4.kernels.sm90 import backward as bwd  # noqa: E402

CALLS = 7


def main_kernel_us(d, sq, sk, b, h, tile):
    q, dout = (torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(b, sk, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=-1, softcap=0.0, sink=None)
    out, lse = sm90.forward(q, k, v, **opts)
    extra = dict(tile=tile)
    for _ in range(3):
        bwd.backward(dout, q, k, v, out, lse, None, **opts, **extra)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            bwd.backward(dout, q, k, v, out, lse, None, **opts, **extra)
        torch.cuda.synchronize()
    times = [e.device_time for e in prof.events()
             if e.device_type.name == "CUDA" and "attn_bwd" in e.name and "kernel" in e.name]
    return statistics.median(times), len(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--sk", type=int, default=1024)
    ap.add_argument("--bh", type=int, default=256)
    ap.add_argument("--sq", default="256,512,1024,2048,4096")
    ap.add_argument("--kt", action="store_true")
    ap.add_argument("--flag", default=None)
    ap.add_argument("--unset", default=None, help="a boolean module switch of backward.py turned off")
    args = ap.parse_args()
    if args.flag:
        setattr(bwd, args.flag, True)
    if args.unset:
        setattr(bwd, args.unset, False)
    h = 16
    b = args.bh // h
    d = args.d
    tile = bwd.D128_CAUSAL_TILE if args.kt and d == 128 else bwd.default_tile(d, d)
    ctas = (args.sk // tile.block_n) * b * h
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    waves = -(-ctas // sms)
    print(torch.cuda.get_device_name(), f"| D={d} Sk={args.sk} B={b} H={h}: {ctas} CTAs, {waves} waves on {sms} SMs,"
          f" BM={tile.block_m}, {'keys as rows' if tile.keys_as_rows else 'queries as rows'}"
          f"{', ' + args.flag if args.flag else ''}{', not ' + args.unset if args.unset else ''}"
          f"{', persistent grid' if bwd.persistent_tiles(tile) else ''}")
    xs, ys = [], []
    for sq in (int(x) for x in args.sq.split(",")):
        steps = -(-sq // tile.block_m)
        us, n = main_kernel_us(d, sq, args.sk, b, h, tile)
        per_cta = us / waves
        xs.append(steps)
        ys.append(per_cta)
        print(f"  Sq={sq:5d}: {steps:3d} steps a CTA, main kernel {us:8.1f} us ({n} calls), {per_cta:6.2f} us a wave")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    t = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    c = my - t * mx
    print(f"  fit: {t:.3f} us a step, {c:.2f} us a CTA besides its steps "
          f"(at {args.sk // tile.block_m} steps: {100 * c / (c + t * args.sk // tile.block_m):.0f}% of a CTA's time)")


if __name__ == "__main__":
    main()
