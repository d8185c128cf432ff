"""How fast can any kernel read a paged KV pool whose pages lie in shuffled order? A layout ceiling for the
paged decode rows, independent of attention.

    python benchmarks/paged_read_ceiling.py [--rows 1:65536,8:8192,64:8192] [--groups 1,8,64] [--rounds 5]

Sessions 9-18 found the paged decode step 1-3% slower than the contiguous one on the same bytes, and the identity
page table as fast as the contiguous cache: the cost is where the pages lie, not the kernel's page-table work.
That alone does not say whether a different access pattern could read shuffled pages at the contiguous rate.
This probe answers it with the simplest reader possible: a persistent streaming sum (no attention, no split
structure) over the K and V pools, whole 256 KB pages (all kv heads of 128 tokens) a visit, pages taken in the
page table's order. Columns, GB/s of K+V under the decode suite's read-only L2 flush (tune_decode.read_flush_ms):

- `torch.sum`: one buffer holding exactly the K and V bytes, read by torch (the card's plain streaming rate).
- `pages/identity`: the page reader, table in sequence order (a contiguous stream of pages).
- `pages/shuffled gN`: the page reader, the table shuffled in runs of N consecutive pages (N = 1 is the bench's
  layout; N = 8 keeps 2 MB, one GPU large page, together; N = 64 keeps 16 MB together).
- `decode/contig`, `decode/paged`: fa4's public decode step on the same rows (contiguous cache; the bench's
  shuffled table), for reference.

If `pages/shuffled g1` reads slower than `pages/identity` by about what `decode/paged` loses to `decode/contig`,
the placement itself costs that much for a plain reader too, and no kernel can buy it back by its access order.
Each reader's sum is checked against torch's before timing.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fa4  # noqa: E402
from tune_decode import D, HKV, HQ, PAGE, gbps, read_flush_ms  # noqa: E402

CHUNK = 8192  # elements a program loads per iteration: 16 KB, 4 x 16-byte loads per thread at 8 warps


@triton.jit
def _page_sum_kernel(K, V, Table, Partial, n_pages, page_elems, CHUNK: tl.constexpr):
    """Program p reads pages Table[p], Table[p + G], ... of K, then the same of V; one fp32 sum a program."""
    p = tl.program_id(0)
    grid = tl.num_programs(0)
    offs = tl.arange(0, CHUNK)
    acc = tl.zeros([CHUNK], dtype=tl.float32)
    for i in range(p, 2 * n_pages, grid):
        is_v = i >= n_pages
        page = tl.load(Table + (i - n_pages * is_v.to(tl.int32))).to(tl.int64)
        base = page * page_elems
        for c in range(0, page_elems, CHUNK):
            if is_v:
                x = tl.load(V + base + c + offs)
            else:
                x = tl.load(K + base + c + offs)
            acc += x.to(tl.float32)
    tl.store(Partial + p, tl.sum(acc))


def page_reader(k_pool, v_pool, table, programs):
    """A callable reading every page of both pools in the table's order, and its partial-sum buffer."""
    n_pages = table.numel()
    page_elems = k_pool[0].numel()
    assert page_elems % CHUNK == 0
    partial = torch.empty(programs, device="cuda", dtype=torch.float32)

    def run():
        _page_sum_kernel[(programs,)](k_pool, v_pool, table, partial, n_pages, page_elems, CHUNK=CHUNK,
                                      num_warps=8)
        return partial
    return run


def grouped_shuffle(n_pages, group, gen):
    """A permutation of the pages that keeps runs of `group` consecutive pages together."""
    runs = n_pages // group
    order = torch.randperm(runs, generator=gen)
    return (order[:, None] * group + torch.arange(group)[None, :]).flatten().to(torch.int32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1:65536,8:8192,64:8192", help="B:L,... decode-suite rows")
    ap.add_argument("--groups", default="1,8,64", help="shuffle run lengths in pages")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--programs-per-sm", type=int, default=8)
    args = ap.parse_args()
    rows = [tuple(int(x) for x in r.split(":")) for r in args.rows.split(",")]
    groups = [int(g) for g in args.groups.split(",")]
    props = torch.cuda.get_device_properties(0)
    programs = props.multi_processor_count * args.programs_per_sm
    print(f"{props.name}, {props.multi_processor_count} SMs; page reader: {programs} programs x 8 warps, "
          f"{CHUNK * 2 // 1024} KB a load step; read-only L2 flush; median of {args.rounds} rounds")
    gen = torch.Generator().manual_seed(0)
    for batch, length in rows:
        n_pages = batch * length // PAGE
        kv = torch.randn(2, n_pages, PAGE, HKV, D, device="cuda", dtype=torch.bfloat16)
        k_pool, v_pool = kv[0], kv[1]
        want = kv.float().sum().item()
        q = torch.randn(batch, 1, HQ, D, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((batch,), length, device="cuda", dtype=torch.int32)
        out = torch.empty_like(q)
        contig_k = k_pool.view(batch, length, HKV, D)
        contig_v = v_pool.view(batch, length, HKV, D)
        bench_table = torch.randperm(n_pages, generator=gen).to(torch.int32).cuda()

        cols = {"torch.sum": lambda: kv.sum()}
        tables = {"pages/identity": torch.arange(n_pages, dtype=torch.int32, device="cuda")}
        for g in groups:
            if n_pages % g == 0 and n_pages // g > 1:
                tables[f"pages/shuffled g{g}"] = grouped_shuffle(n_pages, g, gen).cuda()
        for name, table in tables.items():
            reader = page_reader(k_pool, v_pool, table, programs)
            got = reader().sum().item()
            if abs(got - want) > 1e-3 * max(1.0, abs(want)) + 1.0:
                raise RuntimeError(f"{name}: page reader sum {got} != torch {want}")
            cols[name] = reader
        cols["decode/contig"] = lambda: fa4.flash_attn_with_kvcache(q, contig_k, contig_v, cache_seqlens=lens,
                                                                    out=out)
        page_table = bench_table.view(batch, length // PAGE)
        cols["decode/paged"] = lambda: fa4.flash_attn_with_kvcache(q, k_pool, v_pool, cache_seqlens=lens,
                                                                   page_table=page_table, out=out)
        times = {name: [] for name in cols}
        for _ in range(args.rounds):  # interleaved rounds: drifts in clocks hit every column alike
            for name, fn in cols.items():
                times[name].append(read_flush_ms(fn, quick=True))
        mb = 2 * n_pages * PAGE * HKV * D * 2 / 1e6
        print(f"\nB = {batch}, L = {length}: K+V {mb:.0f} MB, {n_pages} pages of {PAGE} tokens a pool")
        base = gbps(batch, length, statistics.median(times["pages/identity"]))
        for name, ts in times.items():
            rate = gbps(batch, length, statistics.median(ts))
            print(f"  {name:22s} {rate:7.0f} GB/s   {rate / base:5.3f} of pages/identity   "
                  f"(rounds {min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f} us)")
        del kv, k_pool, v_pool, contig_k, contig_v
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
