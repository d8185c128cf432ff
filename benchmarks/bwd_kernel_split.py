"""Where one sm90 backward call spends its GPU time, kernel by kernel (torch.profiler, 5 calls averaged): the main
kernel against the per-call fixed costs (dQ accumulator zeroing, preprocess, dQ cast), which do not shrink with S.

    python benchmarks/bwd_kernel_split.py
"""
import sys, torch
sys.path.insert(0, ".")
from torch.profiler import profile, ProfilerActivity
from fa4.kernels import sm90
from fa4.kernels.sm90 import backward as bwd
rows = [(128, 1024, False), (128, 1024, True), (128, 4096, False), (64, 4096, False), (256, 4096, False)]
for d, s, causal in rows:
    b, h = 16384 // s, 2048 // d
    q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0, sink=None)
    out, lse = sm90.forward(q, k, v, **opts)
    for _ in range(3):
        bwd.backward(do, q, k, v, out, lse, None, **opts)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            bwd.backward(do, q, k, v, out, lse, None, **opts)
        torch.cuda.synchronize()
    tot = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            tot[e.name[:60]] = tot.get(e.name[:60], 0) + e.device_time / 5
    print(f"== D={d} S={s} causal={causal}: total {sum(tot.values()):.1f} us")
    for n, t in sorted(tot.items(), key=lambda x: -x[1]):
        print(f"   {t:9.1f} us  {n}")
