"""Does a decode program that reads whole pages (all kv heads of its tokens) read a shuffled paged cache faster than
fa4's per-kv-head programs? A probe for issue #5's paged 268 MB rows.

    python benchmarks/decode_heads_probe.py [--rows 1:65536,8:8192,1:8192] [--rounds 5]
        [--configs 16/4/3/8,32/4/3/4] [--programs 128]

fa4's decode step gives each (sequence, kv head, split) its own program: it reads 256-byte rows of one head,
2 KB apart, from each 256 KB page (128 tokens x 8 kv heads x 128 x bf16), while seven other programs read the
same page's other heads. Session 19's plain reader read whole pages of the same shuffled pool at ~2,950 GB/s;
the decode step reads it at ~2,750 (contiguous ~2,830), and session 37 ruled out the address translation.

Here one program takes a split of one sequence's keys for HG adjacent kv heads (config BLOCK_T/warps/stages/HG):
each tile is BLOCK_T tokens x HG heads, BLOCK_T runs of HG x 256 contiguous bytes (HG = 8: one run of a page).
The scores are the product of the HG·group query heads with all BLOCK_T·HG (token, head) rows, masked to each
query head's own kv head. At HG = 4 the 16 query rows fill the smallest tl.dot exactly, so the products cost what
fa4's 16-row blocks (4 useful rows) cost per byte; HG = 8 costs twice that. P·V with the masked P sums only each
head's rows. The splits (programs / (B · Hkv / HG) of them) merge in fa4's combine kernel, launched plainly (no
PDL, no cluster): the `kernel` columns time the attention kernel alone. Columns: GB/s of K+V under the read-only
L2 flush, median of interleaved rounds; `fa4` is the public call (its merge included) on the same tensors. Each
probe output is compared with fa4's first.
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

from fa4 import inference  # noqa: E402
from fa4.kernels.triton import combine  # noqa: E402
from tune_decode import D, HKV, HQ, PAGE, gbps, make_inputs, read_flush_ms  # noqa: E402


@triton.jit
def _heads_kernel(Q, K, V, OutP, LseP, Table, seqlen_k, tiles_per_split, batch,
                  stride_kb, stride_ks, stride_vb, stride_vs, stride_ptb, page_size, qk_scale,
                  HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, PAGED: tl.constexpr,
                  HG: tl.constexpr):
    split = tl.program_id(0)
    b = tl.program_id(1)
    h0 = tl.program_id(2) * HG  # first kv head of this program's HG heads
    GROUP: tl.constexpr = HQ // HKV
    FLAT: tl.constexpr = BLOCK_T * HG
    rows = h0 * GROUP + tl.arange(0, HG * GROUP)  # query heads
    offs_d = tl.arange(0, D)
    cols = tl.arange(0, FLAT)
    col_tok = cols // HG
    q = tl.load(Q + b.to(tl.int64) * (HQ * D) + rows[:, None] * D + offs_d[None, :])
    head_ok = (h0 + cols[None, :] % HG) == (rows[:, None] // GROUP)
    start = split * tiles_per_split * BLOCK_T
    end = tl.minimum(start + tiles_per_split * BLOCK_T, seqlen_k)
    m_i = tl.zeros([HG * GROUP], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([HG * GROUP], dtype=tl.float32)
    acc = tl.zeros([HG * GROUP, D], dtype=tl.float32)
    # (token, head) row c of a tile: token c // HG (a token's heads are adjacent, tokens HKV·D apart), head h0 + c % HG.
    flat_offs = (col_tok * (HKV * D) + (h0 + cols % HG) * D)[:, None] + offs_d[None, :]
    if PAGED:
        pt_row = Table + b.to(tl.int64) * stride_ptb
        next_page = tl.load(pt_row + start // page_size, mask=start < end, other=0)
    for t in range(start, end, BLOCK_T):
        if PAGED:
            page = next_page.to(tl.int64)
            next_page = tl.load(pt_row + (t + BLOCK_T) // page_size, mask=t + BLOCK_T < end, other=0)
            row0 = (t % page_size).to(tl.int64)
            kbase = page * stride_kb + row0 * stride_ks
            vbase = page * stride_vb + row0 * stride_vs
        else:
            tt = t + tl.zeros([], dtype=tl.int64)
            kbase = b.to(tl.int64) * stride_kb + tt * stride_ks
            vbase = b.to(tl.int64) * stride_vb + tt * stride_vs
        tok_ok = (t + col_tok) < end
        k = tl.load(K + kbase + flat_offs, mask=tok_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(head_ok & tok_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + vbase + flat_offs, mask=tok_ok[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    prow = (split * batch + b).to(tl.int64) * HQ + rows
    tl.store(LseP + prow, lse)
    tl.store(OutP + prow[:, None] * D + offs_d[None, :], acc / l_safe[:, None])


def heads_call(q, k, v, table, out, splits, cfg, merge=True):
    """The probe step: the heads kernel over `splits` key ranges of each sequence and cfg's HG kv heads a
    program, then (merge) fa4's combine."""
    block_t, num_warps, num_stages, hg = cfg
    batch, length = q.shape[0], (table.shape[1] * PAGE if table is not None else k.shape[1])
    assert k.stride(-1) == 1 and k.stride(-2) == D and k.stride(-3) == HKV * D, "tokens of a page are contiguous rows"
    tiles = -(-length // block_t)
    per_split = -(-tiles // splits)
    part = torch.empty(splits, batch, 1, HQ, D, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(splits, batch, 1, HQ, device=q.device, dtype=torch.float32)
    lse = torch.empty(batch, HQ, 1, device=q.device, dtype=torch.float32)
    paged = table is not None
    args = (q, k, v, part, lse_part, table if paged else q, length, per_split, batch,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), table.stride(0) if paged else 0,
            PAGE if paged else 1, D ** -0.5 * 1.4426950408889634)

    def call():
        _heads_kernel[(splits, batch, HKV // hg)](*args, HQ=HQ, HKV=HKV, D=D, BLOCK_T=block_t, PAGED=paged, HG=hg,
                                                  num_warps=num_warps, num_stages=num_stages)
        if not merge:
            return
        combine.combine_into(part, lse_part, out, lse, num_splits=splits, batch=batch, seqlen=1, num_heads=HQ,
                             head_dv=D, partial_strides=(batch * HQ * D, HQ * D, HQ * D, D),
                             lse_partial_strides=(batch * HQ, HQ, HQ, 1), lse_strides=(HQ, 1, 1))
    return call


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1:65536,8:8192,1:8192")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--configs", default="16/4/3/8,32/4/3/4", help="BLOCK_T/warps/stages/kv heads a program,...")
    ap.add_argument("--programs", default="128,256", help="programs a step (splits = programs / B), comma list")
    args = ap.parse_args()
    rows = [tuple(int(x) for x in r.split(":")) for r in args.rows.split(",")]
    configs = [tuple(int(x) for x in c.split("/")) for c in args.configs.split(",")]
    programs = [int(x) for x in args.programs.split(",")]
    print(f"# {torch.cuda.get_device_name()}; GB/s of K+V, read-only flush, median of {args.rounds} rounds",
          flush=True)
    for batch, length in rows:
        for paged in (True, False):
            q, k, v, lens, table = make_inputs(batch, length, paged)
            ref = torch.empty_like(q)
            fns = {"fa4": lambda: inference.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, page_table=table,
                                                                    out=ref)}
            fns["fa4"]()
            for cfg in configs:
                for n in programs:
                    splits = max(1, n // (batch * (HKV // cfg[3])))
                    out = torch.full_like(q, float("nan"))
                    fn = heads_call(q, k, v, table, out, splits, cfg)
                    fn()
                    err = (out.float() - ref.float()).abs().max().item()
                    name = f"{'/'.join(map(str, cfg))} s{splits}"
                    if not err < 2e-2:
                        print(f"MISMATCH {name} B={batch} L={length} paged={paged}: max|diff| {err:.3g}", flush=True)
                        continue
                    fns[name] = fn
                    fns[name + " kernel"] = heads_call(q, k, v, table, out, splits, cfg, merge=False)
            samples = {name: [] for name in fns}
            names = list(fns)
            for r in range(args.rounds):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    samples[name].append(gbps(batch, length, read_flush_ms(fns[name], False)))
            cells = "  ".join(f"{name} {statistics.median(s):.0f}" for name, s in samples.items())
            print(f"B={batch} L={length} {'paged' if paged else 'contig'}: {cells}", flush=True)
            q = k = v = table = fns = None
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
