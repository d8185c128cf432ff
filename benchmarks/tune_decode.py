"""Tune fa4's split-KV decode kernel on the GPU: GB/s of K+V read per decode step over the decode suite.

    python benchmarks/tune_decode.py            # all 48 configs and 15 split counts (over 10 minutes: use --sections)
    python benchmarks/tune_decode.py --quick    # fewer tile configs and split counts (about 4 minutes)
    python benchmarks/tune_decode.py --quick --sections 1,4 --json out.json

Decode suite: bf16, one query token, Hq 32, Hkv 8, D 128, (B, L) in {(1, 8192), (1, 65536), (8, 8192),
(32, 4096), (64, 8192), (128, 2048)}, every sequence full; bytes = 2·B·L·Hkv·D·2. Paged rows use pages of 128
in shuffled order. Timing: triton.testing.do_bench medians (it clears L2 before every call), as `fa4 bench`.

Sections printed:
 1. peers in the same run (SDPA's FlashAttention-2 and cuDNN kernels) and fa4's public call as it stands, with
    the (BLOCK_N, warps, stages) config and split count it picked;
 2. tile configs at the split count the heuristic picks (through decode.Step: the public call's launch path);
 3. split counts for each row's best config of section 2 and for the config the public call picks;
 4. host path: per call, back-to-back eager calls against CUDA-graph replay of the same call (eager ≈ max(host,
    GPU) time: equal columns mean the host is hidden), and do_bench of the public call against do_bench of its
    graph replay (equal GB/s mean `fa4 bench` sees only GPU time);
 5. (only when asked: --sections 5) fa4, a bare read of the same bytes and the SDPA peers under do_bench's memset
    flush and under a read-only flush (what the dirty lines of the memset cost each row);
 6. (only when asked: --sections 6) A/B of the kernel switches in decode.py (TILE_BASE: per-tile base addressing;
    PDL: the combine as a programmatic dependent launch; CLUSTER_MERGE: the splits merged in a thread-block cluster,
    no combine; --variants picks the sets) at the public call's config and splits, each variant
    under both flushes, in --rounds interleaved rounds (median of the rounds' medians), cuDNN beside them.
Each config's output is compared with the public call's; a mismatch is printed as MISMATCH.
"""
import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fa4 import inference  # noqa: E402
from fa4.kernels.triton import decode  # noqa: E402

SUITE = [(1, 8192), (1, 65536), (8, 8192), (32, 4096), (64, 8192), (128, 2048)]
HQ, HKV, D, PAGE = 32, 8, 128, 128


FLUSH = "memset"  # --flush: how sections 1-4 clear L2 before each timed call


def bench_ms(fn, quick):
    """Median ms of fn under the flush --flush names (sections 1-4)."""
    if FLUSH == "read":
        return read_flush_ms(fn, quick)
    return memset_flush_ms(fn, quick)


def memset_flush_ms(fn, quick):
    """do_bench median: L2 cleared by its 256 MB memset before each call."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=5 if quick else 20, rep=25 if quick else 100, return_mode="median")


def gbps(batch, length, ms):
    return 2 * batch * length * HKV * D * 2 / ms / 1e6


def make_inputs(batch, length, paged, kv_buffer=False):
    """(q, k, v, lens, table) of a decode-suite row; kv_buffer: K and V as the two halves of one buffer, returned
    last, so that a single read of it covers exactly their bytes (decode_timeline.py)."""
    q = torch.randn(batch, 1, HQ, D, device="cuda", dtype=torch.bfloat16)
    if kv_buffer:
        kv = torch.randn(2, batch, length, HKV, D, device="cuda", dtype=torch.bfloat16)
        k, v = kv[0], kv[1]
    else:
        k = torch.randn(batch, length, HKV, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
    lens = torch.full((batch,), length, device="cuda", dtype=torch.int32)
    table = None
    if paged:
        n_pages = batch * length // PAGE
        k, v = k.view(n_pages, PAGE, HKV, D), v.view(n_pages, PAGE, HKV, D)
        table = torch.randperm(n_pages, device="cuda").to(torch.int32).view(batch, length // PAGE)
    if kv_buffer:
        return q, k, v, lens, table, kv
    return q, k, v, lens, table


def decode_step(q, k, v, lens, table, out, num_splits, cfg):
    """The decode.Step of a suite row with a forced config and split count (decode.py's switches as they are set
    when it is built)."""
    return decode.Step(q, k, v, out, want_lse=False, k=None, v=None, cache_seqlens=lens, cache_batch_idx=None,
                       page_table=table, rotary_cos=None, rotary_sin=None, rotary_interleaved=True,
                       rotary_per_token=False, softmax_scale=D ** -0.5, window_left=-1, window_right=-1,
                       softcap=0.0, sink=None, num_splits=num_splits, config=cfg)


def kernel_call(q, k, v, lens, table, out, num_splits, cfg, step=None):
    """One decode step with a forced config and split count, launched as the public call launches it (`step`: a
    Step built by decode_step for these tensors instead)."""
    step = step or decode_step(q, k, v, lens, table, out, num_splits, cfg)
    return lambda: step(q, k, v, None, None, None, None, lens, None, table, None, out, 0)


def public_row(batch, length, paged):
    """A suite row's inputs and output after one public call: (q, k, v, lens, table, out, config, splits)."""
    q, k, v, lens, table = make_inputs(batch, length, paged)
    out = torch.empty_like(q)
    inference.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, page_table=table, out=out)
    cfg, splits = public_choice()
    return q, k, v, lens, table, out, cfg, splits


def public_choice():
    """(config, splits) of the Step the last public call used."""
    _, step = next(reversed(inference._steps.values()))
    return tuple(step.config), step.num_splits


def heuristic_splits(batch, length, cfg):
    return inference.choose_num_splits(batch * HKV, length, cfg.block_n,
                                       torch.cuda.get_device_properties(0).multi_processor_count)


def peers(q, k, v):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    res = {}
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        def call(backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                      enable_gqa=True)
        try:
            call()
            res[name] = call
        except Exception as exc:  # a peer that cannot run this shape is reported, not fatal
            res[name] = f"{type(exc).__name__}"
    return res


def read_flush_ms(fn, quick, flush_bytes=256 << 20):
    """Median ms of fn with L2 flushed before each call by a read-only pass over 256 MB (its lines are clean, so
    the timed call pays no write-back of the flush; do_bench's memset leaves up to the L2's size dirty)."""
    buf = read_flush_ms.__dict__.get("buf")
    if buf is None:
        buf = read_flush_ms.buf = torch.ones(flush_bytes // 4, device="cuda", dtype=torch.float32)
    reps = 25 if quick else 100
    for _ in range(5):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        buf.sum()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(starts, ends))[reps // 2]


def capture(fn):
    """A CUDA graph of one call of fn (warmed up on a side stream first, as torch.cuda.graph asks)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def per_call_ms(fn, iters=200):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--layouts", default="paged,contiguous")
    ap.add_argument("--batches", default="", help="only the suite rows with these batch sizes, e.g. 1,8")
    ap.add_argument("--sections", default="1,2,3,4", help="which sections to run, e.g. 1,4 (5: L2 flush methods)")
    ap.add_argument("--rounds", type=int, default=3, help="section 6: interleaved rounds per variant")
    ap.add_argument("--variants", default="both,cluster",
                    help="section 6: switch sets to compare (old, tilebase, pdl, both: the combine merges; cluster: "
                         "the splits merge in a thread-block cluster)")
    ap.add_argument("--flush", choices=("memset", "read"), default="memset",
                    help="sections 1-4: do_bench's memset flush (default) or a read-only flush (clean L2); sections 5 "
                         "and 6 time both")
    args = ap.parse_args()
    global FLUSH
    FLUSH = args.flush
    layouts = [x == "paged" for x in args.layouts.split(",")]
    global SUITE
    if args.batches:
        SUITE = [(b, n) for b, n in SUITE if str(b) in args.batches.split(",")]
    import triton
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    if args.quick:
        configs = [decode.Config(*c) for c in ((64, 4, 2), (64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 4, 3),
                                               (128, 8, 3))]
        split_list = (1, 2, 4, 8, 16, 24, 32, 48, 64)
    else:
        configs = [decode.Config(bn, w, st) for bn, w, st in itertools.product((32, 64, 128), (4, 8), (2, 3, 4, 5))]
        split_list = (1, 2, 3, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64, 96)
    sections = {int(x) for x in args.sections.split(",")}
    records = []
    best = {}

    if 1 in sections:
        print("\n## 1. peers and fa4's public call (GB/s)", flush=True)
    for (batch, length), paged in itertools.product(SUITE, layouts if 1 in sections else ()):
        q, k, v, lens, table = make_inputs(batch, length, paged)
        row = f"B={batch:<4} L={length:<6} {'paged' if paged else 'contig'}"
        fa4_call = lambda: inference.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, page_table=table)  # noqa
        ms = bench_ms(fa4_call, args.quick)
        cfg, splits = public_choice()
        line = f"{row}  fa4 {gbps(batch, length, ms):7.0f} ({cfg}, splits {splits})"
        records.append(dict(section="public", B=batch, L=length, paged=paged, gbps=gbps(batch, length, ms),
                            config=list(cfg), splits=splits))
        if not paged:
            for name, fn in peers(q, k, v).items():
                if callable(fn):
                    p_gbps = gbps(batch, length, bench_ms(fn, args.quick))
                    records.append(dict(section="peer", backend=name, B=batch, L=length, gbps=p_gbps))
                    line += f"  {name} {p_gbps:7.0f}"
                else:
                    line += f"  {name} {fn}"
        print(line, flush=True)
        q = k = v = table = None  # free this row's cache before the next row's
        torch.cuda.empty_cache()

    if 2 in sections:
        print("\n## 2. tile configs (BLOCK_N, warps, stages) at the heuristic's splits (GB/s)", flush=True)
        print("row".ljust(26) + "".join(f"{c.block_n:>4}/{c.num_warps}/{c.num_stages}" for c in configs), flush=True)
    for (batch, length), paged in itertools.product(SUITE, layouts if 2 in sections else ()):
        q, k, v, lens, table = make_inputs(batch, length, paged)
        expect = inference.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, page_table=table)
        line = f"B={batch:<4} L={length:<6} {'paged' if paged else 'contig'}".ljust(26)
        for cfg in configs:
            out = torch.empty_like(expect)
            splits = heuristic_splits(batch, length, cfg)
            fn = kernel_call(q, k, v, lens, table, out, splits, cfg)
            try:
                fn()
                torch.cuda.synchronize()
            except Exception as exc:  # out of shared memory or registers: that config does not exist here
                line += f"{'-':>11}"
                records.append(dict(section="config", B=batch, L=length, paged=paged, config=list(cfg),
                                    splits=splits, error=type(exc).__name__))
                continue
            ok = torch.allclose(out.float(), expect.float(), atol=2e-2, rtol=2e-2)
            value = gbps(batch, length, bench_ms(fn, args.quick))
            records.append(dict(section="config", B=batch, L=length, paged=paged, config=list(cfg), splits=splits,
                                gbps=value, match=ok))
            line += f"{value:>11.0f}" if ok else f"{'MISMATCH':>11}"
            if ok and value > best.get((batch, length, paged), (None, 0))[1]:
                best[(batch, length, paged)] = (cfg, value)
        print(line, flush=True)
        q = k = v = table = None  # free this row's cache before the next row's
        torch.cuda.empty_cache()
    if best:
        print("best: " + "; ".join(f"B={b} L={n} {'paged' if p else 'contig'}: {tuple(c)} {g:.0f}"
                                   for (b, n, p), (c, g) in best.items()), flush=True)

    if 3 in sections:
        print("\n## 3. split counts per config (GB/s; * = heuristic's pick for that config)", flush=True)
        print("row".ljust(40) + "".join(f"{n:>7}" for n in split_list), flush=True)
    for (batch, length), paged in itertools.product(SUITE, layouts if 3 in sections else ()):
        q, k, v, lens, table = make_inputs(batch, length, paged)
        out = torch.empty(batch, 1, HQ, D, device="cuda", dtype=torch.bfloat16)
        inference.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, page_table=table)
        public_cfg = decode.Config(*public_choice()[0])
        cfgs = [public_cfg] + [c for c in [best.get((batch, length, paged), (None,))[0]] if c and c != public_cfg]
        for cfg in cfgs:
            pick = heuristic_splits(batch, length, cfg)
            tag = "public" if cfg == public_cfg else "best"
            line = f"B={batch:<4} L={length:<6} {'paged' if paged else 'contig'} {tuple(cfg)} {tag}".ljust(40)
            tiles = math.ceil(length / cfg.block_n)
            for n in split_list:
                if n > tiles:
                    line += f"{'':>7}"
                    continue
                value = gbps(batch, length, bench_ms(kernel_call(q, k, v, lens, table, out, n, cfg), args.quick))
                records.append(dict(section="splits", B=batch, L=length, paged=paged, config=list(cfg), splits=n,
                                    gbps=value, heuristic=n == pick))
                line += f"{value:>6.0f}{'*' if n == pick else ' '}"
            print(line, flush=True)
        q = k = v = table = None  # free this row's cache before the next row's
        torch.cuda.empty_cache()

    if 4 in sections:
        print("\n## 4. host path: per call back to back (eager vs graph replay), do_bench (public vs its graph)",
              flush=True)
    for (batch, length), paged in itertools.product(SUITE, layouts if 4 in sections else ()):
        q, k, v, lens, table = make_inputs(batch, length, paged)
        fn = lambda: inference.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, page_table=table)  # noqa
        graph = capture(fn)
        eager, replay = per_call_ms(fn), per_call_ms(graph.replay)
        bench_eager, bench_graph = bench_ms(fn, args.quick), bench_ms(graph.replay, args.quick)
        pub, gra = gbps(batch, length, bench_eager), gbps(batch, length, bench_graph)
        records.append(dict(section="host", B=batch, L=length, paged=paged, eager_ms=eager, graph_ms=replay,
                            bench_gbps=pub, bench_graph_gbps=gra))
        print(f"B={batch:<4} L={length:<6} {'paged' if paged else 'contig'}  back to back: eager {eager * 1e3:6.1f} us"
              f"  graph {replay * 1e3:6.1f} us   do_bench: public {pub:5.0f} GB/s  graph {gra:5.0f} GB/s", flush=True)
        q = k = v = table = graph = None  # free this row's cache before the next row's
        torch.cuda.empty_cache()

    if 5 in sections:
        print("\n## 5. L2 flush: fa4's public call, a bare read of the same K+V bytes (torch sum) and the SDPA "
              "peers under do_bench's flush (a 256 MB memset, which leaves up to the L2's size of dirty lines that "
              "the timed call must write back) and under a read-only flush (a 256 MB sum: clean lines); GB/s",
              flush=True)
        print(f"{'B':>4} {'L':>6} {'layout':>6} | {'flush':>6} | {'read':>5} {'fa4':>5} {'flash':>5} {'cudnn':>5}",
              flush=True)
    for (batch, length), paged in itertools.product(SUITE, layouts if 5 in sections else ()):
        q, k, v, lens, table, out, cfg, splits = public_row(batch, length, paged)
        fns = {}
        kv_flat = (k.view(-1), v.view(-1))
        fns["read"] = lambda: (kv_flat[0].sum(dtype=torch.float32), kv_flat[1].sum(dtype=torch.float32))
        fns["fa4"] = kernel_call(q, k, v, lens, table, out, splits, decode.Config(*cfg))
        if not paged:
            fns.update({name: fn for name, fn in peers(q, k, v).items() if callable(fn)})
        for flush in ("memset", "read"):
            res = {name: gbps(batch, length, memset_flush_ms(fn, args.quick) if flush == "memset" else
                              read_flush_ms(fn, args.quick)) for name, fn in fns.items()}
            records.append(dict(section="flush", B=batch, L=length, paged=paged, flush=flush, splits=splits,
                                **{f"{name}_gbps": val for name, val in res.items()}))
            cell = lambda name, w: f"{res[name]:{w}.0f}" if name in res else f"{'-':>{w}}"  # noqa: E731
            print(f"{batch:>4} {length:>6} {'paged' if paged else 'contig':>6} | {flush:>6} | {cell('read', 5)} "
                  f"{cell('fa4', 5)} {cell('sdpa_flash', 5)} {cell('sdpa_cudnn', 5)}"
                  f"   (splits {splits})", flush=True)
        q = k = v = table = out = fns = kv_flat = None
        torch.cuda.empty_cache()

    if 6 in sections:
        print("\n## 6. decode.py switches, A/B at the public call's config and splits (GB/s; memset | read flush; "
              f"median of {args.rounds} interleaved rounds)", flush=True)
        known = {"old": dict(TILE_BASE=False, PDL=False, CLUSTER_MERGE=False),
                 "tilebase": dict(TILE_BASE=True, PDL=False, CLUSTER_MERGE=False),
                 "pdl": dict(TILE_BASE=False, PDL=True, CLUSTER_MERGE=False),
                 "both": dict(TILE_BASE=True, PDL=True, CLUSTER_MERGE=False),
                 "cluster": dict(TILE_BASE=True, PDL=True, CLUSTER_MERGE=True)}
        variants = {name: known[name] for name in args.variants.split(",")}
        print(f"{'B':>4} {'L':>6} {'layout':>6} | " + " ".join(f"{n:>15}" for n in variants) + " | cudnn (m|r)",
              flush=True)
    for (batch, length), paged in itertools.product(SUITE, layouts if 6 in sections else ()):
        q, k, v, lens, table, out, cfg, splits = public_row(batch, length, paged)
        saved = {key: getattr(decode, key) for key in ("TILE_BASE", "PDL", "CLUSTER_MERGE")}
        fns = {}
        for name, flags in variants.items():
            for key, val in flags.items():
                setattr(decode, key, val)
            fns[name] = kernel_call(q, k, v, lens, table, out, splits, decode.Config(*cfg))
            fns[name]()
        for key, val in saved.items():
            setattr(decode, key, val)
        ref = out.clone()
        for name, fn in fns.items():
            # Every variant gives the same output: bitwise where the splits merge in the same order, to fp32
            # rounding of the merge where one merges in a cluster and the other in the combine.
            out.fill_(float("nan"))
            fn()
            if not torch.allclose(out.float(), ref.float(), atol=1e-2, rtol=1e-2):
                print(f"MISMATCH {name} B={batch} L={length} paged={paged}", flush=True)
        if not paged:
            cudnn = peers(q, k, v).get("sdpa_cudnn")
            if callable(cudnn):
                fns["cudnn"] = cudnn
        samples = {name: {"memset": [], "read": []} for name in fns}
        names = list(fns)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                samples[name]["memset"].append(gbps(batch, length, memset_flush_ms(fns[name], args.quick)))
                samples[name]["read"].append(gbps(batch, length, read_flush_ms(fns[name], args.quick)))
        med = {name: {f: sorted(v)[len(v) // 2] for f, v in d.items()} for name, d in samples.items()}
        records.append(dict(section="switches", B=batch, L=length, paged=paged, splits=splits, config=list(cfg),
                            **{f"{n}_{f}_gbps": val for n, d in med.items() for f, val in d.items()}))
        cells = " ".join(f"{med[n]['memset']:7.0f}|{med[n]['read']:<7.0f}" for n in variants)
        extra = f"{med['cudnn']['memset']:5.0f}|{med['cudnn']['read']:<5.0f}" if "cudnn" in med else "-"
        print(f"{batch:>4} {length:>6} {'paged' if paged else 'contig':>6} | {cells} | {extra}  "
              f"(config {tuple(cfg)}, splits {splits})", flush=True)
        q = k = v = table = out = fns = None
        torch.cuda.empty_cache()

    if args.json:
        args.json.write_text(json.dumps(dict(card=props.name, torch=torch.__version__, triton=triton.__version__,
                                             date=time.strftime("%Y-%m-%d %H:%M"), records=records), indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
