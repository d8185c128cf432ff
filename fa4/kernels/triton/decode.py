"""Split-KV attention over a KV cache (decode, speculative decoding, chunked prefill), in portable Triton.

Decoding reads the whole cache for a handful of query rows, so the kernel is bound by memory bandwidth and its
job is to keep every SM streaming K and V. Two ideas do it:

- GQA packing: the Hq / Hkv query heads that share a kv head, times the Sq query tokens, are the rows of one
  tile (row r = token r // group, head r % group), so each K/V tile is read once for all of them. The tile is
  padded to BLOCK_M >= 16 rows, the smallest tensor-core product (tl.dot).
- Split-KV: with few sequences and kv heads there are too few (sequence, kv head) programs to fill the GPU, so
  each one's key range is cut into `num_splits` chunks of key tiles handled by separate programs (the STRIDED
  switch deals the tiles out in turn instead: split s takes tiles s, s + num_splits, ...). Each writes a partial
  result normalised by its own sum, o_s = Σ_j exp(s_j - lse_s) v_j, and its lse_s; combine.py merges them:
  lse = log Σ_s exp(lse_s),  out = Σ_s exp(lse_s - lse) o_s.

Per program, over its key tiles K_j, V_j (scores in base 2: s · scale · log2 e):

    S = Q K_jᵀ,  m' = max(m, rowmax S),  P = exp2(S - m'),  l = l·exp2(m - m') + rowsum P,
    O = O·exp2(m - m') + P V_j                     (P cast to the input dtype, as FlashAttention does)

Keys: contiguous cache (Bc, L, Hkv, D) indexed by cache_batch_idx[b] (or b), or paged
(num_pages, page_size, Hkv, D) through page_table (B, max_pages): key j of sequence b is row j % page_size of
page page_table[b, j // page_size]. Sequence b has cache_seqlens[b] + seqlen_new keys; causal and the window
are aligned to the end of the cache (bottom-right). q can be rotated in the prologue (rotary.rotated_rows) at
positions cache_seqlens[b] + token (causal/local) or cache_seqlens[b].
"""
from contextlib import nullcontext

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda as tl_cuda

from fa4.kernels.direct_launch import Launch
from fa4.kernels.direct_launch import current_device as _current_device
from fa4.kernels.direct_launch import hooks_idle as _hooks_idle
from fa4.kernels.direct_launch import raw_stream as _raw_stream
from fa4.kernels.triton.combine import merged_lse
from fa4.kernels.triton.common import LOG2E, softcap_level, tanh_via_exp2, visible_mask
from fa4.kernels.triton.rotary import cache_length, cache_row, rotated_rows


@triton.jit
def _tile_pages(pt_row, start_n, end, offs_n, page_size, PAGE_ALIGNED: tl.constexpr):
    """Page of key tile [start_n, start_n + BLOCK_N): one scalar when the tile sits in one page, else per key."""
    if PAGE_ALIGNED:
        page = tl.load(pt_row + start_n // page_size, mask=start_n < end, other=0)
    else:
        cols = start_n + offs_n
        page = tl.load(pt_row + cols // page_size, mask=cols < end, other=0)
    return page


@triton.jit
def _cluster_sync(token):
    """Every thread of every CTA in this thread-block cluster arrives, then waits for all of them (sm_90). The
    arrive releases and the wait acquires at cluster scope, so the partial results each CTA stored before it are
    visible to every CTA of the cluster after it. `token` (a value computed before the barrier) keeps the
    compiler from moving the asm; the returned 0 is added to what follows for the same reason."""
    return tl.inline_asm_elementwise(
        "barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;\n\tmov.u32 $0, 0;",
        "=r,r", [token], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _merge_in_cluster(OutPartial, LsePartial, Out, Lse, Sink, split, b, tok, head, row_ok, batch, seqlen_q,
                      num_heads, stride_ob, stride_os, stride_oh,
                      HEAD_DV: tl.constexpr, CLUSTER: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
                      MERGE_COLS: tl.constexpr, HAS_SINK: tl.constexpr, WRITE_LSE: tl.constexpr):
    """The combine's merge (combine.py) done by the split programs themselves, right after a cluster barrier: the
    CLUSTER CTAs of one (sequence, kv head, row block) are the splits, and CTA `split` merges columns
    [split · MERGE_COLS, (split + 1) · MERGE_COLS) of every row from all splits' partials (L2, read past L1).
    lse = log(Σ_s exp(lse_s) [+ exp(sink)]),  out = Σ_s exp(lse_s − lse) o_s, around the largest term."""
    sp = tl.arange(0, BLOCK_SPLITS)
    prow = ((sp[:, None] * batch + b).to(tl.int64) * seqlen_q + tok[None, :]) * num_heads + head[None, :]
    ok = (sp[:, None] < CLUSTER) & row_ok[None, :]
    lse_s = tl.load(LsePartial + prow, mask=ok, other=float("-inf"), cache_modifier=".cg")  # (splits, rows)
    sink = tl.load(Sink + head, mask=row_ok, other=0.0).to(tl.float32) if HAS_SINK else 0.0
    lse, lse_sub = merged_lse(lse_s, sink, HAS_SINK)
    live = lse_s > float("-inf")
    w = tl.where(live, tl.exp(lse_s - lse_sub[None, :]), 0.0)
    cols = split * MERGE_COLS + tl.arange(0, MERGE_COLS)
    col_ok = cols < HEAD_DV
    o = tl.load(OutPartial + prow[:, :, None] * HEAD_DV + cols[None, None, :],
                mask=live[:, :, None] & col_ok[None, None, :], other=0.0, cache_modifier=".cg")
    out = tl.sum(w[:, :, None] * o, 0)  # (rows, MERGE_COLS)
    o_rows = b.to(tl.int64) * stride_ob + tok.to(tl.int64) * stride_os + head.to(tl.int64) * stride_oh
    tl.store(Out + o_rows[:, None] + cols[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])
    if WRITE_LSE:
        if split == 0:
            # lse is contiguous (B, Hq, Sq).
            tl.store(Lse + (b.to(tl.int64) * num_heads + head) * seqlen_q + tok, lse, mask=row_ok)


# Sizes that change from call to call without changing the code: no recompilation for their value (Triton would
# otherwise specialise ints equal to 1 or divisible by 16). Absent optional tensors are passed as None (a constexpr
# for Triton): their code is never generated. seqlen_fixed follows the pointers so that a launch's per-call values
# form its head (see Launch).
@triton.jit(do_not_specialize=["batch", "seqlen_fixed", "seqlen_new"])
def _decode_kernel(Q, K, V, Out, Lse, OutPartial, LsePartial, Sink,
                   CacheSeqlens, CacheBatchIdx, PageTable, Cos, Sin,
                   seqlen_fixed,
                   stride_qb, stride_qs, stride_qh,
                   stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh,
                   stride_ob, stride_os, stride_oh,
                   stride_ptb, stride_rot,
                   batch, seqlen_q, num_heads_kv, group, seqlen_new, page_size, rot_half,
                   qk_scale, cap_scale, cap_log2, window_left, window_right,
                   HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   SPLIT: tl.constexpr, WRITE_LSE: tl.constexpr,
                   HAS_SEQLENS: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, PAGED: tl.constexpr,
                   PAGE_ALIGNED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, HAS_SINK: tl.constexpr,
                   ROTARY: tl.constexpr, ROTARY_INTERLEAVED: tl.constexpr, ROTARY_PER_TOKEN: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, PDL_PRIMARY: tl.constexpr, TILE_BASE: tl.constexpr,
                   CLUSTER: tl.constexpr = 0, BLOCK_SPLITS: tl.constexpr = 1, MERGE_COLS: tl.constexpr = 1,
                   STRIDED: tl.constexpr = False):
    if PDL_PRIMARY:
        # The combine is launched as a programmatic dependent: let it become resident now (it waits for this
        # kernel's end with griddepcontrol.wait), so its launch latency hides under the key loop.
        tl_cuda.gdc_launch_dependents()
    # Grid: axis 0 = (sequence, kv head), axis 1 = split of the key range, axis 2 = block of packed rows. Merged in
    # a cluster (CLUSTER splits), axis 0 = (sequence, kv head) · CLUSTER + split instead: consecutive CTAs along
    # axis 0 form one cluster.
    if CLUSTER:
        pid_bh = tl.program_id(0) // CLUSTER
        split = tl.program_id(0) % CLUSTER
        num_splits = CLUSTER
    else:
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        num_splits = tl.num_programs(1)
    pid_m = tl.program_id(2)
    b = pid_bh // num_heads_kv
    h_kv = pid_bh % num_heads_kv
    num_rows = seqlen_q * group
    m_start = pid_m * BLOCK_M

    cache_len = cache_length(CacheSeqlens, b, seqlen_fixed, HAS_SEQLENS)
    seqlen_k = cache_len + seqlen_new

    # Packed rows: token and query head of each row; padding rows (past Sq·group) are never stored.
    rows = m_start + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    tok = rows // group
    head = h_kv * group + rows % group
    rows_k = tok + (seqlen_k - seqlen_q)  # each row's position in key coordinates (bottom-right alignment)

    # Key range of this block of rows, cut at BLOCK_N multiples into num_splits chunks.
    tok_first = m_start // group
    tok_last = (tl.minimum(m_start + BLOCK_M, num_rows) - 1) // group
    lo = 0
    hi = seqlen_k
    if HAS_LEFT:
        lo = tl.maximum(tok_first + seqlen_k - seqlen_q - window_left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(tok_last + seqlen_k - seqlen_q + window_right + 1, seqlen_k)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.maximum(hi, lo)
    if STRIDED:
        # Split s takes every num_splits-th tile from tile s (an A/B switch: see STRIDED_PAGED). Any subset of the
        # tiles merges exactly, since each split's partial carries its own lse.
        start = lo + split * BLOCK_N
        end = hi
        step = BLOCK_N * num_splits
    else:
        tiles_per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), num_splits)
        start = lo + split * tiles_per_split * BLOCK_N
        end = tl.minimum(start + tiles_per_split * BLOCK_N, hi)
        step = BLOCK_N

    # Q tile (BLOCK_M, BLOCK_D), rotated in fp32 when asked, then in the input dtype for the product.
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_rows = b.to(tl.int64) * stride_qb + tok.to(tl.int64) * stride_qs + head.to(tl.int64) * stride_qh
    if ROTARY:
        if ROTARY_PER_TOKEN:
            pos = cache_len + tok
        else:
            pos = cache_len + tok * 0
        q = rotated_rows(Q, q_rows, row_ok, offs_d, pos, Cos, Sin, stride_rot, rot_half,
                         HEAD_D, BLOCK_D, ROTARY_INTERLEAVED).to(Q.dtype.element_ty)
    else:
        q = tl.load(Q + q_rows[:, None] + offs_d[None, :],
                    mask=row_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)

    # Where this sequence's keys live.
    if PAGED:
        pt_row = PageTable + b.to(tl.int64) * stride_ptb
        K = K + h_kv.to(tl.int64) * stride_kh
        V = V + h_kv.to(tl.int64) * stride_vh
    else:
        cb = cache_row(CacheBatchIdx, b, HAS_BATCH_IDX)
        K = K + cb * stride_kb + h_kv.to(tl.int64) * stride_kh
        V = V + cb * stride_vb + h_kv.to(tl.int64) * stride_vh

    # Running state. Unsplit, a sink seeds (m, l) = (sink · log2 e, 1): one logit with no value row. Split, the
    # sink joins in the combine instead, so that it is counted once.
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if HAS_SINK and not SPLIT:
        m_i = tl.load(Sink + head, mask=row_ok, other=0.0).to(tl.float32) * 1.4426950408889634
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    offs_n = tl.arange(0, BLOCK_N)
    if PAGED:
        # Pages of the first tile. Each iteration fetches the next tile's pages one step ahead, so the K/V loads
        # do not wait on a page-table load of their own iteration (which would cost the pipeline a stage).
        next_page = _tile_pages(pt_row, start, end, offs_n, page_size, PAGE_ALIGNED)
    # A tile whose rows are consecutive cache rows (contiguous cache, or a tile inside one page) is addressed as
    # one 64-bit base per tile plus loop-invariant 32-bit offsets: the per-key 64-bit multiplies leave the loop.
    k_offs = offs_n[:, None] * stride_ks + offs_d[None, :]
    v_offs = offs_n[:, None] * stride_vs + offs_dv[None, :]
    for start_n in range(start, end, step):
        cols = start_n + offs_n
        col_ok = cols < end
        if PAGED:
            page = next_page.to(tl.int64)
            next_page = _tile_pages(pt_row, start_n + step, end, offs_n, page_size, PAGE_ALIGNED)
            if PAGE_ALIGNED and TILE_BASE:
                in_page = (start_n % page_size) + tl.zeros([], dtype=tl.int64)  # first row of the tile in its page
                k_ptrs = K + (page * stride_kb + in_page * stride_ks) + k_offs
                v_ptrs = V + (page * stride_vb + in_page * stride_vs) + v_offs
            else:
                if PAGE_ALIGNED:
                    row = (start_n % page_size) + offs_n  # the whole tile sits in one page: contiguous rows
                else:
                    row = cols % page_size
                k_rows = page * stride_kb + row.to(tl.int64) * stride_ks
                v_rows = page * stride_vb + row.to(tl.int64) * stride_vs
                k_ptrs = K + k_rows[:, None] + offs_d[None, :]
                v_ptrs = V + v_rows[:, None] + offs_dv[None, :]
        elif TILE_BASE:
            first = start_n + tl.zeros([], dtype=tl.int64)  # 64-bit before the multiply (a Python int when interpreted)
            k_ptrs = K + first * stride_ks + k_offs
            v_ptrs = V + first * stride_vs + v_offs
        else:
            k_ptrs = K + cols.to(tl.int64)[:, None] * stride_ks + offs_d[None, :]
            v_ptrs = V + cols.to(tl.int64)[:, None] * stride_vs + offs_dv[None, :]
        k = tl.load(k_ptrs, mask=col_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if HAS_SOFTCAP:
            # softcap · tanh(scale · qk / softcap) · log2 e (HAS_SOFTCAP: common.softcap_level)
            qk = cap_log2 * tanh_via_exp2(qk * cap_scale, HAS_SOFTCAP == 2)
        else:
            qk = qk * qk_scale
        qk = tl.where(visible_mask(rows_k, cols, end, window_left, window_right, HAS_LEFT, HAS_RIGHT),
                      qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen nothing keeps m = -inf; subtract 0 then so exp2 gives 0, not NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs, mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # Epilogue: out = O / l, lse = (m + log2 l) · ln 2; a row that saw nothing (l = 0) gives 0 and -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    o_mask = row_ok[:, None] & (offs_dv[None, :] < HEAD_DV)
    if SPLIT:
        # Partials are contiguous (num_splits, B, Sq, Hq, Dv) and (num_splits, B, Sq, Hq).
        prow = ((split * batch + b).to(tl.int64) * seqlen_q + tok) * (num_heads_kv * group) + head
        tl.store(LsePartial + prow, lse, mask=row_ok)
        tl.store(OutPartial + prow[:, None] * HEAD_DV + offs_dv[None, :], out, mask=o_mask)
        if CLUSTER:
            zero = _cluster_sync(split)
            _merge_in_cluster(OutPartial, LsePartial, Out, Lse, Sink, split + zero, b, tok, head, row_ok, batch,
                              seqlen_q, num_heads_kv * group, stride_ob, stride_os, stride_oh,
                              HEAD_DV, CLUSTER, BLOCK_SPLITS, MERGE_COLS, HAS_SINK, WRITE_LSE)
    else:
        o_rows = b.to(tl.int64) * stride_ob + tok.to(tl.int64) * stride_os + head.to(tl.int64) * stride_oh
        tl.store(Out + o_rows[:, None] + offs_dv[None, :], out.to(Out.dtype.element_ty), mask=o_mask)
        if WRITE_LSE:
            # lse is contiguous (B, Hq, Sq).
            lrow = (b.to(tl.int64) * (num_heads_kv * group) + head) * seqlen_q + tok
            tl.store(Lse + lrow, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------------------
# Tile configurations
# ----------------------------------------------------------------------------------------------------------

class Config(tuple):
    """(BLOCK_N, num_warps, num_stages) of one launch; BLOCK_M follows from the packed row count."""
    __slots__ = ()

    def __new__(cls, block_n, num_warps, num_stages):
        return super().__new__(cls, (block_n, num_warps, num_stages))

    block_n = property(lambda self: self[0])
    num_warps = property(lambda self: self[1])
    num_stages = property(lambda self: self[2])


# fp16/bf16 on CUDA, by padded head dim, for the two regimes of choose_num_splits. Shared memory per program on
# sm_90 (D = 128, from the compiled kernel): (stages - 1) K and V tiles + ~6 KiB, so (64, 4, 3) takes 70 KiB
# (3 programs fit an SM's 228 KiB) and (128, 4, 3) 136 KiB (1 per SM).
# - Split (few sequence x kv-head programs, each key range cut so that about one program runs per SM): 64-key
#   tiles, small programs that can share an SM.
# - Wide (the unsplit programs already cover the SMs): 128-key tiles, 3 stages. H100 run 2026-11-25
#   (tune_decode section 2, B >= 32 rows, GPU-bound): (128, 4, 3) 2764-3053 GB/s on every row, while 64-key
#   configs dropped to 2117-2674 on some.
_CUDA_SPLIT = {16: Config(128, 4, 3), 32: Config(128, 4, 3), 64: Config(128, 4, 3), 128: Config(64, 4, 3),
               256: Config(32, 4, 3)}
_CUDA_WIDE = {**_CUDA_SPLIT, 128: Config(128, 4, 3)}
_CUDA_FP32 = {16: Config(64, 4, 2), 32: Config(64, 4, 2), 64: Config(32, 4, 2), 128: Config(32, 4, 2),
              256: Config(16, 4, 2)}
_INTERPRETER = Config(16, 4, 1)  # CPU interpreter: small tiles exercise the split and page logic cheaply


def padded_dim(d):
    return max(16, 1 << (d - 1).bit_length())


def shared_bytes(cfg, head_dim, head_dim_v, elem_bytes=2):
    """Shared memory a launch of cfg takes: (stages - 1) K and V tiles in flight plus ~8 KiB (sm_90 / sm_100 / sm_120
    compiles, D = 128: (64, 4, 3) 71,680 bytes, (128, 4, 3) 139,264)."""
    return (cfg.num_stages - 1) * cfg.block_n * (padded_dim(head_dim) + padded_dim(head_dim_v)) * elem_bytes + 8192


_SMEM_OPTIN = {}


def smem_per_block(device):
    """Shared memory a block may opt in to on this device (cached): 227 KiB on the H100 and B200, 163 KiB on the
    A100, ~99 KiB on consumer parts (sm_86, sm_89, sm_120)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    limit = _SMEM_OPTIN.get(index)
    if limit is None:
        # (torch >= 2.6 has the property; fa4 needs 2.8.)
        limit = _SMEM_OPTIN[index] = torch.cuda.get_device_properties(index).shared_memory_per_block_optin
    return limit


def default_config(device, dtype, head_dim, head_dim_v, wide=False, page_size=0, block_m=16):
    """Tile config of a launch; `wide` when the unsplit programs already cover the GPU. The wide tile is for
    decode's 16-row blocks only (sm_90 compile, D = 128: (128, 4, 3) takes 209 registers at 32 rows and 255 at
    64). A paged cache whose pages the wide tile does not divide takes the split tile when that one does (one
    page per tile: no per-key gather). A tile whose K / V ring does not fit the device's shared memory (the wide
    tile's 136 KiB on a ~99 KiB consumer part) gives way to the split tile, then to fewer stages."""
    if device.type != "cuda":
        return _INTERPRETER
    dim = max(padded_dim(head_dim), padded_dim(head_dim_v))
    if dtype == torch.float32:
        cfg = _CUDA_FP32[dim]
    else:
        cfg = (_CUDA_WIDE if wide and block_m <= 16 else _CUDA_SPLIT)[dim]
        if page_size and page_size % cfg.block_n and page_size % _CUDA_SPLIT[dim].block_n == 0:
            cfg = _CUDA_SPLIT[dim]
    elem = 4 if dtype == torch.float32 else 2
    limit = smem_per_block(device)
    if shared_bytes(cfg, head_dim, head_dim_v, elem) > limit and dtype != torch.float32:
        cfg = _CUDA_SPLIT[dim]
    while shared_bytes(cfg, head_dim, head_dim_v, elem) > limit and cfg.num_stages > 2:
        cfg = Config(cfg.block_n, cfg.num_warps, cfg.num_stages - 1)
    return cfg


def block_m_for(rows):
    """Packed rows per program: 16 (the smallest tl.dot) up to 64 for chunked prefill."""
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


# Switches kept for A/B runs (benchmarks/tune_decode.py --sections 6): per-tile base addressing of K/V, the
# combine launched as a programmatic dependent of the split kernel, and the splits merged in a thread-block
# cluster instead of by the combine (CLUSTER_MERGE, up to MAX_CLUSTER splits).
# MAX_CLUSTER = 8, the portable size. H100 2026-11-27 (card 1752624010195, tune_decode --sections 6, read flush):
# B = 8 L = 8192, 2 splits, paged 2780 -> 2823 GB/s, contiguous 2850 -> 2889; but 16 splits (B = 1) in clusters of
# 16 (non-portable) fell 2772 -> 2605 at L = 65536: the 16-CTA clusters stack CTAs on shared SMs, and with one CTA
# an SM forced only 7 such clusters fit the card (cuOccupancyMaxActiveClusters), so the eighth waits a wave.
TILE_BASE = True
# How a split step hands out key tiles (A/B switches): contiguous chunks (split s: tiles [s·T, (s+1)·T)) or strided
# (split s: tiles s, s + S, s + 2S, ...). H100 2026-11-28 (`benchmarks/decode_page_order.py strided`, read flush),
# paged B = 8 L = 8192 chunks -> strided: 2814 -> 2833 and 2801 -> 2835 GB/s on two cards, but 2816 -> 2795 and, over
# four random page tables, -0.3% on a third; paged B = 1 L = 65536 +0.1%, +0.2%, -0.5%; contiguous B = 1 L = 65536
# -0.6 to -0.8% on all three. The effect follows the card and the page table, not the order: both stay chunked.
STRIDED_PAGED = False
STRIDED_CONTIGUOUS = False
PDL = True
CLUSTER_MERGE = True
MAX_CLUSTER = 8


def cluster_size(device, num_splits, head_dv):
    """Splits of a step merged in a cluster (0: the combine merges them): sm_90+ under the Triton release whose
    launcher this was tested with (3.6: launch metadata (num_warps, num_ctas, shared), cluster from num_ctas), at
    most MAX_CLUSTER splits, and at least 4 merged columns a CTA."""
    if not (CLUSTER_MERGE and device.type == "cuda" and 1 < num_splits <= min(MAX_CLUSTER, 8)
            and padded_dim(head_dv) >> (num_splits.bit_length() - 1) >= 4
            and triton.__version__.startswith("3.6")):
        return 0
    return num_splits if torch.cuda.get_device_capability(device)[0] >= 9 else 0


def tile_offsets_fit_int32(block_n, row_strides, head_dims):
    """Whether a tile's loop-invariant offsets (key row c · row stride + column, TILE_BASE) fit in int32 for
    every cache tensor. A cache viewed with a huge row stride (a sequence-major buffer permuted, say) keeps the
    per-key 64-bit addressing instead of overflowing."""
    return all((block_n - 1) * abs(stride) + dim < 2**31 for stride, dim in zip(row_strides, head_dims))


def _pdl_supported():
    """Whether this Triton can launch with programmatic dependent launch (the launch_pdl compile option) and emit
    griddepcontrol (tl.extra.cuda.gdc_*); a Triton without them takes the plain two-launch path."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {}) and hasattr(tl_cuda, "gdc_wait")


# ----------------------------------------------------------------------------------------------------------
# Split workspace
# ----------------------------------------------------------------------------------------------------------

# fp32 scratch for the partial results, per (device, stream), grown by doubling and never freed: a CUDA graph
# captured with one buffer keeps its address, so a later, larger request must not release it.
_workspaces = {}
_retired = []


def _workspace_on(device, stream, numel):
    key = (device, stream)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        if buf is not None:
            _retired.append(buf)
        buf = torch.empty(max(numel, 2 * buf.numel() if buf is not None else 0), dtype=torch.float32,
                          device=device)
        _workspaces[key] = buf
    return buf


def _workspace(device, numel):
    return _workspace_on(device, _raw_stream(device.index) if device.type == "cuda" else 0, numel)


# ----------------------------------------------------------------------------------------------------------
# One decode step: append, attention, combine
# ----------------------------------------------------------------------------------------------------------

class Step:
    """The launches of one call signature of flash_attn_with_kvcache: the append of the new keys (when given),
    the split-KV attention and the merge of the splits (when split).

    Built from the call's tensors (their shapes, strides and dtypes; arguments validated by fa4.inference) and
    called with the tensors of each call; cache_seqlens is a tensor, or None with its int as seqlen_fixed.
    `out` None: each call allocates it (contiguous (B, Sq, Hq, Dv)). Split partials live in the per-stream
    workspace, so with `out` given and want_lse False a call allocates nothing.
    """

    def __init__(self, q, k_cache, v_cache, out, *, want_lse, k, v, cache_seqlens, cache_batch_idx, page_table,
                 rotary_cos, rotary_sin, rotary_interleaved, rotary_per_token, softmax_scale, window_left,
                 window_right, softcap, sink, num_splits, config=None):
        from fa4.kernels.triton import combine, rotary

        batch, seqlen_q, num_heads, head_d = q.shape
        head_dv = v_cache.shape[-1]
        num_heads_kv = k_cache.shape[2]
        group = num_heads // num_heads_kv
        paged = page_table is not None
        has_seqlens = isinstance(cache_seqlens, torch.Tensor)
        has_rotary = rotary_cos is not None
        self.device = q.device
        self.device_index = q.device.index if q.device.type == "cuda" else None
        self.dtype = q.dtype
        self.out_shape = (batch, seqlen_q, num_heads, head_dv)
        self.lse_shape = (batch, num_heads, seqlen_q) if want_lse else None
        self.has_lens, self.has_batch_idx, self.paged = has_seqlens, cache_batch_idx is not None, paged
        self.has_sink, self.has_rotary = sink is not None, has_rotary
        if out is None:
            row = num_heads * head_dv
            out_strides = (seqlen_q * row, row, head_dv)
        else:
            out_strides = (out.stride(0), out.stride(1), out.stride(2))

        self.append = None
        if k is not None and k.shape[0] * k.shape[1] * k.shape[2]:
            self.append = Launch(rotary._append_kv_kernel, 10, *rotary.append_launch(
                k, v, k_cache, v_cache, has_seqlens=has_seqlens, has_batch_idx=self.has_batch_idx,
                page_table=page_table, rotary_cos=rotary_cos, rotary_interleaved=rotary_interleaved))

        self.attend = self.combine = None
        self.split = False
        self.cluster = 0
        self.num_splits = num_splits
        rows = seqlen_q * group
        if batch * rows * num_heads_kv:
            cfg = config or default_config(q.device, q.dtype, head_d, head_dv)
            self.config = cfg
            block_m = block_m_for(rows)
            self.split = split = num_splits > 1
            # The combine as a programmatic dependent launch of the split kernel (sm_90+; griddepcontrol).
            pdl = (split and PDL and q.device.type == "cuda" and _pdl_supported()
                   and torch.cuda.get_device_capability(q.device)[0] >= 9)
            cluster = cluster_size(q.device, num_splits, head_dv) if split else 0
            self.cluster = cluster
            if cluster:
                grid = (batch * num_heads_kv * num_splits, 1, -(-rows // block_m))
                pdl = False
            else:
                grid = (batch * num_heads_kv, num_splits, -(-rows // block_m))
            has_softcap = softcap > 0.0
            tail = (q.stride(0), q.stride(1), q.stride(2),
                    k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                    v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
                    *out_strides,
                    page_table.stride(0) if paged else 0, rotary_cos.stride(0) if has_rotary else 0,
                    batch, seqlen_q, num_heads_kv, group, k.shape[1] if k is not None else 0,
                    k_cache.shape[1] if paged else 1, rotary_cos.shape[1] if has_rotary else 0,
                    softmax_scale * LOG2E, softmax_scale / softcap if has_softcap else 1.0,
                    softcap * LOG2E if has_softcap else 1.0, max(window_left, 0), max(window_right, 0))
            constexprs = dict(
                HEAD_D=head_d, HEAD_DV=head_dv, BLOCK_D=padded_dim(head_d), BLOCK_DV=padded_dim(head_dv),
                BLOCK_M=block_m, BLOCK_N=cfg.block_n, SPLIT=split, WRITE_LSE=want_lse,
                HAS_SEQLENS=has_seqlens, HAS_BATCH_IDX=self.has_batch_idx, PAGED=paged,
                PAGE_ALIGNED=paged and k_cache.shape[1] % cfg.block_n == 0,
                HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
                HAS_SOFTCAP=softcap_level(softcap, q.dtype),
                HAS_SINK=sink is not None, ROTARY=has_rotary, ROTARY_INTERLEAVED=bool(rotary_interleaved),
                ROTARY_PER_TOKEN=bool(rotary_per_token),
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", PDL_PRIMARY=pdl,
                TILE_BASE=TILE_BASE and tile_offsets_fit_int32(
                    cfg.block_n, (k_cache.stride(1), v_cache.stride(1)), (padded_dim(head_d), padded_dim(head_dv))))
            # The merge: CTA r of a cluster takes columns [r · MERGE_COLS, (r + 1) · MERGE_COLS), a power of two
            # wide, so that the first 2^floor(log2 CLUSTER) CTAs cover every column (the rest merge none).
            block_splits = 1 << (cluster - 1).bit_length() if cluster else 1
            strided = split and (STRIDED_PAGED if paged else STRIDED_CONTIGUOUS)
            constexprs.update(STRIDED=bool(strided), CLUSTER=cluster, BLOCK_SPLITS=block_splits,
                              MERGE_COLS=padded_dim(head_dv) >> (cluster.bit_length() - 1) if cluster else 1)
            self.attend = Launch(_decode_kernel, 14, grid, tail, constexprs, cfg.num_warps, cfg.num_stages,
                                 cluster=max(cluster, 1))
            if split:
                # Partials (num_splits, B, Sq, Hq, Dv) and (num_splits, B, Sq, Hq), contiguous, in one buffer.
                part_rows = num_splits * batch * seqlen_q * num_heads
                self.ws_numel = part_rows * (head_dv + 1)
                self.ws_lse_offset = part_rows * head_dv  # elements; x 4 bytes keeps 16-byte alignment (Dv % 8 = 0)
                row = num_heads * head_dv
            if split and not cluster:
                self.combine = Launch(combine._combine_kernel, 5, *combine.combine_launch(
                    num_splits=num_splits, batch=batch, seqlen=seqlen_q, num_heads=num_heads, head_dv=head_dv,
                    partial_strides=(batch * seqlen_q * row, seqlen_q * row, row, head_dv),
                    lse_partial_strides=(batch * seqlen_q * num_heads, seqlen_q * num_heads, num_heads, 1),
                    out_strides=out_strides, lse_strides=(num_heads * seqlen_q, 1, seqlen_q) if want_lse else None,
                    has_sink=sink is not None, write_lse=want_lse, pdl_wait=pdl), launch_pdl=pdl)
        self.launches = tuple(x for x in (self.append, self.attend, self.combine) if x is not None)
        self.ready = False  # every launch holds its compiled kernel

    @property
    def num_launches(self):
        return len(self.launches)

    def __call__(self, q, k_cache, v_cache, k, v, cos, sin, lens, batch_idx, table, sink, out, seqlen_fixed):
        """Runs the step; returns (out, lse or None). lens: the cache_seqlens tensor or None (then seqlen_fixed)."""
        if out is None:
            out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
        lse = None
        if self.lse_shape is not None:
            lse = torch.empty(self.lse_shape, dtype=torch.float32, device=self.device)
        index = self.device_index
        if not (self.ready and index is not None and _current_device() == index and _hooks_idle()
                and self._fast(q, k_cache, v_cache, k, v, cos, sin, lens, batch_idx, table, sink, out, lse,
                               seqlen_fixed)):
            self._jit(q, k_cache, v_cache, k, v, cos, sin, lens, batch_idx, table, sink, out, lse, seqlen_fixed)
        return out, lse

    def _fast(self, q, k_cache, v_cache, k, v, cos, sin, lens, batch_idx, table, sink, out, lse, seqlen_fixed):
        """Direct launches; False (nothing launched) when a pointer lost the 16-byte alignment."""
        stream = _raw_stream(self.device_index)
        p_q, p_k, p_v, p_o = q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr()
        bits = p_q | p_k | p_v | p_o
        p_lse = p_sink = p_lens = p_idx = p_table = p_cos = p_sin = p_op = p_lp = None
        if lse is not None:
            p_lse = lse.data_ptr()
            bits |= p_lse
        if self.has_sink:
            p_sink = sink.data_ptr()
            bits |= p_sink
        if self.has_lens:
            p_lens = lens.data_ptr()
            bits |= p_lens
        if self.has_batch_idx:
            p_idx = batch_idx.data_ptr()
            bits |= p_idx
        if self.paged:
            p_table = table.data_ptr()
            bits |= p_table
        if self.has_rotary:
            p_cos, p_sin = cos.data_ptr(), sin.data_ptr()
            bits |= p_cos | p_sin
        if self.append is not None:
            p_kn, p_vn = k.data_ptr(), v.data_ptr()
            bits |= p_kn | p_vn
        if self.split:
            p_op = _workspace_on(self.device, stream, self.ws_numel).data_ptr()
            p_lp = p_op + 4 * self.ws_lse_offset
        if bits & 15:
            return False
        if self.append is not None:
            self.append.fast((p_kn, p_vn, p_k, p_v, p_lens, p_idx, p_table, p_cos, p_sin, seqlen_fixed), stream)
        if self.attend is not None:
            self.attend.fast((p_q, p_k, p_v, p_o, p_lse, p_op, p_lp, p_sink, p_lens, p_idx, p_table, p_cos, p_sin,
                              seqlen_fixed), stream)
            if self.combine is not None:
                self.combine.fast((p_op, p_lp, p_o, p_lse, p_sink), stream)
        return True

    def _jit(self, q, k_cache, v_cache, k, v, cos, sin, lens, batch_idx, table, sink, out, lse, seqlen_fixed):
        """Launches through JITFunction (first call, CPU interpreter, torch.compile, launch hooks, unaligned
        pointers, another current device), keeping the compiled kernels when every pointer is 16-byte aligned."""
        index = self.device_index
        op = lp = None
        if self.split:
            ws = _workspace_on(self.device, _raw_stream(index) if index is not None else 0, self.ws_numel)
            op, lp = ws, ws[self.ws_lse_offset:]
        tensors = (q, k_cache, v_cache, out, lse, op, lp, sink, lens, batch_idx, table, cos, sin, k, v)
        keep = (index is not None and not torch.compiler.is_compiling()
                and not any(t.data_ptr() & 15 for t in tensors if t is not None))
        guard = torch.cuda.device(index) if index is not None and _current_device() != index else nullcontext()
        with guard:
            if self.append is not None:
                self.append.jit((k, v, k_cache, v_cache, lens, batch_idx, table, cos, sin, seqlen_fixed), keep)
            if self.attend is not None:
                self.attend.jit((q, k_cache, v_cache, out, lse, op, lp, sink, lens, batch_idx, table, cos, sin,
                                 seqlen_fixed), keep)
                if self.combine is not None:
                    self.combine.jit((op, lp, out, lse, sink), keep)
        self.ready = all(x.compiled is not None for x in self.launches)
