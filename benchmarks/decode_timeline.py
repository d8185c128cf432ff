"""Where a decode step's time goes besides streaming K and V: a per-program timeline of the split-KV kernel and
its combine, beside a plain streaming read of the same bytes.

    python benchmarks/decode_timeline.py [--rows 1:8192,1:65536,8:8192,64:8192] [--layouts contig,paged]
                                         [--reps 30] [--splits 16,33] [--even]

Session 10 fitted the contiguous decode rows to t = bytes / 3,140 GB/s + 9.1 µs: every call pays ~9 µs besides
its bytes, 9% of a 268 MB step. This probe splits that cost up, per row and layout (read-only L2 flush before
each call, as the decode suite times it):

- `step`: the public call's median time (CUDA events), GB/s.
- `read`: a streaming sum over one buffer holding exactly the step's K and V bytes (torch.sum, one launch), the
  same flush: what a plain read of those bytes costs, fixed cost included.
- The trace build (a copy of decode.py / combine.py with %globaltimer stamps patched in, never shipped): per
  program its start and end and SM; per combine program the return of griddepcontrol.wait and its end.
  Reported as medians over the repetitions, in µs from the first program's start:
  `span` (first start to last attention end), `start99` (when 99% of the programs had started), `end10/50/90`
  (the programs' end times by percentile), `comb` (last attention end to last combine end), and `outside`
  (event time minus the traced span: launch latency and teardown outside the kernels).
- `--splits`: the same step with other split counts; `--even`: the kernel's key range handed out as evenly as
  tiles allow (split s gets floor or ceil of tiles / splits) instead of ceil-sized chunks, so that e.g.
  33 splits at B = 1 run 264 programs of 31-32 tiles, two a program per SM (a probe variant only).
"""
import argparse
import importlib.util
import inspect
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fa4  # noqa: E402
from fa4.kernels.triton import combine, decode  # noqa: E402
from tune_decode import (HKV, HQ, decode_step, gbps, kernel_call, make_inputs, public_choice,  # noqa: E402
                         read_flush_ms)

# The helpers the patched kernels call: %globaltimer (ns) read after `dep` is available, and the SM's id.
HELPERS = '''
@triton.jit
def _tr_clock(dep):
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [dep], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def _tr_smid(dep):
    return tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [dep], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _tr_slot(addr, slot):
    return (tl.full([], addr, tl.int64) + slot.to(tl.int64) * 32).to(tl.pointer_type(tl.int64), bitcast=True)

'''

COMBINE_SLOT0 = 1 << 16  # trace slots: attention programs from 0, combine programs from here; 4 int64 each


def _edit(src, anchor, text, after=True, count=1):
    if src.count(anchor) != count:
        raise RuntimeError(f"anchor {anchor!r} found {src.count(anchor)} times, expected {count}")
    return src.replace(anchor, anchor + text if after else text + anchor)


def patched_decode(trace_addr, even):
    """decode.py with trace stamps (trace_addr: int address of the slot buffer, or None) and/or even splits."""
    src = inspect.getsource(decode)
    src = _edit(src, "@triton.jit\ndef _tile_pages", HELPERS, after=False)
    if trace_addr is not None:
        src = _edit(src, "    # Grid: axis 0 = (sequence, kv head)", "    _tr_t0 = _tr_clock(tl.program_id(0))\n",
                    after=False)
        src = _edit(src, "            tl.store(Lse + lrow, lse, mask=row_ok)\n", (
            "    _tr_dep = tl.sum(l_i).to(tl.int32, bitcast=True)\n"
            "    _tr_p = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * pid_m)\n"
            f"    _tr_b = _tr_slot({trace_addr}, _tr_p)\n"
            "    tl.store(_tr_b, _tr_t0)\n"
            "    tl.store(_tr_b + 1, _tr_clock(_tr_dep))\n"
            "    tl.store(_tr_b + 2, _tr_smid(_tr_dep).to(tl.int64))\n"))
    if even:
        # The chunked branch (contiguous caches; a paged step deals its tiles out in turn, which is already as
        # even as tiles allow, and keeps its own branch).
        old = ("        tiles_per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), num_splits)\n"
               "        start = lo + split * tiles_per_split * BLOCK_N\n"
               "        end = tl.minimum(start + tiles_per_split * BLOCK_N, hi)\n")
        new = ("        n_tiles = tl.cdiv(hi - lo, BLOCK_N)\n"
               "        base_tiles = n_tiles // num_splits\n"
               "        extra = n_tiles % num_splits\n"
               "        start = lo + (split * base_tiles + tl.minimum(split, extra)) * BLOCK_N\n"
               "        end = tl.minimum(start + (base_tiles + (split < extra).to(tl.int32)) * BLOCK_N, hi)\n")
        if src.count(old) != 1:
            raise RuntimeError("split range code not found")
        src = src.replace(old, new)
    return _load(src, f"fa4_decode_probe_{'t' if trace_addr else ''}{'e' if even else ''}")


def patched_combine(trace_addr, src=None, name="fa4_combine_probe_t"):
    """combine.py (or the source `src` of another version of it) with trace stamps."""
    src = src or inspect.getsource(combine)
    src = _edit(src, "@triton.jit\ndef _combine_kernel", HELPERS, after=False)
    src = _edit(src, "        tl_cuda.gdc_wait()\n", "    _tr_t1 = _tr_clock(tl.program_id(0))\n")
    src = _edit(src, "    tl.store(o_ptr + offs_d, acc.to(Out.dtype.element_ty), mask=offs_d < HEAD_DV)\n", (
        f"    _tr_b = _tr_slot({trace_addr}, tl.program_id(0) + {COMBINE_SLOT0})\n"
        "    tl.store(_tr_b + 1, _tr_t1)\n"
        "    tl.store(_tr_b + 2, _tr_clock(tl.sum(acc).to(tl.int32, bitcast=True)))\n"))
    return _load(src, name)


_tmp = tempfile.mkdtemp(prefix="fa4_decode_timeline_")


def _load(src, name):
    """Import `src` as module `name` from a real file (triton.jit reads a kernel's source with inspect)."""
    path = Path(_tmp) / f"{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def make_step(q, k, v, lens, table, out, cfg, splits, kernels=None):
    """A Step with a forced config and split count, built with the given (decode kernel, combine kernel)."""
    saved = decode._decode_kernel, combine._combine_kernel
    if kernels is not None:
        decode._decode_kernel, combine._combine_kernel = kernels
    try:
        step = decode_step(q, k, v, lens, table, out, splits, cfg)
    finally:
        decode._decode_kernel, combine._combine_kernel = saved
    return kernel_call(q, k, v, lens, table, out, splits, cfg, step)


def timeline(fn, trace, n_attn, n_comb, reps):
    """Median over `reps` flushed calls of the trace's landmarks (µs from the first attention start)."""
    flush = read_flush_ms.__dict__.get("buf")
    if flush is None:
        read_flush_ms(lambda: None, True)
        flush = read_flush_ms.buf
    rows = []
    for _ in range(reps):
        trace.zero_()
        flush.sum()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        t = trace.view(-1, 4).cpu()
        attn = t[:n_attn]
        t0 = attn[:, 0].min().item()
        starts = sorted(((attn[:, 0] - t0) / 1e3).tolist())
        ends = sorted(((attn[:, 1] - t0) / 1e3).tolist())
        span = ends[-1]
        row = dict(event=s.elapsed_time(e) * 1e3, span=span, start99=starts[int(0.99 * (n_attn - 1))],
                   end10=ends[int(0.1 * (n_attn - 1))], end50=ends[n_attn // 2], end90=ends[int(0.9 * (n_attn - 1))],
                   sms=len(set(attn[:, 2].tolist())))
        if n_comb:
            comb = t[COMBINE_SLOT0:COMBINE_SLOT0 + n_comb]
            total = (comb[:, 2].max().item() - t0) / 1e3
            row["comb"] = total - span
            row["wait_ret"] = (comb[:, 1].min().item() - t0) / 1e3 - span
        else:
            row["comb"] = row["wait_ret"] = 0.0
            total = span
        row["outside"] = row["event"] - total
        rows.append(row)
    return {key: statistics.median(r[key] for r in rows) for key in rows[0]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1:8192,1:65536,8:8192,64:8192")
    ap.add_argument("--layouts", default="contig,paged")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=1, help="time every variant this many times, alternated")
    ap.add_argument("--splits", default="", help="extra split counts to time (e.g. 16,33)")
    ap.add_argument("--even", action="store_true", help="also time the even split variant")
    ap.add_argument("--alt-combine", default="", help="another combine.py to time beside the shipped one "
                    "(variant tag 'a'), e.g. the previous commit's: git show HEAD~1:fa4/kernels/triton/combine.py")
    args = ap.parse_args()
    torch.manual_seed(0)
    trace = torch.zeros((COMBINE_SLOT0 + 4096) * 4, dtype=torch.int64, device="cuda")
    traced = (patched_decode(trace.data_ptr(), False)._decode_kernel, patched_combine(trace.data_ptr())._combine_kernel)
    even = (patched_decode(None, True)._decode_kernel, combine._combine_kernel) if args.even else None
    alt = alt_traced = None
    if args.alt_combine:
        alt_src = Path(args.alt_combine).read_text()
        alt = (decode._decode_kernel, _load(alt_src, "fa4_combine_alt")._combine_kernel)
        alt_traced = (traced[0], patched_combine(trace.data_ptr(), alt_src, "fa4_combine_alt_t")._combine_kernel)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"# {torch.cuda.get_device_name()} ({sms} SMs); read-only flush; µs unless named", flush=True)
    hdr = (f"{'B':>3} {'L':>6} {'layout':>6} {'splits':>6} | {'step':>6} {'GB/s':>5} {'read':>6} {'GB/s':>5} | "
           f"{'span':>6} {'st99':>5} {'end10':>6} {'end50':>6} {'end90':>6} {'comb':>5} {'wait':>5} "
           f"{'outside':>7} {'SMs':>4}")
    print(hdr, flush=True)
    extra = [int(s) for s in args.splits.split(",") if s]
    for batch, length in [tuple(int(x) for x in r.split(":")) for r in args.rows.split(",")]:
        for layout in args.layouts.split(","):
            q, k, v, lens, table, kv = make_inputs(batch, length, layout == "paged", kv_buffer=True)
            out = torch.empty_like(q)
            fa4.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, page_table=table, out=out)
            ref = out.clone()
            cfg, shipped_splits = public_choice()
            cfg = decode.Config(*cfg)
            read_ms = read_flush_ms(lambda: torch.sum(kv), False)
            # Extra split counts only where they keep the launch within a few waves (the small-batch rows).
            extra_here = [s for s in extra if s != shipped_splits and batch * HKV * s <= 4 * sms]
            variants = [(shipped_splits, None, "")] + [(s, None, "") for s in extra_here]
            if even is not None and shipped_splits > 1:
                variants += [(s, even, "e") for s in [shipped_splits] + extra_here]
            if alt is not None and shipped_splits > 1:
                variants += [(shipped_splits, alt, "a")]
            for splits, kernels, tag in [v for _ in range(args.rounds) for v in variants]:
                fn = make_step(q, k, v, lens, table, out, cfg, splits, kernels)
                out.fill_(float("nan"))
                fn()
                err = (out.float() - ref.float()).abs().max().item()
                if not err < 2e-2:
                    print(f"MISMATCH B={batch} L={length} {layout} splits={splits}{tag}: max err {err}", flush=True)
                ms = read_flush_ms(fn, False)
                tl_row = None
                if tag in ("", "a"):
                    tfn = make_step(q, k, v, lens, table, out, cfg, splits, traced if not tag else alt_traced)
                    n_comb = batch * HQ if splits > 1 else 0
                    tl_row = timeline(tfn, trace, batch * HKV * splits, n_comb, args.reps)
                line = (f"{batch:>3} {length:>6} {layout:>6} {str(splits) + tag:>6} | {ms * 1e3:6.1f} "
                        f"{gbps(batch, length, ms):5.0f} {read_ms * 1e3:6.1f} {gbps(batch, length, read_ms):5.0f} |")
                if tl_row:
                    line += (f" {tl_row['span']:6.1f} {tl_row['start99']:5.1f} {tl_row['end10']:6.1f} "
                             f"{tl_row['end50']:6.1f} {tl_row['end90']:6.1f} {tl_row['comb']:5.1f} "
                             f"{tl_row['wait_ret']:5.1f} {tl_row['outside']:7.1f} {tl_row['sms']:4.0f}")
                print(line, flush=True)


if __name__ == "__main__":
    main()
