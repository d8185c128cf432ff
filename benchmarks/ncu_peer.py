"""One forward (or forward + backward) of a training-suite row through fa4's sm90 kernels or FlashAttention-4's
CuTe DSL path, for Nsight Compute side by side (benchmarks/ncu_peer.sh).

    python benchmarks/ncu_peer.py fa4|flashattn4 fwd|bwd D S causal

bf16, B·S = 16384, H·D = 2048 as `fa4 bench`. Three calls (the first compiles); profile the last one's kernel.
FlashAttention-4 is imported only here, as a measuring stick (never from fa4).
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    who, what, d, s, causal = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), bool(int(sys.argv[5]))
    b, h = 16384 // s, 2048 // d
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=what == "bwd")
               for _ in range(3))
    if who == "fa4":
        import fa4
        fn = lambda: fa4.flash_attn_func(q, k, v, causal=causal)  # noqa: E731
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
