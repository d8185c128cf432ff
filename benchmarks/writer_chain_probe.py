"""Where the keys-as-rows kernel's ordered dQ chain spends its time: per training-suite row (B·S = 16384,
H·D = 2048, bf16), do_bench median µs of the sm90 backend `backward` call in five forms, alternated over rounds in
one process, best round of each:

    shipped        the default tile and routing (D = 128 causal: the persistent keys-as-rows grid)
    one-cta        the keys-as-rows tile one CTA a tile (no persistent grid), consumers issuing their reduce-adds
    writer         the same with its writer warp issuing the unordered reduce-adds (tile.dq_writer)
    chain          deterministic=True through the writer's ordered chain on that tile (KT_ASC_CHAIN_MIN_ROWS = 0)
    det-shipped    deterministic=True as shipped (dq_route: the chain, the shared-dQ tile's chain, or the pass)

writer against one-cta is the writer's own cost (its per-step round trip: wait_group 0 before the next step's
spin); chain against writer is the order's (waiting for the key blocks before it). Session 24 measured the chain at
+3-4% over the default at D = 64 causal but +16% at D = 64 S = 4096 without a window and +65% on the D = 128 causal
tile at S = 1024 (benchmarks/NOTES.md).

    python benchmarks/writer_chain_probe.py [--rows 64:4096:0,64:4096:1,128:1024:1,128:4096:1] [--rounds 3]
"""
import argparse
import dataclasses
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fa4.kernels import sm90  # noqa: E402
from fa4.kernels.sm90 import backward as bwd  # noqa: E402


def kt_tile(d, **over):
    """The keys-as-rows tile of head dim d off the persistent grid (D = 128: the causal tile's geometry)."""
    base = bwd.get_tile(64, 64) if d == 64 else dataclasses.replace(bwd.D128_CAUSAL_TILE, persistent=False)
    tile = dataclasses.replace(base, **over)
    assert tile.keys_as_rows and not bwd.persistent_tiles(tile), tile
    return tile


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="64:4096:0,64:4096:1,64:16384:1,128:1024:1,128:4096:1,128:16384:1")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    bwd.KT_ASC_CHAIN_MIN_ROWS = 0
    print(torch.cuda.get_device_name(), "| us per backward call, best round")
    for item in args.rows.split(","):
        d, s, causal = (int(x) for x in item.split(":"))
        if d == 128 and not causal:
            print(f"D=128 S={s} causal=0: skipped (the keys-as-rows tile serves causal D = 128 only)")
            continue
        b, h = 16384 // s, 2048 // d
        q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0, sink=None)
        out, lse = sm90.forward(q, k, v, **opts)
        forms = {"shipped": dict(), "one-cta": dict(tile=kt_tile(d)), "writer": dict(tile=kt_tile(d, dq_writer=True)),
                 "chain": dict(tile=kt_tile(d), deterministic=True), "det-shipped": dict(deterministic=True)}
        times = {name: [] for name in forms}
        for _ in range(args.rounds):
            for name, kw in forms.items():
                fn = lambda: bwd.backward(dout, q, k, v, out, lse, None, **opts, **kw)  # noqa: E731
                fn()
                times[name].append(do_bench(fn, warmup=5, rep=40) * 1e3)
        best = {name: min(t) for name, t in times.items()}
        ref = best["one-cta"]
        cells = " | ".join(f"{name} {t:8.1f} ({t / ref:.3f})" for name, t in best.items())
        print(f"D={d} S={s:5d} causal={causal}: {cells}", flush=True)


if __name__ == "__main__":
    main()
