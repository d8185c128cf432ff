"""Where the sm90 backward main kernel's time per CTA goes besides its steps (the trace build's CTA timeline).

    python benchmarks/bwd_cta_timeline.py [--rows 128:1024:0,128:4096:1,64:4096:0]

The trace build (tile.trace) stamps, for every CTA, consumer 0's %globaltimer at its start, when K and V arrived,
when the first Q / dO arrived, after the last step and after dK and dV are stored (backward.LAST_CTA_TRACE, with the
CTA's SM). Printed per row, medians over the CTAs in µs:
  gap       the previous CTA on the same SM stored its dK, dV -> this CTA's consumer 0 starts (the previous CTA's
            other partitions finishing, the launch, barrier set-up and register hand-out)
  kv        consumer start -> K and V arrived         first_q   -> the first Q / dO arrived
  steps     -> the last step done (per step beside)   epilogue  -> dK and dV stored
bwd_cta_overhead.py measures the same fixed cost from timings alone (no trace build).
"""
import argparse
import dataclasses
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fa4.kernels.sm90 import backward as bwd  # noqa: E402


def timeline(d, s, causal):
    b, h = 16384 // s, 2048 // d
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0, sink=None)
    out = torch.randn_like(q)
    lse = torch.randn(b, h, s, device="cuda", dtype=torch.float32) + 10.0
    tile = dataclasses.replace(bwd.default_tile(d, d, window_right=opts["window_right"]), trace=True)
    for _ in range(3):
        bwd.backward(dout, q, k, v, out, lse, None, tile=tile, **opts)
    torch.cuda.synchronize()
    tr = bwd.LAST_CTA_TRACE.cpu()
    steps = -(-s // tile.block_m)
    ev, sm = tr[:, :bwd.CTA_EVENTS].double() / 1e3, tr[:, bwd.CTA_EVENTS]
    gaps = []
    for unit in sm.unique():
        rows = ev[sm == unit]
        rows = rows[rows[:, 0].argsort()]
        gaps += (rows[1:, 0] - rows[:-1, 4]).tolist()
    med = lambda x: statistics.median(x.tolist() if torch.is_tensor(x) else x)  # noqa: E731
    parts = dict(gap=med(gaps), kv=med(ev[:, 1] - ev[:, 0]), first_q=med(ev[:, 2] - ev[:, 1]),
                 steps=med(ev[:, 3] - ev[:, 2]), epilogue=med(ev[:, 4] - ev[:, 3]))
    span = (ev[:, 4].max() - ev[:, 0].min()).item()
    kind = "keys-as-rows" if tile.keys_as_rows else ("d256" if tile.d256 else "queries-as-rows")
    line = f"D={d:3d} S={s:5d} causal={int(causal)} ({kind}, {tr.shape[0]} CTAs, span {span:7.1f} us):"
    for name, us in parts.items():
        line += f" {name} {us:6.2f}"
    if not causal:
        line += f" ({parts['steps'] / steps:.3f} a step of {steps})"
    print(line, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="128:1024:0,128:1024:1,128:4096:0,128:4096:1,64:4096:0,64:4096:1")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "| median µs per CTA (consumer 0)")
    for row in args.rows.split(","):
        d, s, causal = (int(x) for x in row.split(":"))
        timeline(d, s, bool(causal))


if __name__ == "__main__":
    main()
