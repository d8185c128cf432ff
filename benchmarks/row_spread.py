"""Spread of the fa4 backward over 20 do_bench calls in one process, per training-suite row (the r24 / r27 outliers
at D = 128 S = 1024 causal), with the SM clock, power and throttle reasons sampled after each row.

    python benchmarks/row_spread.py 128:1024:1 128:1024:0 128:4096:1 256:4096:1
"""
import subprocess, sys, torch
sys.path.insert(0, '.')
import fa4
from triton.testing import do_bench
for spec in sys.argv[1:]:
    d, s, causal = (int(x) for x in spec.split(":"))
    b, h = 16384 // s, 2048 // d
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = fa4.flash_attn_func(q, k, v, causal=bool(causal))
    g = torch.randn_like(out)
    flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
    def bwd():
        torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
    for i in range(3):
        bwd()
    ts = [do_bench(bwd, warmup=5, rep=30) for _ in range(20)]
    clk = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw,clocks_throttle_reasons.active", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    tf = sorted(flops / t / 1e9 for t in ts)
    print(f"{spec}: TFLOP/s min {tf[0]:.0f} median {tf[len(tf)//2]:.0f} max {tf[-1]:.0f} | {clk}")
