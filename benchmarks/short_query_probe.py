"""Short query sequences against long key sequences: the forward kernels against the split-KV decode kernel.

    python benchmarks/short_query_probe.py

flash_attn_func(backend="sm90") (the Gluon forward) has no split over keys, so a few query tokens against a long
cache run on B · Hkv (packed) CTAs. flash_attn_with_kvcache runs the same attention (causal aligned to the cache
end) with split-KV; flash_attn_func with backend=None takes that route where dispatch.splitkv_wanted says so
(column "auto", and "route": the backend resolve_auto picked). Outputs are compared; times are do_bench medians
(memset L2 flush), µs.
"""
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fa4  # noqa: E402
from fa4 import dispatch  # noqa: E402

# (B, Sq, Sk, Hq, Hkv, D)
SHAPES = [(1, 1, 8192, 32, 8, 128), (8, 1, 8192, 32, 8, 128), (4, 16, 8192, 32, 8, 128), (8, 4, 4096, 32, 8, 128),
          (1, 64, 32768, 32, 8, 128), (4, 128, 8192, 32, 8, 128), (2, 512, 8192, 32, 8, 128),
          (4, 16, 8192, 32, 32, 128), (4, 16, 8192, 16, 2, 64)]


def main():
    print(f"# {torch.cuda.get_device_name()}; µs, do_bench median; causal, bf16")
    print(f"{'B':>3} {'Sq':>4} {'Sk':>6} {'Hq':>3} {'Hkv':>3} {'D':>4} | {'sm90':>8} {'kvcache':>8} {'auto':>8} "
          f"{'sm90/auto':>9} {'route':>8} | {'triton':>8} {'auto-nosm90':>8} {'ratio':>6} {'route':>8} | "
          f"{'maxdiff':>8}")
    for b, sq, sk, hq, hkv, d in SHAPES:
        torch.manual_seed(0)
        q = torch.randn(b, sq, hq, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, sk, hkv, d, device="cuda", dtype=torch.bfloat16)
        f1 = lambda: fa4.flash_attn_func(q, k, v, causal=True, backend="sm90")  # noqa: E731
        f2 = lambda: fa4.flash_attn_with_kvcache(q, k, v, causal=True)  # noqa: E731
        f3 = lambda: fa4.flash_attn_func(q, k, v, causal=True)  # noqa: E731
        diff = max((f1().float() - f2().float()).abs().max().item(), (f1().float() - f3().float()).abs().max().item())
        route = dispatch.resolve_auto(q, k, v, max_seqlen_q=None, window_left=-1, window_right=0, softcap=0.0,
                                      sink=None, cu_seqlens_q=None, page_table=None, seqused_k=None)
        t1, t2, t3 = (min(triton.testing.do_bench(f, warmup=25, rep=100) for _ in range(2)) * 1e3
                      for f in (f1, f2, f3))
        # Beside the portable forward (what GPUs other than Hopper get): backend="triton", and backend=None with
        # the sm90 path switched off.
        f4 = lambda: fa4.flash_attn_func(q, k, v, causal=True, backend="triton")  # noqa: E731
        os.environ["FA4_SM90"] = "0"
        try:
            route_t = dispatch.resolve_auto(q, k, v, max_seqlen_q=None, window_left=-1, window_right=0, softcap=0.0,
                                            sink=None, cu_seqlens_q=None, page_table=None, seqused_k=None)
            t5 = min(triton.testing.do_bench(f3, warmup=25, rep=100) for _ in range(2)) * 1e3
        finally:
            del os.environ["FA4_SM90"]
        t4 = min(triton.testing.do_bench(f4, warmup=25, rep=100) for _ in range(2)) * 1e3
        print(f"{b:>3} {sq:>4} {sk:>6} {hq:>3} {hkv:>3} {d:>4} | {t1:8.1f} {t2:8.1f} {t3:8.1f} {t1 / t3:9.2f} "
              f"{route:>8} | {t4:8.1f} {t5:8.1f} {t4 / t5:6.2f} {route_t:>8} | {diff:8.1e}", flush=True)


if __name__ == "__main__":
    main()
