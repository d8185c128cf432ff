"""Split-KV attention over a KV cache (decode, speculative decoding, chunked prefill), in portable Triton.

Decoding reads the whole cache for a handful of query rows, so the kernel is bound by memory bandwidth and its
job is to keep every SM streaming K and V. Two ideas do it:

- GQA packing: the Hq / Hkv query heads that share a kv head, times the Sq query tokens, are the rows of one
  tile (row r = token r // group, head r % group), so each K/V tile is read once for all of them. The tile is
  padded to BLOCK_M >= 16 rows, the smallest tensor-core product (tl.dot).
- Split-KV: with few sequences and kv heads there are too few (sequence, kv head) programs to fill the GPU, so
  each one's key range is cut into `num_splits` chunks handled by separate programs. Each writes a partial
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
import torch
import triton
import triton.language as tl

from fa4.kernels.triton.common import LOG2E, tanh_via_exp2, visible_mask
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


# Sizes that change from call to call without changing the code: no recompilation for their value (Triton would
# otherwise specialise ints equal to 1 or divisible by 16).
@triton.jit(do_not_specialize=["batch", "seqlen_fixed", "seqlen_new"])
def _decode_kernel(Q, K, V, Out, Lse, OutPartial, LsePartial, Sink,
                   CacheSeqlens, CacheBatchIdx, PageTable, Cos, Sin,
                   stride_qb, stride_qs, stride_qh,
                   stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh,
                   stride_ob, stride_os, stride_oh,
                   stride_ptb, stride_rot,
                   batch, seqlen_q, num_heads_kv, group, seqlen_fixed, seqlen_new, page_size, rot_half,
                   qk_scale, cap_scale, cap_log2, window_left, window_right,
                   HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   SPLIT: tl.constexpr, WRITE_LSE: tl.constexpr,
                   HAS_SEQLENS: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, PAGED: tl.constexpr,
                   PAGE_ALIGNED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr, HAS_SINK: tl.constexpr,
                   ROTARY: tl.constexpr, ROTARY_INTERLEAVED: tl.constexpr, ROTARY_PER_TOKEN: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    # Grid: axis 0 = (sequence, kv head), axis 1 = split of the key range, axis 2 = block of packed rows.
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
    tiles_per_split = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), num_splits)
    start = lo + split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, hi)

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
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < end
        if PAGED:
            page = next_page.to(tl.int64)
            next_page = _tile_pages(pt_row, start_n + BLOCK_N, end, offs_n, page_size, PAGE_ALIGNED)
            if PAGE_ALIGNED:
                row = (start_n % page_size) + offs_n  # the whole tile sits in one page: contiguous rows
            else:
                row = cols % page_size
            k_rows = page * stride_kb + row.to(tl.int64) * stride_ks
            v_rows = page * stride_vb + row.to(tl.int64) * stride_vs
        else:
            k_rows = cols.to(tl.int64) * stride_ks
            v_rows = cols.to(tl.int64) * stride_vs
        k = tl.load(K + k_rows[:, None] + offs_d[None, :],
                    mask=col_ok[:, None] & (offs_d[None, :] < HEAD_D), other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if HAS_SOFTCAP:
            qk = cap_log2 * tanh_via_exp2(qk * cap_scale)  # softcap · tanh(scale · qk / softcap) · log2 e
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
        v = tl.load(V + v_rows[:, None] + offs_dv[None, :],
                    mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DV), other=0.0)
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


# fp16/bf16 on CUDA, by padded head dim. One K and one V tile per pipeline stage: 64 keys x 128 dims x 2 bytes
# x 2 = 32 KiB, so 3 stages take 96 KiB of shared memory and two programs fit on an H100 SM (228 KiB).
# To be refined from benchmarks/tune_decode.py on the H100.
_CUDA = {16: Config(128, 4, 3), 32: Config(128, 4, 3), 64: Config(128, 4, 3), 128: Config(64, 4, 3),
         256: Config(32, 4, 3)}
_CUDA_FP32 = {16: Config(64, 4, 2), 32: Config(64, 4, 2), 64: Config(32, 4, 2), 128: Config(32, 4, 2),
              256: Config(16, 4, 2)}
_INTERPRETER = Config(16, 4, 1)  # CPU interpreter: small tiles exercise the split and page logic cheaply


def padded_dim(d):
    return max(16, triton.next_power_of_2(d))


def default_config(device, dtype, head_dim, head_dim_v):
    if device.type != "cuda":
        return _INTERPRETER
    dim = max(padded_dim(head_dim), padded_dim(head_dim_v))
    return (_CUDA_FP32 if dtype == torch.float32 else _CUDA)[dim]


def block_m_for(rows):
    """Packed rows per program: 16 (the smallest tl.dot) up to 64 for chunked prefill."""
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


# ----------------------------------------------------------------------------------------------------------
# Split workspace
# ----------------------------------------------------------------------------------------------------------

# fp32 scratch for the partial results, per (device, stream), grown by doubling and never freed: a CUDA graph
# captured with one buffer keeps its address, so a later, larger request must not release it.
_workspaces = {}
_retired = []


def _workspace(device, numel):
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < numel:
        if buf is not None:
            _retired.append(buf)
        buf = torch.empty(max(numel, 2 * buf.numel() if buf is not None else 0), dtype=torch.float32,
                          device=device)
        _workspaces[key] = buf
    return buf


# ----------------------------------------------------------------------------------------------------------
# Host wrapper
# ----------------------------------------------------------------------------------------------------------

def plan(q, k_cache, v_cache, out, lse, *, cache_seqlens, seqlen_new, cache_batch_idx, page_table,
         rotary_cos, rotary_sin, rotary_interleaved, rotary_per_token, softmax_scale, window_left, window_right,
         softcap, sink, num_splits, config=None):
    """(grid, positional args, constexprs, config, partials) of the decode launch; `decode` documents the args.

    `partials` is None unsplit, else the (out_partial, lse_partial) flat fp32 buffers of the workspace.
    """
    batch, seqlen_q, num_heads, head_d = q.shape
    head_dv = v_cache.shape[-1]
    num_heads_kv = k_cache.shape[2]
    group = num_heads // num_heads_kv
    paged = page_table is not None
    has_seqlens = isinstance(cache_seqlens, torch.Tensor)
    rotary = rotary_cos is not None
    cfg = config or default_config(q.device, q.dtype, head_d, head_dv)
    block_m = block_m_for(seqlen_q * group)
    split = num_splits > 1
    grid = (batch * num_heads_kv, num_splits, triton.cdiv(seqlen_q * group, block_m))
    partials = None
    dummy = out  # stands in for absent optional tensors (never read: their constexpr flag is off)
    out_partial = lse_partial = dummy
    if split:
        part_rows = num_splits * batch * seqlen_q * num_heads
        ws = _workspace(q.device, part_rows * (head_dv + 1))
        out_partial, lse_partial = ws, ws[part_rows * head_dv:]
        partials = (out_partial, lse_partial)
    has_softcap = softcap > 0.0
    args = (
        q, k_cache, v_cache, out, lse if lse is not None else dummy, out_partial, lse_partial,
        sink if sink is not None else dummy,
        cache_seqlens if has_seqlens else dummy,
        cache_batch_idx if cache_batch_idx is not None else dummy,
        page_table if paged else dummy,
        rotary_cos if rotary else dummy, rotary_sin if rotary else dummy,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        page_table.stride(0) if paged else 0, rotary_cos.stride(0) if rotary else 0,
        batch, seqlen_q, num_heads_kv, group, 0 if has_seqlens else int(cache_seqlens), seqlen_new,
        k_cache.shape[1] if paged else 1, rotary_cos.shape[1] if rotary else 0,
        softmax_scale * LOG2E, softmax_scale / softcap if has_softcap else 1.0,
        softcap * LOG2E if has_softcap else 1.0, max(window_left, 0), max(window_right, 0))
    constexprs = dict(
        HEAD_D=head_d, HEAD_DV=head_dv, BLOCK_D=padded_dim(head_d), BLOCK_DV=padded_dim(head_dv),
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, SPLIT=split, WRITE_LSE=lse is not None,
        HAS_SEQLENS=has_seqlens, HAS_BATCH_IDX=cache_batch_idx is not None, PAGED=paged,
        PAGE_ALIGNED=paged and k_cache.shape[1] % cfg.block_n == 0,
        HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, HAS_SOFTCAP=has_softcap,
        HAS_SINK=sink is not None, ROTARY=rotary, ROTARY_INTERLEAVED=bool(rotary_interleaved),
        ROTARY_PER_TOKEN=bool(rotary_per_token),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    return grid, args, constexprs, cfg, partials


def decode(q, k_cache, v_cache, out, lse, *, cache_seqlens, seqlen_new, cache_batch_idx, page_table,
           rotary_cos, rotary_sin, rotary_interleaved, rotary_per_token, softmax_scale, window_left,
           window_right, softcap, sink, num_splits, config=None):
    """Attention of q (B, Sq, Hq, D) over the cache into `out` (B, Sq, Hq, Dv), and lse (B, Hq, Sq) if given.

    Arguments are validated by fa4.inference. cache_seqlens: int or (B,) int tensor of cached keys before the
    seqlen_new appended ones. num_splits >= 1 programs share each (sequence, kv head) key range.
    """
    from fa4.kernels.triton.combine import combine_into

    grid, args, constexprs, cfg, partials = plan(
        q, k_cache, v_cache, out, lse, cache_seqlens=cache_seqlens, seqlen_new=seqlen_new,
        cache_batch_idx=cache_batch_idx, page_table=page_table, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
        rotary_interleaved=rotary_interleaved, rotary_per_token=rotary_per_token, softmax_scale=softmax_scale,
        window_left=window_left, window_right=window_right, softcap=softcap, sink=sink, num_splits=num_splits,
        config=config)
    _decode_kernel[grid](*args, **constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if partials is not None:
        # Partials (num_splits, B, Sq, Hq, Dv) and (num_splits, B, Sq, Hq), contiguous, as flat buffers.
        batch, seqlen_q, num_heads, _ = q.shape
        head_dv = v_cache.shape[-1]
        row = num_heads * head_dv
        combine_into(*partials, out, lse, sink, num_splits=num_splits, batch=batch, seqlen=seqlen_q,
                     num_heads=num_heads, head_dv=head_dv,
                     partial_strides=(batch * seqlen_q * row, seqlen_q * row, row, head_dv),
                     lse_partial_strides=(batch * seqlen_q * num_heads, seqlen_q * num_heads, num_heads, 1),
                     lse_strides=(num_heads * seqlen_q, 1, seqlen_q) if lse is not None else None)
