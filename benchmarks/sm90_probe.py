"""Probe the Gluon Hopper forward: correctness and speed of each schedule / softmax variant.

    python benchmarks/sm90_probe.py            # everything (about 5 minutes on an H100)
    python benchmarks/sm90_probe.py --quick    # base variant and cuDNN only, D = 128

Every kernel runs in a child process with a timeout, so a hang (an mbarrier wait that never completes) costs
that child only; the parent prints which one. Phase 1 compiles and checks every (variant, D, causal) in
parallel against torch SDPA (math backend, fp32) by DESIGN.md's numerics rule; phase 2 times each variant
alone on the GPU over the training suite (bf16, B·S = 16384, H·D = 2048) beside cuDNN, FA2 and, when
`flash_attn.cute` imports, FlashAttention-4. Output: one line per check, then a TFLOP/s table with each
variant's ratio to the best peer.
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

# One factor at a time around the shipped defaults (fa4/kernels/sm90/attention_fwd.py: DEFAULT_VARIANT).
VARIANTS = {
    "base": {},
    "no-pingpong": dict(PINGPONG=False),
    "lazy": dict(LAZY=True),
    "poly25": dict(POLY=1),
    "poly50": dict(POLY=2),
    "lazy+poly25": dict(LAZY=True, POLY=1),
    "stages3": dict(stages=3),
    "wg3": dict(num_wg=3, consumer_regs=160),
}
HEAD_DIMS = (64, 128, 256)
SEQLENS = (4096, 16384)


def _applies(name, d):
    if name == "wg3":
        return d == 64
    if name == "stages3":
        return d != 256
    return True


# ----------------------------------------------------------------------------------------------------------
# Children (run in a fresh process each)
# ----------------------------------------------------------------------------------------------------------

def _emit(obj):
    print("RESULT " + json.dumps(obj), flush=True)


def _child_check(task):
    """Compile one variant and check it at a small GQA shape against SDPA in fp32."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sys.path.insert(0, ROOT)
    os.environ["FA4_SM90"] = "1"
    from fa4.kernels import sm90

    d, causal, variant = task["d"], task["causal"], VARIANTS[task["variant"]]
    torch.manual_seed(d + causal)
    b, s, hq, hkv = 2, 1000, 4, 2
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
    _emit(dict(kind="check", **task, ok=ok, err=err, lowp_err=base, atol=atol, lse_err=lse_err,
               first_call_s=round(first_call_s, 1)))


def _suite():
    for d in HEAD_DIMS:
        for s in SEQLENS:
            for causal in (False, True):
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
                                softcap=0.0, sink=None, variant=VARIANTS[name])
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
        if name in VARIANTS and (not _applies(name, d) or d in task.get("skip_d", ())):
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="base variant and cuDNN only, D = 128")
    ap.add_argument("--variants", default=None, help="comma-separated subset of: " + ",".join(VARIANTS))
    ap.add_argument("--jobs", type=int, default=8, help="parallel compile+check children")
    ap.add_argument("--check-timeout", type=int, default=240)
    ap.add_argument("--time-timeout", type=int, default=150)
    ap.add_argument("--budget", type=int, default=560, help="seconds; later tasks are skipped past it")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, task = args.child[0], json.loads(args.child[1])
        (_child_check if mode == "check" else _child_time)(task)
        return

    start = time.time()
    names = list(VARIANTS) if not args.variants else args.variants.split(",")
    dims = HEAD_DIMS
    if args.quick:
        names, dims = ["base"], (128, )
    import torch
    import triton
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}", flush=True)

    # Phase 1: compile + check, in parallel (CPU-bound compiles; the GPU work is tiny).
    checks = [dict(variant=n, d=d, causal=c) for n in names for d in dims for c in (False, True) if _applies(n, d)]
    all_results, failed = [], set()

    def check(task):
        if time.time() - start > args.budget:
            return task, [], "skipped (budget)"
        return (task, *_run_child("check", task, args.check_timeout))

    print("## correctness (vs SDPA fp32, B=2 S=1000 Hq=4 Hkv=2, bf16)", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        for task, results, status in pool.map(check, checks):
            all_results += results
            r = results[0] if results else {}
            good = status == "ok" and r.get("ok")
            if not good:
                failed.add(task["variant"] + f"/d{task['d']}")
            print(f"{'PASS' if good else 'FAIL'} {task['variant']:<12} d={task['d']:<3} causal={int(task['causal'])} "
                  + (f"err={r['err']:.2e} (2*lowp+atol={2 * r['lowp_err'] + r['atol']:.2e}) "
                     f"lse_err={r['lse_err']:.1e} first_call={r['first_call_s']}s" if r else "")
                  + ("" if status == "ok" else f"  [{status}]"), flush=True)

    # Phase 2: timings, one child at a time on the GPU.
    peers = ["cudnn", "fa2", "fa4cute"] if not args.quick else ["cudnn"]
    timing_tasks = [dict(name="base")] + [dict(name=p) for p in peers] + \
        [dict(name=n) for n in names if n != "base"]
    table = {}
    print("\n## timings (bf16, B*S=16384, H*D=2048; TFLOP/s, do_bench median)", flush=True)
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
        results, status = _run_child("time", task, args.time_timeout)
        all_results += results
        for r in results:
            table[(r["name"], r["d"], r["s"], r["causal"])] = r.get("tflops", r.get("error"))
        if status != "ok":
            print(f"{task['name']}: {status}", flush=True)

    cols = [n for n in ["base"] + [n for n in names if n != "base"] if any(k[0] == n for k in table)]
    peer_cols = [p for p in peers if any(k[0] == p for k in table)]
    head = f"{'D':>4} {'S':>6} {'causal':>6} | " + " ".join(f"{c:>12}" for c in peer_cols + cols) + \
        " | best-fa4/best-peer"
    print(head)
    for d, s, causal, _, _ in _suite():
        if d not in dims:
            continue
        vals = [table.get((c, d, s, causal)) for c in peer_cols + cols]
        cells = [f"{v:12.1f}" if isinstance(v, float) else f"{'err' if v else '-':>12}" for v in vals]
        peer_best = max([v for v in vals[:len(peer_cols)] if isinstance(v, float)], default=None)
        ours = max([v for v in vals[len(peer_cols):] if isinstance(v, float)], default=None)
        ratio = f"{ours / peer_best:.3f}" if ours and peer_best else "-"
        print(f"{d:>4} {s:>6} {int(causal):>6} | " + " ".join(cells) + f" | {ratio}")
    errors = {k: v for k, v in table.items() if isinstance(v, str)}
    for k, v in errors.items():
        print(f"error {k}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_results, f, indent=1)
    print(f"# done in {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
