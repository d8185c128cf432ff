"""Where the paged decode step loses against the contiguous one: the same K/V bytes read through a page table
whose pages are in shuffled order (the bench's layout), in sequence order (identity table), and as a contiguous
cache; GB/s under a read-only L2 flush (tune_decode.read_flush_ms), median of interleaved rounds.

    python benchmarks/decode_layout_probe.py [--rounds 5] [--pages 128,1024] [--rows 1:65536,8:8192]

If the identity table reads as fast as the contiguous cache, the paged kernel's own work (page-table loads,
addressing) costs nothing and the gap is the scattered placement of the pages (DRAM / TLB locality). With
`--pages 128,1024`: a 1024-token page of 8 heads x 128 x bf16 is 2 MB, one GPU large page. (Session 10: the
shuffled 1024-token pages cost the same as the 128-token ones.)

`--tables` adds page tables that keep the shuffled pages but change the order a program meets them:
`sorted-split` (each split's share of the table sorted by page index, i.e. by address; splits as the public call
picks them), `sorted-seq` (each sequence's pages sorted), `runs8` (shuffled in runs of 8 consecutive pages, 2 MB).
`--configs BN/W/S,...` times every layout with those forced (BLOCK_N, warps, stages) at the public split count
too (column name suffixed with the config).

Before timing, each paged layout's output is compared with the contiguous kernel's on the same keys: the
identity table with the cache itself, the shuffled one with the cache gathered in its page order (a shuffled
table hands a sequence other sequences' pages when B > 1).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fa4  # noqa: E402
from fa4.kernels.triton import decode  # noqa: E402
from tune_decode import D, HKV, HQ, PAGE, gbps, kernel_call, public_choice, read_flush_ms  # noqa: E402

ROWS = "1:65536,8:8192,64:8192"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pages", default=str(PAGE), help="comma-separated page sizes (tokens) to run")
    ap.add_argument("--rows", default=ROWS, help="B:L,... (default %(default)s)")
    ap.add_argument("--tables", default="", help="extra tables: sorted-split,sorted-seq,runs8")
    ap.add_argument("--configs", default="", help="forced tile configs BN/W/S,... timed beside the public call")
    args = ap.parse_args()
    rows = [tuple(int(v) for v in r.split(":")) for r in args.rows.split(",")]
    extra_tables = [t for t in args.tables.split(",") if t]
    configs = [decode.Config(*(int(x) for x in c.split("/"))) for c in args.configs.split(",") if c]
    print(f"# {torch.cuda.get_device_name()}; GB/s, read-only flush, median of {args.rounds} rounds", flush=True)
    for page, (batch, length) in [(int(p), row) for p in args.pages.split(",") for row in rows]:
        q = torch.randn(batch, 1, HQ, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, length, HKV, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        lens = torch.full((batch,), length, device="cuda", dtype=torch.int32)
        n_pages = batch * length // page
        kp, vp = k.view(n_pages, page, HKV, D), v.view(n_pages, page, HKV, D)
        ident = torch.arange(n_pages, device="cuda", dtype=torch.int32).view(batch, -1)
        shuf = torch.randperm(n_pages, device="cuda").to(torch.int32).view(batch, -1)
        out = torch.empty_like(q)
        layouts = {"contig": (k, v, None), "identity": (kp, vp, ident), "shuffled": (kp, vp, shuf)}
        fa4.flash_attn_with_kvcache(q, kp, vp, cache_seqlens=lens, page_table=shuf, out=out)
        cfg, splits = public_choice()
        for name in extra_tables:
            layouts[name] = (kp, vp, reordered(shuf, name, decode.Config(*cfg), splits, length, page))
        fns = {name: (lambda kk=kk, vv=vv, table=table:
                      fa4.flash_attn_with_kvcache(q, kk, vv, cache_seqlens=lens, page_table=table, out=out))
               for name, (kk, vv, table) in layouts.items()}
        for c in configs:
            for name, (kk, vv, table) in list(layouts.items()):
                fns[f"{name}@{c.block_n}/{c.num_warps}/{c.num_stages}"] = kernel_call(q, kk, vv, lens, table, out,
                                                                                      splits, c)
        names = list(fns)
        print(f"# B={batch} L={length}: public config {tuple(cfg)}, {splits} splits", flush=True)
        print(f"{'page':>5} {'B':>4} {'L':>6} | " + " ".join(f"{n:>16}" for n in names), flush=True)
        for name, fn in fns.items():
            kk, vv, table = layouts[name.split("@")[0]]
            fn()
            got = out.clone()
            if table is None:
                continue
            # The same keys as a contiguous cache, gathered in the table's page order.
            kc = kk[table.long()].view(batch, length, HKV, D)
            vc = vv[table.long()].view(batch, length, HKV, D)
            want = fa4.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens)
            del kc, vc
            if not torch.allclose(got, want, atol=2e-2, rtol=2e-2):
                print(f"MISMATCH {name} page={page} B={batch} L={length}: max diff "
                      f"{(got.float() - want.float()).abs().max().item():.3e}", flush=True)
        samples = {name: [] for name in fns}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                samples[name].append(gbps(batch, length, read_flush_ms(fns[name], quick=True)))
        med = {name: sorted(s)[len(s) // 2] for name, s in samples.items()}
        print(f"{page:>5} {batch:>4} {length:>6} | " + " ".join(f"{med[n]:16.0f}" for n in names), flush=True)
        del q, k, v, kp, vp, out, fns
        torch.cuda.empty_cache()


def reordered(table, how, cfg, splits, length, page):
    """The shuffled table with the same pages per sequence, met in another order (see the module doc)."""
    batch, per_seq = table.shape
    if how == "sorted-seq":
        return table.sort(dim=1).values.contiguous()
    if how == "sorted-split":
        tiles = -(-length // cfg.block_n)
        pages_per_split = max(1, -(-tiles // splits) * cfg.block_n // page)
        parts = [table[:, i:i + pages_per_split].sort(dim=1).values for i in range(0, per_seq, pages_per_split)]
        return torch.cat(parts, dim=1).contiguous()
    if how == "runs8":
        runs = table.numel() // 8
        order = torch.randperm(runs, device=table.device)
        return (order[:, None] * 8 + torch.arange(8, device=table.device)).flatten().to(torch.int32).view(batch, -1)
    raise ValueError(f"unknown table {how!r}")


if __name__ == "__main__":
    main()
