"""D = 128 backward on the training suite's rows (B·S = 16384, H·D = 2048, bf16): the default tile beside the
persistent keys-as-rows grid (D128_CAUSAL_TILE) and that grid with the unordered writer warp (tile.dq_writer), causal
and not; do_bench median µs, best of three alternated rounds, each as a ratio to the default (session 26: whether
the grid the deterministic chain runs on also serves the default's non-causal calls).

    python benchmarks/kt_grid_probe.py
"""
import dataclasses
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fa4.kernels import sm90  # noqa: E402
from fa4.kernels.sm90 import backward as bwd  # noqa: E402


def main():
    print(torch.cuda.get_device_name(), "| us per backward call, D = 128, bf16")
    kt = bwd.D128_CAUSAL_TILE
    variants = [("default", None), ("kt-persist", kt), ("kt-persist+writer", dataclasses.replace(kt, dq_writer=True))]
    for s, causal in ((1024, 0), (4096, 0), (16384, 0), (1024, 1), (4096, 1), (16384, 1)):
        d = 128
        b, h = 16384 // s, 2048 // d
        q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0, sink=None)
        out, lse = sm90.forward(q, k, v, **opts)
        times = {name: [] for name, _ in variants}
        ref = None
        for r in range(3):
            for name, tile in variants:
                fn = lambda: bwd.backward(dout, q, k, v, out, lse, None, tile=tile, **opts)  # noqa: E731
                grads = fn()
                if ref is None:
                    ref = grads
                elif r == 0:  # the variants agree (dQ's reduce-add order differs)
                    err = max((x.float() - y.float()).abs().max().item() for x, y in zip(grads[:3], ref[:3]))
                    assert err < 0.05, (name, err)
                times[name].append(do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3)
        base = min(times["default"])
        print(f"D=128 S={s:5d} causal={causal}: "
              + " | ".join(f"{name} {min(t):8.1f} ({base / min(t):.3f}x)" for name, t in times.items()), flush=True)


if __name__ == "__main__":
    main()
