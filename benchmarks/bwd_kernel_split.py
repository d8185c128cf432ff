"""Where one sm90 backward call spends its GPU time, kernel by kernel (torch.profiler, 5 calls averaged): the main
kernel against the per-call fixed costs (dQ accumulator zeroing, preprocess, dQ cast), which do not shrink with S.

    python benchmarks/bwd_kernel_split.py
"""
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fa4.kernels import sm90  # noqa: E402
from fa4.kernels.sm90 import backward as bwd  # noqa: E402

ROWS = [(128, 1024, False), (128, 1024, True), (128, 4096, False), (64, 4096, False), (256, 4096, False)]
CALLS = 5


def main():
    for d, s, causal in ROWS:
        b, h = 16384 // s, 2048 // d
        q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0, sink=None)
        out, lse = sm90.forward(q, k, v, **opts)
        for _ in range(3):  # compile and warm up outside the profiled window
            bwd.backward(dout, q, k, v, out, lse, None, **opts)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(CALLS):
                bwd.backward(dout, q, k, v, out, lse, None, **opts)
            torch.cuda.synchronize()
        per_kernel = {}
        for e in prof.events():
            if e.device_type.name == "CUDA":
                per_kernel[e.name[:60]] = per_kernel.get(e.name[:60], 0.0) + e.device_time / CALLS
        print(f"== D={d} S={s} causal={causal}: total {sum(per_kernel.values()):.1f} us")
        for name, us in sorted(per_kernel.items(), key=lambda x: -x[1]):
            print(f"   {us:9.1f} us  {name}")


if __name__ == "__main__":
    main()
