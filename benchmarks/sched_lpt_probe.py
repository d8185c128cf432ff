"""The sm90 forward's work order on batched causal calls: paired units on a static stride (shipped) against
single tiles longest first from the dynamic counter in L2 sections (SCHED "lpt", attention_fwd.py), kernel time
alone by torch.profiler (median of the calls), rounds alternated. The training suite's causal rows by default.

    python benchmarks/sched_lpt_probe.py [--rows 128:16384,64:4096] [--variants base,lpt,lpt1,lptall] [--rounds 2]
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fa4.kernels import sm90  # noqa: E402

VARIANTS = {"base": None, "lpt": dict(SCHED="lpt"), "lpt1": dict(SCHED="lpt", SECTION=1),
            "lpt2": dict(SCHED="lpt", SECTION=2), "lpt4": dict(SCHED="lpt", SECTION=4),
            "lptall": dict(SCHED="lpt", SECTION=1 << 20), "dynpaired": dict(DYNAMIC=True)}


def kernel_us(fn, calls):
    """Median device time of the attention kernel (the longest kernel of a call) and the rest a call, µs."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    times = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            times.setdefault(e.name, []).append(e.device_time)
    main = max(times, key=lambda name: sum(times[name]))
    rest = sum(sum(v) for name, v in times.items() if name != main) / calls
    return statistics.median(times[main]), rest


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="64:4096,64:16384,128:1024,128:4096,128:16384,256:4096,256:16384")
    ap.add_argument("--variants", default="base,lpt,lpt1,lptall")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    names = args.variants.split(",")
    print(f"# {torch.cuda.get_device_name()}; bf16 causal, B·S = 16384, H·D = 2048; "
          f"kernel TFLOP/s (other µs a call)")
    for row in args.rows.split(","):
        d, s = (int(x) for x in row.split(":"))
        b, h = 16384 // s, 2048 // d
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * b * h * s * s * d / 2
        opts = dict(softmax_scale=d ** -0.5, window_right=0)
        want = sm90.forward(q, k, v, **opts)[0]
        res = {n: [] for n in names}
        rest = {}
        for _ in range(args.rounds):
            for n in names:
                fn = lambda n=n: sm90.forward(q, k, v, variant=VARIANTS[n], **opts)  # noqa: E731
                got = fn()[0]
                err = (got.float() - want.float()).abs().max().item()
                assert err < 2e-2, f"{n}: max |diff| {err} against the shipped order"
                t, r = kernel_us(fn, args.calls)
                res[n].append(flops / t / 1e6)
                rest[n] = r
        base = statistics.median(res[names[0]])
        cells = " | ".join(f"{n} {'/'.join(f'{x:.0f}' for x in res[n])} ({statistics.median(res[n]) / base:.3f}, "
                           f"+{rest[n]:.1f}us)" for n in names)
        print(f"D={d} S={s} B={b} H={h} | {cells}", flush=True)


if __name__ == "__main__":
    main()
