"""Host time per call of the short-query forward routes (Python and launch, no GPU wait), and where it goes.

    python benchmarks/host_overhead_probe.py

B = 1, one query token, 8192 keys, Hq 32, Hkv 8, D 128, causal, bf16: microseconds of host time per call for
1000 back-to-back calls of each path, then a cProfile of flash_attn_func(backend=None) (the splitkv route).
"""
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fa4  # noqa: E402
from fa4 import dispatch, inference  # noqa: E402


def per_call_us(fn, n=1000):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def main():
    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 8192, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    feats = dict(max_seqlen_q=None, window_left=-1, window_right=0, softcap=0.0, sink=None, cu_seqlens_q=None,
                 page_table=None, seqused_k=None)
    paths = {
        "flash_attn_func auto (splitkv)": lambda: fa4.flash_attn_func(q, k, v, causal=True),
        "flash_attn_func sm90": lambda: fa4.flash_attn_func(q, k, v, causal=True, backend="sm90"),
        "flash_attn_with_kvcache": lambda: fa4.flash_attn_with_kvcache(q, k, v, causal=True),
        "inference.forward_splitkv": lambda: inference.forward_splitkv(
            q, k, v, softmax_scale=128 ** -0.5, window_left=-1, window_right=0, softcap=0.0, sink=None),
        "dispatch.resolve_auto": lambda: dispatch.resolve_auto(q, k, v, **feats),
        "dispatch.planned_sm90_forward": lambda: dispatch.planned_sm90_forward(
            q, k, v, softmax_scale=0.1, softcap=0.0, sink=None, cu_seqlens_q=None, cu_seqlens_k=None,
            seqused_k=None, max_seqlen_q=None, max_seqlen_k=None, window_left=-1, window_right=0),
    }
    print(f"# {torch.cuda.get_device_name()}: host µs per call")
    for name, fn in paths.items():
        print(f"{per_call_us(fn):8.1f}  {name}", flush=True)
    prof = cProfile.Profile()
    fn = paths["flash_attn_func auto (splitkv)"]
    prof.enable()
    for _ in range(2000):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
