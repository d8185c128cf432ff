"""Split-KV decode with several kv heads a program (opt-in variant of decode.py's kernel, `decode.HEADS_PER_PROGRAM`).

decode.py's kernel runs one program per (sequence, kv head, split). A cache token row holds every kv head
(Hkv · D values, 2 KB at Hkv 8, D 128 in bf16), so each program reads 256 B of every 2 KB row, and the 8 programs of
a sequence's split read the same pages from 8 SMs. With a shuffled page table that costs 1-3% of the read rate
against a contiguous cache (benchmarks/NOTES.md, session 10: an in-order table costs nothing, 2 MB pages cost the
same as 256 KB ones), which fits address-translation misses: every page is a new translation for each of the 8
SMs that read it.

Here one program reads HB kv heads of its token range: K and V tiles are [HB, BLOCK_N, D] (HB heads side by side
in each token row), the scores a batched product per head, [HB, M, D] x [HB, D, BLOCK_N] (tl.dot on 3-D tensors),
with the group's query heads as the M = 16 rows of each head (padded). Per (kv head, query row) the online softmax
is the one of decode.py:

    S = Q K_jᵀ · scale · log2 e,  m' = max(m, rowmax S),  P = exp2(S - m'),  l = l·exp2(m - m') + rowsum P,
    O = O·exp2(m - m') + P V_j

Scope (decode.heads_per_program decides): one query token, GQA group <= 16, no rotary, window, softcap or sink,
D = Dv a power of two, 16-bit inputs, a contiguous cache or a paged one whose pages hold whole tiles. Its launch
takes decode.Step's head of arguments, so the Step's fast path and CUDA-graph behaviour are unchanged.
"""
import triton
import triton.language as tl
from triton.language.extra import cuda as tl_cuda

from fa4.kernels.triton.rotary import cache_length, cache_row

ROWS = 16  # query rows per kv head in the batched product (the smallest tl.dot M); the group is padded to it


@triton.jit(do_not_specialize=["batch", "seqlen_fixed", "seqlen_new"])
def _decode_heads_kernel(Q, K, V, Out, Lse, OutPartial, LsePartial, Sink, CacheSeqlens, CacheBatchIdx, PageTable,
                         Cos, Sin, seqlen_fixed,
                         stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                         stride_ob, stride_oh, stride_ptb,
                         batch, num_heads_kv, group, seqlen_new, page_size, qk_scale,
                         HB: tl.constexpr, M: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                         SPLIT: tl.constexpr, WRITE_LSE: tl.constexpr, HAS_SEQLENS: tl.constexpr,
                         HAS_BATCH_IDX: tl.constexpr, PAGED: tl.constexpr, PDL_PRIMARY: tl.constexpr):
    if PDL_PRIMARY:
        tl_cuda.gdc_launch_dependents()  # the merge waits for this kernel's end (see decode._decode_kernel)
    # Grid: axis 0 = (sequence, group of HB kv heads), axis 1 = split of the key range.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    groups_per_seq = num_heads_kv // HB
    b = pid // groups_per_seq
    h0 = (pid % groups_per_seq) * HB

    seqlen_k = cache_length(CacheSeqlens, b, seqlen_fixed, HAS_SEQLENS) + seqlen_new
    tiles_per_split = tl.cdiv(tl.cdiv(seqlen_k, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seqlen_k)

    offs_h = tl.arange(0, HB)
    offs_m = tl.arange(0, M)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    # Query head of (kv head h0 + i, row r): (h0 + i) · group + r; rows past the group are padding.
    head = (h0 + offs_h)[:, None] * group + offs_m[None, :]  # [HB, M]
    row_ok = (offs_m < group)[None, :] & (offs_h >= 0)[:, None]  # [HB, M]
    q = tl.load(Q + b.to(tl.int64) * stride_qb + head[:, :, None].to(tl.int64) * stride_qh + offs_d[None, None, :],
                mask=row_ok[:, :, None], other=0.0)

    # A tile's offsets from its first token row, loop-invariant and 32-bit (decode.tile_offsets_fit_int32 holds).
    k_offs = (h0 + offs_h)[:, None, None] * stride_kh + offs_n[None, :, None] * stride_ks + offs_d[None, None, :]
    v_offs = (h0 + offs_h)[:, None, None] * stride_vh + offs_n[None, :, None] * stride_vs + offs_d[None, None, :]
    if PAGED:
        pt_row = PageTable + b.to(tl.int64) * stride_ptb
        next_page = tl.load(pt_row + start // page_size, mask=start < end, other=0)
    else:
        cb = cache_row(CacheBatchIdx, b, HAS_BATCH_IDX)
        K = K + cb * stride_kb
        V = V + cb * stride_vb

    acc = tl.zeros([HB, M, D], dtype=tl.float32)
    m_i = tl.zeros([HB, M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([HB, M], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        first = start_n + tl.zeros([], dtype=tl.int64)  # 64-bit before the multiplies (a Python int when interpreted)
        if PAGED:
            # The tile sits in one page (page_size % BLOCK_N == 0); the next tile's page is fetched a step ahead.
            page = next_page.to(tl.int64)
            next_page = tl.load(pt_row + (start_n + BLOCK_N) // page_size, mask=start_n + BLOCK_N < end, other=0)
            in_page = first % page_size
            k_base = page * stride_kb + in_page * stride_ks
            v_base = page * stride_vb + in_page * stride_vs
        else:
            k_base = first * stride_ks
            v_base = first * stride_vs
        col_ok = (start_n + offs_n) < end
        k = tl.load(K + k_base + k_offs, mask=col_ok[None, :, None], other=0.0)  # [HB, BLOCK_N, D]
        s = tl.dot(q, tl.permute(k, (0, 2, 1))) * qk_scale  # [HB, M, BLOCK_N]
        s = tl.where(col_ok[None, None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 2))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen keeps exp2 finite
        p = tl.exp2(s - m_sub[:, :, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 2)
        v = tl.load(V + v_base + v_offs, mask=col_ok[None, :, None], other=0.0)  # [HB, BLOCK_N, D]
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, :, None])
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, :, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    num_heads = num_heads_kv * group
    if SPLIT:
        # Partials (num_splits, B, 1, Hq, Dv) and (num_splits, B, 1, Hq), as decode.py writes them.
        prow = (split * batch + b).to(tl.int64) * num_heads + head
        tl.store(LsePartial + prow, lse, mask=row_ok)
        tl.store(OutPartial + prow[:, :, None] * D + offs_d[None, None, :], out, mask=row_ok[:, :, None])
    else:
        o_ptr = Out + b.to(tl.int64) * stride_ob + head[:, :, None].to(tl.int64) * stride_oh + offs_d[None, None, :]
        tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, :, None])
        if WRITE_LSE:
            tl.store(Lse + b.to(tl.int64) * num_heads + head, lse, mask=row_ok)  # lse (B, Hq, 1)


def heads_launch(q, k_cache, v_cache, out_strides, *, heads_per_program, block_n, num_splits, want_lse, has_seqlens,
                 has_batch_idx, paged, page_table, seqlen_new, softmax_scale, pdl):
    """(grid, tail, constexprs) of one launch; its head of arguments is decode.Step's (14 values). out_strides:
    the output's (batch, token, head) element strides, as decode.Step has them."""
    batch, _, num_heads, head_d = q.shape
    num_heads_kv = k_cache.shape[2]
    grid = (batch * (num_heads_kv // heads_per_program), num_splits, 1)
    tail = (q.stride(0), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out_strides[0], out_strides[2],
            page_table.stride(0) if paged else 0,
            batch, num_heads_kv, num_heads // num_heads_kv, seqlen_new, k_cache.shape[1] if paged else 1,
            softmax_scale * 1.4426950408889634)
    constexprs = dict(HB=heads_per_program, M=ROWS, D=head_d, BLOCK_N=block_n, SPLIT=num_splits > 1,
                      WRITE_LSE=want_lse, HAS_SEQLENS=has_seqlens, HAS_BATCH_IDX=has_batch_idx, PAGED=paged,
                      PDL_PRIMARY=pdl)
    return grid, tail, constexprs
