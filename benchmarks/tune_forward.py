"""Tile configurations of the Triton forward (fa4/kernels/triton/forward.py): inspect offline, time on a GPU.

    python benchmarks/tune_forward.py time [--d 64 128 256] [--causal 0 1] [--s 1024 4096] [--quick | --new]
                                           [--only PATTERN ...] [--flex] [--json out.json]
        On a GPU: the training suite of DESIGN.md (bf16, B*S = 16384, H*D = 2048), every candidate config of
        the head dim timed with triton.testing.do_bench (median), FA2 (SDPA flash) in the same run; prints
        TFLOP/s per (shape, config), then the best config per (head dim, causal) as _TABLE lines.
        Filters (the row's table config is always timed): --s keeps those sequence lengths; --quick the first
        QUICK candidates; --new the candidates of the latest round (CANDIDATES[d][NEW_FROM[d]:]); --only those
        whose printed name contains one of the patterns (e.g. --only " ov" "w4 s3"). --flex also times
        FlexAttention (fa4.bench.peers.Flex: torch.compile(flex_attention), causal block mask) on each row
        after our configs, in the same process and harness (its first call compiles: ~10-40 s per row).
    python benchmarks/tune_forward.py sass [--cc 90 80 86] [--table | --candidates] [--check]
        No GPU needed: compiles each config ahead of time for the given compute capabilities and prints
        registers, spill bytes, shared memory and programs per SM, and notes where ptxas serializes the wgmma
        ("wgmma serialized (C751x)": each product waited right after it is issued); --check exits 1 on spills
        or on shared memory past the card's limit (tests/test_triton_forward.py runs `sass --table --check`).
        The default capabilities are 90 and 80 for --table, 90 for --candidates (they are sm_90 tiles: several
        spill under sm_80's mma.sync, which no table row uses).
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fa4.kernels.triton import forward as fwd  # noqa: E402
from tuning_common import (DTYPE_NAMES, programs_per_sm, resource_usage, smem_limit, suite_options,  # noqa: E402
                           training_suite)

C = fwd.Config
L = dict(lazy_rescale=True)
# Candidates per padded head dim (sm_90), the table's first. Axes: TMA descriptors or plain loads; maxnreg=128
# with 8 warps (two programs per SM: one's softmax under the other's wgmma); key block 32/64/128; ring depth;
# lazy rescaling of O.
CANDIDATES = {
    64: [C(128, 128, 8, 2, True, 128), C(128, 128, 8, 2, True, 128, **L), C(128, 128, 8, 3, True),
         C(128, 64, 8, 2, True), C(128, 128, 8, 2), C(128, 64, 8, 3), C(128, 128, 4, 3, True), C(64, 64, 4, 3, True)],
    128: [C(128, 64, 8, 2, True, 128), C(128, 64, 8, 2, True, 128, **L), C(128, 64, 8, 3, True),
          C(128, 128, 8, 2, True), C(128, 128, 8, 2, True, **L), C(128, 64, 8, 3), C(128, 32, 8, 3, True),
          C(64, 64, 4, 3, True)],
    256: [C(128, 64, 8, 2, True), C(128, 64, 8, 2, True, **L), C(128, 32, 8, 3, True), C(128, 32, 8, 2, True),
          C(64, 32, 4, 3, True), C(64, 64, 8, 2, True), C(128, 32, 8, 3)],
}
QUICK = 4  # --quick: the first QUICK candidates of each head dim

# Round 2, after reading FlexAttention's Triton template (torch/_inductor/kernel/flex/): on the H100 Flex runs
# 128x128 w4 s3 (D=64) and 128x64 w8 s3 (D=128) with plain loads, one key loop, no warp specialization, and its
# loop compiles to the same wgmma sequence as ours at the same tile (QK^T issued and waited together with the
# P V still in flight, softmax, P V issued, waited at the next QK^T). The new axes: `overlap` (P V of block
# j-1 under the softmax of block j, inside one program), lazy rescaling on the tiles Flex and the table use,
# and overlapped tiles that keep two programs per SM. NEW_FROM[d] is where they start (`time --new`).
O = dict(overlap=True)
NEW_FROM = {d: len(cands) for d, cands in CANDIDATES.items()}
# `sass` prints which tiles ptxas serializes (every wgmma waited right after it is issued, C751x): the D=64
# table tile is (C7511, as is Flex's identical D=64 tile), the D=128 table tile too (C7512, under its register
# cap); the overlapped 8-warp tiles at D=128 are (C7515), so only one is kept, as a control.
CANDIDATES[64] += [
    C(128, 128, 4, 3, True, **L),       # the non-causal table tile, lazy (D=64: the softmax is half the work)
    C(128, 64, 8, 3, **L),              # the causal table tile, lazy
    C(128, 64, 4, 3, True, **O),        # overlap, one warpgroup per 128 rows, two programs per SM
    C(64, 128, 4, 2, True, **O),        # overlap, 64-row tiles, two programs per SM
    C(128, 64, 8, 2, True, 128, **O),   # overlap under the 128-register cap (a few L1 spills), two per SM
    C(64, 64, 4, 3, True, **O),         # overlap, small tiles, three programs per SM
    C(128, 128, 8, 2, True, **O),       # overlap, one program per SM with 8 warps (FA3's shape, no ping-pong)
]
CANDIDATES[128] += [
    C(128, 64, 8, 3, **L),              # Flex's tile (plain loads, 3 stages), lazy
    C(64, 64, 4, 2, True, **O),         # overlap, 64-row tiles, two programs per SM
    C(64, 64, 4, 3, True, **O),         # the same with a 3-deep K/V ring (still two per SM)
    C(128, 64, 8, 2, True, **O),        # overlap, one program per SM; ptxas serializes its wgmma (control)
]

# Round 3 (session 6), after benchmarks/ws_probe.py: a minimal one-warpgroup kernel (4 warps, 128 x 64, 2 stages,
# every block masked under causal) beat the table's 8-warp tile at D = 128 S = 1024 (429 vs 396 TFLOP/s,
# causal 302 vs 284; H100). The new axis: one warpgroup owning all 128 rows with two m64 wgmma chains (ILP inside
# the warpgroup), two programs per SM by shared memory, no register cap.
NEW_FROM = {d: len(cands) for d, cands in CANDIDATES.items()}
CANDIDATES[64] += [
    C(128, 64, 4, 2, True), C(128, 128, 4, 2, True), C(128, 64, 4, 3, True), C(128, 128, 4, 4, True),
    C(64, 128, 4, 3, True),
]
CANDIDATES[64] += [C(128, 64, 4, 2, True, **O), C(128, 64, 4, 4, True, **O)]  # the causal table tile's ring depth
CANDIDATES[128] += [
    C(128, 64, 4, 2, True), C(128, 64, 4, 2, True, **L), C(128, 64, 4, 3, True), C(128, 128, 4, 2, True),
    C(128, 32, 4, 3, True), C(64, 128, 4, 2, True), C(64, 64, 4, 2, True),
]

# Up to four registers parked in local memory (a few STL/LDL per loop iteration, L1-resident) are tolerated:
# that is what the 128-register cap costs some feature mixes. Anything larger fails --check.
MINOR_SPILL_BYTES = 16


def _fmt(cfg):
    return "%dx%d w%d s%d%s%s%s%s" % (cfg.block_m, cfg.block_n, cfg.num_warps, cfg.num_stages,
                                      " tma" if cfg.tma else "", " r%d" % cfg.maxnreg if cfg.maxnreg else "",
                                      " lazy" if cfg.lazy_rescale else "", " ov" if cfg.overlap else "")


# ----------------------------------------------------------------------------------------------------------
# time: on the GPU
# ----------------------------------------------------------------------------------------------------------

def _geomean(values):
    if any(v is None or v != v for v in values):
        return float("-inf")  # a config that failed (or was not run) on some row never wins
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _time(fn):
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _ptxas():
    """The ptxas Triton compiles with now (torch.compile may point TRITON_PTXAS_PATH at torch's own)."""
    try:
        from triton import knobs
        tool = knobs.nvidia.ptxas
        return f"{tool.path} ({tool.version})"
    except Exception as exc:  # noqa: BLE001 (informational only)
        return f"? ({type(exc).__name__})"


def _time_flex(q, k, v, causal, flops, ref):
    """FlexAttention as the bench calls it (fa4.bench.peers.Flex) -> (TFLOP/s or nan, note)."""
    from fa4.bench.peers import Flex
    before = _ptxas()
    t0 = time.time()
    try:
        fn = Flex().training(causal)
        out = fn(q, k, v)
        torch.cuda.synchronize()
        first = time.time() - t0
        err = (out.float() - ref.float()).abs().max().item()
        tflops = flops / _time(lambda: fn(q, k, v)) * 1e-9
        note = f"max|err| vs SDPA {err:.1e}  (first call {first:.1f}s)"
        if err >= 0.05:
            tflops, note = float("nan"), note + "  WRONG (excluded)"
    except Exception as exc:  # noqa: BLE001
        tflops, note = float("nan"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    after = _ptxas()
    if after != before:
        note += f"  (ptxas changed: {before} -> {after})"
    return tflops, note


def _time_row(d, s, b, h, causal, candidates, flex=False):
    """FA2 and every candidate on one training-suite shape -> {"fa2": TFLOP/s, "configs": {name: TFLOP/s}}
    (and "flex": TFLOP/s when asked)."""
    dev = torch.device("cuda")
    q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # SDPA's (B, H, S, D) views
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ref = sdpa(qt, kt, vt, is_causal=causal).transpose(1, 2)
    row = dict(D=d, S=s, B=b, H=h, causal=causal, configs={})
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        row["fa2"] = flops / _time(lambda: sdpa(qt, kt, vt, is_causal=causal)) * 1e-9
    print(f"D={d:3d} S={s:5d} B={b:2d} H={h:2d} causal={int(causal)}  FA2 {row['fa2']:6.1f} TFLOP/s")
    for cfg in candidates:
        def fn(cfg=cfg):
            return fwd.forward_with_config(q, k, v, config=cfg, **suite_options(d, causal))
        t0 = time.time()
        try:
            out, _ = fn()
            torch.cuda.synchronize()
            err = (out.float() - ref.float()).abs().max().item()
            tflops = flops / _time(fn) * 1e-9
            ok = err < 0.05  # against SDPA in bf16: catches garbage, not rounding
            note = f"max|err| vs SDPA {err:.1e}" + ("" if ok else "  WRONG (excluded)")
        except Exception as exc:  # noqa: BLE001 (a config that cannot launch is a result too)
            tflops, ok, note = float("nan"), False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        row["configs"][_fmt(cfg)] = tflops if ok else float("nan")
        print(f"    {_fmt(cfg):30s} {tflops:6.1f} TFLOP/s  {tflops / row['fa2']:5.2f}x FA2  {note}"
              f"  (first call {time.time() - t0:.1f}s)")
        sys.stdout.flush()
    if flex:
        # After our configs: compiling Flex may repoint TRITON_PTXAS_PATH for the rest of the process.
        row["flex"], note = _time_flex(q, k, v, causal, flops, ref)
        print(f"    {'flex (torch.compile)':30s} {row['flex']:6.1f} TFLOP/s  {row['flex'] / row['fa2']:5.2f}x FA2"
              f"  {note}")
        sys.stdout.flush()
    return row


def _table_config(dev, d, causal):
    return fwd.default_config(dev, torch.bfloat16, d, d, causal)


def select_candidates(d, causal, table, quick=False, new=False, only=None):
    """The configs one row times: the candidates left by the filters, and the row's table config first."""
    cands = list(CANDIDATES[d])
    if quick:
        cands = cands[:QUICK]
    if new:
        cands = cands[NEW_FROM[d]:]
    if only:
        cands = [cfg for cfg in cands if any(pat in _fmt(cfg) for pat in only)]
    if table is not None:
        cands = [table] + [cfg for cfg in cands if cfg != table]
    return cands


def cmd_time(args):
    import triton
    assert torch.cuda.is_available(), "`time` needs a CUDA GPU"
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {triton.__version__}")
    print(f"# ptxas: {_ptxas()}")
    results = []
    for d, s, b, h, causal in training_suite(args.d, args.causal):
        if args.s and s not in args.s:
            continue
        cands = select_candidates(d, causal, _table_config(dev, d, causal), args.quick, args.new, args.only)
        results.append(_time_row(d, s, b, h, causal, cands, flex=args.flex))
        torch.cuda.empty_cache()

    print("\n# Summary: TFLOP/s of the default (table) config and of the best candidate per row")
    print(f"{'D':>3} {'S':>5} {'causal':>6} {'FA2':>6} {'flex':>6} {'table':>6} {'best':>6} {'best/FA2':>8} "
          f"{'best/flex':>9}  best config")
    for row in results:
        table = _fmt(_table_config(dev, row["D"], row["causal"]))
        best = max(row["configs"].items(), key=lambda kv: -1 if kv[1] != kv[1] else kv[1])
        flex = row.get("flex", float("nan"))
        print(f"{row['D']:3d} {row['S']:5d} {int(row['causal']):6d} {row['fa2']:6.1f} {flex:6.1f} "
              f"{row['configs'].get(table, float('nan')):6.1f} {best[1]:6.1f} {best[1] / row['fa2']:8.2f} "
              f"{best[1] / flex:9.2f}  {best[0]}")
    print("\n# Suggested _TABLE rows: per (head dim, causal), the config with the best geometric mean")
    for d in args.d:
        for causal in args.causal:
            rows = [r for r in results if r["D"] == d and r["causal"] == causal]
            if rows:
                best = max(CANDIDATES[d], key=lambda cfg: _geomean([r["configs"].get(_fmt(cfg)) for r in rows]))
                print(f'    ("sm90", {d}, {causal}): {best!r},')
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(card=torch.cuda.get_device_name(dev), torch=torch.__version__,
                           triton=triton.__version__, date=time.strftime("%Y-%m-%d"), rows=results), f, indent=1)


# ----------------------------------------------------------------------------------------------------------
# sass: ahead-of-time compile, no GPU
# ----------------------------------------------------------------------------------------------------------

# Feature mixes compiled by `sass`: each flips constexpr flags that change the kernel's registers.
FEATURES = {
    "plain": dict(),
    "causal": dict(window_right=0),
    "window+softcap+sink": dict(window_left=100, window_right=0, softcap=30.0, sink=True),
    "varlen causal": dict(window_right=0, varlen=True),
    "paged causal": dict(window_right=0, varlen=True, page_size=16),
}


def _is_causal(feature):
    """Whether forward.default_config files this feature mix under the causal table rows."""
    return feature.get("window_right", -1) == 0 and feature.get("window_left", -1) < 0


def aot_compile(cc, cfg, dtype=torch.bfloat16, d=128, dv=None, feature="plain"):
    """Compile the forward kernel for compute capability `cc` as a launch of `cfg` would specialise it.

    Returns (compiled kernel, config actually compiled: TMA configs lose TMA and their cap below sm_90)."""
    import triton
    from triton.backends.compiler import GPUTarget
    dv = dv or d
    f = dict(FEATURES[feature])
    varlen, sink, page_size = f.pop("varlen", False), f.pop("sink", False), f.pop("page_size", 0)
    opts = dict(suite_options(d, False), **f, sink=torch.zeros(4) if sink else None)
    if varlen:
        q, k = torch.empty(512, 4, d, dtype=dtype), torch.empty(512, 4, d, dtype=dtype)
        v = torch.empty(512, 4, dv, dtype=dtype)
        cu = torch.tensor([0, 256, 512], dtype=torch.int32)
        opts.update(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=256, max_seqlen_k=256)
        if page_size:  # page_size 16 < BLOCK_N: the per-row gather through the page table
            k, v = k.view(-1, page_size, 4, d), v.view(-1, page_size, 4, dv)
            opts.update(cu_seqlens_k=None, page_table=torch.zeros(2, 16, dtype=torch.int32),
                        seqused_k=torch.tensor([256, 256], dtype=torch.int32))
    else:
        q, k = torch.empty(2, 256, 4, d, dtype=dtype), torch.empty(2, 256, 4, d, dtype=dtype)
        v = torch.empty(2, 256, 4, dv, dtype=dtype)
    _, _, launch = fwd.prepare(q, k, v, **opts)
    launch["tma_ok"] = launch["tma_ok"] and cc >= 90  # CPU tensors stand in for aligned device tensors
    _, args, constexprs, cfg = fwd.kernel_call(launch, cfg)
    kernel = fwd._fwd_kernel
    signature, attrs, consts = {}, {}, dict(constexprs)
    for i, (param, arg) in enumerate(zip(kernel.params, args)):
        # As the launcher specialises: pointers and ints divisible by 16 get the divisibility attribute,
        # ints equal to 1 become constants.
        if isinstance(arg, torch.Tensor):
            signature[param.name] = "*" + DTYPE_NAMES[arg.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(arg, int) and arg == 1:
            signature[param.name], consts[param.name] = "constexpr", 1
        elif isinstance(arg, int):
            signature[param.name] = "i32"
            if arg % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[param.name] = "fp32"
    for name in constexprs:
        signature[name] = "constexpr"
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.maxnreg:
        options["maxnreg"] = cfg.maxnreg
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options), cfg


def _table_configs(cc):
    """(head dim, feature, config) for the table's rows of this architecture, each under every feature mix
    that matches its causal flag."""
    arch = {90: "sm90", 100: "sm100", 80: "sm80"}.get(cc, "small")
    jobs = []
    for (a, d, causal), cfg in fwd._TABLE.items():
        if a == arch:
            jobs += [(d, feat, cfg) for feat, f in FEATURES.items() if _is_causal(f) == causal]
    return jobs


def wgmma_serialization(compiled, cc):
    """ptxas's C751x notes for this kernel: codes of the reasons it serializes wgmma (each one waited right
    after it is issued: no tensor-core overlap inside a warpgroup), '' when it does not. Reassembles the PTX
    with Triton's ptxas and -v (Triton keeps no log); sm_90+ only."""
    if cc < 90:
        return ""
    from triton.backends.nvidia.compiler import get_ptxas
    arch = f"sm_{cc}a" if cc in (90, 100) else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        proc = subprocess.run([get_ptxas(cc).path, "-v", f"--gpu-name={arch}", src, "-o", out],
                              capture_output=True, text=True)
    return ",".join(sorted(set(re.findall(r"\((C75\d\d)\)[^\n]*serialized", proc.stdout + proc.stderr))))


def cmd_sass(args):
    bad = 0
    for cc in args.cc:
        if args.candidates:
            jobs = [(d, feat, cfg) for d, cfgs in CANDIDATES.items() for cfg in cfgs for feat in ("plain", "causal")]
        else:
            jobs = _table_configs(cc)
        for d, feat, cfg in jobs:
            t0 = time.time()
            compiled, use = aot_compile(cc, cfg, d=d, feature=feat)
            u = resource_usage(compiled)
            threads = 32 * use.num_warps
            per_sm = programs_per_sm(cc, threads, u["regs"], u["smem"])
            problems, notes = [], []
            if u["stack"] > MINOR_SPILL_BYTES:
                problems.append("SPILLS")
            elif u["stack"] or u["ldl_stl"]:
                notes.append(f"minor spill ({u['ldl_stl']} LDL/STL)")
            if u["smem"] > smem_limit(cc):
                problems.append("SMEM > limit")
            serial = wgmma_serialization(compiled, cc)
            if serial:
                notes.append(f"wgmma serialized ({serial})")
            bad += bool(problems)
            print(f"sm_{cc} D={d:3d} {feat:19s} {_fmt(use):26s} regs {u['regs']:3d} stack {u['stack']:4d} "
                  f"smem {u['smem'] // 1024:3d} KiB  programs/SM {per_sm}  hgmma {u['hgmma']:3d} hmma {u['hmma']:4d}"
                  f"  {' '.join(problems + notes) or 'ok'}  ({time.time() - t0:.1f}s)")
            sys.stdout.flush()
    if not args.candidates and 90 in args.cc:
        bad += _sass_lean()
    if args.check and bad:
        print(f"{bad} config(s) spill or overflow shared memory")
        sys.exit(1)


def lean_aot_compile(cc, cfg, d, causal):
    """Compile forward_lean's kernel for compute capability `cc` as a batched bf16 launch of `cfg` would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from fa4.kernels.triton import forward_lean
    if cfg.host_desc:
        kernel = forward_lean._lean_fwd_host_desc_kernel
        consts = dict(HEAD_D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal, SPLIT=cfg.split)
        rows = dict(q_desc=cfg.block_m, o_desc=cfg.block_m, k_desc=cfg.block_n, v_desc=cfg.block_n)
    else:
        kernel = forward_lean._lean_fwd_kernel
        consts = dict(HEAD_D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal, WARP_SPEC=cfg.warp_spec)
        rows = {}
    signature, attrs = {}, {}
    for i, param in enumerate(kernel.params):
        name = param.name
        if name in consts:
            signature[name] = "constexpr"
        elif name in rows:  # a host-built descriptor over the (B, H, S, D) view, one [1, 1, rows, D] box
            signature[name] = f"tensordesc<bf16[1, 1, {rows[name]}, {d}]>"
        elif name in ("Q", "K", "V", "Out"):
            signature[name], attrs[(i,)] = "*bf16", [["tt.divisibility", 16]]
        elif name == "Lse":
            signature[name], attrs[(i,)] = "*fp32", [["tt.divisibility", 16]]
        elif name == "qk_scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride_") and name[-1] in "bs":  # row and batch strides: multiples of 16
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options=dict(num_warps=4, num_stages=cfg.num_stages))


def _sass_lean():
    """forward_lean.TABLE's tiles for sm_90: no spills, shared memory within the limit, and the warp
    specializer engaged where the tile asks for it (it skips a loop it cannot split without saying so).
    Returns the number of bad tiles."""
    from fa4.kernels.triton import forward_lean
    bad = 0
    for (arch, d, causal), rows in forward_lean.TABLE.items():
        for bound, cfg in rows:
            t0 = time.time()
            compiled = lean_aot_compile(90, cfg, d, causal)
            u = resource_usage(compiled)
            engaged = "ttg.warp_specialize" in compiled.asm["ttgir"]
            problems = (["SPILLS"] if u["stack"] > MINOR_SPILL_BYTES else []) + \
                (["SMEM > limit"] if u["smem"] > smem_limit(90) else [])
            if u["stack"] and not problems:
                problems_note = f"minor spill ({u['ldl_stl']} LDL/STL, {u['loop_spills']} in loops)"
            else:
                problems_note = ""
            if engaged != cfg.warp_spec:
                problems.append("warp specialization " + ("not engaged" if cfg.warp_spec else "unexpected"))
            bad += bool(problems)
            print(f"sm_90 D={d:3d} lean {'causal' if causal else 'plain':6s} Sq<={bound or 'any':<5} "
                  f"{cfg.block_m}x{cfg.block_n} s{cfg.num_stages}{' ws' if cfg.warp_spec else ''}"
                  f"{' hd' if cfg.host_desc else ''}{' sp' if cfg.split else ''}  warps "
                  f"{compiled.metadata.num_warps:2d} regs {u['regs']:3d} stack {u['stack']:4d} smem "
                  f"{u['smem'] // 1024:3d} KiB  hgmma {u['hgmma']:3d}  {' '.join(problems) or problems_note or 'ok'}"
                  f"  ({time.time() - t0:.1f}s)")
            sys.stdout.flush()
    return bad


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("time", help="time candidate configs on the GPU")
    t.add_argument("--d", type=int, nargs="+", default=[64, 128, 256])
    t.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    t.add_argument("--s", type=int, nargs="+", help="only these sequence lengths")
    t.add_argument("--quick", action="store_true", help=f"only the first {QUICK} candidates per head dim")
    t.add_argument("--new", action="store_true", help="only the latest round's candidates (from NEW_FROM)")
    t.add_argument("--only", nargs="+", metavar="PATTERN",
                   help="only candidates whose printed name contains one of these (e.g. ' ov' 'w4 s3')")
    t.add_argument("--flex", action="store_true", help="also time FlexAttention on each row (after ours)")
    t.add_argument("--json", help="also write the measurements here")
    s = sub.add_parser("sass", help="compile ahead of time and report registers/spills (no GPU)")
    s.add_argument("--cc", type=int, nargs="+", help="compute capabilities (default 90 80; 90 for --candidates)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--table", action="store_true", help="the configs of forward._TABLE (default)")
    g.add_argument("--candidates", action="store_true", help="the tuning candidates")
    s.add_argument("--check", action="store_true", help="exit 1 on spills or shared memory overflow")
    args = parser.parse_args()
    if args.cmd == "time":
        args.causal = [bool(c) for c in args.causal]
        cmd_time(args)
    else:
        if args.cc is None:
            args.cc = [90] if args.candidates else [90, 80]
        cmd_sass(args)


if __name__ == "__main__":
    main()
