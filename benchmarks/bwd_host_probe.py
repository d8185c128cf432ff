"""Where an eager backward's host time goes, and how much of it the GPU sees (session 25).

The bench times the backward alone: `torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)` between two CUDA
events, after a 256 MB L2-flush memset, and enqueues its repetitions without waiting for the GPU. Where the host
takes longer per call than the GPU (backward plus memset), the GPU idles between the calls' kernels and the events
time the host: session 23 found the D = 128 S = 1024 causal row host-bound so. This probe prints, per row:

  - marks: host µs from the grad() call to each stage (the autograd Function's backward, the dispatch, the sm90
    `backward_checked`, the preprocess launch, the main kernel's launch, the return), GPU idle before each call,
    median of --reps calls;
  - the same marks with the sm90 backward's Replay switched off (the full path), and for a Function of fa4's shape
    whose backward launches nothing (the autograd engine's own cost);
  - the forward's host time (flash_attn_func, GPU idle before it) and its do_bench µs, its plan launched through
    launch.RawLaunch and through Triton's own wrapper (bind);
  - bwd eager: do_bench µs (the bench's L2 flush) with and without the Replay, alternated;
  - the CPU ops and CUDA runtime calls of 10 backward calls under torch.profiler, by self CPU time.

    python benchmarks/bwd_host_probe.py [--rows 128:1024:1,128:1024:0,64:4096:1] [--reps 30] [--no-profile] [--gc-off]
        [--engine-variants] [--group G]      (--group: G query heads a kv head, K / V with H / G heads)
"""
import argparse
import os
import statistics
import sys
import time

import torch
from triton.testing import do_bench

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]

import fa4  # noqa: E402
from fa4 import dispatch, ops  # noqa: E402
from fa4.kernels.sm90 import backward as bwd, launch  # noqa: E402
from fa4.kernels import direct_launch  # noqa: E402

MARKS = {}


def _stamp(owner, name, label):
    """Wrap owner.name so that its first entry and exit in a call are stamped (perf_counter) under label."""
    fn = getattr(owner, name)

    def wrapped(*a, **kw):
        MARKS.setdefault(label + ">", time.perf_counter())
        r = fn(*a, **kw)
        MARKS.setdefault(label + "<", time.perf_counter())
        return r
    setattr(owner, name, wrapped)


def install():
    from fa4.kernels.sm90 import backward_fast
    _stamp(backward_fast.Replay, "__call__", "replay")
    _stamp(launch.RawLaunch, "launch", "raw_launch")
    function_backward = ops._EagerAttention.backward

    def stamped(ctx, dout, dlse):
        MARKS.setdefault("Function.backward>", time.perf_counter())
        grads = function_backward(ctx, dout, dlse)
        MARKS.setdefault("Function.backward<", time.perf_counter())
        return grads
    ops._EagerAttention.backward = staticmethod(stamped)
    _stamp(ops, "_gradients", "gradients")
    _stamp(ops, "_run_backward", "run_backward")
    _stamp(dispatch, "resolve_auto_backward", "dispatch")
    _stamp(bwd, "backward_checked", "checked")
    _stamp(bwd, "default_tile", "default_tile")
    _stamp(bwd, "dq_route", "dq_route")
    _stamp(bwd, "preprocess", "preprocess")
    _stamp(direct_launch.Launch, "fast", "prep_launch")
    _stamp(bwd, "_launch_main", "launch_main")
    _stamp(bwd, "plan_signature", "plan_signature")
    _stamp(launch.Plan, "launch", "plan_launch")


def marks_of(call, reps):
    rows = []
    for _ in range(reps):
        torch.cuda.synchronize()
        MARKS.clear()
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        rows.append({k: (v - t0) * 1e6 for k, v in MARKS.items()} | {"return": (t1 - t0) * 1e6})
    keys = sorted(rows[-1], key=lambda k: rows[-1][k])
    return {k: statistics.median(r[k] for r in rows if k in r) for k in keys}


class _Floor(torch.autograd.Function):
    """fa4's eager Function's shape (18 inputs, (out, lse), 9 saved tensors) with a backward that launches nothing:
    the autograd engine's own cost of one backward on this host."""
    @staticmethod
    def forward(ctx, q, k, v, *rest):
        out, lse, grads = rest[-3:]
        ctx.save_for_backward(q, k, v, out, lse, None, None, None, None)
        ctx.grads = grads
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return out.clone(), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        MARKS.setdefault("run_backward>", time.perf_counter())
        _ = ctx.saved_tensors
        return (*ctx.grads, *([None] * 15))


class _FloorSavedOutputs(torch.autograd.Function):
    """_Floor with out and lse made here and saved as outputs, as fa4's Function saves them."""
    @staticmethod
    def forward(ctx, q, k, v, *rest):
        out, lse, grads = rest[-3:]
        out, lse = out.clone(), lse.clone()
        ctx.save_for_backward(q, k, v, out, lse, None, None, None, None)
        ctx.grads = grads
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        MARKS.setdefault("run_backward>", time.perf_counter())
        _ = ctx.saved_tensors
        return (*ctx.grads, *([None] * 15))


def engine_variants(q, k, v, out, lse, dout, causal, reps):
    """Host marks of three stand-ins between _Floor and fa4's Function: outputs saved (_FloorSavedOutputs), and fa4's
    own Function with its _run_backward replaced by one returning ready gradients (no kernels)."""
    grads = tuple(torch.empty_like(t) for t in (q, k, v))
    y, _ = _FloorSavedOutputs.apply(q, k, v, *([None] * 12), out.detach(), lse.detach(), grads)
    rows = {"saved outputs": marks_of(lambda: torch.autograd.grad(y, (q, k, v), dout, retain_graph=True), reps)}
    real_run = ops._run_backward

    def ready(*a):
        MARKS.setdefault("run_backward>", time.perf_counter())
        return (*grads, None)
    ops._run_backward = ready
    try:
        y2 = fa4.flash_attn_func(q, k, v, causal=bool(causal))
        rows["fa4's Function, no kernels"] = marks_of(
            lambda: torch.autograd.grad(y2, (q, k, v), dout, retain_graph=True), reps)
    finally:
        ops._run_backward = real_run
    return rows


def engine_floor(q, k, v, out, lse, dout, reps):
    grads = tuple(torch.empty_like(t) for t in (q, k, v))
    y, _ = _Floor.apply(q, k, v, *([None] * 12), out.detach(), lse.detach(), grads)
    return marks_of(lambda: torch.autograd.grad(y, (q, k, v), dout, retain_graph=True), reps)


def main():
    from fa4.kernels.sm90 import backward_fast
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="128:1024:1,128:1024:0,64:4096:1")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--gc-off", action="store_true", help="also the Replay's marks with Python's collector off")
    ap.add_argument("--engine-variants", action="store_true", help="also stand-ins between the floor and fa4's Function")
    ap.add_argument("--group", type=int, default=1, help="query heads per kv head (GQA)")
    args = ap.parse_args()
    install()
    shipped_replay = backward_fast.replay
    forms = (("replay", shipped_replay), ("full", lambda *a: None))
    for spec in args.rows.split(","):
        d, s, causal = (int(x) for x in spec.split(":"))
        b, h = 16384 // s, 2048 // d
        q, k, v = (torch.randn(b, s, h // (args.group if i else 1), d, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for i in range(3))
        dout = torch.randn_like(q)
        out, lse = fa4.flash_attn_func(q, k, v, causal=bool(causal), return_lse=True)

        def bwd_call():
            return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
        for _ in range(3):
            bwd_call()
        print(f"D={d} S={s} causal={causal}: host marks (µs from the grad() call, GPU idle before it):", flush=True)
        for name, fn in forms:
            backward_fast.replay = fn
            m = marks_of(bwd_call, args.reps)
            print(f"  {name:6s} " + "  ".join(f"{k} {v:.0f}" for k, v in m.items()), flush=True)
        backward_fast.replay = shipped_replay
        if args.gc_off:
            import gc
            gc.disable()
            m = marks_of(bwd_call, args.reps)
            gc.enable()
            print("  replay, garbage collector off: " + "  ".join(f"{k} {v:.0f}" for k, v in m.items()), flush=True)
        fwd_call = lambda: fa4.flash_attn_func(q, k, v, causal=bool(causal))  # noqa: E731
        raw_launch = launch.Plan.launch_tensors
        for name, how in (("RawLaunch", raw_launch), ("bind", lambda self, i, t: self.launch(i, self.bind(t)))):
            launch.Plan.launch_tensors = how
            m = marks_of(fwd_call, args.reps)
            ts = sorted(do_bench(fwd_call, warmup=5, rep=30) for _ in range(5))
            print(f"  forward, plan through {name}: host {m['return']:.0f} µs (GPU idle before it), do_bench µs min "
                  f"{ts[0] * 1e3:.0f} median {ts[2] * 1e3:.0f}", flush=True)
        launch.Plan.launch_tensors = raw_launch
        m = engine_floor(q, k, v, out, lse, dout, args.reps)
        print("  engine floor (a Function launching nothing): " + "  ".join(f"{k} {v:.0f}" for k, v in m.items()),
              flush=True)
        if args.engine_variants:
            for name, m in engine_variants(q, k, v, out, lse, dout, causal, args.reps).items():
                print(f"  engine, {name}: " + "  ".join(f"{k} {v:.0f}" for k, v in m.items()), flush=True)
        flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
        res = {name: [] for name, _ in forms}
        for _ in range(3):
            for name, fn in forms:
                backward_fast.replay = fn
                res[name] += [do_bench(bwd_call, warmup=5, rep=30) for _ in range(3)]
        for name, ts in res.items():
            ts = sorted(ts)
            print(f"  bwd eager {name:6s}: µs min {ts[0] * 1e3:.0f} median {ts[len(ts) // 2] * 1e3:.0f} max "
                  f"{ts[-1] * 1e3:.0f}  (TFLOP/s at median {flops / ts[len(ts) // 2] / 1e9:.0f})", flush=True)
        backward_fast.replay = shipped_replay
        if not args.no_profile and causal and d == 128:
            from torch.profiler import profile, ProfilerActivity
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    bwd_call()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)


if __name__ == "__main__":
    main()
