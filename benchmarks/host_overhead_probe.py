"""Host time per call of the short-query forward routes (Python and launch, no GPU wait), and where it goes.

    python benchmarks/host_overhead_probe.py

B = 1, one query token, 8192 keys, Hq 32, Hkv 8, D 128, causal, bf16: microseconds of host time per call for
1000 back-to-back calls of each path, then a cProfile of flash_attn_func(backend=None) (the splitkv route).
"""
import cProfile
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fa4  # noqa: E402
from fa4 import dispatch, inference  # noqa: E402
from sm90_probe import _host_us  # noqa: E402


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
        print(f"{_host_us(fn, n=1000, warmup=20):8.1f}  {name}", flush=True)
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
