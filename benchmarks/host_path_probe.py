"""Host time of fa4's eager call (forward, forward + backward) with the GPU kept busy by a sleep kernel, so the CPU
never waits for it; then cProfile of the causal D = 128 S = 1024 forward + backward's host path.

    python benchmarks/host_path_probe.py

Session 23's one run (NOTES) read ~2.1 ms of host time for a forward + backward on every row, more than the eager
timings allow (~1.1-1.4 ms at D = 128 S = 1024 causal): launches queued behind the ~25 ms sleep kernel may cost
more than in a steady stream. Read its figures as an upper bound and its profile as the split between the parts.
"""
import cProfile, pstats, statistics, sys, time, torch
sys.path.insert(0, '.')
import fa4
def host_us(fn, n=20):
    ts = []
    for _ in range(n):
        torch.cuda._sleep(50_000_000)  # ~25 ms of GPU time: the queue never drains under fn
        t0 = time.perf_counter(); fn(); ts.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
    return statistics.median(ts)
for d, s, causal in ((128, 1024, True), (128, 1024, False), (128, 4096, True)):
    b, h = 16384 // s, 2048 // d
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    fwd = lambda: fa4.flash_attn_func(q, k, v, causal=causal)
    def both():
        out = fa4.flash_attn_func(q, k, v, causal=causal)
        return torch.autograd.grad(out, (q, k, v), dout)
    for _ in range(3):
        both()
    torch.cuda.synchronize()
    print(f"D={d} S={s} causal={causal}: host fwd {host_us(fwd):.0f} us, fwd+bwd {host_us(both):.0f} us", flush=True)
    if causal and s == 1024:
        pr = cProfile.Profile()
        for _ in range(10):
            torch.cuda._sleep(50_000_000)
            pr.enable(); both(); pr.disable()
            torch.cuda.synchronize()
        pstats.Stats(pr).sort_stats("cumulative").print_stats(22)
