"""A/B timings behind session 7's host-path and concurrency changes (benchmarks/NOTES.md, session 7), one process.

    python benchmarks/stream_ab.py host          # Triton forward: host µs per API call and do_bench TFLOP/s
    python benchmarks/stream_ab.py triton-bwd    # D = 256 Triton backward, dV pass serial / on a side stream
    python benchmarks/stream_ab.py sm90-bwd      # sm90 backward, ordered dQ pass serial / beside the main kernel

Training-suite shapes (bf16, B = 16384 / S, H = 2048 / D). Each variant is timed twice, alternating, with
triton.testing.do_bench over torch.autograd.grad (backward) or fa4.flash_attn_func (forward), and the largest
gradient difference between the two orders is printed (0 where dQ is ordered). The session's numbers came from
ad-hoc copies of this logic; this file was written from them afterwards and has not been run on a GPU yet.
"""
import argparse
import time

import torch
from triton.testing import do_bench

import fa4


def _inputs(d, s, grad):
    b, h = 16384 // s, 2048 // d
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=grad) for _ in range(3))
    return q, k, v, 4.0 * b * h * s * s * d


def host(_args):
    """Host µs per call back to back (the GPU queue absorbs the kernels), then do_bench TFLOP/s."""
    for causal in (False, True):
        q, k, v, flops = _inputs(128, 1024, True)
        flops /= 2 if causal else 1
        f = lambda: fa4.flash_attn_func(q, k, v, causal=causal, backend="triton")  # noqa: E731
        for _ in range(10):
            f()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(200):
            f()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        print(f"D 128 S 1024 causal {int(causal)}: host {(t1 - t0) / 200 * 1e6:.0f} µs per call, "
              f"{flops / do_bench(f, warmup=25, rep=100) / 1e9:.0f} TFLOP/s", flush=True)


def _ab(rows, backend, toggle, label, deterministic=False):
    module, name = toggle
    for d, s, causal in rows:
        q, k, v, flops = _inputs(d, s, True)
        flops *= 2.5 / (2 if causal else 1)
        dout = torch.randn_like(q)
        res, grads = {}, {}
        for on in (False, True, False, True):
            setattr(module, name, on)
            out = fa4.flash_attn_func(q, k, v, causal=causal, backend=backend, deterministic=deterministic)
            g = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
            grads[on] = g()
            res.setdefault(on, []).append(flops / do_bench(g, warmup=25, rep=120) / 1e9)
        setattr(module, name, True)
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(grads[False], grads[True]))
        print(f"D {d} S {s} causal {int(causal)}: serial {res[False][0]:.0f}/{res[False][1]:.0f}  {label} "
              f"{res[True][0]:.0f}/{res[True][1]:.0f}  max|diff| {diff:.1e}", flush=True)


def triton_bwd(_args):
    from fa4.kernels.triton import backward as tb
    # dQ by fp32 atomics (the default at D = 256): the two orders agree to rounding, not bitwise.
    _ab([(256, 4096, True), (256, 16384, True), (256, 4096, False)], "triton", (tb, "CONCURRENT_LAUNCHES"),
        "concurrent")


def sm90_bwd(_args):
    from fa4.kernels.sm90 import backward as sb
    _ab([(64, 4096, False), (64, 4096, True), (64, 16384, False), (64, 16384, True)], None,
        (sb, "CONCURRENT_DQ"), "concurrent")
    # Deterministic D = 128 through the ordered pass (its in-kernel chain off; benchmarks/dq_chain_ab.py times that).
    sb.DQ_CHAIN = False
    _ab([(128, s, c) for s in (1024, 4096, 16384) for c in (False, True)], None, (sb, "CONCURRENT_DQ"),
        "concurrent", deterministic=True)
    sb.DQ_CHAIN = True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["host", "triton-bwd", "sm90-bwd"])
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    {"host": host, "triton-bwd": triton_bwd, "sm90-bwd": sm90_bwd}[args.what](args)


if __name__ == "__main__":
    main()
