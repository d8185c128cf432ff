"""Where a step of the Gluon Hopper backward's consumers spends its cycles (the trace build, tile.trace).

    python benchmarks/bwd_trace.py                      # D = 64 and 128, S = 4096, both causal values
    python benchmarks/bwd_trace.py --rows 64:16384 --variants shipped,wg3,reduce-add

The trace build stamps %clock64 at eight points of each consumer step (backward._trace_step) in the CTAs of the
first (batch, kv head). Printed per (row, variant, consumer): the median cycles of each phase over the traced
steps (the first two skipped) and the median step:
  q_wait    step start -> Q (and dO) arrived          softmax   S done -> P stored
  s_done    Q arrived -> S done (lse2, Delta loaded)   dp_wait   P stored -> dV issued, dP done
  ds        dP done -> dS stored and fenced            mma_wait  dK (and dQ) issued -> all products done
  release   products done -> Q / dO slots released     st_wait   -> the previous dQ tile read (store_wait)
  dq_stage  -> this dQ tile stored to shared, fenced   dq_issue  -> its TMA reduce-add issued (step end)
  loop      step end -> next step start
A phase that is long against the others is where the step waits; compare with the m64n64k16 budget of a step
(D = 64: 20 wgmma instructions a consumer, ~32 cycles each at the tensor core's peak).

The keys-as-rows kernel (the D = 64 default, backward_kt.py) stamps the same events with its own meaning: softmax is
S done -> Pᵀ formed, dp_wait -> dPᵀ done, ds -> dSᵀ stored and handed over, mma_wait -> dV, dK and the dQ share
done (with its dQ lag, the previous step's share, including the wait for the other consumer's dSᵀ). Its ~1,280
cycles of tensor work a consumer step (D = 64) are the budget there. Not yet run on a GPU (session 13).
"""
import argparse
import dataclasses
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fa4.kernels.sm90 import backward as bwd  # noqa: E402

PHASES = ["q_wait", "s_done", "softmax", "dp_wait", "ds", "mma_wait", "release", "st_wait", "dq_stage", "dq_issue"]
# At D = 64 "shipped" is the keys-as-rows kernel (backward_kt.py); the queries-as-rows forms are named explicitly.
_QROWS64 = dict(keys_as_rows=False, block_m=64)
VARIANTS = {"shipped": {}, "kt-no-lag": dict(dq_lag=False, stages=3),
            "wg3": dict(_QROWS64, num_wg=3, consumer_regs=160, separate_dq=True),
            "reduce-add": dict(_QROWS64, num_wg=3, consumer_regs=160, separate_dq=False),
            "wg2": dict(_QROWS64, num_wg=2, consumer_regs=240, separate_dq=True),
            "wg2-reduce-add": dict(_QROWS64, num_wg=2, consumer_regs=240, separate_dq=False),
            # D = 128: the keys-as-rows tile of causal and chained calls (off the persistent grid, as trace builds are).
            "kt128": {**dataclasses.asdict(bwd.D128_CAUSAL_TILE), "persistent": False}}
VARIANTS["kt128"].pop("trace")
VARIANTS["kt128-dv-early"] = {**VARIANTS["kt128"], "dv_early": True}


def trace_row(d, s, causal, over):
    b, h = 16384 // s, 2048 // d
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0, sink=None)
    # Timing only: any O and lse of the right shapes (lse large enough that P stays finite).
    out = torch.randn_like(q)
    lse = torch.randn(b, h, s, device="cuda", dtype=torch.float32) + 10.0
    dout = torch.randn_like(q)
    tile = bwd.get_tile(d, d, trace=True, **over)
    if tile is None:
        return None
    for _ in range(2):
        bwd.backward(dout, q, k, v, out, lse, None, tile=tile, **opts)
    torch.cuda.synchronize()
    tr = bwd.LAST_TRACE.cpu()  # (key blocks, consumers, steps, events)
    return tr


def summarize(tr):
    rows = []
    for wg in range(tr.shape[1]):
        t = tr[:, wg].double()  # (kb, steps, events)
        last = t.shape[2] - 1
        valid = (t[:, :, 0] > 0) & (t[:, :, last] > 0)
        ph = {}
        for i, name in enumerate(PHASES):
            x = (t[:, :, i + 1] - t[:, :, i])[:, 2:][valid[:, 2:]]
            ph[name] = float(x.median()) if x.numel() else float("nan")
        nxt = (t[:, 1:, 0] - t[:, :-1, last])[:, 2:][(valid[:, 1:] & valid[:, :-1])[:, 2:]]
        ph["loop"] = float(nxt.median()) if nxt.numel() else float("nan")
        step = (t[:, 1:, 0] - t[:, :-1, 0])[:, 2:][(valid[:, 1:] & valid[:, :-1])[:, 2:]]
        ph["step"] = float(step.median()) if step.numel() else float("nan")
        ph["steps"] = int(valid.sum())
        rows.append(ph)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="64:4096,128:4096", help="comma-separated D:S")
    ap.add_argument("--variants", default="shipped,kt-no-lag,wg3")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "| median cycles per consumer step, by phase")
    hdr = f"{'D':>4} {'S':>6} {'c':>2} {'variant':12s} wg " + " ".join(f"{n:>8s}" for n in PHASES + ["loop", "step"])
    print(hdr)
    for row in args.rows.split(","):
        d, s = (int(x) for x in row.split(":"))
        for causal in (False, True):
            for name in args.variants.split(","):
                try:
                    tr = trace_row(d, s, causal, VARIANTS[name])
                except Exception as exc:
                    print(f"{d} {s} {causal} {name}: {exc!r}"[:300], flush=True)
                    continue
                if tr is None:
                    continue
                for wg, ph in enumerate(summarize(tr)):
                    print(f"{d:4d} {s:6d} {int(causal):2d} {name:12s} {wg:2d} "
                          + " ".join(f"{ph[n]:8.0f}" for n in PHASES + ["loop", "step"]), flush=True)


if __name__ == "__main__":
    main()
