"""The Triton path's forward and forward + backward time with and without a softcap, for an A/B of two trees.

    python benchmarks/triton_softcap_ab.py LABEL        # times the fa4 that imports (PYTHONPATH picks the tree)

bf16, B = 2, S = 4096, H = 16, D = 128, softcap 0 and 30, causal and not, backend="triton"; do_bench medians, µs.
Session 37 ran it twice in one device call, on a copy of the tree with the pre-change Triton kernels
(`git show 5e0d2bb:fa4/kernels/triton/{common,backward,forward,decode}.py` into the copy's fa4/kernels/triton,
`PYTHONPATH=<copy> python benchmarks/triton_softcap_ab.py old`) and on the tree itself (`... new`): raw logs
`benchmarks/results/raw/h100-2026-11-28-s37-triton-softcap-*-ab.txt`, numbers in benchmarks/NOTES.md.
"""
import sys

import torch
from triton.testing import do_bench

import fa4


def main():
    label = sys.argv[1] if len(sys.argv) > 1 else "tree"
    print(f"# {label}: {fa4.__file__} on {torch.cuda.get_device_name()}", flush=True)
    batch, seqlen, heads, dim = 2, 4096, 16, 128
    for softcap in (0.0, 30.0):
        for causal in (False, True):
            q, k, v = (torch.randn(batch, seqlen, heads, dim, device="cuda", dtype=torch.bfloat16,
                                   requires_grad=True) for _ in range(3))

            def forward():
                return fa4.flash_attn_func(q, k, v, softcap=softcap, causal=causal, backend="triton")

            dout = torch.randn_like(forward())
            fwd = do_bench(forward, warmup=20, rep=200)
            both = do_bench(lambda: torch.autograd.grad(forward(), (q, k, v), dout), warmup=20, rep=300)
            print(f"{label} softcap={softcap} causal={causal}: fwd {fwd * 1e3:.0f} us, fwd+bwd {both * 1e3:.0f} us",
                  flush=True)


if __name__ == "__main__":
    main()
