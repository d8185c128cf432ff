"""Non-causal D = 128 backward on the keys-as-rows tile (one CTA a tile, and persistent) against the shipped
shared-dQ tile: whole backward calls alternated over rounds, best and median ratios, gradients compared.

    python benchmarks/kt_noncausal_probe.py [ROUNDS] [S,S,...]
"""
import dataclasses
import statistics
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, ".")
from fa4.kernels import sm90  # noqa: E402
from fa4.kernels.sm90 import backward as bwd  # noqa: E402

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 7
LENGTHS = [int(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else [1024, 2048, 4096]
print(torch.cuda.get_device_name(), f"| non-causal D=128 backward us: shared-dQ (shipped) / kt / kt persistent, "
      f"best of {ROUNDS} rounds")
kt = dataclasses.replace(bwd.D128_CAUSAL_TILE, persistent=False)
ktp = bwd.D128_CAUSAL_TILE
for s in LENGTHS:
    d = 128; b, h = 16384 // s, 2048 // d
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=-1, softcap=0.0, sink=None)
    out, lse = sm90.forward(q, k, v, **opts)
    tiles = {"shared": None, "kt": kt, "ktp": ktp}
    times = {n: [] for n in tiles}; grads = {}
    for _ in range(ROUNDS):
        for n, t in tiles.items():
            extra = {} if t is None else dict(tile=t)
            fn = lambda: bwd.backward(dout, q, k, v, out, lse, None, **opts, **extra)  # noqa: E731
            grads[n] = fn()
            times[n].append(do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3)
    base = min(times["shared"])
    err = max((grads["ktp"][i].float() - grads["shared"][i].float()).abs().max().item() for i in range(3))
    print(f"S={s}: " + " | ".join(f"{n} {min(v):.1f} (x{base / min(v):.3f}, median x{statistics.median(times['shared']) / statistics.median(v):.3f})" for n, v in times.items()) + f" | max grad diff ktp vs shared {err:.1e}", flush=True)
