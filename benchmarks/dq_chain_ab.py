"""The sm90 D = 128 backward's dQ writer warp and deterministic=True's in-kernel ordered dQ, timed against the
shipped paths in one process (benchmarks/NOTES.md, session 8).

    python benchmarks/dq_chain_ab.py [--rows 1024,4096,16384] [--repeats 5]

Training-suite shapes (bf16, D = 128, B = 16384 / S, H = 16). Per row, do_bench over torch.autograd.grad of
  default        the table's tile (dQ by unordered reduce-add; the writer warp if the table has it)
  default-cw     the consumers issue the reduce-adds (tile.dq_writer off)
  default-w      the writer warp issues them (tile.dq_writer on)
  det-pass       deterministic=True through the ordered dQ pass (backward.DQ_CHAIN off)
  det-chain      deterministic=True through the in-kernel chain
alternating, twice; TFLOP/s of the best and each variant's cost against `default`; the largest dQ difference of
det-chain against default; and `repeats` det-chain calls compared bitwise with the first.
"""
import argparse
from dataclasses import replace

import torch
from triton.testing import do_bench

import fa4
from fa4.kernels.sm90 import backward as sb


def row(s, causal, repeats):
    b, h, d = 16384 // s, 16, 128
    torch.manual_seed(s + causal)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    flops = 4.0 * b * h * s * s * d * 2.5 / (2 if causal else 1)
    shipped = sb._TABLE[(128, 128)]
    # name: (deterministic, DQ_CHAIN, tile)
    variants = {"default": (False, True, shipped), "default-cw": (False, True, replace(shipped, dq_writer=False)),
                "default-w": (False, True, replace(shipped, dq_writer=True)), "det-pass": (True, False, shipped),
                "det-chain": (True, True, shipped)}
    ms, grads = {}, {}
    try:
        for _ in range(2):
            for name, (det, chain, tile) in variants.items():
                sb.DQ_CHAIN, sb._TABLE[(128, 128)] = chain, tile
                out = fa4.flash_attn_func(q, k, v, causal=causal, deterministic=det)
                g = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
                grads[name] = g()
                ms.setdefault(name, []).append(do_bench(g, warmup=25, rep=150))
        sb.DQ_CHAIN, sb._TABLE[(128, 128)] = True, shipped
        out = fa4.flash_attn_func(q, k, v, causal=causal, deterministic=True)
        calls = [torch.autograd.grad(out, (q, k, v), dout, retain_graph=True) for _ in range(repeats)]
        same = all(torch.equal(a, b) for again in calls for a, b in zip(grads["det-chain"], again))
    finally:
        sb.DQ_CHAIN, sb._TABLE[(128, 128)] = True, shipped
    best = {name: min(t) for name, t in ms.items()}
    line = f"S {s:5d} causal {int(causal)}:"
    for name in variants:
        line += f" {name} {flops / (best[name] * 1e-3) / 1e12:.0f}"
        if name != "default":
            line += f" ({100 * (best[name] / best['default'] - 1):+.1f}%)"
    diff = (grads["det-chain"][0].float() - grads["default"][0].float()).abs().max().item()
    print(f"{line} TFLOP/s | dQ det-chain vs default max {diff:.0e} | det-chain bitwise x{repeats}: {same}",
          flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1024,4096,16384")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    for s in (int(x) for x in args.rows.split(",")):
        for causal in (False, True):
            row(s, causal, args.repeats)


if __name__ == "__main__":
    main()
