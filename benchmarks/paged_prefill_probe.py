"""Paged prefill: `flash_attn_varlen_func(..., page_table=...)` against the same keys as a packed contiguous cache,
and against FlashAttention-4's paged varlen path when `flash_attn.cute` imports.

    python benchmarks/paged_prefill_probe.py [--rows 4:4096:4096,1:16384:16384,4:1024:8192] [--reps 3] [--diagnose]

Rows are B:Sq:Sk (bf16, Hq 32, Hkv 8, D 128, causal aligned bottom-right, 128-token pages in shuffled order): a
whole-prompt prefill when Sq = Sk, a chunk of Sq new tokens against an Sk-token cache (chunked prefill, the new
tokens' keys already in the cache) when Sq < Sk. TFLOP/s counts the visible (query, key) pairs only: 4 · D · Hq
per pair. do_bench's median (its 256 MB memset between calls), median of --reps runs alternated. The backend fa4
picked and, for the portable path, the dispatcher's reason are printed from fa4's debug log. Every column's output
is compared with fa4's contiguous call first.
"""
import argparse
import logging
import os
import statistics
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fa4  # noqa: E402
from fa4 import checks  # noqa: E402
from varlen_train_probe import host_syncs  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 128


class _Reasons(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def visible_pairs(sq, sk):
    """(query, key) pairs a bottom-right causal mask leaves: query i sees keys j <= i + sk - sq."""
    return sum(max(0, min(sk, i + sk - sq + 1)) for i in range(sq))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="4:4096:4096,1:16384:16384,4:1024:8192")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--diagnose", action="store_true", help="also: contiguous with seqused_k, paged with the "
                    "identity page table (pages in sequence order), both through Triton's JIT launch and with the "
                    "value checks' host read on every call; the host synchronisations of a call")
    args = ap.parse_args()
    reasons = _Reasons()
    logging.getLogger("fa4").addHandler(reasons)
    logging.getLogger("fa4").setLevel(logging.DEBUG)
    try:
        from flash_attn.cute import flash_attn_varlen_func as fa4_peer
    except Exception as exc:  # noqa: BLE001 - the kit may be absent
        fa4_peer = None
        print(f"# FlashAttention-4 not importable: {type(exc).__name__}: {str(exc)[:120]}")
    print(f"# {torch.cuda.get_device_name()}; bf16 Hq {HQ} Hkv {HKV} D {D}, page {PAGE} shuffled; TFLOP/s, "
          f"do_bench median, median of {args.reps}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for row in args.rows.split(","):
        batch, sq, sk = (int(x) for x in row.split(":"))
        q = torch.randn(batch * sq, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn(batch * sk, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn_like(k)
        cu_q = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * sq
        cu_k = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * sk
        used = torch.full((batch,), sk, device="cuda", dtype=torch.int32)
        n_pages = batch * sk // PAGE
        # Page p of the pool holds the keys the table sends there: gather the contiguous keys into shuffled pages.
        table = torch.randperm(n_pages, device="cuda", generator=gen).to(torch.int32).view(batch, sk // PAGE)
        k_pages = torch.empty(n_pages, PAGE, HKV, D, device="cuda", dtype=torch.bfloat16)
        v_pages = torch.empty_like(k_pages)
        k_pages[table.flatten().long()] = k.view(n_pages, PAGE, HKV, D)
        v_pages[table.flatten().long()] = v.view(n_pages, PAGE, HKV, D)
        cols = {
            "fa4 contig": lambda: fa4.flash_attn_varlen_func(q, k, v, cu_q, cu_k, sq, sk, causal=True),
            "fa4 paged": lambda: fa4.flash_attn_varlen_func(q, k_pages, v_pages, cu_q, None, sq, sk, seqused_k=used,
                                                            page_table=table, causal=True),
        }
        if args.diagnose:
            ident = torch.arange(n_pages, device="cuda", dtype=torch.int32).view(batch, sk // PAGE)
            k_ident, v_ident = k.view(n_pages, PAGE, HKV, D), v.view(n_pages, PAGE, HKV, D)
            cols["fa4 contig+seqused"] = lambda: fa4.flash_attn_varlen_func(q, k, v, cu_q, cu_k, sq, sk,
                                                                            seqused_k=used, causal=True)
            cols["fa4 paged identity"] = lambda: fa4.flash_attn_varlen_func(
                q, k_ident, v_ident, cu_q, None, sq, sk, seqused_k=used, page_table=ident, causal=True)

            def jit_launch(fn):
                def call():  # the sm90 forward through Triton's own launch instead of launch.py's plans
                    os.environ["FA4_SM90_FAST"] = "0"
                    try:
                        return fn()
                    finally:
                        del os.environ["FA4_SM90_FAST"]
                return call
            cols["fa4 contig (JIT launch)"] = jit_launch(cols["fa4 contig"])
            cols["fa4 paged (JIT launch)"] = jit_launch(cols["fa4 paged"])

            def read_every_call(fn):
                def call():  # the value checks' host read on every call (before checks remembered passed sets)
                    saved = checks._remembered_key
                    checks._remembered_key = lambda *a: None
                    try:
                        return fn()
                    finally:
                        checks._remembered_key = saved
                return call
            cols["fa4 contig (checks read every call)"] = read_every_call(cols["fa4 contig"])
            cols["fa4 paged (checks read every call)"] = read_every_call(cols["fa4 paged"])
        if fa4_peer is not None:
            cols["FA4 contig"] = lambda: fa4_peer(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=sq,
                                                  max_seqlen_k=sk, causal=True)
            cols["FA4 paged"] = lambda: fa4_peer(q, k_pages, v_pages, cu_seqlens_q=cu_q, max_seqlen_q=sq,
                                                 seqused_k=used, page_table=table, causal=True)
        want = None
        for name, fn in list(cols.items()):
            reasons.lines.clear()
            try:
                got = fn()
                got = got[0] if isinstance(got, tuple) else got
            except Exception as exc:  # noqa: BLE001 - report and drop the column
                print(f"# B={batch} Sq={sq} Sk={sk} {name}: {type(exc).__name__}: {str(exc)[:200]}")
                del cols[name]
                continue
            if want is None:
                want = got.float()
            err = (got.float() - want).abs().max().item()
            why = "; ".join(dict.fromkeys(line[:160] for line in reasons.lines if "fa4" in name))
            print(f"# B={batch} Sq={sq} Sk={sk} {name}: max |diff| vs fa4 contig {err:.2e}"
                  + (f"; log: {why}" if why else ""))
        if args.diagnose:
            # Host synchronisations of one steady-state call (torch's sync debug mode warns on each).
            for name, fn in cols.items():
                print(f"# B={batch} Sq={sq} Sk={sk} {name}: {host_syncs(fn)} host synchronisations a call")
        flops = 4 * D * HQ * batch * visible_pairs(sq, sk)
        times = {name: [] for name in cols}
        for _ in range(args.reps):
            for name, fn in cols.items():
                times[name].append(do_bench(fn, warmup=10, rep=50, return_mode="median"))
        line = " ".join(f"{name} {flops / statistics.median(ts) / 1e9:6.0f}" for name, ts in times.items())
        print(f"B={batch:>2} Sq={sq:>6} Sk={sk:>6} | {line}", flush=True)


if __name__ == "__main__":
    main()
