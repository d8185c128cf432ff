"""A/B of Hopper forward variants (fa4/kernels/sm90/attention_fwd.py, the `variant` keys of launch_plan) on
training-suite shapes (B·S = 16384, H·D = 2048, bf16): do_bench median µs of the kernel call, the variants
alternated over several rounds in one process, the best round of each compared with the shipped build's (and the
median round's ratio beside it).

    python benchmarks/fwd_variant_ab.py --variants '{"tail": {"TAIL": true}}' [--rounds 3]
        [--rows 128:16384:0,128:4096:1,...]

A row is D:S:causal. Each variant's O is checked against the shipped build's (max |difference|; the variants
change the schedule, not the arithmetic, so it is 0 or a rounding of the row sums' order). sm90_probe.py times
one round of each variant; its own notes put one run's noise at up to ~5%, which is why this alternates.
"""
import argparse
import json
import statistics

import torch
from triton.testing import do_bench

DEFAULT_ROWS = "64:4096:0,64:16384:0,64:16384:1,128:4096:0,128:16384:0,128:16384:1,256:4096:0,256:16384:1"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", required=True, help='JSON {name: variant dict}; "base" (shipped) is added')
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", default=DEFAULT_ROWS)
    args = ap.parse_args()
    from fa4.kernels import sm90
    variants = dict(base={}, **json.loads(args.variants))
    print(torch.cuda.get_device_name(), "| forward µs (do_bench median, L2 flushed), best of",
          args.rounds, "rounds; TFLOP/s; ratio to base")
    for row in args.rows.split(","):
        d, s, causal = (int(x) for x in row.split(":"))
        b, h = 16384 // s, 2048 // d
        flops = 4 * b * h * s * s * d / (2 if causal else 1)
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0 if causal else -1)
        times = {n: [] for n in variants}
        outs = {}
        for _ in range(args.rounds):
            for name, var in variants.items():
                fn = lambda: sm90.forward(q, k, v, variant=dict(var, FAST=False), **opts)  # noqa: E731
                outs[name] = fn()[0]
                times[name].append(do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3)
        base = min(times["base"])
        base_med = statistics.median(times["base"])
        line = f"D={d:3d} S={s:5d} causal={causal}:"
        for name in variants:
            t = min(times[name])
            diff = (outs[name].float() - outs["base"].float()).abs().max().item()
            line += (f" | {name} {t:7.1f} us {flops / t / 1e6:5.0f} TF x{base / t:.3f} (median of rounds "
                     f"x{base_med / statistics.median(times[name]):.3f}) maxdiff {diff:.1e} "
                     f"{[round(x, 1) for x in times[name]]}")
        print(line, flush=True)


if __name__ == "__main__":
    main()
