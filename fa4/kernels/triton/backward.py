"""Attention backward in portable Triton (every NVIDIA GPU from compute capability 8.0).

The math (docs/INTERNALS.md), per query row i and key j, with scores in base-2 units (s2 = s·log2 e):

    P_ij   = exp2(s2_ij − lse2_i)                      recomputed from the forward's lse, never stored
    Delta_i = rowsum(dO_i · O_i) − dlse_i              (preprocess kernel)
    dV_j  += Σ_i P_ij dO_i                             dP_ij = dO_i · V_j
    dS_ij  = P_ij (dP_ij − Delta_i)   [· (1 − tanh²) under softcap: d(c·tanh(x/c))/dx]
    dK_j  += scale · Σ_i dS_ij Q_i,    dQ_i += scale · Σ_j dS_ij K_j

Three kernels, in launch order:
1. `_bwd_preprocess`: Delta, lse2 = lse·log2 e (+inf for empty rows, so that their P is exactly 0) and, for
   fp32 inputs, the per-block partial sums of the sink gradient dsink_h = −Σ_i exp(sink_h − lse_i)·Delta_i.
2. `_bwd_dkdv_kernel`: one program per (batch, kv head, key block). K and V stay resident; the program walks
   the query heads of its GQA group and the query blocks that can see its keys, so dK/dV are summed over the
   group in registers and written once. Where the config says so it also adds its dQ share into an fp32
   buffer with atomics. At D = 256 (split_dkdv) it runs twice, a dV pass and a dK pass; on sm90 the dV pass
   runs on a side stream beside the dK pass (concurrent_dv), each filling the SMs the other's tail leaves idle.
3. `_bwd_dq_kernel` (deterministic=True, the configs that measured it faster, and every call with a sink and
   16-bit inputs): one program per (batch, query head, query block) walks its key blocks in a fixed order, so
   dQ is bitwise reproducible. With a sink it also gives the sink gradient's partial sums, with
   rowsum(dO·O)_i taken as Σ_j P_ij·dP_ij: exact where the rounded O is not (see the kernel).

Blocks are split into "full" blocks (every (row, key) pair visible: no mask arithmetic) and boundary blocks
(causal diagonal, window edges, sequence tails), which are the only ones that evaluate the mask.
"""
import dataclasses

import torch
import triton
import triton.language as tl

from .common import LOG2E, softcap_level, tanh_via_exp2, visible_key_range, visible_mask

_LOG2E = tl.constexpr(LOG2E)  # kernels may only read constexpr globals


# ----------------------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _sequence(b, CU_Q, CU_K, SEQUSED_K, seqlen_q, seqlen_k,
              VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, HAS_SEQUSED: tl.constexpr):
    """(q_start, q_len, k_start, k_len, k_used) of sequence b.

    k_len rows of dK/dV belong to the sequence (all are written); only the first k_used keys are visible.
    """
    if VARLEN_Q:
        q_start = tl.load(CU_Q + b)
        q_len = tl.load(CU_Q + b + 1) - q_start
    else:
        q_start = b * 0  # a tensor, like the varlen branch's
        q_len = seqlen_q
    if VARLEN_K:
        k_start = tl.load(CU_K + b)
        k_len = tl.load(CU_K + b + 1) - k_start
    else:
        k_start = b * 0
        k_len = seqlen_k
    if HAS_SEQUSED:
        k_used = tl.minimum(tl.load(SEQUSED_K + b), k_len)
    else:
        k_used = k_len
    return q_start, q_len, k_start, k_len, k_used


@triton.jit
def _tile_mask(rows, n_rows, cols, n_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """(rows, cols) bool mask of [0, n_rows) x [0, n_cols), built only from the sides asked for (or None)."""
    if MASK_ROWS:
        if MASK_COLS:
            mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        else:
            mask = rows[:, None] < n_rows
    else:
        if MASK_COLS:
            mask = cols[None, :] < n_cols
        else:
            mask = None
    return mask


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """Load a (rows, cols) tile with zeros outside [0, n_rows) x [0, n_cols); masks only where asked."""
    if MASK_ROWS or MASK_COLS:
        x = tl.load(ptrs, mask=_tile_mask(rows, n_rows, cols, n_cols, MASK_ROWS, MASK_COLS), other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _log2_scores(qk, score_scale, cap_scale, SOFTCAP: tl.constexpr):
    """Scores in base-2 units from raw q·k, and tanh (for the softcap chain rule; unused without softcap).

    No softcap: s2 = qk · (scale·log2 e). Softcap c: s2 = (c·log2 e) · tanh(qk · scale / c).
    """
    if SOFTCAP:
        t = tanh_via_exp2(qk * score_scale, SOFTCAP == 2)  # SOFTCAP: common.softcap_level
        s2 = t * cap_scale
    else:
        t = qk
        s2 = qk * score_scale
    return s2, t


# ----------------------------------------------------------------------------------------------------------
# 1. Preprocess: Delta, lse in base 2, sink-gradient partial sums
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def aligned_start(q_start, b):
    """Where packed sequence b (first token q_start) starts in the aligned copies of Delta and lse2: the smallest
    multiple of 4 at or above q_start + 3·b. Sequences stay in order without overlap (the next one starts at least
    q_start + len + 3·(b + 1)), and a buffer of aligned_length(T, B) floats a head holds them all."""
    return (q_start + 3 * b + 3) // 4 * 4


def aligned_length(tokens, batch):
    """Floats a head of the aligned copies takes (a multiple of 4: 16-byte row strides)."""
    return (tokens + 3 * batch + 3 + 3) // 4 * 4


@triton.jit
def _ext_parts(x, dtype):
    """[hi, mid, lo] of x in `dtype` (as fp32 values): hi + mid + lo = x to fp32 precision; a non-finite x whole in
    hi (backward.stats_ext_parts)."""
    hi = x.to(dtype)
    rest = tl.where(tl.abs(x) == float("inf"), 0.0, x - hi.to(tl.float32))  # ±inf: all in hi
    mid = rest.to(dtype)
    lo = (rest - mid.to(tl.float32)).to(dtype)
    return hi.to(tl.float32), mid.to(tl.float32), lo.to(tl.float32)


@triton.jit
def _store_stats_ext(EXT, pid_bh, rows, lse2, delta, ext_rows, ext_scale, DELTA_COL: tl.constexpr):
    """Rows `rows` (< ext_rows) of the (B·Hq, ext_rows, 16) K extension of the sm90 keys-as-rows backward
    (backward.stats_ext_parts): the [hi, mid, lo] parts of x = lse2 · ext_scale (= −lse2 / scale2) in columns 0-2,
    those of x = −Delta from column DELTA_COL (backward.STATS_EXT_DELTA_COL), zeros elsewhere, in the extension's
    16-bit dtype."""
    cols = tl.arange(0, 16)[None, :]
    off = (pid_bh.to(tl.int64) * ext_rows + rows)[:, None] * 16 + cols
    mask = (rows < ext_rows)[:, None] & (cols < 16)
    l_hi, l_mid, l_lo = _ext_parts(lse2 * ext_scale, EXT.dtype.element_ty)
    d_hi, d_mid, d_lo = _ext_parts(-delta, EXT.dtype.element_ty)
    part = tl.where(cols == 0, l_hi[:, None], tl.where(cols == 1, l_mid[:, None], tl.where(
        cols == 2, l_lo[:, None], tl.where(cols == DELTA_COL, d_hi[:, None], tl.where(
            cols == DELTA_COL + 1, d_mid[:, None], tl.where(cols == DELTA_COL + 2, d_lo[:, None], 0.0))))))
    tl.store(EXT + off, part.to(EXT.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_preprocess(
        O, DO, LSE, DLSE, SINK, DELTA, LSE2, DSINK_PART, CU_Q, DELTA_AL, LSE2_AL, DQ_ACC, COUNTER,
        STATS_EXT_BUF,
        stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh,
        stride_lb, stride_lh, stride_ls, stride_dlb, stride_dlh, stride_dls, stride_tb, stride_th,
        stride_al, seqlen_q, n_heads, head_dim_v, head_dim_q, ext_rows, ext_scale,
        VARLEN_Q: tl.constexpr, HAS_DLSE: tl.constexpr, HAS_SINK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, ALIGNED_COPY: tl.constexpr = False,
        ZERO_DQ: tl.constexpr = False, BLOCK_DQ: tl.constexpr = 16, ZERO_COUNTER: tl.constexpr = False,
        STATS_EXT: tl.constexpr = False, EXT_DELTA_COL: tl.constexpr = 0):
    """Delta, lse2 and the sink partials of one (batch, head, block of BLOCK_M query rows).

    ALIGNED_COPY (packed sequences): Delta and lse2 also into (Hq, stride_al) buffers where sequence b starts at
    aligned_start(cu_q[b], b), a multiple of 4 floats: the sm90 backward's loader reads its rows by TMA, whose boxes
    must start at 16-byte aligned positions in their innermost dimension.
    ZERO_DQ (batched): also zero the block's rows of the fp32 dQ accumulator DQ_ACC (B, Sq, Hq, head_dim_q),
    contiguous, and with ZERO_COUNTER program (0, 0) the 4 int32 of COUNTER (the persistent grid's tile counter):
    the main kernel's reduce-adds need both zeroed, and a fill kernel of their own cost a launch (host time) and a
    pass over memory of its own.
    STATS_EXT (batched): also the statistics' 16-bit K extension STATS_EXT_BUF (B·Hq, ext_rows, 16), Delta's parts
    from column EXT_DELTA_COL, for the sm90 keys-as-rows kernel (backward.stats_ext_serves), padding rows up to
    ext_rows included (lse2 = +inf, Delta = 0): the grid then covers ext_rows."""
    # (batch, head) on axis 0: it may exceed the 65535 programs that axes 1 and 2 allow (many short sequences).
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    h64 = h.to(tl.int64)  # head offsets in 64 bits too: strides of transposed layouts reach H·S·D
    if VARLEN_Q:
        q_start = tl.load(CU_Q + b)
        q_len = tl.load(CU_Q + b + 1) - q_start
    else:
        q_start = 0
        q_len = seqlen_q
    start_m = pid_m * BLOCK_M
    if start_m < q_len:
        rows = start_m + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_DV)
        row_ok = rows < q_len
        tok = (q_start + start_m).to(tl.int64)  # first token of the block, 64-bit: offsets may pass 2^31
        b64 = b.to(tl.int64)
        o_ptrs = (O + b64 * stride_ob + h64 * stride_oh + tok * stride_os
                  + (rows - start_m)[:, None] * stride_os + cols[None, :])
        do_ptrs = (DO + b64 * stride_dob + h64 * stride_doh + tok * stride_dos
                   + (rows - start_m)[:, None] * stride_dos + cols[None, :])
        o = _load_tile(o_ptrs, rows, q_len, cols, head_dim_v, True, True).to(tl.float32)
        do = _load_tile(do_ptrs, rows, q_len, cols, head_dim_v, True, True).to(tl.float32)
        # Delta_i = Σ_d dO_id O_id − dlse_i: the diagonal of the softmax Jacobian (plus lse's own gradient).
        delta = tl.sum(o * do, axis=1)
        lse_off = b64 * stride_lb + h64 * stride_lh + (q_start + rows).to(tl.int64) * stride_ls
        lse = tl.load(LSE + lse_off, mask=row_ok, other=0.0)
        if HAS_DLSE:
            dl_off = b64 * stride_dlb + h64 * stride_dlh + (q_start + rows).to(tl.int64) * stride_dls
            delta -= tl.load(DLSE + dl_off, mask=row_ok, other=0.0)
        # Empty rows (lse = -inf) get lse2 = +inf: exp2(s2 - inf) = 0 exactly, so they add no gradient.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
        t_off = b64 * stride_tb + h64 * stride_th + (q_start + rows).to(tl.int64)
        tl.store(DELTA + t_off, delta, mask=row_ok)
        tl.store(LSE2 + t_off, lse2, mask=row_ok)
        if ALIGNED_COPY:
            al_off = h64 * stride_al + aligned_start(q_start, b).to(tl.int64) + rows
            tl.store(DELTA_AL + al_off, delta, mask=row_ok)
            tl.store(LSE2_AL + al_off, lse2, mask=row_ok)
        if ZERO_DQ:
            dcols = tl.arange(0, BLOCK_DQ)
            dq_off = (((b64 * seqlen_q + rows.to(tl.int64)) * n_heads + h64) * head_dim_q)[:, None] + dcols[None, :]
            tl.store(DQ_ACC + dq_off, tl.zeros((BLOCK_M, BLOCK_DQ), dtype=tl.float32),
                     mask=row_ok[:, None] & (dcols < head_dim_q)[None, :])
            if ZERO_COUNTER and pid_bh == 0 and pid_m == 0:
                tl.store(COUNTER + tl.arange(0, 4), tl.zeros((4,), dtype=tl.int32))
        if HAS_SINK:
            # dsink_h = −Σ_i exp(sink_h − lse_i) Delta_i; with a sink, lse_i >= sink_h is always finite.
            sink = tl.load(SINK + h)
            w = tl.exp(sink - lse) * delta
            part = tl.sum(tl.where(row_ok, w, 0.0), axis=0)
            tl.store(DSINK_PART + pid_bh.to(tl.int64) * tl.num_programs(1) + pid_m, part)
        if STATS_EXT:
            _store_stats_ext(STATS_EXT_BUF, pid_bh, rows, tl.where(row_ok, lse2, float("inf")),
                             tl.where(row_ok, delta, 0.0), ext_rows, ext_scale, EXT_DELTA_COL)
    elif STATS_EXT:
        # A block of padding rows only (the grid covers ext_rows): P = 0 and dS = 0 there.
        rows = start_m + tl.arange(0, BLOCK_M)
        _store_stats_ext(STATS_EXT_BUF, pid_bh, rows, tl.zeros([BLOCK_M], tl.float32) + float("inf"),
                         tl.zeros([BLOCK_M], tl.float32), ext_rows, ext_scale, EXT_DELTA_COL)


# ----------------------------------------------------------------------------------------------------------
# 2. dK, dV (and dQ by atomics): a program per (batch, kv head, key block)
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _visible_query_range(start_n, seqlen_q, seqlen_k, window_left, window_right,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query-block bounds for the key block [start_n, start_n + BLOCK_N), the transpose of visible_key_range.

    Returns (lo, full_lo, full_hi, hi): rows outside [lo, hi) see none of the block's keys; query blocks in
    [full_lo, full_hi) see all of them and lie inside [0, Sq) (no mask); the rest are boundary blocks. Unlike
    the dQ direction, neither rows past Sq nor keys past Sk may leak into a full block here: both would add
    to stored gradients (dK/dV rows, or dQ through the atomics).
    Row i sees key j when j >= i + off - window_left and j <= i + off + window_right, off = Sk - Sq.
    """
    off = seqlen_k - seqlen_q
    n_last = tl.minimum(start_n + BLOCK_N, seqlen_k) - 1
    lo = 0
    hi = seqlen_q
    if HAS_RIGHT:  # the first row that sees key start_n
        lo = tl.maximum(start_n - off - window_right, 0)
    if HAS_LEFT:  # one past the last row that sees the block's last key
        hi = tl.minimum(n_last - off + window_left + 1, seqlen_q)
    hi = tl.where(start_n < seqlen_k, hi, 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.maximum(hi, lo)
    # Full: every row sees the block's last key (right edge) and its first key (left edge). Clamp before
    # dividing: integer division of a negative number rounds toward zero on the GPU.
    full_lo = lo
    if HAS_RIGHT:
        first_row = tl.maximum(start_n + BLOCK_N - 1 - off - window_right, 0)
        full_lo = tl.maximum(((first_row + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, lo)
    full_hi = (seqlen_q // BLOCK_M) * BLOCK_M
    if HAS_LEFT:
        full_hi = tl.minimum(full_hi, (tl.maximum(start_n - off + window_left + 1, 0) // BLOCK_M) * BLOCK_M)
    full_hi = tl.where(start_n + BLOCK_N <= seqlen_k, full_hi, 0)
    full_lo = tl.minimum(full_lo, hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _dkdv_block(dk, dv, k, v, q_base, do_base, dq_base, lse2_base, delta_base,
                start_m, offs_m, offs_n, offs_d, offs_dv,
                stride_qs, stride_dos, stride_dqs,
                seqlen_q, seqlen_k, window_left, window_right, head_dim, head_dim_v,
                score_scale, cap_scale, softmax_scale,
                MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                SOFTCAP: tl.constexpr, DQ_ATOMIC: tl.constexpr, EVEN_D: tl.constexpr,
                PRECISION: tl.constexpr, COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr,
                DQ_TRANSPOSED: tl.constexpr):
    """Add one query block's contribution to the resident key block's dK, dV (transposed: keys are rows)."""
    rows = start_m + offs_m
    tok = tl.cast(start_m, tl.int64)
    q = _load_tile(q_base + tok * stride_qs + offs_m[:, None] * stride_qs + offs_d[None, :],
                   rows, seqlen_q, offs_d, head_dim, MASK, not EVEN_D)
    do = _load_tile(do_base + tok * stride_dos + offs_m[:, None] * stride_dos + offs_dv[None, :],
                    rows, seqlen_q, offs_dv, head_dim_v, MASK, not EVEN_D)
    if MASK:
        lse2 = tl.load(lse2_base + rows, mask=rows < seqlen_q, other=float("inf"))
    else:
        lse2 = tl.load(lse2_base + rows)
    if COMPUTE_DK:
        if MASK:
            delta = tl.load(delta_base + rows, mask=rows < seqlen_q, other=0.0)
        else:
            delta = tl.load(delta_base + rows)
    # Sᵀ and Pᵀ = exp2(S2ᵀ − lse2), keys along rows.
    qk = tl.dot(k, tl.trans(q), input_precision=PRECISION)
    s2, t = _log2_scores(qk, score_scale, cap_scale, SOFTCAP)
    # P <= 1 exactly, but lse2 comes back from the forward's natural-log lse with an ulp or two of |lse2| of error;
    # at a huge softmax_scale (|lse2| ~ 1e8) that exponent error overflows exp2 and the gradients would turn inf / NaN.
    p = tl.minimum(tl.exp2(s2 - lse2[None, :]), 1.0, propagate_nan=tl.PropagateNan.ALL)
    if MASK:
        off = seqlen_k - seqlen_q
        vis = (offs_n[:, None] < seqlen_k) & (rows[None, :] < seqlen_q)
        if HAS_LEFT:
            vis = vis & (offs_n[:, None] >= rows[None, :] + off - window_left)
        if HAS_RIGHT:
            vis = vis & (offs_n[:, None] <= rows[None, :] + off + window_right)
        p = tl.where(vis, p, 0.0)
    if COMPUTE_DV:
        # dV += Pᵀ dO, with P rounded to the input dtype as the forward's P·V product rounds it.
        dv += tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
    if COMPUTE_DK:
        # dPᵀ = V dOᵀ; dSᵀ = Pᵀ (dPᵀ − Delta).
        dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds = p * (dp - delta[None, :])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        ds = ds.to(q.dtype)
        dk += tl.dot(ds, q, input_precision=PRECISION)
        if DQ_ATOMIC:
            # dQ (block) = scale · dS K, added into the fp32 accumulator; other key blocks add concurrently.
            if DQ_TRANSPOSED:
                # dQᵀ = Kᵀ dSᵀ puts D on the MMA's M side: a wgmma even when BLOCK_M < 64.
                dq = tl.dot(tl.trans(k), ds, input_precision=PRECISION) * softmax_scale
                dq_ptrs = dq_base + tok * stride_dqs + offs_m[None, :] * stride_dqs + offs_d[:, None]
                dq_mask = _tile_mask(offs_d, head_dim, rows, seqlen_q, not EVEN_D, MASK)
            else:
                dq = tl.dot(tl.trans(ds), k, input_precision=PRECISION) * softmax_scale
                dq_ptrs = dq_base + tok * stride_dqs + offs_m[:, None] * stride_dqs + offs_d[None, :]
                dq_mask = _tile_mask(rows, seqlen_q, offs_d, head_dim, MASK, not EVEN_D)
            if MASK or not EVEN_D:
                tl.atomic_add(dq_ptrs, dq, mask=dq_mask, sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
        Q, K, V, DO, DQ_ACC, DK, DV, LSE2, DELTA, CU_Q, CU_K, SEQUSED_K,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh,
        stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh, stride_tb, stride_th,
        seqlen_q, seqlen_k, n_kv_heads, head_dim, head_dim_v,
        score_scale, cap_scale, softmax_scale, window_left, window_right,
        GROUP: tl.constexpr, VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, HAS_SEQUSED: tl.constexpr,
        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, DQ_ATOMIC: tl.constexpr,
        EVEN_D: tl.constexpr, PRECISION: tl.constexpr, COMPUTE_DK: tl.constexpr, COMPUTE_DV: tl.constexpr,
        DQ_TRANSPOSED: tl.constexpr, BLOCKS_FASTEST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # BLOCKS_FASTEST: key blocks on axis 0, heads on axis 1, so the programs resident together are the key blocks
    # of a few heads and each head's Q and dO stream from L2 after the first read (heads fastest, the programs of
    # a wave were as many different heads, each reading its Q and dO from HBM). Else heads on axis 0, key blocks
    # on axis 1 (also the host's choice past 65535 heads · sequences, the limit of axis 1). Either way key block
    # 0 (the longest under causal) of a head starts before its others.
    if BLOCKS_FASTEST:
        pid_bh = tl.program_id(1)
        start_n = tl.program_id(0) * BLOCK_N
    else:
        pid_bh = tl.program_id(0)
        start_n = tl.program_id(1) * BLOCK_N
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    hk64 = hk.to(tl.int64)
    q_start, q_len, k_start, k_len, k_used = _sequence(b, CU_Q, CU_K, SEQUSED_K, seqlen_q, seqlen_k,
                                                       VARLEN_Q, VARLEN_K, HAS_SEQUSED)
    if start_n < k_len:
        b64 = b.to(tl.int64)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        k_tok = (k_start + start_n).to(tl.int64)
        # K and V of this block stay in registers/shared memory for the whole program; keys past k_used are 0.
        k_ptrs = (K + b64 * stride_kb + hk64 * stride_kh + k_tok * stride_ks
                  + (offs_n - start_n)[:, None] * stride_ks + offs_d[None, :])
        v_ptrs = (V + b64 * stride_vb + hk64 * stride_vh + k_tok * stride_vs
                  + (offs_n - start_n)[:, None] * stride_vs + offs_dv[None, :])
        k = _load_tile(k_ptrs, offs_n, k_used, offs_d, head_dim, True, not EVEN_D)
        if COMPUTE_DK:
            v = _load_tile(v_ptrs, offs_n, k_used, offs_dv, head_dim_v, True, not EVEN_D)
        else:
            v = k  # unused: the dV-only pass needs no V
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        lo, full_lo, full_hi, hi = _visible_query_range(start_n, q_len, k_used, window_left, window_right,
                                                        BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        q_tok = q_start.to(tl.int64)
        # The query heads of this kv head's group, summed here: dK/dV are written once, never re-read.
        for g in range(GROUP):
            hq64 = (hk * GROUP + g).to(tl.int64)
            q_base = Q + b64 * stride_qb + hq64 * stride_qh + q_tok * stride_qs
            do_base = DO + b64 * stride_dob + hq64 * stride_doh + q_tok * stride_dos
            dq_base = DQ_ACC + b64 * stride_dqb + hq64 * stride_dqh + q_tok * stride_dqs
            lse2_base = LSE2 + b64 * stride_tb + hq64 * stride_th + q_tok
            delta_base = DELTA + b64 * stride_tb + hq64 * stride_th + q_tok
            for start_m in range(lo, full_lo, BLOCK_M):
                dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, dq_base, lse2_base, delta_base,
                                     start_m, offs_m, offs_n, offs_d, offs_dv, stride_qs, stride_dos, stride_dqs,
                                     q_len, k_used, window_left, window_right, head_dim, head_dim_v,
                                     score_scale, cap_scale, softmax_scale, True, HAS_LEFT, HAS_RIGHT,
                                     SOFTCAP, DQ_ATOMIC, EVEN_D, PRECISION,
                                     COMPUTE_DK, COMPUTE_DV, DQ_TRANSPOSED)
            for start_m in range(full_lo, full_hi, BLOCK_M):
                dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, dq_base, lse2_base, delta_base,
                                     start_m, offs_m, offs_n, offs_d, offs_dv, stride_qs, stride_dos, stride_dqs,
                                     q_len, k_used, window_left, window_right, head_dim, head_dim_v,
                                     score_scale, cap_scale, softmax_scale, False, HAS_LEFT, HAS_RIGHT,
                                     SOFTCAP, DQ_ATOMIC, EVEN_D, PRECISION,
                                     COMPUTE_DK, COMPUTE_DV, DQ_TRANSPOSED)
            for start_m in range(full_hi, hi, BLOCK_M):
                dk, dv = _dkdv_block(dk, dv, k, v, q_base, do_base, dq_base, lse2_base, delta_base,
                                     start_m, offs_m, offs_n, offs_d, offs_dv, stride_qs, stride_dos, stride_dqs,
                                     q_len, k_used, window_left, window_right, head_dim, head_dim_v,
                                     score_scale, cap_scale, softmax_scale, True, HAS_LEFT, HAS_RIGHT,
                                     SOFTCAP, DQ_ATOMIC, EVEN_D, PRECISION,
                                     COMPUTE_DK, COMPUTE_DV, DQ_TRANSPOSED)
        dk *= softmax_scale  # dK = scale · Σ dS Q (the softmax scale itself, not the base-2 score scale)
        dk_ptrs = (DK + b64 * stride_dkb + hk64 * stride_dkh + k_tok * stride_dks
                   + (offs_n - start_n)[:, None] * stride_dks + offs_d[None, :])
        dv_ptrs = (DV + b64 * stride_dvb + hk64 * stride_dvh + k_tok * stride_dvs
                   + (offs_n - start_n)[:, None] * stride_dvs + offs_dv[None, :])
        if COMPUTE_DK:
            tl.store(dk_ptrs, dk.to(DK.dtype.element_ty),
                     mask=_tile_mask(offs_n, k_len, offs_d, head_dim, True, not EVEN_D))
        if COMPUTE_DV:
            tl.store(dv_ptrs, dv.to(DV.dtype.element_ty),
                     mask=_tile_mask(offs_n, k_len, offs_dv, head_dim_v, True, not EVEN_D))


# ----------------------------------------------------------------------------------------------------------
# 3. dQ without atomics: a program per (batch, query head, query block), key blocks in a fixed order
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _dq_block(dq, pdp, q, do, lse2, delta, k_base, v_base, start_n, rows, offs_n, offs_d, offs_dv,
              stride_ks, stride_vs, seqlen_q, seqlen_k, window_left, window_right, head_dim, head_dim_v,
              score_scale, cap_scale,
              MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
              HAS_SINK: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    """Add one key block's contribution to the resident query block's dQ (unscaled) and, with a sink, to
    pdp_i = Σ_j P_ij dP_ij (= rowsum(dO·O)_i, computed here without O's rounding)."""
    cols = start_n + offs_n
    tok = tl.cast(start_n, tl.int64)
    k = _load_tile(k_base + tok * stride_ks + offs_n[:, None] * stride_ks + offs_d[None, :],
                   cols, seqlen_k, offs_d, head_dim, MASK, not EVEN_D)
    v = _load_tile(v_base + tok * stride_vs + offs_n[:, None] * stride_vs + offs_dv[None, :],
                   cols, seqlen_k, offs_dv, head_dim_v, MASK, not EVEN_D)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    s2, t = _log2_scores(qk, score_scale, cap_scale, SOFTCAP)
    p = tl.minimum(tl.exp2(s2 - lse2[:, None]), 1.0, propagate_nan=tl.PropagateNan.ALL)  # P <= 1 (see above)
    if MASK:
        vis = visible_mask(rows + (seqlen_k - seqlen_q), cols, seqlen_k, window_left, window_right,
                           HAS_LEFT, HAS_RIGHT)
        p = tl.where(vis, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    if HAS_SINK:
        pdp += tl.sum(p * dp, axis=1)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq, pdp


@triton.jit
def _bwd_dq_kernel(
        Q, K, V, DO, DQ, LSE2, DELTA, CU_Q, CU_K, SEQUSED_K, SINK, DLSE, DSINK_PART,
        stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh, stride_tb, stride_th,
        stride_dlb, stride_dlh, stride_dls,
        seqlen_q, seqlen_k, n_heads, head_dim, head_dim_v,
        score_scale, cap_scale, softmax_scale, window_left, window_right,
        GROUP: tl.constexpr, VARLEN_Q: tl.constexpr, VARLEN_K: tl.constexpr, HAS_SEQUSED: tl.constexpr,
        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
        HAS_SINK: tl.constexpr, HAS_DLSE: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr,
        BLOCKS_FASTEST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    # With a sink (HAS_SINK) the program also writes its partial of the sink gradient to
    # DSINK_PART[pid_bh, its query-block index]: −dsink_h = Σ_i exp(sink_h − lse_i)·(Σ_j P_ij dP_ij − dlse_i), the
    # preprocess's Σ_i exp(sink_h − lse_i)·Delta_i with rowsum(dO·O) replaced by the exact Σ_j P_ij dP_ij: no
    # rounding of O in it (from O rounded to the input dtype, both this kernel's dsink and the low-precision
    # reference's carry bf16-level noise, and the numerics rule compared two such draws).
    # Last query blocks first: under causal they see the most keys. BLOCKS_FASTEST: query blocks on axis 0, heads
    # on axis 1 (a head's K and V then come from L2 after the first read), as _bwd_dkdv_kernel.
    if BLOCKS_FASTEST:
        n_blk = tl.num_programs(0)
        pid_bh = tl.program_id(1)
        blk = tl.program_id(0)
    else:
        n_blk = tl.num_programs(1)
        pid_bh = tl.program_id(0)
        blk = tl.program_id(1)
    start_m = (n_blk - 1 - blk) * BLOCK_M
    b = pid_bh // n_heads
    hq = pid_bh % n_heads
    hk = hq // GROUP
    hq64, hk64 = hq.to(tl.int64), hk.to(tl.int64)
    q_start, q_len, k_start, k_len, k_used = _sequence(b, CU_Q, CU_K, SEQUSED_K, seqlen_q, seqlen_k,
                                                       VARLEN_Q, VARLEN_K, HAS_SEQUSED)
    if start_m < q_len:
        b64 = b.to(tl.int64)
        rows = start_m + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q_tok = (q_start + start_m).to(tl.int64)
        q_ptrs = (Q + b64 * stride_qb + hq64 * stride_qh + q_tok * stride_qs
                  + (rows - start_m)[:, None] * stride_qs + offs_d[None, :])
        do_ptrs = (DO + b64 * stride_dob + hq64 * stride_doh + q_tok * stride_dos
                   + (rows - start_m)[:, None] * stride_dos + offs_dv[None, :])
        q = _load_tile(q_ptrs, rows, q_len, offs_d, head_dim, True, not EVEN_D)
        do = _load_tile(do_ptrs, rows, q_len, offs_dv, head_dim_v, True, not EVEN_D)
        t_off = b64 * stride_tb + hq64 * stride_th + q_start.to(tl.int64) + rows
        lse2 = tl.load(LSE2 + t_off, mask=rows < q_len, other=float("inf"))
        delta = tl.load(DELTA + t_off, mask=rows < q_len, other=0.0)
        k_base = K + b64 * stride_kb + hk64 * stride_kh + k_start.to(tl.int64) * stride_ks
        v_base = V + b64 * stride_vb + hk64 * stride_vh + k_start.to(tl.int64) * stride_vs
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        pdp = tl.zeros([BLOCK_M], dtype=tl.float32)
        lo, full_lo, full_hi, hi = visible_key_range(start_m, q_len, k_used, window_left, window_right,
                                                     BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
        for start_n in range(lo, full_lo, BLOCK_N):
            dq, pdp = _dq_block(dq, pdp, q, do, lse2, delta, k_base, v_base, start_n, rows, offs_n, offs_d, offs_dv,
                                stride_ks, stride_vs, q_len, k_used, window_left, window_right, head_dim, head_dim_v,
                                score_scale, cap_scale, True, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_SINK, EVEN_D,
                                PRECISION)
        for start_n in range(full_lo, full_hi, BLOCK_N):
            dq, pdp = _dq_block(dq, pdp, q, do, lse2, delta, k_base, v_base, start_n, rows, offs_n, offs_d, offs_dv,
                                stride_ks, stride_vs, q_len, k_used, window_left, window_right, head_dim, head_dim_v,
                                score_scale, cap_scale, False, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_SINK, EVEN_D,
                                PRECISION)
        for start_n in range(full_hi, hi, BLOCK_N):
            dq, pdp = _dq_block(dq, pdp, q, do, lse2, delta, k_base, v_base, start_n, rows, offs_n, offs_d, offs_dv,
                                stride_ks, stride_vs, q_len, k_used, window_left, window_right, head_dim, head_dim_v,
                                score_scale, cap_scale, True, HAS_LEFT, HAS_RIGHT, SOFTCAP, HAS_SINK, EVEN_D,
                                PRECISION)
        dq *= softmax_scale
        dq_ptrs = (DQ + b64 * stride_dqb + hq64 * stride_dqh + q_tok * stride_dqs
                   + (rows - start_m)[:, None] * stride_dqs + offs_d[None, :])
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty),
                 mask=_tile_mask(rows, q_len, offs_d, head_dim, True, not EVEN_D))
        if HAS_SINK:
            # Rows past the sequence have lse2 = +inf: weight 0. With a sink every real row's lse is finite.
            w = tl.exp2(tl.load(SINK + hq) * _LOG2E - lse2)
            if HAS_DLSE:
                dl_off = b64 * stride_dlb + hq64 * stride_dlh + (q_start + rows).to(tl.int64) * stride_dls
                pdp -= tl.load(DLSE + dl_off, mask=rows < q_len, other=0.0)
            part = tl.sum(tl.where(rows < q_len, w * pdp, 0.0), axis=0)
            tl.store(DSINK_PART + pid_bh.to(tl.int64) * n_blk + blk, part)


# ----------------------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BwdConfig:
    """Tile sizes and launch options. *_1: the dK/dV kernel (BLOCK_N keys resident, BLOCK_M queries streamed);
    *_2: the dQ kernel (BLOCK_M queries resident, BLOCK_N keys streamed). dq_atomic: dQ from the dK/dV kernel
    through fp32 atomics (ignored when deterministic=True, which always runs the dQ kernel). split_dkdv: one
    pass for dV, then one for dK (and dQ): 6 matrix products instead of 5, for head dims whose two fp32
    accumulators would not fit in registers (D = 256). dq_transposed: the atomic dQ product computed as
    dQᵀ = Kᵀ dSᵀ (keeps it on wgmma when block_m1 < 64)."""
    block_m1: int
    block_n1: int
    warps1: int
    stages1: int
    block_m2: int
    block_n2: int
    warps2: int
    stages2: int
    dq_atomic: bool = True
    split_dkdv: bool = False
    dq_transposed: bool = False
    # With split_dkdv: (block_m, block_n, warps, stages) of the dV pass, which has two products and one fp32
    # accumulator against the dK pass's four and the dQ atomics; None = the dK pass's tile.
    dv_pass: tuple = None
    # With split_dkdv: the dV pass on a side stream, beside the dK pass (they read the same inputs and write
    # different outputs). One launch after the other, each pass's tail idled SMs the other could use.
    concurrent_dv: bool = False


# Per (architecture class, padded head dim). Chosen offline so that no kernel spills registers or overflows shared
# memory (benchmarks/tune_backward.py sass --check); benchmarks/tune_backward.py time picks among the sm90 ones
# on an H100. "sm90": Hopper, wgmma, 227 KB of shared memory. "sm80": A100-class (164 KB; also Blackwell for
# now). "sm86": consumer cards with ~99 KB.
_CONFIGS = {
    # sm90 rows: from benchmarks/results/raw/h100-2026-11-25-tune-backward-r1.log, the fastest configs that keep
    # the loops spill-free. At D = 64 and 128 the separate dQ kernel beats fp32 atomics (and is deterministic by
    # construction); 64x128 at D=128 measured 6% faster but spills in the dK/dV loop. At D = 256 the dK pass's
    # transposed atomic dQ beat the dQ kernel on all four rows (244 / 224 / 264 / 263 against 242 / 212 / 257 /
    # 240 TFLOP/s): the split already recomputes S twice, and the dQ kernel would be a third recomputation.
    # (Five products as FA2 does them, dK and dV of 64 keys both in registers, spill 250+ registers in every
    # Triton 3.6 build tried: tune_backward sass, session 4.)
    ("sm90", 64): BwdConfig(64, 128, 8, 3, 128, 64, 8, 3, dq_atomic=False),
    ("sm90", 128): BwdConfig(32, 128, 8, 3, 128, 64, 8, 3, dq_atomic=False),
    # D = 256: the dV pass on a 3-deep ring of its own (dv_pass), session 6 (H100, tune_backward r2, raw
    # h100-2026-11-26-tune-backward-d256-r2.log): 274 / 228 / 287 / 293 TFLOP/s against 254 / 220 / 260 / 280
    # with the dK pass's 2-deep tile, FA2 255 / 235 / 271 / 263.
    # Its dQ-kernel fields serve deterministic=True only (the ordered dQ pass, also beside the Gluon D = 256 kernel):
    # a 3-deep K / V ring there measured 849 / 2882 us against 1116 / 3762 with 2 (S = 4096 / 16384 causal, H100,
    # session 24, benchmarks/NOTES.md).
    ("sm90", 256): BwdConfig(32, 128, 8, 2, 128, 32, 8, 3, dq_atomic=True, split_dkdv=True, dq_transposed=True,
                             dv_pass=(32, 128, 8, 3), concurrent_dv=True),
    ("sm80", 64): BwdConfig(32, 128, 8, 3, 128, 32, 8, 3, dq_atomic=True, dq_transposed=True),
    ("sm80", 128): BwdConfig(32, 64, 4, 2, 64, 64, 4, 2, dq_atomic=False),
    ("sm80", 256): BwdConfig(16, 128, 8, 2, 64, 32, 8, 2, dq_atomic=False, split_dkdv=True),
    ("sm86", 64): BwdConfig(32, 128, 8, 3, 128, 32, 8, 3, dq_atomic=True, dq_transposed=True),
    ("sm86", 128): BwdConfig(32, 64, 4, 1, 64, 32, 4, 2, dq_atomic=False),
    ("sm86", 256): BwdConfig(16, 64, 4, 2, 32, 32, 4, 2, dq_atomic=False, split_dkdv=True),
}
# Plain causal masks (window (-1, 0), no softcap) where another tile measured faster and compiles spill-free:
# at D = 128 on sm_90 the 64-query step spills 26-34 registers in the unmasked-only (non-causal) build but none
# in the causal one, and measured 4-8% faster there (tune_backward r1: S = 1024 / 4096 / 16384 causal 203 / 304
# / 343 TFLOP/s, FA2 195 / 275 / 320).
_CAUSAL_CONFIGS = {
    ("sm90", 128): BwdConfig(64, 128, 8, 3, 128, 64, 8, 3, dq_atomic=False),
}
# fp32 inputs (ieee products on the FMA units, no tensor cores): small tiles over 8 warps keep them in registers.
_FP32_CONFIG = BwdConfig(16, 32, 8, 1, 32, 16, 8, 1, dq_atomic=False, split_dkdv=True)
_INTERPRETER_CONFIG = BwdConfig(32, 32, 4, 1, 32, 32, 4, 1)


def arch_class(capability):
    """The _CONFIGS architecture class of a (major, minor) compute capability."""
    major, minor = capability
    if major == 9:
        return "sm90"
    if (major, minor) in ((8, 0), (8, 7)) or major in (10, 11):
        return "sm80"
    return "sm86"


def table_config(arch, bucket, causal=False):
    """The table's config for an architecture class and head-dim bucket; `causal`: a plain causal mask."""
    return (causal and _CAUSAL_CONFIGS.get((arch, bucket))) or _CONFIGS[(arch, bucket)]


def default_config(q, head_dim_pad, causal=False):
    """The tuned config for q's device, dtype and padded head dim (max of D and Dv); `causal`: the mask is plain
    causal (window (-1, 0)) without softcap."""
    if q.device.type != "cuda":
        return _INTERPRETER_CONFIG
    if q.dtype == torch.float32:
        return _FP32_CONFIG
    bucket = 64 if head_dim_pad <= 64 else 128 if head_dim_pad <= 128 else 256
    return table_config(arch_class(torch.cuda.get_device_capability(q.device)), bucket, causal)


# ----------------------------------------------------------------------------------------------------------
# Host function
# ----------------------------------------------------------------------------------------------------------

def _bsh_strides(t, varlen):
    """(batch, token, head) strides of a (B, S, H, D) or packed (T, H, D) tensor; batch stride 0 when packed."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _lse_strides(t, varlen):
    """(batch, head, token) strides of lse-shaped tensors: (B, Hq, Sq) batched, (Hq, Tq) packed."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _unit_last_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


# Grid order of the dK/dV and dQ kernels: the blocks of one head adjacent (axis 0) so the operands they stream
# come from L2; False: heads fastest (the order measured until 2026-11-26).
BLOCKS_FASTEST = True


# Launches marked concurrent (the D = 256 split's dV pass) on a side stream; False: all on the caller's stream
# (probes flip it for A/B).
CONCURRENT_LAUNCHES = True


def _blocks_fastest(n_bh):
    return BLOCKS_FASTEST and n_bh <= 65535  # grid axis 1 holds at most 65535 programs


@dataclasses.dataclass
class Launch:
    """One kernel launch: the host function's plan, also what benchmarks/tune_backward.py compiles offline."""
    kernel: object
    grid: tuple
    args: list
    constexprs: dict
    num_warps: int
    num_stages: int = 1
    # May run on a side stream, concurrently with the launches after it (backward() joins it before returning).
    concurrent: bool = False

    def __call__(self):
        self.kernel[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)


def backward(dout, q, k, v, out, lse, dlse, *, softmax_scale, window_left=-1, window_right=-1, softcap=0.0,
             sink=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, max_seqlen_q=None,
             max_seqlen_k=None, page_table=None, deterministic=False, config=None):
    """Attention backward per docs/INTERNALS.md -> (dq, dk, dv, dsink).

    config: a BwdConfig to override the tuned table (benchmarks and tests); None picks default_config.
    """
    launches, finish = plan(dout, q, k, v, out, lse, dlse, softmax_scale=softmax_scale, window_left=window_left,
                            window_right=window_right, softcap=softcap, sink=sink, cu_seqlens_q=cu_seqlens_q,
                            cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k, max_seqlen_q=max_seqlen_q,
                            max_seqlen_k=max_seqlen_k, page_table=page_table, deterministic=deterministic,
                            config=config)
    side = None
    for launch in launches:
        stream = side_stream(q.device) if launch.concurrent and CONCURRENT_LAUNCHES and q.is_cuda else None
        if stream is not None:
            main, side = torch.cuda.current_stream(q.device), stream
            side.wait_stream(main)  # its inputs were written on the caller's stream
            with torch.cuda.stream(side):
                launch()
        else:
            launch()
    if side is not None:
        # Joined before returning: the outputs are ready on the caller's stream, and no tensor this call used
        # is freed (for reuse by the caller's stream) while the side stream may still read it.
        main.wait_stream(side)
    return finish()


_SIDE_STREAMS = {}


def side_stream(device):
    """One side stream per device for backward's concurrent launches (CUDA-graph capture follows it there
    through the wait on the capturing stream), or None: the launches then run in order on the caller's stream.

    None while a CUDA graph is being captured and no side stream exists yet: creating a stream (torch's pool
    allocates its streams on first use) is not something to do inside a capture, so a first backward call that
    is captured runs its passes in order; eager calls afterwards create the stream, and later captures use it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SIDE_STREAMS.get(index)
    if stream is None:
        if torch.cuda.is_current_stream_capturing():
            return None
        stream = _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


def plan(dout, q, k, v, out, lse, dlse, *, softmax_scale, window_left, window_right, softcap, sink,
         cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, page_table, deterministic, config):
    """Allocate the outputs and buffers; return (launches, finish): run the launches in order, then finish()
    gives (dq, dk, dv, dsink)."""
    if page_table is not None:
        raise NotImplementedError("the Triton backward does not support a paged KV cache (inference only)")
    varlen_q = cu_seqlens_q is not None
    varlen_k = cu_seqlens_k is not None
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last dimension; got {t.stride(-1)}")
    dout, out = _unit_last_stride(dout), _unit_last_stride(out)
    device = q.device
    n_heads, head_dim = q.shape[-2], q.shape[-1]
    n_kv_heads, head_dim_v = k.shape[-2], v.shape[-1]
    group = n_heads // n_kv_heads
    if varlen_q:
        batch = cu_seqlens_q.numel() - 1
        seqlen_q = int(max_seqlen_q)
    else:
        batch, seqlen_q = q.shape[0], q.shape[1]
    seqlen_k = int(max_seqlen_k) if varlen_k else k.shape[1]

    # dK/dV rows outside every packed sequence are never visited, so packed outputs start at 0.
    alloc_k = torch.zeros if varlen_k else torch.empty
    dk = alloc_k(k.shape, dtype=k.dtype, device=device)
    dv = alloc_k(v.shape, dtype=v.dtype, device=device)
    if q.numel() == 0 or batch == 0 or seqlen_q == 0:
        dsink = torch.zeros(n_heads, dtype=torch.float32, device=device) if sink is not None else None
        return [], lambda: (torch.zeros(q.shape, dtype=q.dtype, device=device), dk.zero_(), dv.zero_(), dsink)

    d_pad = max(triton.next_power_of_2(head_dim), 16)
    dv_pad = max(triton.next_power_of_2(head_dim_v), 16)
    cfg = config or default_config(q, max(d_pad, dv_pad),
                                   causal=window_left < 0 and window_right == 0 and not softcap)
    has_keys = k.numel() > 0 and seqlen_k > 0
    # With a sink and 16-bit inputs the dQ kernel runs: it computes the sink gradient without O's rounding
    # (see _bwd_dq_kernel). fp32 outputs carry no such rounding, and there the preprocess's sum is as exact.
    sink_in_dq = sink is not None and has_keys and q.dtype != torch.float32
    # The D = 256 bucket's atomic dQ (split dK / dV passes) gave a wrong dQ (max error 3-6, H100) whenever Dv is
    # padded to its block: (192, 40) and (256, 40), with or without a window, while (192, 64), (192, 192) and
    # (128, 40) were right (a GPU fuzz, session 21). Such calls take the dQ kernel (its fixed key order measured
    # right on the same shapes).
    padded_dv_split = cfg.split_dkdv and dv_pad != head_dim_v
    dq_atomic = cfg.dq_atomic and not deterministic and has_keys and not sink_in_dq and not padded_dv_split
    dummy = torch.empty(1, dtype=torch.int32, device=device)
    cu_q = cu_seqlens_q if varlen_q else dummy
    cu_k = cu_seqlens_k if varlen_k else dummy
    used = seqused_k if seqused_k is not None else dummy
    launches = []

    # 1. Preprocess: Delta and lse2 in lse's layout (contiguous), sink partial sums per (b, h, block).
    delta = torch.empty(lse.shape, dtype=torch.float32, device=device)
    lse2 = torch.empty(lse.shape, dtype=torch.float32, device=device)
    prep_m = 64 if dv_pad <= 128 else 32
    n_prep = triton.cdiv(seqlen_q, prep_m)
    # Sink-gradient partial sums: from the dQ kernel (sink_in_dq), else from the preprocess (fp32 inputs, or
    # no keys: every row then sees only the sink, O = 0 and Delta = −dlse exactly).
    sink_in_prep = sink is not None and not sink_in_dq
    n_parts = n_prep if sink_in_prep else triton.cdiv(seqlen_q, cfg.block_m2)
    dsink_part = (torch.zeros(batch * n_heads, n_parts, dtype=torch.float32, device=device)
                  if sink is not None else delta)
    do_s = _bsh_strides(dout, varlen_q)
    t_s = _lse_strides(delta, varlen_q)[:2]
    launches.append(Launch(
        _bwd_preprocess, (batch * n_heads, n_prep),
        [out, dout, lse, dlse if dlse is not None else lse, sink if sink is not None else lse,
         delta, lse2, dsink_part, cu_q, delta, lse2, delta, delta, lse2, *_bsh_strides(out, varlen_q), *do_s,
         *_lse_strides(lse, varlen_q), *(_lse_strides(dlse, varlen_q) if dlse is not None else (0, 0, 0)), *t_s, 0,
         seqlen_q, n_heads, head_dim_v, 0, 0, 1.0],
        dict(VARLEN_Q=varlen_q, HAS_DLSE=dlse is not None, HAS_SINK=sink_in_prep, BLOCK_M=prep_m,
             BLOCK_DV=dv_pad), num_warps=4))

    # dQ: an fp32 accumulator for the atomics, else written once in the input dtype by the dQ kernel.
    if dq_atomic:
        dq = torch.zeros(q.shape, dtype=torch.float32, device=device)
    else:
        dq = (torch.zeros if varlen_q or not has_keys else torch.empty)(q.shape, dtype=q.dtype, device=device)

    def finish():
        dsink = None
        if sink is not None:
            # fp64 for the last tiny reduction: the partials may cancel, and there are only B·Sq/64 of them.
            dsink = -dsink_part.view(batch, n_heads, n_parts).double().sum(dim=(0, 2)).float()
        if not has_keys:
            dk.zero_()
            dv.zero_()
        return dq.to(q.dtype), dk, dv, dsink

    if not has_keys:
        return launches, finish

    cap = float(softcap)
    score_scale = softmax_scale / cap if cap > 0 else softmax_scale * LOG2E
    seq_args = [seqlen_q, seqlen_k]
    scalar_args = [score_scale, cap * LOG2E, softmax_scale, window_left, window_right]
    qkv_strides = [*_bsh_strides(q, varlen_q), *_bsh_strides(k, varlen_k), *_bsh_strides(v, varlen_k), *do_s,
                   *_bsh_strides(dq, varlen_q)]
    common = dict(GROUP=group, VARLEN_Q=varlen_q, VARLEN_K=varlen_k, HAS_SEQUSED=seqused_k is not None,
                  HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, SOFTCAP=softcap_level(cap, q.dtype),
                  EVEN_D=d_pad == head_dim and dv_pad == head_dim_v,
                  PRECISION="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_D=d_pad, BLOCK_DV=dv_pad)

    # 2. dK, dV (+ dQ through atomics), in one pass or as a dV pass then a dK pass.
    blocks_fastest = _blocks_fastest(batch * n_kv_heads)
    for compute_dk, compute_dv in ([(False, True), (True, False)] if cfg.split_dkdv else [(True, True)]):
        tile = (cfg.block_m1, cfg.block_n1, cfg.warps1, cfg.stages1)
        if cfg.split_dkdv and not compute_dk and cfg.dv_pass is not None:
            tile = cfg.dv_pass
        n_kb = triton.cdiv(seqlen_k, tile[1])
        grid1 = (n_kb, batch * n_kv_heads) if blocks_fastest else (batch * n_kv_heads, n_kb)
        launches.append(Launch(
            _bwd_dkdv_kernel, grid1,
            [q, k, v, dout, dq, dk, dv, lse2, delta, cu_q, cu_k, used, *qkv_strides,
             *_bsh_strides(dk, varlen_k), *_bsh_strides(dv, varlen_k), *t_s,
             *seq_args, n_kv_heads, head_dim, head_dim_v, *scalar_args],
            dict(common, DQ_ATOMIC=dq_atomic and compute_dk, COMPUTE_DK=compute_dk, COMPUTE_DV=compute_dv,
                 DQ_TRANSPOSED=cfg.dq_transposed, BLOCKS_FASTEST=blocks_fastest, BLOCK_M=tile[0],
                 BLOCK_N=tile[1]),
            tile[2], tile[3], concurrent=cfg.split_dkdv and cfg.concurrent_dv and not compute_dk))

    # 3. dQ in a fixed key order (and, with a sink, its gradient's partial sums).
    if not dq_atomic:
        launches.append(dq_launch(dout, q, k, v, dq, lse2, delta, cfg, softmax_scale=softmax_scale,
                                  window_left=window_left, window_right=window_right, softcap=softcap,
                                  cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k,
                                  seqlen_q=seqlen_q, seqlen_k=seqlen_k, sink=sink if sink_in_dq else None,
                                  dlse=dlse, dsink_part=dsink_part))
    return launches, finish


def dq_launch(dout, q, k, v, dq, lse2, delta, cfg, *, softmax_scale, window_left, window_right, softcap,
              cu_seqlens_q, cu_seqlens_k, seqused_k, seqlen_q, seqlen_k, sink=None, dlse=None, dsink_part=None):
    """The launch of the dQ kernel (one program per (batch, query head, query block) of cfg.block_m2 rows).
    lse2, delta: the preprocess outputs (lse's layout). With a sink, dsink_part (zeros, (batch·Hq, programs
    along the query axis)) receives the sink gradient's partial sums, negated: dsink = −Σ parts."""
    varlen_q, varlen_k = cu_seqlens_q is not None, cu_seqlens_k is not None
    d_pad = max(triton.next_power_of_2(q.shape[-1]), 16)
    dv_pad = max(triton.next_power_of_2(v.shape[-1]), 16)
    dummy = torch.empty(1, dtype=torch.int32, device=q.device)
    batch = cu_seqlens_q.numel() - 1 if varlen_q else q.shape[0]
    n_heads = q.shape[-2]
    cap = float(softcap)
    has_sink = sink is not None
    strides = [*_bsh_strides(q, varlen_q), *_bsh_strides(k, varlen_k), *_bsh_strides(v, varlen_k),
               *_bsh_strides(dout, varlen_q), *_bsh_strides(dq, varlen_q), *_lse_strides(delta, varlen_q)[:2],
               *(_lse_strides(dlse, varlen_q) if has_sink and dlse is not None else (0, 0, 0))]
    n_blk = triton.cdiv(seqlen_q, cfg.block_m2)
    blocks_fastest = _blocks_fastest(batch * n_heads)
    return Launch(
        _bwd_dq_kernel, (n_blk, batch * n_heads) if blocks_fastest else (batch * n_heads, n_blk),
        [q, k, v, dout, dq, lse2, delta, cu_seqlens_q if varlen_q else dummy, cu_seqlens_k if varlen_k else dummy,
         seqused_k if seqused_k is not None else dummy, sink if has_sink else lse2,
         dlse if has_sink and dlse is not None else lse2, dsink_part if has_sink else lse2, *strides,
         seqlen_q, seqlen_k, n_heads, q.shape[-1], v.shape[-1],
         softmax_scale / cap if cap > 0 else softmax_scale * LOG2E, cap * LOG2E, softmax_scale,
         window_left, window_right],
        dict(GROUP=n_heads // k.shape[-2], VARLEN_Q=varlen_q, VARLEN_K=varlen_k, HAS_SEQUSED=seqused_k is not None,
             HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0, SOFTCAP=softcap_level(cap, q.dtype),
             HAS_SINK=has_sink,
             HAS_DLSE=has_sink and dlse is not None, EVEN_D=d_pad == q.shape[-1] and dv_pad == v.shape[-1],
             PRECISION="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_D=d_pad, BLOCK_DV=dv_pad,
             BLOCKS_FASTEST=blocks_fastest, BLOCK_M=cfg.block_m2, BLOCK_N=cfg.block_n2),
        cfg.warps2, cfg.stages2)
