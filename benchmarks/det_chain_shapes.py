"""deterministic=True at D = 128 causal on (batch, heads, rows) shapes off the training suite: the default backward,
the persistent keys-as-rows grid's chain (KT_PERSIST_CHAIN with its row threshold lifted) and the shared-dQ tile's
chain (KT_PERSIST_CHAIN off), do_bench median µs of the backend `backward` call (session 26: how the persistent
chain's cost depends on the number of tiles a head has and on the waves of tiles).

    python benchmarks/det_chain_shapes.py [--shapes B:H:S,...]
"""
import argparse
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fa4.kernels import sm90  # noqa: E402
from fa4.kernels.sm90 import backward as bwd  # noqa: E402

SHAPES = "1:16:4096,4:16:4096,1:64:4096,1:16:1024,16:16:1024,1:256:1024,1:16:16384,1:64:16384"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=SHAPES)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "| us per backward call, D = 128 causal, bf16")
    saved = bwd.KT_PERSIST_CHAIN, bwd.KT_PERSIST_CHAIN_MIN_ROWS
    for item in args.shapes.split(","):
        b, h, s = (int(x) for x in item.split(":"))
        d = 128
        q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0, softcap=0.0, sink=None)
        out, lse = sm90.forward(q, k, v, **opts)
        res = []
        for det, persist in ((False, True), (True, True), (True, False)):
            bwd.KT_PERSIST_CHAIN, bwd.KT_PERSIST_CHAIN_MIN_ROWS = persist, 0
            fn = lambda: bwd.backward(dout, q, k, v, out, lse, None, deterministic=det, **opts)  # noqa: E731
            fn()
            res.append(do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3)
        bwd.KT_PERSIST_CHAIN, bwd.KT_PERSIST_CHAIN_MIN_ROWS = saved
        print(f"B={b:3d} H={h:3d} S={s:5d}: default {res[0]:8.1f}  det persistent chain {res[1]:8.1f} "
              f"({res[1] / res[0] - 1:+.1%})  det shared-dQ chain {res[2]:8.1f} ({res[2] / res[0] - 1:+.1%})",
              flush=True)


if __name__ == "__main__":
    main()
