"""Probe the Gluon Hopper forward: where the time of short sequences goes, and the r2 variants against it.

    python benchmarks/sm90_probe.py              # everything below, about 5 minutes on an H100
    python benchmarks/sm90_probe.py --quick      # D = 128 only
    python benchmarks/sm90_probe.py --variants base,tail,q2,reversed --json out.json

Every kernel runs in a child process with a timeout, so a hang (an mbarrier wait that never completes) costs
that child only; the parent prints which one. Phase 1 compiles and checks every (variant, D, causal) in
parallel against torch SDPA (math backend, fp32) by DESIGN.md's numerics rule. Phase 2 runs one child at a
time on the GPU over the training suite: D = 64, 128, 256 x S = 1024, 4096, 16384 x causal, bf16,
B = 16384 / S, H = 2048 / D (S = 1024: B = 16, the bench's row).

What it measures (benchmarks/NOTES.md, "Hopper forward (Gluon), r2 analysis", says why):
  api       fa4.flash_attn_func(backend="sm90") on inputs that require grad: the `fa4 bench` path
  api-fast  the same through the FAST host launch (the default since r4; `api` is FA4_SM90_FAST=0)
  direct    fa4.kernels.sm90.forward, do_bench (which flushes L2 before each call)
  graph     the same call captured in a CUDA graph and replayed: the kernel's own time, no host
  host      microseconds of Python per call (back-to-back calls, no synchronisation)
  trace     the TRACE build: per-CTA globaltimer span and per-tile clock stamps (Q wait, first block,
            key loop, epilogue, gap between tiles)
  peers     cuDNN (SDPA), FlashAttention-4 (flash_attn.cute) and fa4's Triton forward
            (flash_attn_func(backend="triton")), each on inputs that require grad, as `fa4 bench` calls them.
Kernel variants (timed as direct and graph): base (shipped), tail (TAIL), q2 (TAIL + two Q buffers),
reversed (the r1 causal schedule, causal rows only).
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

# name: (variant overrides, head dims, causal values, timed, in the default run).
VARIANTS = {
    "base": ({}, (64, 128, 256), (False, True), True, True),
    # r2: Q released right after the last QKᵀ of a tile, lse stored after the O store is issued.
    "tail": (dict(TAIL=True), (64, 128, 256), (False, True), True, True),
    # Session 4: base takes TAIL per problem (configs.tail_for: S <= 4096); notail is the earlier default.
    "notail": (dict(TAIL=False), (64, 128, 256), (False, True), True, False),
    # r2: two Q buffers, the loader runs into the next tile (D <= 128: Q twice fits beside K/V and O).
    "q2": (dict(TAIL=True, q_buffers=2), (64, 128), (False, True), True, True),
    # Checked only: the per-tile trace build, and the FAST host launch (same kernel, other launch path).
    "trace": (dict(TRACE=True), (64, 128, 256), (False, True), False, True),
    "fast": (dict(FAST=True), (64, 128, 256), (False, True), False, True),
    # The r1 causal schedule (query blocks in descending order, round robin): A/B of the paired units at
    # S = 1024 and 4096, where the r2 bench had causal as slow as non-causal.
    "reversed": (dict(SCHED="reversed"), (64, 128, 256), (True, ), True, True),
    # Earlier runners-up, on request (--variants): tiles, ping-pong, stages, stagger, lazy.
    "wg2": (dict(num_wg=2, consumer_regs=240), (64, ), (False, True), True, False),
    "pingpong": (dict(PINGPONG=True), (128, ), (False, True), True, False),
    "no-pingpong": (dict(PINGPONG=False), (64, 256), (False, True), True, False),
    "stages3": (dict(stages=3), (64, 128), (False, True), True, False),
    "stagger": (dict(STAGGER=True), (128, 256), (False, ), True, False),
    "lazy": (dict(LAZY=True), (64, 128, 256), (False, True), False, False),
    # FlashAttention-4's exp2 on the FMA pipe for 1 or 2 of every 4 scores, re-measured on the current kernel
    # (r1 measured it slower on the first kernel, before ping-pong and the third warpgroup).
    "poly1": (dict(POLY=1), (64, 128), (False, True), True, False),
    "poly2": (dict(POLY=2), (64, ), (False, True), True, False),
    # Session 6: the per-element mask of every bound (the form before the per-row bounds), on the two-consumer
    # tiles that now take the per-row form (causal rows: the masked diagonal blocks).
    "mask2d": (dict(MASK2D=True), (64, 128, 256), (True, ), True, False),
    # Session 9: under causal the long query block of a pair walks its key blocks upwards, the short one
    # downwards, so a head's CTAs read the same K/V block at the same time (attention_fwd._block). The
    # default since (base; the runs before it timed it as "converge"); "descend" is the walk before it (every
    # tile from its last key block down).
    "descend": (dict(CONVERGE=False), (64, 128, 256), (True, ), True, False),
    # Session 9: O staged half its columns at a time (O_HALVES), so the D = 256 tile needs no room for O in Q's
    # buffer and hands Q back before its epilogue (the trace's ~3 µs Q wait a tile). Compiled, not yet timed.
    "ohalves": (dict(O_HALVES=True), (128, 256), (False, True), True, False),
    # Session 9: D = 128 with three consumers (192 query rows, 160 registers a thread) on 64-key blocks, two or
    # three stages: the D = 64 table's latency hiding (three softmax chains in flight) at half the S tile.
    # Compiled spill-free, not yet timed.
    "wg3bn64": (dict(num_wg=3, consumer_regs=160, block_n=64), (128, ), (False, True), True, False),
    "wg3bn64s3": (dict(num_wg=3, consumer_regs=160, block_n=64, stages=3), (128, ), (False, True), True, False),
    # Session 9: three consumers for D = 64 under causal at every length (the table takes two up to a visible
    # span of 4096 keys, configs.MASKED_SPAN_WG2; 8192 for packed calls of mixed lengths since session 20),
    # re-timed now that the causal walk converges.
    "wg3": (dict(num_wg=3, consumer_regs=160), (64, ), (True, ), True, False),
}
HEAD_DIMS = (64, 128, 256)
SEQ_LENS = (1024, 4096, 16384)
PEERS = ("cudnn", "fa4cute", "triton")


def _applies(name, d, causal=None):
    _, dims, causals, _, _ = VARIANTS[name]
    return d in dims and (causal is None or causal in causals)


def _suite(dims=HEAD_DIMS):
    """(D, S, causal, B, H): the training suite (B·S = 16384, H·D = 2048)."""
    for d in dims:
        for s in SEQ_LENS:
            for causal in (False, True):
                yield d, s, causal, 16384 // s, 2048 // d


def _flops(b, h, s, d, causal):
    f = 4 * b * h * s * s * d
    return f / 2 if causal else f


# ----------------------------------------------------------------------------------------------------------
# Children (run in a fresh process each)
# ----------------------------------------------------------------------------------------------------------

def _emit(obj):
    print("RESULT " + json.dumps(obj), flush=True)


def _sm90_call(q, k, v, causal, variant):
    from fa4.kernels import sm90
    return sm90.forward(q, k, v, softmax_scale=q.shape[-1] ** -0.5, window_left=-1,
                        window_right=0 if causal else -1, softcap=0.0, sink=None, variant=variant)


def _child_check(task):
    """Compile one variant and check it at small GQA shapes against SDPA in fp32 (S = 1000 and 1300: even and
    odd numbers of query blocks, so the paired causal schedule meets its lone middle block). FAST calls twice
    (the second call, on other tensors, takes the fast path); TRACE also checks the trace buffer."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sys.path.insert(0, ROOT)
    from fa4.kernels.sm90 import attention_fwd

    d, causal, name = task["d"], task["causal"], task["variant"]
    variant = VARIANTS[name][0]
    worst = None
    for s in (1000, 1300):
        torch.manual_seed(d + causal + s)
        b, hq, hkv = 2, 4, 2
        q = torch.randn(b, s, hq, d, dtype=torch.bfloat16, device="cuda")
        k = torch.randn(b, s, hkv, d, dtype=torch.bfloat16, device="cuda")
        # Keys fading along the sequence: the walk (last block first) sees the row max climb.
        k = (k * torch.linspace(6.0, 0.1, s, device="cuda")[None, :, None, None]).to(torch.bfloat16)
        v = torch.randn(b, s, hkv, d, dtype=torch.bfloat16, device="cuda")
        scale = d ** -0.5
        t0 = time.time()
        out, lse = _sm90_call(q, k, v, causal, variant)
        torch.cuda.synchronize()
        first_call_s = time.time() - t0
        extra = ""
        if variant.get("FAST"):
            q, k, v = q.clone(), k.clone(), v.clone()
            out, lse = _sm90_call(q, k, v, causal, variant)
            torch.cuda.synchronize()
        if variant.get("TRACE"):
            tr = attention_fwd.LAST_TRACE.cpu()
            spans = tr[:, 1] - tr[:, 0]
            if not bool((spans > 0).all()):
                extra = "trace: a CTA without a time stamp"

        def sdpa(dtype):
            qh, kh, vh = (t.transpose(1, 2).to(dtype) for t in (q, k, v))
            with sdpa_kernel(SDPBackend.MATH):
                o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale, enable_gqa=True)
            return o.transpose(1, 2)

        ref, low = sdpa(torch.float32), sdpa(torch.bfloat16)
        err = (out.float() - ref).abs().max().item()
        base = (low.float() - ref).abs().max().item()
        atol = 2 * ((ref + 0.3 - 0.3) - ref).abs().max().item()
        kk = k.float().repeat_interleave(hq // hkv, dim=2)
        sc = torch.einsum("bihd,bjhd->bhij", q.float(), kk) * scale
        if causal:
            sc = sc.masked_fill(torch.ones(s, s, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
        lse_err = (lse - torch.logsumexp(sc, dim=-1)).abs().max().item()
        ok = bool(torch.isfinite(out).all()) and err <= 2 * base + atol and lse_err < 1e-2 and not extra
        r = dict(kind="check", **task, s=s, ok=ok, err=err, lowp_err=base, atol=atol, lse_err=lse_err,
                 first_call_s=round(first_call_s, 1), note=extra)
        if worst is None or (worst["ok"] and (not ok or err / (2 * base + atol) >
                                               worst["err"] / (2 * worst["lowp_err"] + worst["atol"]))):
            worst = r
        del sc, kk
    _emit(worst)


def _bench(fn):
    import triton
    fn()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _host_us(fn, n=20, warmup=1):
    """Python time per call, back to back without synchronising (the GPU queue absorbs the kernels)."""
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def _capture(fn, warmups=3):
    """fn captured in a CUDA graph after one call and `warmups` calls on a side stream (torch.cuda.graph's
    recipe) -> (graph, what the captured call returned)."""
    import torch
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        res = fn()
    return graph, res


def _graph_ms(fn):
    """The call captured in a CUDA graph, replayed under do_bench (L2 flushed before each replay)."""
    graph, _ = _capture(fn)
    ms = _bench(graph.replay)
    del graph
    return ms


def _inputs(b, s, h, d, grad):
    import torch
    torch.manual_seed(0)
    return [torch.randn(b, s, h, d, dtype=torch.bfloat16, device="cuda", requires_grad=grad) for _ in range(3)]


def _peer_fn(name, q, k, v, causal):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if name == "cudnn":
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))

        def fn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal)
        return fn
    if name == "fa4cute":
        from flash_attn.cute import flash_attn_func

        def fn():
            out = flash_attn_func(q, k, v, causal=causal)
            return out[0] if isinstance(out, tuple) else out
        return fn
    if name == "triton":
        import fa4

        def fn():
            return fa4.flash_attn_func(q, k, v, causal=causal, backend="triton")
        return fn
    raise ValueError(name)


def _time_shape(task, d, s, causal, b, h):
    """All measurements of one child at one shape: {measurement: value}."""
    import torch
    name = task["name"]
    res = {}
    if name in PEERS:
        q, k, v = _inputs(b, s, h, d, grad=True)
        fn = _peer_fn(name, q, k, v, causal)
        res["ms"] = _bench(fn)
        res["host_us"] = _host_us(fn)
    elif name == "api":
        import fa4
        q, k, v = _inputs(b, s, h, d, grad=True)

        def fn():
            return fa4.flash_attn_func(q, k, v, causal=causal, backend="sm90")
        # FAST is the default since r4: "" = JIT launch (FA4_SM90_FAST=0), "fast_" = the default path.
        modes = [("", "0")] + ([("fast_", None)] if task.get("fast_ok") else [])
        for prefix, env in modes:
            if env is None:
                os.environ.pop("FA4_SM90_FAST", None)
            else:
                os.environ["FA4_SM90_FAST"] = env
            res[prefix + "ms"] = _bench(fn)
            res[prefix + "host_us"] = _host_us(fn)
        os.environ.pop("FA4_SM90_FAST", None)
    elif name == "trace":
        res = _trace_shape(task, d, s, causal, b, h)
    else:  # a kernel variant through fa4.kernels.sm90.forward
        q, k, v = _inputs(b, s, h, d, grad=False)
        variant = dict(VARIANTS[name][0])
        variant.setdefault("FAST", False)  # variants are timed through Triton's JIT launch; FAST is its own column

        def fn():
            return _sm90_call(q, k, v, causal, variant)
        res["ms"] = _bench(fn)
        res["graph_ms"] = _graph_ms(fn)
        if name == "base":
            res["host_us"] = _host_us(fn)
            if task.get("fast_ok"):
                fast = dict(variant, FAST=True)

                def fast_fn():
                    return _sm90_call(q, k, v, causal, fast)
                res["fast_ms"] = _bench(fast_fn)
                res["fast_host_us"] = _host_us(fast_fn)
    torch.cuda.empty_cache()
    return res


def _trace_shape(task, d, s, causal, b, h):
    """TRACE builds of base (and q2 where it applies): kernel span and where a tile's time goes."""
    import torch
    from fa4.kernels.sm90 import attention_fwd as af
    q, k, v = _inputs(b, s, h, d, grad=False)
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    res = {}
    for vname in task.get("trace_variants", ("base", )):
        if not _applies(vname, d, causal) or d in task.get("skip_d", {}).get(vname, ()):
            continue
        variant = dict(VARIANTS[vname][0], TRACE=True)
        _sm90_call(q, k, v, causal, variant)
        runs = []
        for _ in range(3):
            flush.zero_()
            _sm90_call(q, k, v, causal, variant)
            torch.cuda.synchronize()
            runs.append(af.LAST_TRACE.cpu())
        spans = [int(t[:, 1].max() - t[:, 0].min()) for t in runs]
        tr = runs[sorted(range(3), key=lambda i: spans[i])[1]]  # the median run
        res[vname] = _trace_summary(tr, af.TRACE_HDR, af.TRACE_EV)
    del flush
    return res


def _trace_summary(tr, hdr, nev):
    """Per-CTA clock stamps -> µs per tile component (mean over tiles) and CTA totals."""
    tr = tr.double()
    gt0, gt1, ck0, ck1 = tr[:, 0], tr[:, 1], tr[:, 2], tr[:, 3]
    span_ns = gt1 - gt0
    rate = (ck1 - ck0) / span_ns.clamp(min=1)  # SM cycles per ns
    tiles = tr[:, hdr:].reshape(tr.shape[0], -1, nev)
    valid = tiles[:, :, 0] > 0
    per = 1e-3 / rate[:, None]  # µs per cycle
    comp = {
        "q_wait": (tiles[:, :, 1] - tiles[:, :, 0]),
        "first": (tiles[:, :, 2] - tiles[:, :, 1]).clamp(min=0) * (tiles[:, :, 2] > 0),
        "loop": (tiles[:, :, 3] - tiles[:, :, 2]) * (tiles[:, :, 2] > 0),
        "epi": (tiles[:, :, 4] - tiles[:, :, 3]),
    }
    nxt = tiles[:, 1:, 0]
    gap = (nxt - tiles[:, :-1, 4]) * valid[:, 1:]
    comp["gap"] = gap
    ntiles = valid.sum()
    out = {k: float((v[:, :v.shape[1]] * per * valid[:, :v.shape[1]]).sum() / ntiles) for k, v in comp.items()}
    out["lead"] = float(((tiles[:, 0, 0] - ck0) * per[:, 0]).mean())  # CTA start to its first tile
    # Whole tiles (start to O store issued): the first of each CTA (cold instruction cache, empty ring)
    # against the later ones; and the spread of CTA start and end times (launch skew, imbalance).
    dur = (tiles[:, :, 4] - tiles[:, :, 0]) * per
    out["tile1_us"] = float(dur[:, 0][valid[:, 0]].mean()) if bool(valid[:, 0].any()) else 0.0
    later = valid.clone()
    later[:, 0] = False
    out["tileN_us"] = float(dur[later].mean()) if bool(later.any()) else 0.0
    out["start_skew_us"] = float((gt0.max() - gt0.min()) / 1e3)
    out["end_skew_us"] = float((gt1.max() - gt1.min()) / 1e3)
    out["span_us"] = float((gt1.max() - gt0.min()) / 1e3)
    out["busy_max_us"] = float(span_ns.max() / 1e3)
    out["busy_mean_us"] = float(span_ns.mean() / 1e3)
    out["tiles_per_cta"] = float(valid.sum(1).double().mean())
    out["blocks_per_tile"] = float((tiles[:, :, 5] * valid).sum() / ntiles)
    out["ghz"] = float(rate.mean())
    return out


def _child_time(task):
    """Time one fa4 variant, fa4 path or peer over the suite; one RESULT line per shape."""
    import torch
    sys.path.insert(0, ROOT)
    name = task["name"]
    for d, s, causal, b, h in _suite(task.get("dims", HEAD_DIMS)):
        if name in VARIANTS and (not _applies(name, d, causal) or d in task.get("skip_d", ())):
            continue
        if name == "api" and d in task.get("skip_d", ()):
            continue
        try:
            res = _time_shape(task, d, s, causal, b, h)
            _emit(dict(kind="time", name=name, d=d, s=s, causal=causal, b=b, h=h, **res))
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
    env = dict(os.environ)
    env.pop("FA4_SM90_FAST", None)
    env.setdefault("FA4_SM90", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=ROOT, env=env)
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


def _tf(r, key, d, s, causal, b, h):
    v = r.get(key)
    return _flops(b, h, s, d, causal) / v * 1e-9 if isinstance(v, (int, float)) and v > 0 else None


def _cell(v, fmt="7.1f", width=7):
    return f"{v:{fmt}}" if isinstance(v, (int, float)) else f"{'-':>{width}}"


def _print_tables(res, timed, dims):
    """res[(name, d, s, causal)] = result dict."""
    def get(name, d, s, c):
        return res.get((name, d, s, c), {})

    print("\n## 1. the bench path, TFLOP/s (inputs require grad; peers as `fa4 bench` calls them)")
    print(f"{'D':>4} {'S':>6} {'c':>2} | {'cudnn':>7} {'fa4cute':>7} {'triton':>7} | {'sm90':>7} {'sm90fst':>7} |"
          f" {'sm90/peer':>9} {'fast/peer':>9}")
    for d, s, c, b, h in _suite(dims):
        peers = [_tf(get(p, d, s, c), "ms", d, s, c, b, h) for p in ("cudnn", "fa4cute")]
        trit = _tf(get("triton", d, s, c), "ms", d, s, c, b, h)
        api = _tf(get("api", d, s, c), "ms", d, s, c, b, h)
        fast = _tf(get("api", d, s, c), "fast_ms", d, s, c, b, h)
        best = max([p for p in peers if p], default=None)
        r1 = f"{api / best:9.3f}" if api and best else f"{'-':>9}"
        r2 = f"{fast / best:9.3f}" if fast and best else f"{'-':>9}"
        print(f"{d:>4} {s:>6} {int(c):>2} | " + " ".join(_cell(x) for x in peers + [trit]) + " | "
              + _cell(api) + " " + _cell(fast) + f" | {r1} {r2}")

    kv = [n for n in timed if n in VARIANTS]
    print("\n## 2. kernel variants, TFLOP/s: 'graph' = CUDA-graph replay (kernel only), 'dir' = direct call")
    print(f"{'D':>4} {'S':>6} {'c':>2} | " + " ".join(f"{n + ':graph':>12} {n + ':dir':>10}" for n in kv)
          + " | best graph/best peer")
    for d, s, c, b, h in _suite(dims):
        cells, graphs = [], {}
        for n in kv:
            r = get(n, d, s, c)
            g, dr = _tf(r, "graph_ms", d, s, c, b, h), _tf(r, "ms", d, s, c, b, h)
            if g:
                graphs[n] = g
            cells.append(f"{_cell(g, '12.1f', 12)} {_cell(dr, '10.1f', 10)}")
        peers = [_tf(get(p, d, s, c), "ms", d, s, c, b, h) for p in ("cudnn", "fa4cute")]
        best = max([p for p in peers if p], default=None)
        bn = max(graphs, key=graphs.get) if graphs else None
        tail = f"{graphs[bn] / best:.3f} ({bn})" if bn and best else "-"
        print(f"{d:>4} {s:>6} {int(c):>2} | " + " ".join(cells) + f" | {tail}")

    print("\n## 3. host µs per call (back to back) and the time the bench path adds over the kernel (ms)")
    print(f"{'D':>4} {'S':>6} {'c':>2} | {'direct':>7} {'dirfast':>7} {'api':>7} {'apifast':>7} {'triton':>7}"
          f" {'cudnn':>7} {'fa4cute':>7} | {'graph':>7} {'direct':>7} {'api':>7} {'apifast':>7}")
    for d, s, c, b, h in _suite(dims):
        base, api = get("base", d, s, c), get("api", d, s, c)
        host = [base.get("host_us"), base.get("fast_host_us"), api.get("host_us"), api.get("fast_host_us"),
                get("triton", d, s, c).get("host_us"), get("cudnn", d, s, c).get("host_us"),
                get("fa4cute", d, s, c).get("host_us")]
        ms = [base.get("graph_ms"), base.get("ms"), api.get("ms"), api.get("fast_ms")]
        print(f"{d:>4} {s:>6} {int(c):>2} | " + " ".join(_cell(x) for x in host) + " | "
              + " ".join(_cell(x, "7.3f") for x in ms))

    print("\n## 4. trace (TRACE build, median of 3 calls after an L2 flush): µs")
    print("   (span: first CTA start to last CTA end; busy: one CTA's start to end; per tile: Q wait, first key "
          "block, rest of the key loop, epilogue, gap to the next tile; tile1/tileN: whole first tile / later "
          "tiles; skew: spread of CTA start and end times)")
    print(f"{'D':>4} {'S':>6} {'c':>2} {'variant':>7} | {'span':>7} {'busymax':>7} {'busyavg':>7} {'tiles':>5}"
          f" {'blk/t':>5} | per tile: {'qwait':>6} {'first':>6} {'loop':>7} {'epi':>6} {'gap':>6} | {'lead':>6}"
          f" {'tile1':>7} {'tileN':>7} {'s-skew':>6} {'e-skew':>6} {'GHz':>5}")
    for d, s, c, b, h in _suite(dims):
        tr = get("trace", d, s, c)
        for vname, t in tr.items():
            if not isinstance(t, dict):
                continue
            print(f"{d:>4} {s:>6} {int(c):>2} {vname:>7} | {t['span_us']:7.1f} {t['busy_max_us']:7.1f} "
                  f"{t['busy_mean_us']:7.1f} {t['tiles_per_cta']:5.1f} {t['blocks_per_tile']:5.1f} | "
                  f"{'':>10}{t['q_wait']:6.2f} {t['first']:6.2f} {t['loop']:7.2f} {t['epi']:6.2f} {t['gap']:6.2f} | "
                  f"{t['lead']:6.2f} {t['tile1_us']:7.2f} {t['tileN_us']:7.2f} {t['start_skew_us']:6.1f} "
                  f"{t['end_skew_us']:6.1f} {t['ghz']:5.2f}")

    print("\n## causal / non-causal TFLOP/s (graph; 1.0 = parity since causal FLOPs are halved)")
    for d in dims:
        for s in SEQ_LENS:
            b, h = 16384 // s, 2048 // d
            line = f"{d:>4} {s:>6} |"
            for n in kv:
                # Non-causal of the variant itself, or of base for the causal-only schedules.
                nc = _tf(get(n, d, s, False) or get("base", d, s, False), "graph_ms", d, s, False, b, h)
                ca = _tf(get(n, d, s, True), "graph_ms", d, s, True, b, h)
                line += f" {n} {ca / nc:.3f}" if nc and ca else f" {n} -"
            print(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="D = 128 only")
    ap.add_argument("--dims", default=None, help="comma-separated head dims (default 64,128,256)")
    ap.add_argument("--variants", default=None, help="comma-separated subset of: " + ",".join(VARIANTS))
    ap.add_argument("--no-peers", action="store_true", help="skip cuDNN, FlashAttention-4 and the Triton forward")
    ap.add_argument("--jobs", type=int, default=8, help="parallel compile+check children")
    ap.add_argument("--check-timeout", type=int, default=240)
    ap.add_argument("--time-timeout", type=int, default=150)
    ap.add_argument("--budget", type=int, default=330,
                    help="seconds; tasks not started by then are skipped (a started one may take --time-timeout)")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, task = args.child[0], json.loads(args.child[1])
        (_child_check if mode == "check" else _child_time)(task)
        return

    start = time.time()
    names = [n for n in VARIANTS if VARIANTS[n][4]] if not args.variants else args.variants.split(",")
    for n in names:
        if n not in VARIANTS:
            raise SystemExit(f"unknown variant {n}")
    if "base" not in names:
        names = ["base"] + names
    dims = (128, ) if args.quick else HEAD_DIMS
    if args.dims:
        dims = tuple(int(x) for x in args.dims.split(","))
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
                failed.add((task["variant"], task["d"]))
            print(f"{'PASS' if good else 'FAIL'} {task['variant']:<12} d={task['d']:<3} causal={int(task['causal'])} "
                  + (f"S={r['s']} err={r['err']:.2e} (2*lowp+atol={2 * r['lowp_err'] + r['atol']:.2e}) "
                     f"lse_err={r['lse_err']:.1e} first_call={r['first_call_s']}s {r.get('note', '')}" if r else "")
                  + ("" if status == "ok" else f"  [{status}]"), flush=True)
    print(f"# checks done at {time.time() - start:.0f}s", flush=True)

    def skip_d(name):
        return [d for d in dims if (name, d) in failed]

    # Phase 2: one child at a time on the GPU, the most telling first (the budget may cut the tail).
    fast_ok = "fast" in names and not skip_d("fast")
    timed = [n for n in names if VARIANTS[n][3]]
    tasks = [dict(name="base", fast_ok=fast_ok, skip_d=skip_d("base")),
             dict(name="api", fast_ok=fast_ok, skip_d=skip_d("base"))]
    if not args.no_peers:
        tasks += [dict(name=p) for p in PEERS]
    trace_vs = [n for n in ("base", "q2", "wg2", "descend", "ohalves") if n in names]
    if "trace" in names:
        # A variant is traced only at the head dims where it and the trace build passed their checks.
        tasks.append(dict(name="trace", trace_variants=trace_vs,
                          skip_d={n: sorted(set(skip_d("trace")) | set(skip_d(n))) for n in trace_vs}))
    tasks += [dict(name=n, skip_d=skip_d(n)) for n in timed if n != "base"]
    res = {}
    print("\n## timings (bf16, B*S=16384, H*D=2048; do_bench median, L2 flushed before each call)", flush=True)
    for task in tasks:
        task["dims"] = list(dims)
        if time.time() - start > args.budget:
            print(f"skipped {task['name']} (budget)", flush=True)
            continue
        if task["name"] in VARIANTS and all(d in task["skip_d"] or not _applies(task["name"], d) for d in dims):
            print(f"skipped {task['name']} (failed its checks)", flush=True)
            continue
        t0 = time.time()
        results, status = _run_child("time", task, args.time_timeout)
        all_results += results
        for r in results:
            res[(r["name"], r["d"], r["s"], r["causal"])] = r
        errs = [r for r in results if "error" in r]
        print(f"timed {task['name']} ({len(results)} shapes, {time.time() - t0:.0f}s)"
              + ("" if status == "ok" else f": {status}")
              + (f"; errors: {errs[0]['error'][:200]}" if errs else ""), flush=True)

    _print_tables(res, timed, dims)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_results, f, indent=1)
    print(f"# done in {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
