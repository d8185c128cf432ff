"""Launch configurations of the Triton backward (fa4/kernels/triton/backward.py): time on a GPU, inspect offline.

    python benchmarks/tune_backward.py time [--d 64 128 256] [--causal 0 1] [--quick | --last N] [--jobs 16]
                                            [--json PATH]
        On a GPU: DESIGN.md's training suite (bf16, B*S = 16384, H*D = 2048). Per row: FA2 (SDPA flash) backward,
        every candidate config of the head dim, and deterministic=True with the table config, all timed with
        triton.testing.do_bench (median, cold L2); each candidate's gradients are checked against FA2's first.
        Prints TFLOP/s (backward FLOPs = 2.5 x forward), then the best config per head dim as _CONFIGS lines
        to paste into backward.py. --jobs compiles every variant first in parallel worker processes.
    python benchmarks/tune_backward.py sass [--cc 90 80] [--d 64 128 256] [--table | --candidates] [--check]
        No GPU needed: compiles each config's kernels ahead of time for the given compute capabilities and
        prints registers, spill bytes, shared memory, programs per SM and tensor-core instruction counts;
        --check exits 1 on register spills inside the loops or shared memory past the card's limit
        (tests/test_triton_backward.py runs `sass --table --check`).
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fa4.kernels.triton import backward as bwd  # noqa: E402
from tuning_common import (DTYPE_NAMES, programs_per_sm, resource_usage, smem_limit, suite_options,  # noqa: E402
                           training_suite)

C = bwd.BwdConfig
# Candidates per padded head dim for sm_90, the first QUICK of each are the most promising (offline: no spills).
# C(block_m1, block_n1, warps1, stages1, block_m2, block_n2, warps2, stages2, dq_atomic, split_dkdv, dq_transposed)
CANDIDATES = {
    64: [C(64, 128, 8, 2, 128, 64, 8, 2, True), C(64, 128, 8, 3, 128, 64, 8, 3, True, False, True),
         C(64, 128, 8, 3, 128, 64, 8, 3, False), C(32, 128, 8, 3, 128, 64, 8, 3, True, False, True),
         C(64, 128, 8, 3, 128, 64, 8, 3, True), C(64, 128, 8, 2, 128, 128, 8, 2, False),
         C(64, 64, 4, 3, 64, 64, 4, 3, True), C(32, 128, 8, 3, 128, 32, 8, 3, False)],
    128: [C(32, 128, 8, 2, 128, 64, 8, 2, True, False, True), C(64, 128, 8, 2, 128, 64, 8, 2, False),
          C(64, 128, 8, 2, 128, 64, 8, 2, True), C(32, 128, 8, 3, 128, 64, 8, 3, False),
          C(32, 128, 8, 3, 128, 64, 8, 3, True, False, True), C(64, 128, 8, 3, 128, 64, 8, 3, False),
          C(64, 64, 4, 2, 64, 64, 4, 2, True), C(128, 64, 8, 2, 128, 64, 8, 2, False)],
    256: [C(32, 128, 8, 2, 64, 32, 8, 2, False, True), C(16, 64, 8, 2, 64, 32, 8, 2, False),
          C(32, 128, 8, 2, 128, 32, 8, 2, False, True), C(16, 128, 8, 2, 64, 32, 8, 2, True, True, True),
          C(32, 128, 8, 2, 64, 32, 8, 2, True, True, True), C(16, 64, 8, 3, 64, 32, 8, 3, False),
          C(64, 64, 8, 2, 64, 64, 8, 2, False), C(32, 64, 4, 2, 64, 32, 4, 2, False, True)],
}
QUICK = 4
# Session 6: the D = 256 split's dV pass on its own tile (BwdConfig.dv_pass), the dK pass on the table's or on
# 16-query steps. The dV pass has two products and one accumulator, so it has the registers for a deeper ring.
# All compile spill-free. Round 1 (H100): dv 32x128 s3 +4-8% over the table; dv 64x64 w8 -9% to -19% (dropped).
_D256 = CANDIDATES[256][4]  # the table's tile: 32x128 w8 s2, split, transposed atomic dQ
CANDIDATES[256] += [dataclasses.replace(_D256, dv_pass=(32, 128, 8, 3)),
                    dataclasses.replace(_D256, dv_pass=(32, 128, 8, 4)),
                    dataclasses.replace(_D256, dv_pass=(16, 128, 8, 4)),
                    dataclasses.replace(_D256, block_m1=16, dv_pass=(32, 128, 8, 3)),
                    dataclasses.replace(_D256, block_m1=16, stages1=3, dv_pass=(32, 128, 8, 3))]
# Up to two local-memory accesses inside a loop (one register parked in L1 per iteration) are tolerated: the
# D = 256 causal dK pass with atomic dQ has one and still measured 6-10% faster than the spill-free dQ-kernel
# config (results/raw/h100-2026-11-25-tune-backward-r1.log). Anything larger fails --check.
MINOR_LOOP_SPILLS = 2



def _fmt(cfg):
    dq = "dq-atomic" + ("-T" if cfg.dq_transposed else "") if cfg.dq_atomic else \
        f"dq-kernel {cfg.block_m2}x{cfg.block_n2} w{cfg.warps2} s{cfg.stages2}"
    dv = " dv %dx%d w%d s%d" % cfg.dv_pass if cfg.dv_pass else ""
    return (f"{cfg.block_m1}x{cfg.block_n1} w{cfg.warps1} s{cfg.stages1}{' split' if cfg.split_dkdv else ''}{dv} "
            f"{dq}")


def _literal(cfg):
    fields = [getattr(cfg, f.name) for f in dataclasses.fields(cfg)]
    return "BwdConfig(" + ", ".join(str(x) for x in fields) + ")"


# ----------------------------------------------------------------------------------------------------------
# time: on the GPU
# ----------------------------------------------------------------------------------------------------------

def _problem(b, s, h, d, causal, dev):
    """q, k, v, dout (B, S, H, D) bf16 and the FA2 forward's out (a (B, S, H, D) view) and lse (B, H, S)."""
    q, k, v, dout = (torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16) for _ in range(4))
    res = torch.ops.aten._scaled_dot_product_flash_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, False, scale=d ** -0.5)
    out, lse = res[0].transpose(1, 2), res[1][..., :s].contiguous()
    return q, k, v, dout, out, lse


def _warm_one(job):
    """Worker process: compile one (row, config, deterministic) variant through a small call of the same
    specialisation (integer arguments keep their divisibility by 16), filling Triton's on-disk cache."""
    d, h, causal, cfg, det = job
    q, k, v, dout, out, lse = _problem(1, 256, h, d, causal, torch.device("cuda"))
    try:
        bwd.backward(dout, q, k, v, out, lse, None, deterministic=det, config=cfg, **suite_options(d, causal))
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # noqa: BLE001 (reported, then the timing pass reports it again)
        return f"{_fmt(cfg)}: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"


def _precompile(rows, cands, jobs):
    import concurrent.futures
    import multiprocessing
    work = set()
    for d, _, _, h, causal in rows:
        table = bwd.table_config(bwd.arch_class(torch.cuda.get_device_capability()), d, causal)
        for cfg in cands[d] + [table]:
            work.add((d, h, causal, cfg, False))
        work.add((d, h, causal, table, True))
    t0 = time.time()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as ex:
        for err in ex.map(_warm_one, sorted(work, key=str)):
            if err:
                print("  precompile:", err)
    print(f"# precompiled {len(work)} variants with {jobs} workers in {time.time() - t0:.0f}s")
    sys.stdout.flush()


def _time(fn):
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _rel_err(got, ref):
    return max(((g.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-6)).item()
               for g, r in zip(got, ref))


def _time_row(d, s, b, h, causal, cands, table, dev):
    """One training-suite row: FA2's backward, then each candidate and deterministic=True with the table config."""
    q, k, v, dout, out, lse = _problem(b, s, h, d, causal, dev)
    flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
    leaves = [t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v)]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        o = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=causal)
    do_t = dout.transpose(1, 2)
    ref = [g.transpose(1, 2) for g in torch.autograd.grad(o, leaves, do_t, retain_graph=True)]
    ms = _time(lambda: torch.autograd.grad(o, leaves, do_t, retain_graph=True))
    row = dict(D=d, S=s, B=b, H=h, causal=causal, fa2=flops / ms * 1e-9, configs={})
    print(f"D={d:3d} S={s:5d} B={b:2d} H={h:2d} causal={int(causal)}  FA2 {row['fa2']:6.1f} TFLOP/s")
    variants = [(cfg, False) for cfg in cands] + ([] if table in cands else [(table, False)]) + [(table, True)]
    for cfg, det in variants:
        name = _fmt(cfg) + (" [deterministic]" if det else "")

        def fn(cfg=cfg, det=det):
            return bwd.backward(dout, q, k, v, out, lse, None, deterministic=det, config=cfg,
                                **suite_options(d, causal))
        t0 = time.time()
        try:
            err = _rel_err(fn()[:3], ref)
            ok = err < 2e-2
            tflops = flops / _time(fn) * 1e-9 if ok else float("nan")
            note = f"rel err {err:.1e}" + ("" if ok else "  WRONG")
        except Exception as exc:  # noqa: BLE001 (a config that cannot launch is a result too)
            tflops, note = float("nan"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
        row["configs"]["deterministic" if det else name] = tflops
        if cfg == table and not det:
            row["table"] = tflops
        print(f"    {name:48s} {tflops:6.1f} TFLOP/s  {tflops / row['fa2']:5.2f}x FA2  {note}"
              f"  ({time.time() - t0:.1f}s)")
        sys.stdout.flush()
    return row


def cmd_time(args):
    import triton
    assert torch.cuda.is_available(), "`time` needs a CUDA GPU"
    dev = torch.device("cuda")
    major, minor = torch.cuda.get_device_capability(dev)
    print(f"# {torch.cuda.get_device_name(dev)} (sm_{major}{minor}), torch {torch.__version__}, "
          f"triton {triton.__version__}")
    rows = training_suite(args.d, args.causal)
    cands = {d: (CANDIDATES[d][:QUICK] if args.quick else CANDIDATES[d]) for d in args.d}
    if args.last:
        cands = {d: CANDIDATES[d][-args.last:] for d in args.d}
    if args.jobs > 1:
        _precompile(rows, cands, args.jobs)
    results = []
    for d, s, b, h, causal in rows:
        table = bwd.table_config(bwd.arch_class((major, minor)), d, causal)
        results.append(_time_row(d, s, b, h, causal, cands[d], table, dev))
        torch.cuda.empty_cache()

    print("\n# Summary (TFLOP/s): FA2, the table config, the best candidate, deterministic=True with the table")
    print(f"{'D':>3} {'S':>5} {'causal':>6} {'FA2':>6} {'table':>6} {'best':>6} {'det':>6}  best config")
    for row in results:
        cfgs = {k: v for k, v in row["configs"].items() if k != "deterministic"}
        best = max(cfgs.items(), key=lambda kv: -1 if kv[1] != kv[1] else kv[1])
        print(f"{row['D']:3d} {row['S']:5d} {int(row['causal']):6d} {row['fa2']:6.1f} "
              f"{row.get('table', float('nan')):6.1f} {best[1]:6.1f} {row['configs']['deterministic']:6.1f}  "
              f"{best[0]}")
    print("\n# Suggested _CONFIGS lines (best geometric mean of TFLOP/s over the head dim's rows)")
    for d in args.d:
        drows = [r for r in results if r["D"] == d]
        if not drows:
            continue

        def score(cfg):
            vals = [r["configs"].get(_fmt(cfg), float("nan")) for r in drows]
            return float("-inf") if any(x != x for x in vals) else sum(math.log(x) for x in vals)
        best = max(cands[d], key=score)
        print(f'    ("sm90", {d}): {_literal(best)},')
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(card=torch.cuda.get_device_name(dev), torch=torch.__version__,
                           triton=triton.__version__, date=time.strftime("%Y-%m-%d"), rows=results), f, indent=1)


# ----------------------------------------------------------------------------------------------------------
# sass: ahead-of-time compile, no GPU
# ----------------------------------------------------------------------------------------------------------

def aot_launches(cfg, d, causal, dtype=torch.bfloat16, deterministic=False):
    """The backward's launches for a (B, S, H, D) training-suite-like problem, built on CPU tensors."""
    h = max(2048 // d, 1)
    q, k, v, dout, out = (torch.empty(2, 256, h, d, dtype=dtype) for _ in range(5))
    lse = torch.empty(2, h, 256)
    launches, _ = bwd.plan(dout, q, k, v, out, lse, None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None,
                           max_seqlen_q=None, max_seqlen_k=None, page_table=None, deterministic=deterministic,
                           config=cfg, **suite_options(d, causal))
    return launches


def aot_compile(launch, cc):
    """Compile one launch for compute capability cc as the launcher would specialise it."""
    import triton
    from triton.backends.compiler import GPUTarget
    kernel = launch.kernel
    signature, attrs, consts = {}, {}, dict(launch.constexprs)
    for i, (param, arg) in enumerate(zip(kernel.params, launch.args)):
        # Pointers and ints divisible by 16 get the divisibility attribute, ints equal to 1 become constants.
        if arg is None:
            # An absent optional pointer: a None constant, as the launcher specialises it (Triton 3.8 rejects the
            # scalar type this used to get).
            signature[param.name], consts[param.name] = "constexpr", None
        elif isinstance(arg, torch.Tensor):
            signature[param.name] = "*" + DTYPE_NAMES[arg.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(arg, bool):
            signature[param.name] = "i1"
        elif isinstance(arg, int) and arg == 1:
            signature[param.name], consts[param.name] = "constexpr", 1
        elif isinstance(arg, int):
            signature[param.name] = "i32"
            if arg % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[param.name] = "fp32"
    for name in launch.constexprs:
        signature[name] = "constexpr"
    for param in kernel.params:
        # Constexpr parameters the launch leaves at their default (Triton 3.8 needs them named).
        if param.name not in signature and param.is_constexpr and param.has_default:
            signature[param.name], consts[param.name] = "constexpr", param.default
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options=dict(num_warps=launch.num_warps, num_stages=launch.num_stages))


def _jobs(args, cc):
    arch = bwd.arch_class(divmod(cc, 10))
    jobs = []
    for d in args.d:
        if args.candidates:
            jobs += [(d, causal, cfg, False) for cfg in CANDIDATES[d] for causal in args.causal]
            continue
        for causal in args.causal:  # the table: per mask, as default_config picks it
            cfg = bwd.table_config(arch, d, bool(causal))
            jobs.append((d, causal, cfg, False))
            if cfg.dq_atomic and causal:
                jobs.append((d, True, cfg, True))  # the deterministic path's kernels
    return jobs


def cmd_sass(args):
    bad = 0
    for cc in args.cc:
        for d, causal, cfg, det in _jobs(args, cc):
            for launch in aot_launches(cfg, d, causal, deterministic=det):
                name = launch.kernel.__name__
                if name == "_bwd_preprocess" and (det or causal):
                    continue  # the same kernel for every config
                t0 = time.time()
                u = resource_usage(aot_compile(launch, cc))
                threads = 32 * launch.num_warps
                per_sm = programs_per_sm(cc, threads, u["regs"], u["smem"])
                problems = []
                if u["loop_spills"] > MINOR_LOOP_SPILLS:
                    problems.append("SPILLS IN LOOPS")
                if u["smem"] > smem_limit(cc):
                    problems.append("SMEM > limit")
                bad += bool(problems)
                part = name.replace("_bwd_", "")
                if name == "_bwd_dkdv_kernel":
                    part = {(True, True): "dkdv", (True, False): "dk", (False, True): "dv"}[
                        (launch.constexprs["COMPUTE_DK"], launch.constexprs["COMPUTE_DV"])]
                    part += "+dq" if launch.constexprs["DQ_ATOMIC"] else ""
                print(f"sm_{cc} D={d:3d} causal={int(causal)}{' det' if det else '    '} {_fmt(cfg):44s} "
                      f"{part:10s} regs {u['regs']:3d} stack {u['stack']:3d} loop spills: {u['loop_spills']} "
                      f"smem {u['smem'] // 1024:3d} KiB programs/SM {per_sm} hgmma {u['hgmma']:3d} "
                      f"hmma {u['hmma']:3d}  {' '.join(problems) or 'ok'} ({time.time() - t0:.1f}s)")
                sys.stdout.flush()
    if args.check and bad:
        print(f"{bad} kernel(s) spill in their loops or overflow shared memory")
        sys.exit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("time", help="time candidate configs on the GPU")
    t.add_argument("--last", type=int, default=0, help="only the last N candidates per head dim (and the table)")
    t.add_argument("--d", type=int, nargs="+", default=[64, 128, 256])
    t.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    t.add_argument("--quick", action="store_true", help=f"only the first {QUICK} candidates per head dim")
    t.add_argument("--jobs", type=int, default=16, help="parallel compile workers (1: compile while timing)")
    t.add_argument("--json", help="also write the measurements here")
    s = sub.add_parser("sass", help="compile ahead of time and report registers/spills (no GPU)")
    s.add_argument("--cc", type=int, nargs="+", default=[90, 80])
    s.add_argument("--d", type=int, nargs="+", default=[64, 128, 256])
    s.add_argument("--causal", type=int, nargs="+", default=[0])
    g = s.add_mutually_exclusive_group()
    g.add_argument("--table", action="store_true", help="the configs of backward._CONFIGS (default)")
    g.add_argument("--candidates", action="store_true", help="the tuning candidates")
    s.add_argument("--check", action="store_true", help="exit 1 on spills or shared memory overflow")
    args = parser.parse_args()
    if args.cmd == "time":
        args.causal = [bool(c) for c in args.causal]
        cmd_time(args)
    else:
        args.causal = [bool(c) for c in args.causal]
        cmd_sass(args)


if __name__ == "__main__":
    main()
