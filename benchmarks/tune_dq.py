"""Where the Hopper backward's time goes per kernel, and the portable dQ kernel's tile (the sm90 backward's
ordered dQ pass: D = 64 always, D = 128 when deterministic), on a GPU:

    python benchmarks/tune_dq.py [--rows 64:4096,64:16384,128:4096]

1. torch.profiler over fa4's sm90 backward (torch.autograd.grad through flash_attn_func): microseconds per
   kernel per call (preprocess, main kernel, dQ kernel, casts).
2. The dQ kernel alone (fa4.kernels.triton.backward.dq_launch) for each candidate (block_m2, block_n2, warps2,
   stages2), do_bench median, against the table's; gradients compared with the table config's.
"""
import argparse
import dataclasses

import torch
import triton

import fa4
from fa4.kernels.sm90 import backward as sbwd
from fa4.kernels.triton import backward as tb

CANDIDATES = {64: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3),
                   (64, 128, 4, 2), (128, 64, 4, 3), (64, 64, 4, 4), (128, 128, 8, 3)],
              128: [(128, 64, 8, 3), (128, 32, 8, 3), (128, 32, 8, 4), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 2),
                    (64, 64, 4, 2), (128, 128, 8, 2)]}


def profile(d, s, causal, deterministic=False):
    b, h = 16384 // s, 2048 // d
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    out = fa4.flash_attn_func(q, k, v, causal=causal, deterministic=deterministic)
    for _ in range(3):
        torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    torch.cuda.synchronize()
    n = 10
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / n) for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(t for _, t in rows)
    print(f"D={d} S={s} causal={int(causal)} deterministic={int(deterministic)}: {total:8.1f} us per backward on the "
          "GPU")
    for key, t in sorted(rows, key=lambda r: -r[1])[:6]:
        print(f"    {t:8.1f} us  {100 * t / total:5.1f}%  {key[:90]}")


def time_dq(d, s, causal):
    b, h = 16384 // s, 2048 // d
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    dout = torch.randn_like(q)
    out = torch.randn_like(q)
    lse = torch.randn(b, h, s, device="cuda", dtype=torch.float32) + 10.0
    delta, lse2, _ = sbwd.preprocess(dout, out, lse, None, None, None, b, s, 64)
    # The deterministic sm90 backward's dQ pass uses the table config of the padded head dim.
    base = tb.default_config(q, d)
    opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0,
                cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, seqlen_q=s, seqlen_k=s)
    flops = 3 * 2.0 * b * h * s * s * d / (2 if causal else 1)  # three products of 2·b·h·s²·d
    ref = None
    for cand in [None] + CANDIDATES[d]:
        cfg = base if cand is None else dataclasses.replace(base, block_m2=cand[0], block_n2=cand[1],
                                                            warps2=cand[2], stages2=cand[3])
        dq = torch.empty_like(q)
        launch = tb.dq_launch(dout, q, k, v, dq, lse2, delta, cfg, **opts)
        try:
            launch()
            torch.cuda.synchronize()
            ms = triton.testing.do_bench(launch, warmup=10, rep=60, return_mode="median")
        except Exception as exc:
            print(f"    {cand}: {type(exc).__name__}: {str(exc)[:100]}")
            continue
        if ref is None:
            ref = dq.clone()
        diff = float((dq.float() - ref.float()).abs().max())
        name = "table " + str((base.block_m2, base.block_n2, base.warps2, base.stages2)) if cand is None else str(cand)
        print(f"    dQ kernel {name:24s} {ms * 1e3:8.1f} us  {flops / ms / 1e9:6.1f} TFLOP/s (3 products)  "
              f"max|diff| {diff:.1e}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="64:4096,64:16384")
    args = ap.parse_args()
    print(torch.cuda.get_device_name())
    for row in args.rows.split(","):
        d, s = (int(x) for x in row.split(":"))
        for causal in (False, True):
            profile(d, s, causal)
            if d > 64:
                profile(d, s, causal, deterministic=True)
            time_dq(d, s, causal)


if __name__ == "__main__":
    main()
