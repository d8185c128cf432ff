"""What the paged decode rows pay for shuffled pages, and four ways of reading them (issue #5's 268 MB paged rows).

    python benchmarks/decode_page_order.py orders        # page orders through the public call
    python benchmarks/decode_page_order.py strided       # split order A/B: chunks against tiles dealt in turn
    python benchmarks/decode_page_order.py head-cluster  # the kv-head programs of a split as one cluster
    python benchmarks/decode_page_order.py cluster8      # B = 1 as 8 splits merged in 8-CTA clusters (64 CTAs)

All: bf16 decode-suite rows (Hq 32, Hkv 8, D 128, page 128), GB/s of K+V under the read-only L2 flush, median
(min-max) of interleaved rounds; each variant's output is compared with the public call's first (orders:
with the contiguous cache's; the pool is relabelled for each order so that every order holds the same keys).

- orders: the same cache read through page tables in several orders: `sorted` (pages in sequence order),
  `shuffled` (a random permutation, as the suite), `withinG` (shuffled only inside aligned groups of G pages;
  G = 8 is one 2 MB group of 256 KB pages), `blocksG` (groups of G pages in order, the groups shuffled), `reversed`.
- strided: decode.Step built with STRIDED_PAGED / STRIDED_CONTIGUOUS on and off (split s takes tiles s, s + S, ...
  instead of a contiguous chunk), at the heuristic's split count and, at B = 1, at 32 splits.
- head-cluster: the shipped B = 1 step (16 splits, PDL merge) with its attention kernel launched in clusters of c
  consecutive (sequence, kv head) programs, i.e. the kv heads of one split on one GPC (no cluster barrier: the kernel
  is unchanged), with its own shared memory or padded to 116 KB (one CTA an SM); plus pages in order for reference.
- cluster8: 8 splits merged in a cluster of 8 (decode's CLUSTER_MERGE path; 64 CTAs at B = 1) against the shipped
  16 splits, with several tile configs.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fa4 import inference  # noqa: E402
from fa4.kernels.direct_launch import Launch  # noqa: E402
from fa4.kernels.triton import decode  # noqa: E402
from tune_decode import decode_step, gbps, kernel_call, make_inputs, public_choice, read_flush_ms  # noqa: E402


class PaddedLaunch(Launch):
    """A Launch whose (clustered) launches ask for `pad` bytes of shared memory (None: the kernel's own)."""
    pad = None

    def with_cluster(self, metadata):
        num_warps, _, shared = metadata
        return (num_warps, self.cluster, self.pad or shared)


def step_fn(q, k, v, lens, table, out, splits, cfg, cluster=1, pad=None, **switches):
    """One decode step with a forced split count and config, built with decode.py's switches set as given; the
    attention launch optionally re-clustered / padded."""
    saved = {name: getattr(decode, name) for name in switches}
    try:
        for name, value in switches.items():
            setattr(decode, name, value)
        step = decode_step(q, k, v, lens, table, out, splits, cfg)
    finally:
        for name, value in saved.items():
            setattr(decode, name, value)
    if cluster > 1 or pad:
        a = step.attend
        new = PaddedLaunch(a.fn, a.n_head, a.grid, a.tail, a.constexprs, a.num_warps, a.num_stages, cluster=cluster)
        new.pad = pad
        step.attend = new
        step.launches = tuple(x for x in (step.append, new, step.combine) if x is not None)
        step.ready = False
    call = kernel_call(q, k, v, lens, table, out, splits, cfg, step)
    call.step = step
    return call


def public(q, k, v, lens, table):
    """The public call's output, config and split count on these tensors."""
    out = torch.empty_like(q)
    inference._steps.clear()  # so that the last Step cached is this call's
    inference.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, page_table=table, out=out)
    cfg, splits = public_choice()
    return out, decode.Config(*cfg), splits


def race(tag, fns, batch, length, rounds):
    res = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            res[name].append(gbps(batch, length, read_flush_ms(fn, False)))
    print(tag, flush=True)
    print("   " + "  ".join(f"{n} {statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})" for n, v in res.items()),
          flush=True)


def checked(fns, q, ref):
    """fns with those whose first output differs from ref dropped (and reported)."""
    kept = {}
    for name, (fn, out) in fns.items():
        try:
            fn()
            fn()
            torch.cuda.synchronize()
        except Exception as exc:  # a variant that cannot launch here is reported, not fatal
            print(f"   {name}: {type(exc).__name__} {str(exc)[:200]}")
            continue
        # Relative to the output's size: over 65536 random keys an output element is ~1e-2, so an absolute bound
        # would pass a wrong key set.
        err = (out.float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
        if not err < 2e-2:
            print(f"   {name}: MISMATCH {err}")
            continue
        kept[name] = fn
    return kept


def orders(rows, rounds, gen):
    def within(n, g):
        idx = torch.arange(n).view(-1, g)
        return torch.stack([row[torch.randperm(g, generator=gen)] for row in idx]).reshape(-1)

    def blocks(n, g):
        return torch.arange(n).view(-1, g)[torch.randperm(n // g, generator=gen)].reshape(-1)

    for batch, length in rows:
        q, k, v, lens, table = make_inputs(batch, length, True)
        n = table.numel()
        groups = [g for g in (2, 8, 64) if n % g == 0]  # groups of G pages need a pool of whole groups
        perms = {"sorted": torch.arange(n), "shuffled": torch.randperm(n, generator=gen),
                 **{f"within{g}": within(n, g) for g in groups},
                 **{f"blocks{g}": blocks(n, g) for g in groups if g > 2}, "reversed": torch.arange(n - 1, -1, -1)}
        # The pool is the contiguous cache viewed as pages: every order's answer is the contiguous cache's.
        k_rows, v_rows = (x.view(batch, length, *x.shape[2:]) for x in (k, v))
        ref = torch.empty_like(q)
        inference.flash_attn_with_kvcache(q, k_rows, v_rows, cache_seqlens=lens, out=ref)
        fns = {}
        for name, perm in perms.items():
            pages = perm.to(device="cuda", dtype=torch.int32).view_as(table)
            # Relabel the pool so that sequence b's j-th page sits at pool slot perm[b·P + j] under this order.
            k_pool, v_pool = torch.empty_like(k), torch.empty_like(v)
            k_pool[pages.flatten().long()] = k_rows.reshape(k.shape)
            v_pool[pages.flatten().long()] = v_rows.reshape(v.shape)
            out = torch.full_like(q, float("nan"))
            fns[name] = (lambda kp=k_pool, vp=v_pool, tab=pages, out=out: inference.flash_attn_with_kvcache(
                q, kp, vp, cache_seqlens=lens, page_table=tab, out=out), out)
        race(f"B={batch} L={length} paged, page orders", checked(fns, q, ref), batch, length, rounds)


def strided(rows, rounds, tables=1):
    for batch, length in rows:
        for paged, draw in [(True, i) for i in range(tables)] + [(False, 0)]:
            q, k, v, lens, table = make_inputs(batch, length, paged)  # a fresh random page table each draw
            ref, cfg, splits = public(q, k, v, lens, table)
            variants = {"chunk": (splits, False), "strided": (splits, True)}
            if batch == 1:
                variants.update({"chunk32": (32, False), "strided32": (32, True)})
            fns = {}
            for name, (s, on) in variants.items():
                out = torch.full_like(q, float("nan"))
                fns[name] = (step_fn(q, k, v, lens, table, out, s, cfg, STRIDED_PAGED=on, STRIDED_CONTIGUOUS=on), out)
            layout = f"paged (table {draw})" if paged else "contiguous"
            race(f"B={batch} L={length} {layout} splits={splits} cfg={tuple(cfg)}", checked(fns, q, ref), batch,
                 length, rounds)


def head_cluster(rows, rounds):
    for batch, length in rows:
        for paged in (True, False):
            q, k, v, lens, table = make_inputs(batch, length, paged)
            ref, cfg, splits = public(q, k, v, lens, table)
            if splits <= decode.MAX_CLUSTER:
                print(f"B={batch} L={length}: {splits} splits merge in a cluster already; skipped")
                continue
            variants = {"ship": (1, None), "hc2": (2, None), "hc4": (4, None), "hc8": (8, None),
                        "pad1": (1, 116 << 10), "hc2pad": (2, 116 << 10), "hc4pad": (4, 116 << 10)}
            fns = {}
            for name, (c, pad) in variants.items():
                out = torch.full_like(q, float("nan"))
                fns[name] = (step_fn(q, k, v, lens, table, out, splits, cfg, c, pad), out)
            fns = checked(fns, q, ref)
            if paged:
                in_order = torch.arange(table.numel(), device="cuda", dtype=torch.int32).view_as(table)
                ref2, _, _ = public(q, k, v, lens, in_order)
                out = torch.full_like(q, float("nan"))
                fns.update(checked({"sorted": (step_fn(q, k, v, lens, in_order, out, splits, cfg), out)}, q, ref2))
            race(f"B={batch} L={length} {'paged' if paged else 'contiguous'} splits={splits} cfg={tuple(cfg)}", fns,
                 batch, length, rounds)


def cluster8(rows, rounds):
    configs = [(16, (64, 4, 3)), (8, (64, 4, 3)), (8, (64, 4, 5)), (8, (64, 4, 7)), (8, (128, 4, 3)),
               (8, (128, 4, 4)), (8, (128, 8, 3))]
    for batch, length in rows:
        for paged in (True, False):
            q, k, v, lens, table = make_inputs(batch, length, paged)
            ref, _, _ = public(q, k, v, lens, table)
            fns = {}
            for s, cfg in configs:
                out = torch.full_like(q, float("nan"))
                name = f"{s}x{cfg[0]}/{cfg[1]}/{cfg[2]}"
                fn = step_fn(q, k, v, lens, table, out, s, decode.Config(*cfg))
                if s <= decode.MAX_CLUSTER and not fn.step.cluster:
                    print(f"   {name}: this device / Triton does not merge in clusters (decode.cluster_size); skipped")
                    continue
                fns[name] = (fn, out)
            race(f"B={batch} L={length} {'paged' if paged else 'contiguous'} (splits x tile/warps/stages)",
                 checked(fns, q, ref), batch, length, rounds)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("orders", "strided", "head-cluster", "cluster8"))
    ap.add_argument("--rows", default="1:65536,8:8192", help="B:L,... (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tables", type=int, default=1, help="strided: paged rows over this many random page tables")
    args = ap.parse_args()
    rows = [tuple(int(x) for x in r.split(":")) for r in args.rows.split(",")]
    print(f"# {torch.cuda.get_device_name()}; read-only flush; GB/s median (min-max) of {args.rounds} rounds",
          flush=True)
    gen = torch.Generator().manual_seed(0)
    run = {"orders": lambda: orders(rows, args.rounds, gen), "strided": lambda: strided(rows, args.rounds, args.tables),
           "head-cluster": lambda: head_cluster(rows, args.rounds), "cluster8": lambda: cluster8(rows, args.rounds)}
    run[args.what]()


if __name__ == "__main__":
    main()
