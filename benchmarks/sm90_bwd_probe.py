"""Probe the Gluon Hopper backward (fa4/kernels/sm90/backward.py): correctness of every configuration, then
TFLOP/s beside fa4's Triton backward, cuDNN (SDPA), FA2 (SDPA flash) and FlashAttention-4 (when
`flash_attn.cute` imports) on the training suite's D = 64 and 128 rows, and D = 256 (`--dims 256`), whose shipped
tile is the D = 256 kernel (fa4/kernels/sm90/backward_d256.py; `--tiles d256` names it explicitly):

    python benchmarks/sm90_bwd_probe.py --check-only --dims 256 --tiles d256
    python benchmarks/sm90_bwd_probe.py --time-only --dims 256 --tiles d256 --peers sdpa_cudnn

    python benchmarks/sm90_bwd_probe.py                 # both phases, about 4-6 minutes on an H100
    python benchmarks/sm90_bwd_probe.py --check-only    # phase 1 only (about a minute)
    python benchmarks/sm90_bwd_probe.py --json out.json

Every kernel runs in a child process with a timeout: the kernel has never run before, and a wrong
barrier phase hangs instead of failing. A child that times out or dies is printed as HANG / CRASH with
its configuration, and the probe goes on.

Phase 1 (check): per (D, causal) a child runs the backward (deterministic off and on, GQA off and on) at
a small odd-length shape and applies DESIGN.md's numerics rule against fa4.reference.backward (fp32 and
input-dtype runs), bf16 and fp16.
Phase 2 (time): per training-suite row a child times the sm90 backward (atomic dQ and deterministic); one
child times the peers on every row. Backward TFLOP/s = 2.5 x forward FLOP (4·B·H·S²·D, halved when
causal). fa4's time is the whole backend `backward` call (preprocess, main kernel, dQ cast); the peers'
is torch.autograd.grad of their forward output, as `fa4 bench` measures them.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECKS = [  # (D, causal, deterministic, hq, hkv)
    (d, causal, det, hq, hkv) for d in (128, 64, 256) for causal in (False, True) for det in (False, True)
    for hq, hkv in ((4, 4), (8, 2))
]
SHIPPED_DIMS = (128, 64)  # head dims with a shipped tile (the "base" checks and the sm90 / sm90_det columns)
# (D, S); B = 16384 / S, H = 2048 / D (D = 256: the training suite's S = 4096 B = 4 H = 8 and S = 16384 B = 1 H = 8)
ROWS = [(128, 1024), (128, 4096), (128, 16384), (64, 4096), (64, 16384), (256, 4096), (256, 16384)]
# The keys-as-rows kernel's fields at D = 64 (two consumers, 128 query rows a step, dQ in the kernel) and at D = 128
# (64 rows a step, off the shared-dQ tile's variants); the "kt" variants below add stages, dV order, lag and poly.
# Without the lag unless a variant says so (the shipped D = 64 tile has it; with it three stages do not fit).
_KT64 = dict(keys_as_rows=True, num_wg=2, block_m=128, separate_dq=False, consumer_regs=240, dq_lag=False)
_KT128 = dict(keys_as_rows=True, block_m=64, shared_dq=False, early_dp=False, dq_writer=False, dq_lag=False)
# Tile variants (--tiles): overrides of backward.BwdTile, checked and timed beside the shipped tile where they fit.
TILES = {
    "shared": dict(shared_dq=True),             # dQ of the CTA's whole key block, columns split over the consumers
    "shared3": dict(shared_dq=True, stages=3),  # the same, with the freed staging memory as a third Q/dO stage
    "sep": dict(separate_dq=True),              # dQ by the ordered pass
    # 128 queries per step on the queries-as-rows kernel (fits registers and shared memory at D = 64)
    "bm128": dict(block_m=128, keys_as_rows=False),
    "early": dict(early_dp=True),               # dP issued right behind S, under the softmax
    "sinkpdp": dict(sink_pdp=True),             # with --sink: the sink gradient's P·dP partials in the main kernel
    "pingpong": dict(ping_pong=True),           # the consumers take turns issuing (S, dP), then (dV, dK, dQ)
    "d256": dict(d256=True),                    # D = 256 only: backward_d256.py (also checked deterministic)
    # D = 256 with each step's second dQ half staged behind the first in the hand-over slot (the tile before
    # dq_in_q, for A/B against the shipped one)
    "d256slot": dict(d256=True, dq_in_q=False),
    # Three consumers (192 keys a CTA, 160 registers each, the loader as the 4-warp default partition), D = 64
    # with the ordered dQ pass: a third step chain in flight (benchmarks/bwd_trace.py: a D = 64 step is a serial
    # chain of ~2,500 cycles per consumer, neither the tensor core, the MUFU unit nor issue saturated).
    # the D = 64 tile shipped from session 6 to 12, explicitly (also timed deterministic)
    "wg3": dict(keys_as_rows=False, block_m=64, separate_dq=True, num_wg=3, consumer_regs=160),
    # the two-consumer D = 64 tile shipped before (A/B for wg3)
    "wg2": dict(keys_as_rows=False, block_m=64, separate_dq=True, num_wg=2, consumer_regs=240),
    # The three-consumer D = 64 tile with dQ by the in-kernel reduce-add (5 products instead of 7; 65 reloads a
    # step at 160 registers).
    "wg3ra": dict(keys_as_rows=False, block_m=64, num_wg=3, consumer_regs=160, separate_dq=False),
    # Two consumers (240 registers) with dQ by the in-kernel reduce-add, issued by the consumers or by the writer
    # warp (tile.dq_writer, session 8): 5 products instead of the ordered pass's 7, and no consumer waits on TMA.
    "wg2ra": dict(keys_as_rows=False, block_m=64, num_wg=2, consumer_regs=240, separate_dq=False),
    "wg2w": dict(keys_as_rows=False, block_m=64, num_wg=2, consumer_regs=240, separate_dq=False,
                 dq_writer=True),
    # D = 128: the writer warp off (the consumers issue their reduce-adds, as before session 8).
    "nowriter": dict(dq_writer=False),
    # D = 64 keys as rows (backward_kt.py): Sᵀ = K·Qᵀ, Pᵀ and dSᵀ the A operands of dV, dK from registers, 128 keys
    # and 128 query rows a step, dQ in the kernel (each consumer 64 query rows); two or three Q / dO stages.
    "kt": dict(_KT64, stages=2, dv_early=True),
    "kt3": dict(_KT64, stages=3, dv_early=True),
    # The same with dV issued after dS is formed instead of before dPᵀ is waited for.
    "ktlate": dict(_KT64, stages=2, dv_early=False),
    "ktlate3": dict(_KT64, stages=3, dv_early=False),
    # Each step's dQ share issued one step late (two dSᵀ buffers a consumer; two stages fit), dV after dS or before
    # dPᵀ is waited for.
    "ktlag": dict(_KT64, stages=2, dv_early=False, dq_lag=True),
    "ktlage": dict(_KT64, stages=2, dv_early=True, dq_lag=True),
    # ktlag with 1 or 2 of every 4 exponentials by polynomial on the FMA pipe.
    "ktlagp1": dict(_KT64, stages=2, dv_early=False, dq_lag=True, poly=1),
    "ktlagp2": dict(_KT64, stages=2, dv_early=False, dq_lag=True, poly=2),
    # D = 128 keys as rows: 64 query rows a step, each consumer's dQ share all rows of D / 2 columns; three or two
    # stages, dV after dS or before dPᵀ is waited for.
    "kt128": dict(_KT128, stages=3, dv_early=False),
    "kt128e": dict(_KT128, stages=3, dv_early=True),
    "kt128s2": dict(_KT128, stages=2, dv_early=False),
    "kt128lag": dict(_KT128, stages=2, dv_early=False, dq_lag=True),
}


_CHECK_CHILD = r"""
import json, sys, torch
sys.path.insert(0, "tests")
from numerics import assert_close_rule
from fa4 import reference
from fa4.kernels.sm90 import backward as bwd
for d, causal, det, hq, hkv, tname, over in json.loads(sys.argv[1]):
    tile = None
    if over:
        tile = bwd.get_tile(d, d, **over)
        if tile is None:
            continue
    res = {}
    for dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        b, s = 2, 1000
        q = torch.randn(b, s, hq, d, device="cuda", dtype=dtype)
        k = torch.randn(b, s, hkv, d, device="cuda", dtype=dtype)
        v = torch.randn(b, s, hkv, d, device="cuda", dtype=dtype)
        opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0,
                    sink=None)
        out, lse = reference.forward(q.float(), k.float(), v.float(), **opts)
        dout = torch.randn_like(out).to(dtype)
        got = bwd.backward(dout, q, k, v, out.to(dtype), lse, None, deterministic=det, tile=tile, **opts)
        torch.cuda.synchronize()
        ref = reference.backward(dout.float(), q.float(), k.float(), v.float(), out, lse, None, **opts)
        low = reference.backward(dout, q, k, v, out.to(dtype), lse, None, compute_dtype=dtype, **opts)
        errs = {}
        for name, g, r, lo in zip(("dq", "dk", "dv"), got, ref, low):
            try:
                assert_close_rule(name, g, r, lo)
                errs[name] = "ok %.1e (lowp %.1e)" % ((g.float() - r).abs().max().item(),
                                                     (lo.float() - r).abs().max().item())
            except AssertionError as exc:
                errs[name] = "FAIL " + str(exc)
        res[str(dtype).split(".")[-1]] = errs
    print("PART " + json.dumps({json.dumps([d, causal, det, hq, hkv, tname, over]): res}), flush=True)
"""

_TIME_CHILD = r"""
import json, sys, torch
from triton.testing import do_bench
which, rows, tiles, with_sink = json.loads(sys.argv[1])
for d, s, causal in rows:
    b, h = 16384 // s, 2048 // d
    flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
    torch.manual_seed(0)
    shape = (b, s, h, d)
    q, k, v, dout = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0,
                sink=torch.randn(h, device="cuda") if with_sink else None)
    key = json.dumps([d, s, causal])

    def timed(name, fn):
        try:
            fn()
            torch.cuda.synchronize()
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            val = round(flops / ms / 1e9, 1)
        except Exception as exc:
            val = "error: " + (type(exc).__name__ + ": " + str(exc))[:160]
        print("PART " + json.dumps({key: {name: val}}), flush=True)

    from fa4.kernels import sm90
    out, lse = sm90.forward(q, k, v, **opts)
    if which == "sm90":
        from fa4.kernels.sm90 import backward as bwd
        if bwd.get_tile(d, d) is not None:
            timed("sm90", lambda: bwd.backward(dout, q, k, v, out, lse, None, deterministic=False, **opts))
            timed("sm90_det", lambda: bwd.backward(dout, q, k, v, out, lse, None, deterministic=True, **opts))
        for tname, over in tiles:
            tile = bwd.get_tile(d, d, **over)
            if tile is not None:
                timed("sm90_" + tname, lambda: bwd.backward(dout, q, k, v, out, lse, None, tile=tile, **opts))
                if tile.d256 or tname.startswith("kt") or tname == "wg3":
                    timed("sm90_" + tname + "_det", lambda: bwd.backward(dout, q, k, v, out, lse, None, tile=tile,
                                                                         deterministic=True, **opts))
    else:
        from fa4.kernels.triton import backward as tbwd
        timed("triton", lambda: tbwd.backward(dout, q, k, v, out, lse, None, **opts))
        from fa4.bench import peers
        for name in which.split(":", 1)[1].split(","):
            peer = peers.make_peer(name)
            why = peer.available()
            if why is not None:
                print("PART " + json.dumps({key: {name: "n/a: " + why[:100]}}), flush=True)
                continue
            qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
            try:
                o = peer.training(causal)(qg, kg, vg)
            except Exception as exc:
                print("PART " + json.dumps({key: {name: "error: " + str(exc)[:160]}}), flush=True)
                continue
            timed(name, lambda: torch.autograd.grad(o, (qg, kg, vg), dout, retain_graph=True))
            del o, qg, kg, vg  # inside the loop: with every peer unavailable none was made
"""


def _timed_det(tile):
    """Whether phase 2 also times a tile variant deterministic (the D = 256 kernel, the D = 64 tiles)."""
    return tile[1].get("d256") or tile[0].startswith("kt") or tile[0] == "wg3"


def _child(code, arg, timeout):
    """(status, parsed RESULT or partial results, log tail) of one child; status ok / HANG / CRASH."""
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(arg)], capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)
        out, status = proc.stdout, "ok" if proc.returncode == 0 else f"CRASH rc={proc.returncode}"
        log = (proc.stdout + proc.stderr)[-1500:]
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        status, log = f"HANG (> {timeout} s)", out[-1500:]
    result = {}
    for line in out.splitlines():
        if line.startswith("PART "):
            for key, val in json.loads(line[5:]).items():
                result.setdefault(key, {}).update(val)
    return status, result, log, round(time.time() - t0, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--time-only", action="store_true", help="skip phase 1 (after a --check-only run passed)")
    ap.add_argument("--peers", default="sdpa_cudnn,sdpa_flash,flashattn4", help="comma-separated peer names")
    ap.add_argument("--tiles", default="", help="comma-separated tile variants to check and time: " + ",".join(TILES))
    ap.add_argument("--dims", default="128,64", help="comma-separated head dims of the checks and rows")
    ap.add_argument("--sink", action="store_true", help="time fa4 with a learnable sink (peers have none)")
    ap.add_argument("--json")
    args = ap.parse_args()
    dims = [int(x) for x in args.dims.split(",")]
    tiles = [[name, TILES[name]] for name in args.tiles.split(",") if name]
    report = {"checks": [], "rows": []}

    print("== phase 1: correctness (numerics rule vs fa4.reference), B=2 S=1000, bf16 and fp16")
    cases = [(*c, "base", None) for c in CHECKS if c[0] in SHIPPED_DIMS] + [
        (*c, name, over) for name, over in tiles for c in CHECKS if not c[2] or over.get("d256")]
    groups = [[c for c in cases if (c[0], c[1]) == (d, causal)] for d in dims for causal in (False, True)]
    if args.time_only:
        groups = []
        print("(skipped: --time-only)")
    with ThreadPoolExecutor(max_workers=4) as pool:
        outcomes = list(pool.map(lambda g: _child(_CHECK_CHILD, g, timeout=180), groups))
    for group, (status, res, log, secs) in zip(groups, outcomes):
        for case in group:
            d, causal, det, hq, hkv, tname, over = case
            got = res.get(json.dumps(list(case)))
            if got is None and over and not status.startswith(("HANG", "CRASH")):
                continue  # the variant has no tile at this head dim
            tag = f"D={d} causal={int(causal)} det={int(det)} H={hq}/{hkv} {tname}"
            print(f"{tag:38s} {json.dumps(got) if got else 'NO RESULT (' + status + ')'}", flush=True)
            report["checks"].append(dict(case=case, status=status if got else "missing", result=got or {}))
        if status != "ok":
            print(f"   child {status} after {secs} s; log: " + log.replace("\n", "\n   "), flush=True)
    hung = any(c["status"].startswith(("HANG", "CRASH")) for c in report["checks"])
    if args.check_only:
        return _finish(report, args)
    if hung:
        print("\nphase 1 had a hang or crash: the sm90 kernel is not timed (peers only).", flush=True)

    print("\n== phase 2: backward TFLOP/s, bf16, B*S = 16384, H*D = 2048")
    rows = [[d, s, causal] for d, s in ROWS if d in dims for causal in (False, True)]
    # Peers cannot hang: one child for all rows. The sm90 kernel gets a child per row.
    st_peers, peers_res, log_peers, _ = _child(_TIME_CHILD, ["peers:" + args.peers, rows, [], False], timeout=300)
    if st_peers != "ok":
        print(f"   peers child {st_peers}; log: " + log_peers.replace("\n", "\n   "), flush=True)
    print(f"{'D':>4} {'S':>6} {'causal':>6} | {'sm90':>7} {'sm90det':>7} {'triton':>7} {'cudnn':>7} {'fa2':>7} "
          f"{'fa4cute':>7} | sm90 / best(cudnn, fa4cute)" + "".join(f" | {t[0]:>8}" for t in tiles)
          + "".join(f" | {t[0] + ' det':>11}" for t in tiles if _timed_det(t)))
    for d, s, causal in rows:
        key = json.dumps([d, s, causal])
        if hung:
            st, mine, log = "skipped", {}, ""
        else:
            st, mine, log, _ = _child(_TIME_CHILD, ["sm90", [[d, s, causal]], tiles, args.sink],
                                      timeout=60 + 20 * len(tiles) + (60 if d == 256 else 0))
        row = dict(D=d, S=s, causal=causal, status_sm90=st, **mine.get(key, {}), **peers_res.get(key, {}))
        report["rows"].append(row)

        def num(name):
            val = row.get(name)
            return val if isinstance(val, (int, float)) else None

        def cell(name):
            val = num(name)
            return f"{val:7.1f}" if val is not None else f"{'-':>7}"
        best = max([x for x in (num("sdpa_cudnn"), num("flashattn4")) if x is not None], default=None)
        # Without a shipped tile (D = 256) the ratio is the first tile variant's.
        mine_best = num("sm90") or next((num("sm90_" + t[0]) for t in tiles if num("sm90_" + t[0])), None)
        ratio = f"{mine_best / best:.2f}x" if best and mine_best else "-"
        print(f"{d:4d} {s:6d} {int(causal):6d} | {cell('sm90')} {cell('sm90_det')} {cell('triton')} "
              f"{cell('sdpa_cudnn')} {cell('sdpa_flash')} {cell('flashattn4')} | {ratio}"
              + "".join(f" | {cell('sm90_' + t[0]):>8}" for t in tiles)
              + "".join(f" | {cell('sm90_' + t[0] + '_det'):>11}" for t in tiles if _timed_det(t)), flush=True)
        if st not in ("ok", "skipped"):
            print(f"   sm90 child {st}; log: " + log.replace("\n", "\n   "), flush=True)
        errs = {k: v for k, v in row.items() if isinstance(v, str) and v.startswith(("error", "n/a"))}
        if errs:
            print("   " + json.dumps(errs), flush=True)
    return _finish(report, args)


def _finish(report, args):
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    failed = [c for c in report["checks"] if c["status"] != "ok" or not c["result"]
              or any(str(v).startswith("FAIL") for r in c["result"].values() for v in r.values())]
    print(f"\nchecks: {len(report['checks']) - len(failed)}/{len(report['checks'])} ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
