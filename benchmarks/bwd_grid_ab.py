"""A/B of the Triton backward kernels' grid order (fa4/kernels/triton/backward.py, BLOCKS_FASTEST), in one process.

    python benchmarks/bwd_grid_ab.py [--dims 64,128,256] [--backends triton,sm90]

Per training-suite row (bf16, B = 16384 / S, H = 2048 / D; S = 1024 only at D = 128): backward TFLOP/s (2.5 x
the forward's FLOPs) of torch.autograd.grad through fa4.flash_attn_func, as `fa4 bench` times it, with the dK/dV
and dQ kernels' programs ordered heads-fastest (the order before 2026-11-26) and blocks-fastest. The sm90
backend uses the Triton dQ kernel at D = 64 (its ordered dQ pass); the triton backend uses both kernels.
"""
import argparse

import torch
import triton

import fa4
from fa4.kernels.triton import backward as tb


def rows(dims):
    for d in dims:
        for s in ((1024, 4096, 16384) if d == 128 else (4096, 16384)):
            for causal in (False, True):
                yield d, s, causal


def time_bwd(backend, d, s, causal):
    b, h = 16384 // s, 2048 // d
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    out = fa4.flash_attn_func(q, k, v, causal=causal, backend=backend)

    def grad():
        return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    res = {}
    for order in (False, True):
        tb.BLOCKS_FASTEST = order
        ref = grad()
        ms = triton.testing.do_bench(grad, warmup=10, rep=60, return_mode="median")
        res[order] = (2.5 * 4.0 * b * h * s * s * d / (2 if causal else 1)) / ms / 1e9
        if order:
            # Both orders compute the same sums in the same per-program order: gradients must match bitwise
            # where dQ comes from the ordered pass, and to fp32-atomic noise otherwise.
            tb.BLOCKS_FASTEST = False
            old = grad()
            tb.BLOCKS_FASTEST = True
            res["max_diff"] = max(float((a.float() - c.float()).abs().max()) for a, c in zip(ref, old))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="64,128,256")
    ap.add_argument("--backends", default="triton,sm90")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "| backward TFLOP/s, heads fastest -> blocks fastest")
    for backend in args.backends.split(","):
        for d, s, causal in rows([int(x) for x in args.dims.split(",")]):
            try:
                r = time_bwd(backend, d, s, causal)
            except Exception as exc:
                print(f"{backend} D={d} S={s} causal={causal}: {exc!r}"[:300], flush=True)
                continue
            print(f"{backend:7s} D={d:3d} S={s:5d} causal={int(causal)}  {r[False]:6.1f} -> {r[True]:6.1f}  "
                  f"({r[True] / r[False]:.3f}x)  max|diff| {r['max_diff']:.1e}", flush=True)
    tb.BLOCKS_FASTEST = True


if __name__ == "__main__":
    main()
