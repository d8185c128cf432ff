"""Forward + backward of a training-suite row, eager against a CUDA-graph replay of the same call, 15 do_bench calls
each, twice, in one process: a row whose eager figures spread while its replays do not is host-bound (session 23:
D = 128 S = 1024 causal).

    python benchmarks/graph_spread.py
"""
import sys, torch
sys.path[:0] = ['.', 'benchmarks']
import fa4
from triton.testing import do_bench
from sm90_probe import _capture  # the project's capture recipe
for d, s, causal in ((128, 1024, True), (128, 1024, False)):
    b, h = 16384 // s, 2048 // d
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    flops = 3.5 * 4 * b * h * s * s * d / (2 if causal else 1)  # forward + backward

    def call():
        out = fa4.flash_attn_func(q, k, v, causal=causal)
        return torch.autograd.grad(out, (q, k, v), dout)
    for _ in range(3):
        call()
    graph, _ = _capture(call, warmups=1)
    for name, fn in (("eager", call), ("graph", graph.replay), ("eager", call), ("graph", graph.replay)):
        tf = sorted(flops / do_bench(fn, warmup=5, rep=30) / 1e9 for _ in range(15))
        print(f"D={d} S={s} causal={causal} fwd+bwd {name}: TFLOP/s min {tf[0]:.0f} median {tf[7]:.0f} max {tf[-1]:.0f}",
              flush=True)
