"""One forward (or forward + backward) of a training-suite row through fa4's sm90 kernels or FlashAttention-4's
CuTe DSL path, for Nsight Compute side by side (benchmarks/ncu_peer.sh).

    python benchmarks/ncu_peer.py fa4|fa4kt|flashattn4|cudnn fwd|bwd D S causal [group]

group: query heads per kv head (GQA; K and V with H / group heads; cudnn gets enable_gqa).

fa4kt: the backward on the keys-as-rows tile at D = 128 (backward.D128_CAUSAL_TILE, the causal default) whatever
the mask, FlashAttention-4's own layout of the products (Sᵀ = K·Qᵀ, dV and dK from registers, dQ shared).

cudnn: SDPA's cuDNN kernels on the bench's transposed views (the D = 256 backward's leader).

bf16, B·S = 16384, H·D = 2048 as `fa4 bench`. Three calls (the first compiles); profile the last one's kernel.
FlashAttention-4 is imported only here, as a measuring stick (never from fa4).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    who, what, d, s, causal = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), bool(int(sys.argv[5]))
    group = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    b, h = 16384 // s, 2048 // d
    q, k, v = (torch.randn(b, s, h // (group if i else 1), d, device="cuda", dtype=torch.bfloat16,
                           requires_grad=what == "bwd") for i in range(3))
    if who == "fa4":
        import fa4
        fn = lambda: fa4.flash_attn_func(q, k, v, causal=causal)  # noqa: E731
    elif who == "fa4kt":
        from fa4.kernels import sm90
        from fa4.kernels.sm90 import backward as bwd
        opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0,
                    sink=None)
        out, lse = sm90.forward(q, k, v, **opts)
        dout = torch.randn_like(out)
        for _ in range(3):
            bwd.backward(dout, q, k, v, out, lse, None, tile=bwd.D128_CAUSAL_TILE, **opts)
        torch.cuda.synchronize()
        return
    elif who == "cudnn":
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def fn():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                     is_causal=causal, enable_gqa=group > 1)
            return out.transpose(1, 2)
    else:
        from flash_attn.cute import flash_attn_func
        fn = lambda: flash_attn_func(q, k, v, causal=causal)[0]  # noqa: E731
    dout = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        out = fn()
        if what == "bwd":
            torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
