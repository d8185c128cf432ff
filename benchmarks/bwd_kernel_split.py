"""Where one sm90 backward call spends its GPU time, kernel by kernel (torch.profiler, 5 calls averaged): the main
kernel against the per-call fixed costs (dQ accumulator zeroing, preprocess, dQ cast), which do not shrink with S.
With --cudnn, SDPA's cuDNN backward of the same call is split the same way beside it, so a row where cuDNN leads
(D = 256 S = 4096, session 22) shows whether the gap is in the main kernel or in the fixed costs.

    python benchmarks/bwd_kernel_split.py
    python benchmarks/bwd_kernel_split.py --rows 256:4096:0,256:16384:0,256:4096:1 --cudnn
    . /tmp/fa4env.sh && python benchmarks/bwd_kernel_split.py --flashattn4   (FlashAttention-4 beside fa4)

Each row prints the total, the main kernel's TFLOP/s on the backward's counted FLOPs (2.5 x the forward's), and
every kernel's µs a call.
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fa4.kernels import sm90  # noqa: E402
from fa4.kernels.sm90 import backward as bwd  # noqa: E402

ROWS = "128:1024:0,128:1024:1,128:4096:0,64:4096:0,256:4096:0"
CALLS = 5


def kernel_times(call):
    """{kernel name: µs a call} of `call` (already warmed up), over CALLS calls."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            call()
        torch.cuda.synchronize()
    per_kernel = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            per_kernel[e.name[:60]] = per_kernel.get(e.name[:60], 0.0) + e.device_time / CALLS
    return per_kernel


def report(label, per_kernel, bwd_flops):
    main_us = max(per_kernel.values())  # the main kernel is the call's longest
    total = sum(per_kernel.values())
    print(f"   {label}: total {total:.1f} us ({bwd_flops / total / 1e6:.0f} TFLOP/s), main kernel {main_us:.1f} us "
          f"({bwd_flops / main_us / 1e6:.0f} TFLOP/s), the rest {total - main_us:.1f} us")
    for name, us in sorted(per_kernel.items(), key=lambda x: -x[1]):
        print(f"      {us:9.1f} us  {name}")


def cudnn_backward(q, k, v, dout, causal):
    """SDPA's cuDNN backward on the bench's layout (transposed views), forward outside the timed call."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    grad = dout.transpose(1, 2)
    return lambda: torch.autograd.grad(out, (qt, kt, vt), grad, retain_graph=True)


def flashattn4_backward(q, k, v, dout, causal):
    """FlashAttention-4's backward (flash_attn.cute, the FA4 kit; a measuring stick, never imported by fa4) on the
    same tensors, forward outside the timed call."""
    from flash_attn.cute import flash_attn_func
    qr, kr, vr = (x.detach().requires_grad_() for x in (q, k, v))
    out = flash_attn_func(qr, kr, vr, causal=causal)
    out = out[0] if isinstance(out, tuple) else out
    return lambda: torch.autograd.grad(out, (qr, kr, vr), dout, retain_graph=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=ROWS,
                    help="D:S:causal,... with B·S = 16384 and H·D = 2048 (default %(default)s)")
    ap.add_argument("--cudnn", action="store_true", help="also split SDPA's cuDNN backward of each row")
    ap.add_argument("--flashattn4", action="store_true",
                    help="also split FlashAttention-4's backward of each row (needs the FA4 kit)")
    args = ap.parse_args()
    for item in args.rows.split(","):
        d, s, causal = (int(x) for x in item.split(":"))
        causal = bool(causal)
        b, h = 16384 // s, 2048 // d
        q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        bwd_flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
        opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0, sink=None)
        out, lse = sm90.forward(q, k, v, **opts)

        def fa4_call():
            return bwd.backward(dout, q, k, v, out, lse, None, **opts)
        for _ in range(3):  # compile and warm up outside the profiled window
            fa4_call()
        print(f"== D={d} S={s} causal={causal}")
        report("fa4", kernel_times(fa4_call), bwd_flops)
        for name, wanted, make in (("cuDNN", args.cudnn, cudnn_backward),
                                   ("FlashAttention-4", args.flashattn4, flashattn4_backward)):
            if not wanted:
                continue
            try:
                call = make(q, k, v, dout, causal)
                for _ in range(3):
                    call()
                report(name, kernel_times(call), bwd_flops)
            except Exception as exc:  # a peer that cannot run here is reported, not fatal
                print(f"   {name}: {type(exc).__name__}: {str(exc)[:200]}")


if __name__ == "__main__":
    main()
