"""Probe the Gluon Hopper forward: correctness and speed of the shipped tiles and their runners-up.

    python benchmarks/sm90_probe.py            # everything (about 4 minutes on an H100)
    python benchmarks/sm90_probe.py --quick    # shipped tiles and cuDNN only, D = 128

Every kernel runs in a child process with a timeout, so a hang (an mbarrier wait that never completes) costs
that child only; the parent prints which one. Phase 1 compiles and checks every (variant, D, causal) in
parallel against torch SDPA (math backend, fp32) by DESIGN.md's numerics rule; phase 2 times each variant
alone on the GPU over the training suite (bf16, B·S = 16384, H·D = 2048, plus D = 128 at S = 1024 with
B = 16, H = 16) beside cuDNN and, when `flash_attn.cute` imports, FlashAttention-4. Output: one line per
check, a TFLOP/s table with the shipped kernel's and the best variant's ratio to the best peer, and the
causal / non-causal ratio of the shipped kernel.

The variants are the decisions still open after run r1 (benchmarks/NOTES.md, "Hopper forward (Gluon)"):
"base" is what ships (fa4/kernels/sm90/configs.py and attention_fwd.DEFAULT_VARIANT); each other variant
changes one thing, only where it is a candidate.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (variant overrides, head dims, causal values, timed). One factor at a time around the shipped tiles.
VARIANTS = {
    "base": ({}, (64, 128, 256), (False, True), True),
    # The r1 causal schedule (round robin over query blocks in descending order): the A/B of the fix.
    "reversed": (dict(SCHED="reversed"), (64, 128, 256), (True, ), True),
    # D = 64 shipped three consumer warpgroups; the r1 base had two.
    "wg2": (dict(num_wg=2, consumer_regs=240), (64, ), (False, True), True),
    # D = 128 ships without ping-pong; D = 64 and 256 with it.
    "pingpong": (dict(PINGPONG=True), (128, ), (False, True), True),
    "no-pingpong": (dict(PINGPONG=False), (64, 256), (False, True), True),
    # A third K/V stage (at D = 128 O is then staged through Q's buffer).
    "stages3": (dict(stages=3), (64, 128), (False, True), True),
    # Key-block walk rotated per CTA, so CTAs of one head do not read the same block at once.
    "stagger": (dict(STAGGER=True), (128, 256), (False, ), True),
    # Numerics of the lazy rescale after the fix (the row sum adds the rounded P); not timed (no gain in r1).
    "lazy": (dict(LAZY=True), (64, 128, 256), (False, True), False),
}
HEAD_DIMS = (64, 128, 256)


def _applies(name, d, causal=None):
    _, dims, causals, _ = VARIANTS[name]
    return d in dims and (causal is None or causal in causals)


# ----------------------------------------------------------------------------------------------------------
# Children (run in a fresh process each)
# ----------------------------------------------------------------------------------------------------------

def _emit(obj):
    print("RESULT " + json.dumps(obj), flush=True)


def _child_check(task):
    """Compile one variant and check it at small GQA shapes against SDPA in fp32 (S = 1000 and 1300: even and
    odd numbers of query blocks, so the paired causal schedule meets its lone middle block)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sys.path.insert(0, ROOT)
    os.environ["FA4_SM90"] = "1"
    from fa4.kernels import sm90

    d, causal, variant = task["d"], task["causal"], VARIANTS[task["variant"]][0]
    worst = None
    for s in (1000, 1300):
        torch.manual_seed(d + causal + s)
        b, hq, hkv = 2, 4, 2
        q = torch.randn(b, s, hq, d, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(b, s, hkv, d, dtype=torch.bfloat16, device="cuda")
        # Keys fading along the sequence: the walk (last block first) sees the row max climb, so the rescale
        # paths (and the lazy threshold) are exercised.
        k = (k * torch.linspace(6.0, 0.1, s, device="cuda")[None, :, None, None]).to(torch.bfloat16)
        v = torch.randn(b, s, hkv, d, dtype=torch.bfloat16, device="cuda")
        scale = d ** -0.5
        t0 = time.time()
        out, lse = sm90.forward(q, k, v, softmax_scale=scale, window_left=-1, window_right=0 if causal else -1,
                                softcap=0.0, sink=None, variant=variant)
        torch.cuda.synchronize()
        first_call_s = time.time() - t0

        def sdpa(dtype):
            qh, kh, vh = (t.transpose(1, 2).to(dtype) for t in (q, k, v))
            with sdpa_kernel(SDPBackend.MATH):
                o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale, enable_gqa=True)
            return o.transpose(1, 2)

        ref, low = sdpa(torch.float32), sdpa(torch.bfloat16)
        err = (out.float() - ref).abs().max().item()
        base = (low.float() - ref).abs().max().item()
        atol = 2 * ((ref + 0.3 - 0.3) - ref).abs().max().item()
        # lse against an fp32 logsumexp of the same scores.
        kk = k.float().repeat_interleave(hq // hkv, dim=2)
        sc = torch.einsum("bihd,bjhd->bhij", q.float(), kk) * scale
        if causal:
            sc = sc.masked_fill(torch.ones(s, s, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
        lse_err = (lse - torch.logsumexp(sc, dim=-1)).abs().max().item()
        ok = bool(torch.isfinite(out).all()) and err <= 2 * base + atol and lse_err < 1e-2
        r = dict(kind="check", **task, s=s, ok=ok, err=err, lowp_err=base, atol=atol, lse_err=lse_err,
                 first_call_s=round(first_call_s, 1))
        # Report the failing shape, else the one closest to its bound.
        if worst is None or (worst["ok"] and (not ok or err / (2 * base + atol) >
                                               worst["err"] / (2 * worst["lowp_err"] + worst["atol"]))):
            worst = r
        del sc, kk
    _emit(worst)


def _suite():
    """(D, S, causal, B, H): the training suite of shared/DESIGN.md."""
    for d in HEAD_DIMS:
        for s in ((1024, 4096, 16384) if d == 128 else (4096, 16384)):
            for causal in (False, True):
                if s == 1024:
                    yield d, s, causal, 16, 16
                else:
                    yield d, s, causal, 16384 // s, 2048 // d


def _flops(b, h, s, d, causal):
    f = 4 * b * h * s * s * d
    return f / 2 if causal else f


def _bench(fn):
    import triton
    fn()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _time_one(name, d, s, causal, b, h):
    """TFLOP/s of one fa4 variant or peer at one training-suite shape."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    scale = d ** -0.5
    if name in VARIANTS:
        from fa4.kernels import sm90

        def fn():
            return sm90.forward(q, k, v, softmax_scale=scale, window_left=-1, window_right=0 if causal else -1,
                                softcap=0.0, sink=None, variant=VARIANTS[name][0])
    elif name in ("cudnn", "fa2"):
        backend = SDPBackend.CUDNN_ATTENTION if name == "cudnn" else SDPBackend.FLASH_ATTENTION
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))

        def fn():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale)
    else:  # fa4cute
        from flash_attn.cute import flash_attn_func

        def fn():
            return flash_attn_func(q, k, v, causal=causal)
    ms = _bench(fn)
    return ms, _flops(b, h, s, d, causal) / ms * 1e-9


def _child_time(task):
    """Time one fa4 variant (or one peer) over the suite; one RESULT line per shape."""
    import torch
    sys.path.insert(0, ROOT)
    os.environ["FA4_SM90"] = "1"
    name = task["name"]
    for d, s, causal, b, h in _suite():
        if task.get("d") and d != task["d"]:
            continue
        if name in VARIANTS and (not _applies(name, d, causal) or d in task.get("skip_d", ())):
            continue
        try:
            ms, tflops = _time_one(name, d, s, causal, b, h)
            _emit(dict(kind="time", name=name, d=d, s=s, causal=causal, ms=ms, tflops=tflops))
        except ImportError as exc:  # a peer that is not installed: one line, not one per shape
            _emit(dict(kind="time", name=name, d=d, s=s, causal=causal, error=f"not installed ({exc})"[:300]))
            return
        except Exception as exc:  # a peer that refuses a shape: report, go on
            _emit(dict(kind="time", name=name, d=d, s=s, causal=causal, error=f"{type(exc).__name__}: {exc}"[:300]))
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# Parent
# ----------------------------------------------------------------------------------------------------------

def _run_child(mode, task, timeout):
    """Run one child; returns (results, status) where status is 'ok', 'timeout' or 'exit N: <tail>'."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, json.dumps(task)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=ROOT)
    try:
        text, _ = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        text, _ = proc.communicate()
        status = "timeout"
    results = [json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")]
    if status != "ok":
        tail = [line for line in text.splitlines() if not line.startswith("RESULT ")][-6:]
        status += ": " + " | ".join(tail)[-600:]
    return results, status


def _print_table(table, peers, names, dims):
    cols = [n for n in names if any(k[0] == n for k in table)]
    peer_cols = [p for p in peers if any(k[0] == p for k in table)]
    head = f"{'D':>4} {'S':>6} {'causal':>6} | " + " ".join(f"{c:>11}" for c in peer_cols + cols) + \
        " | base/peer  best/peer (best)"
    print(head)
    for d, s, causal, _, _ in _suite():
        if d not in dims:
            continue
        vals = [table.get((c, d, s, causal)) for c in peer_cols + cols]
        cells = [f"{v:11.1f}" if isinstance(v, float) else f"{'err' if v else '-':>11}" for v in vals]
        peer_best = max([v for v in vals[:len(peer_cols)] if isinstance(v, float)], default=None)
        ours = {c: v for c, v in zip(cols, vals[len(peer_cols):]) if isinstance(v, float)}
        base = ours.get("base")
        best = max(ours, key=ours.get) if ours else None
        ratio = (f"{base / peer_best:9.3f}" if base and peer_best else f"{'-':>9}") + "  " + \
            (f"{ours[best] / peer_best:9.3f} ({best})" if best and peer_best else "-")
        print(f"{d:>4} {s:>6} {int(causal):>6} | " + " ".join(cells) + f" | {ratio}")
    # The causal schedule: causal against non-causal TFLOP/s (causal FLOPs are halved, so 1.0 is parity).
    print("\n## causal / non-causal TFLOP/s (shipped kernel; 'reversed' = the r1 causal schedule)")
    for d, s, causal, _, _ in _suite():
        if d not in dims or causal:
            continue
        nc = table.get(("base", d, s, False))
        line = f"{d:>4} {s:>6} |"
        for name in ("base", "reversed"):
            c = table.get((name, d, s, True))
            line += f" {name} {c / nc:.3f}" if isinstance(c, float) and isinstance(nc, float) else f" {name} -"
        print(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shipped tiles and cuDNN only, D = 128")
    ap.add_argument("--variants", default=None, help="comma-separated subset of: " + ",".join(VARIANTS))
    ap.add_argument("--fa2", action="store_true", help="also time FlashAttention-2 (SDPA flash)")
    ap.add_argument("--jobs", type=int, default=8, help="parallel compile+check children")
    ap.add_argument("--check-timeout", type=int, default=240)
    ap.add_argument("--time-timeout", type=int, default=150)
    ap.add_argument("--budget", type=int, default=400,
                    help="seconds; tasks not started by then are skipped (a started one may take --time-timeout)")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, task = args.child[0], json.loads(args.child[1])
        (_child_check if mode == "check" else _child_time)(task)
        return

    start = time.time()
    names = list(VARIANTS) if not args.variants else args.variants.split(",")
    if "base" not in names:
        names = ["base"] + names
    dims = HEAD_DIMS
    if args.quick:
        names, dims = ["base"], (128, )
    import torch
    import triton
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}", flush=True)

    # Phase 1: compile + check, in parallel (CPU-bound compiles; the GPU work is tiny).
    checks = [dict(variant=n, d=d, causal=c) for n in names for d in dims for c in (False, True)
              if _applies(n, d, c)]
    all_results, failed = [], set()

    def check(task):
        if time.time() - start > args.budget:
            return task, [], "skipped (budget)"
        return (task, *_run_child("check", task, args.check_timeout))

    print("## correctness (vs SDPA fp32, B=2 S=1000 and 1300 Hq=4 Hkv=2, bf16; the shape nearest its bound)",
          flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        for task, results, status in pool.map(check, checks):
            all_results += results
            r = results[0] if results else {}
            good = status == "ok" and r.get("ok")
            if not good:
                failed.add(task["variant"] + f"/d{task['d']}")
            print(f"{'PASS' if good else 'FAIL'} {task['variant']:<12} d={task['d']:<3} causal={int(task['causal'])} "
                  + (f"S={r['s']} err={r['err']:.2e} (2*lowp+atol={2 * r['lowp_err'] + r['atol']:.2e}) "
                     f"lse_err={r['lse_err']:.1e} first_call={r['first_call_s']}s" if r else "")
                  + ("" if status == "ok" else f"  [{status}]"), flush=True)

    # Phase 2: timings, one child at a time on the GPU; the most important first (the budget may cut the tail).
    peers = ["cudnn"] if args.quick else ["cudnn", "fa4cute"] + (["fa2"] if args.fa2 else [])
    timed = [n for n in names if VARIANTS[n][3]]
    timing_tasks = [dict(name="base")] + [dict(name=p) for p in peers] + [dict(name=n) for n in timed if n != "base"]
    table = {}
    print("\n## timings (bf16, B*S=16384, H*D=2048, and D=128 S=1024 B=16 H=16; TFLOP/s, do_bench median)",
          flush=True)
    for task in timing_tasks:
        if args.quick:
            task["d"] = 128
        if time.time() - start > args.budget:
            print(f"skipped {task['name']} (budget)", flush=True)
            continue
        if task["name"] in VARIANTS:
            # A variant that failed its check at some D is not timed there (it may hang).
            task["skip_d"] = [d for d in dims if f"{task['name']}/d{d}" in failed]
            if all(d in task["skip_d"] or not _applies(task["name"], d) for d in dims):
                print(f"skipped {task['name']} (failed its checks)", flush=True)
                continue
        t0 = time.time()
        results, status = _run_child("time", task, args.time_timeout)
        all_results += results
        for r in results:
            table[(r["name"], r["d"], r["s"], r["causal"])] = r.get("tflops", r.get("error"))
        print(f"timed {task['name']} ({len(results)} shapes, {time.time() - t0:.0f}s)"
              + ("" if status == "ok" else f": {status}"), flush=True)

    _print_table(table, peers, timed, dims)
    errors = {k: v for k, v in table.items() if isinstance(v, str)}
    for k, v in errors.items():
        print(f"error {k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_results, f, indent=1)
    print(f"# done in {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
