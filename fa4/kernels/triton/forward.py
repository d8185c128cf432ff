"""Portable Triton attention forward: every NVIDIA GPU from compute capability 8.0.

One program computes one (query block, query head, sequence) tile of the output:

    for each visible key block K_j, V_j:           (blocks outside the causal/window/length bounds are skipped)
        S   = Q K_j^T                              (fp32; scores in base 2: s * scale * log2(e), one multiply)
        m'  = max(m, rowmax(S))                    (running row maximum)
        P   = exp2(S - m')                         (cast to the input dtype before the product, as FA does)
        l   = l * exp2(m - m') + rowsum(P)         (running normaliser)
        O   = O * exp2(m - m') + P V_j
    out = O / l,   lse = (m + log2 l) * ln 2

The key loop is split in three: masked boundary blocks on the left (sliding window), an unmasked interior and
masked boundary blocks on the right (causal diagonal, window, last partial block), so the per-element mask is
paid only where some element is hidden; key blocks no row can see are never visited. A learnable sink is one
extra logit per head with no value row: it starts the running state as (m, l) = (sink * log2(e), 1).

Per-config options (Config, chosen per GPU family, head dim and causality from measurements): TMA tensor
descriptors for Q/K/V/O on sm_90+ (fewer address registers, hardware zero-fill of tails); a 128-register cap so
two programs share an SM and one's softmax hides under the other's matrix products; lazy rescaling of O;
software pipelining of the unmasked key blocks by one block (P V of the previous block under this block's
softmax, inside one program).
Plain Triton only: nothing here is Hopper-specific source; Triton emits wgmma/TMA on sm_90 and mma.sync on sm_80.

Layouts (docs/INTERNALS.md): batched q (B, Sq, Hq, D); varlen q (Tq, Hq, D) with cu_seqlens; keys batched,
varlen, or paged (num_pages, page_size, Hkv, D) through a page table. Strides come from the tensors.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fa4.kernels.triton import forward_lean
from fa4.kernels.triton.common import (LOG2E, softcap_level, tanh_via_exp2, visible_key_range,
                                       visible_mask)

# The plain training call takes forward_lean's kernel (False: always the general kernel; probes flip it for A/B).
USE_LEAN = True


# ----------------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------------

@triton.jit
def _block_ptrs(X, start_n, offs_n, offs_d, pt_row, page_size, seqlen_k, stride_p, stride_n,
                PAGED: tl.constexpr, PAGE_ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """Addresses of rows [start_n, +BLOCK_N) of K or V (X already points at this program's kv head).

    Paged keys: position j is row j % page_size of page page_table[b, j // page_size]. When page_size is a
    multiple of BLOCK_N the whole block sits in one page: one scalar page lookup and contiguous rows, as fast
    as unpaged keys. Otherwise each row is gathered through its own page index.
    """
    if PAGED:
        if PAGE_ALIGNED:
            page = tl.load(pt_row + start_n // page_size).to(tl.int64)
            blk = X + page * stride_p + (start_n % page_size) * stride_n
            ptrs = blk + offs_n[:, None] * stride_n + offs_d[None, :]
        else:
            cols = start_n + offs_n
            if MASKED:
                page = tl.load(pt_row + cols // page_size, mask=cols < seqlen_k, other=0)
            else:
                page = tl.load(pt_row + cols // page_size)
            rows = page.to(tl.int64) * stride_p + (cols % page_size) * stride_n
            ptrs = X + rows[:, None] + offs_d[None, :]
    else:
        # 64-bit block offset: one sequence alone may hold more than 2^31 elements.
        blk = X + tl.cast(start_n, tl.int64) * stride_n
        ptrs = blk + offs_n[:, None] * stride_n + offs_d[None, :]
    return ptrs


@triton.jit
def _load_rows(X, start_n, offs_n, offs_d, pt_row, page_size, seqlen_k, stride_p, stride_n,
               HEAD: tl.constexpr, BLOCK: tl.constexpr, MASKED: tl.constexpr, PAGED: tl.constexpr,
               PAGE_ALIGNED: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows [start_n, +BLOCK_N) of K or V, zero past Sk and past the head dim (padded to a power of two).

    With TMA, X is a tensor descriptor bounded by (Sk, HEAD): the copy engine zero-fills out-of-range rows and
    columns, no mask is computed. Otherwise row bounds are checked only in masked blocks (interior blocks lie
    below Sk) and column bounds only when HEAD is padded.
    """
    if USE_TMA:
        x = X.load([start_n, 0])
    else:
        ptrs = _block_ptrs(X, start_n, offs_n, offs_d, pt_row, page_size, seqlen_k, stride_p, stride_n,
                           PAGED, PAGE_ALIGNED, MASKED)
        if MASKED:
            mask = (start_n + offs_n)[:, None] < seqlen_k
            if BLOCK != HEAD:
                mask = mask & (offs_d[None, :] < HEAD)
            x = tl.load(ptrs, mask=mask, other=0.0)
        elif BLOCK != HEAD:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _scores(q, K, start_n, offs_n, offs_d, pt_row, page_size, seqlen_k, cap_scale, cap_log2,
            stride_kp, stride_kn, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
            HAS_SOFTCAP: tl.constexpr, PAGED: tl.constexpr, PAGE_ALIGNED: tl.constexpr, USE_TMA: tl.constexpr,
            DOT_PRECISION: tl.constexpr):
    """S = Q K^T for key block [start_n, +BLOCK_N), fp32. Softcap folds in here: s = c tanh(scale qk / c),
    returned in base-2 units (times log2 e); without softcap the scale is applied later, in the exponent."""
    k = _load_rows(K, start_n, offs_n, offs_d, pt_row, page_size, seqlen_k, stride_kp, stride_kn,
                   HEAD_D, BLOCK_D, MASKED, PAGED, PAGE_ALIGNED, USE_TMA)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if HAS_SOFTCAP:
        qk = cap_log2 * tanh_via_exp2(qk * cap_scale, HAS_SOFTCAP == 2)  # HAS_SOFTCAP: common.softcap_level
    return qk


@triton.jit
def _softmax_pv(acc, m_i, l_i, qk, V, start_n, offs_n, offs_dv, rows_k, pt_row, page_size, seqlen_k,
                window_left, window_right, qk_scale, stride_vp, stride_vn,
                HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr,
                HAS_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PAGED: tl.constexpr,
                PAGE_ALIGNED: tl.constexpr, USE_TMA: tl.constexpr, LAZY_RESCALE: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """The online-softmax update with the scores of key block [start_n, +BLOCK_N), then O += P V.

    LAZY_RESCALE (unmasked blocks only): keep a stale row maximum until some row of the block grows by more
    than 8 (log2 units), so that O (BLOCK_M x Dv, the largest register tile) is rescaled only on those rare
    blocks. P = exp2(s - m_stale) <= 2^8 stays finite in fp32 and in P's 16-bit type, and out = O / l stays
    exact because O and l share the same reference maximum.
    """
    if HAS_SOFTCAP:
        scale = 1.0
    else:
        scale = qk_scale
    if MASKED:
        visible = visible_mask(rows_k, start_n + offs_n, seqlen_k, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        qk = tl.where(visible, qk, float("-inf"))
    # The scale is folded into the exponent's multiply-add: exp2(qk * scale - m).
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
    if LAZY_RESCALE and not MASKED:
        if tl.max(m_new - m_i, 0) > 8.0:  # one decision for the whole block: a uniform branch
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha
            acc = acc * alpha[:, None]
            m_i = m_new
        p = tl.exp2(qk * scale - m_i[:, None])
        l_i = l_i + tl.sum(p, 1)
        m_new = m_i
    else:
        m_sub = m_new
        if MASKED:
            # A row that has seen nothing yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN
            # (m itself stays -inf: a finite stand-in could underflow every later exp2 of that row).
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk * scale - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
    v = _load_rows(V, start_n, offs_n, offs_dv, pt_row, page_size, seqlen_k, stride_vp, stride_vn,
                   HEAD_DV, BLOCK_DV, MASKED, PAGED, PAGE_ALIGNED, USE_TMA)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_range(acc, m_i, l_i, q, K, V, n_lo, n_hi, offs_n, offs_d, offs_dv, rows_k,
                  pt_row, page_size, seqlen_k, window_left, window_right, qk_scale, cap_scale, cap_log2,
                  stride_kp, stride_kn, stride_vp, stride_vn,
                  HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, PAGED: tl.constexpr, PAGE_ALIGNED: tl.constexpr,
                  USE_TMA: tl.constexpr, LAZY_RESCALE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The online softmax over key blocks [n_lo, n_hi), all masked or all unmasked."""
    for start_n in range(n_lo, n_hi, BLOCK_N):
        qk = _scores(q, K, start_n, offs_n, offs_d, pt_row, page_size, seqlen_k, cap_scale, cap_log2,
                     stride_kp, stride_kn, HEAD_D, BLOCK_D, MASKED, HAS_SOFTCAP, PAGED, PAGE_ALIGNED, USE_TMA,
                     DOT_PRECISION)
        acc, m_i, l_i = _softmax_pv(acc, m_i, l_i, qk, V, start_n, offs_n, offs_dv, rows_k, pt_row,
                                    page_size, seqlen_k, window_left, window_right, qk_scale,
                                    stride_vp, stride_vn, HEAD_DV, BLOCK_DV, MASKED, HAS_LEFT,
                                    HAS_RIGHT, HAS_SOFTCAP, PAGED, PAGE_ALIGNED, USE_TMA, LAZY_RESCALE,
                                    DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _overlap_softmax(m_i, l_i, qk, qk_scale, HAS_SOFTCAP: tl.constexpr):
    """The online-softmax state update of one unmasked score block, for `_attend_range_overlap`: returns
    (P in fp32, alpha, m, l); O is multiplied by alpha by the caller, just before the block's P V is issued.
    Unmasked blocks only: every score is finite, so no -inf guard is needed (a row that has seen nothing yet
    has m = -inf and gets alpha = exp2(-inf) = 0, with O and l still 0)."""
    if HAS_SOFTCAP:
        scale = 1.0
    else:
        scale = qk_scale
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk * scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


@triton.jit
def _attend_range_overlap(acc, m_i, l_i, q, K, V, n_lo, n_hi, offs_n, offs_d, offs_dv,
                          pt_row, page_size, seqlen_k, qk_scale, cap_scale, cap_log2,
                          stride_kp, stride_kn, stride_vp, stride_vn,
                          HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                          PAGED: tl.constexpr, PAGE_ALIGNED: tl.constexpr, USE_TMA: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    """`_attend_range` over unmasked key blocks, software-pipelined by one block (Config.overlap):

        S_0 = Q K_0^T; P_0 = softmax step(S_0)
        for j = 1 ..:  O = O * alpha_{j-1};  S_j = Q K_j^T;  O += P_{j-1} V_{j-1};  P_j = softmax step(S_j)
        O = O * alpha_last + P_last V_last

    Triton keeps the last wgmma of the loop body in flight across the iteration (its result is only needed
    by the next iteration), so P_{j-1} V_{j-1} runs on the tensor cores while the same warps compute the
    softmax of block j: the overlap FA3 gets inside one warpgroup, here without warp specialization. It
    costs P (BLOCK_M x BLOCK_N fp32) held across the iteration: more registers than the plain loop.
    O is rescaled on every block, before S_j is issued (the previous P V is long finished by then): a lazy
    (conditional) rescale puts a branch on O between the two products, and Triton 3.6 then waits for each
    P V right after issuing it (no overlap left), so LAZY_RESCALE does not apply here. Whether ptxas keeps
    the wgmma asynchronous depends on the tile (`benchmarks/tune_forward.py sass` reports where it does not).
    """
    if n_lo < n_hi:
        qk = _scores(q, K, n_lo, offs_n, offs_d, pt_row, page_size, seqlen_k, cap_scale, cap_log2,
                     stride_kp, stride_kn, HEAD_D, BLOCK_D, False, HAS_SOFTCAP, PAGED, PAGE_ALIGNED, USE_TMA,
                     DOT_PRECISION)
        p, alpha, m_i, l_i = _overlap_softmax(m_i, l_i, qk, qk_scale, HAS_SOFTCAP)
        for start_n in range(n_lo + BLOCK_N, n_hi, BLOCK_N):
            acc = acc * alpha[:, None]
            qk = _scores(q, K, start_n, offs_n, offs_d, pt_row, page_size, seqlen_k, cap_scale, cap_log2,
                         stride_kp, stride_kn, HEAD_D, BLOCK_D, False, HAS_SOFTCAP, PAGED, PAGE_ALIGNED,
                         USE_TMA, DOT_PRECISION)
            v = _load_rows(V, start_n - BLOCK_N, offs_n, offs_dv, pt_row, page_size, seqlen_k, stride_vp,
                           stride_vn, HEAD_DV, BLOCK_DV, False, PAGED, PAGE_ALIGNED, USE_TMA)
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            p, alpha, m_i, l_i = _overlap_softmax(m_i, l_i, qk, qk_scale, HAS_SOFTCAP)
        acc = acc * alpha[:, None]
        v = _load_rows(V, n_hi - BLOCK_N, offs_n, offs_dv, pt_row, page_size, seqlen_k, stride_vp, stride_vn,
                       HEAD_DV, BLOCK_DV, False, PAGED, PAGE_ALIGNED, USE_TMA)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, Sink, CuSeqlensQ, CuSeqlensK, SequsedK, PageTable,
                stride_qb, stride_qs, stride_qh,
                stride_kb, stride_ks, stride_kh,
                stride_vb, stride_vs, stride_vh,
                stride_ob, stride_os, stride_oh,
                stride_lb, stride_lh, stride_ptb,
                num_heads, group, seqlen_q, seqlen_k, page_size,
                qk_scale, cap_scale, cap_log2, window_left, window_right,
                HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                IS_VARLEN: tl.constexpr, PAGED: tl.constexpr, PAGE_ALIGNED: tl.constexpr,
                HAS_SEQUSED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_SINK: tl.constexpr, USE_TMA: tl.constexpr,
                LAZY_RESCALE: tl.constexpr, DOT_PRECISION: tl.constexpr, OVERLAP: tl.constexpr):
    # One program per (query block, head, sequence), query blocks fastest: the programs resident together
    # read the same few heads' K and V, which then come from L2 instead of HBM. Query blocks run in reverse:
    # under causal masking the bottom blocks see the most keys, so the long programs start first and the short
    # ones fill the tail of the last wave. (A 1-D grid has no 65535 limit on sequences x heads.)
    num_m = tl.cdiv(seqlen_q, BLOCK_M)  # seqlen_q is max_seqlen_q for varlen
    pid = tl.program_id(0)
    pid_m = num_m - 1 - pid % num_m
    pid_bh = pid // num_m
    h = pid_bh % num_heads
    b = pid_bh // num_heads
    h_kv = h // group  # query heads of one kv head are adjacent: their programs share K/V in L2

    # Where this sequence's rows live. Base offsets in 64 bits: B * S * H * D may pass 2^31.
    if IS_VARLEN:
        q_start = tl.load(CuSeqlensQ + b)
        seqlen_q = tl.load(CuSeqlensQ + b + 1) - q_start
        q_base = q_start.to(tl.int64) * stride_qs + h.to(tl.int64) * stride_qh
        o_base = q_start.to(tl.int64) * stride_os + h.to(tl.int64) * stride_oh
        lse_base = h.to(tl.int64) * stride_lh + q_start
    else:
        q_base = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        o_base = b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
        lse_base = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
    m_start = pid_m * BLOCK_M
    if m_start >= seqlen_q:
        return

    pt_row = PageTable
    if PAGED:
        # K, V are (num_pages, page_size, Hkv, D): stride_kb is the page stride, stride_ks the row stride.
        seqlen_k = tl.load(SequsedK + b)
        pt_row = PageTable + b.to(tl.int64) * stride_ptb
        k_base = h_kv.to(tl.int64) * stride_kh
        v_base = h_kv.to(tl.int64) * stride_vh
    else:
        if IS_VARLEN:
            k_start = tl.load(CuSeqlensK + b)
            seqlen_k = tl.load(CuSeqlensK + b + 1) - k_start
            k_base = k_start.to(tl.int64) * stride_ks + h_kv.to(tl.int64) * stride_kh
            v_base = k_start.to(tl.int64) * stride_vs + h_kv.to(tl.int64) * stride_vh
        else:
            k_base = b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh
            v_base = b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh
        if HAS_SEQUSED:
            seqlen_k = tl.load(SequsedK + b)

    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    if USE_TMA:
        # Descriptors bounded by this sequence's (length, head dim): the TMA engine zero-fills the tails.
        q_desc = tl.make_tensor_descriptor(Q + q_base, shape=[seqlen_q, HEAD_D], strides=[stride_qs, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        q = q_desc.load([m_start, 0])
        # (A zero-length key sequence loads nothing; its descriptor still gets a legal extent of one row.)
        k_rows = tl.maximum(seqlen_k, 1)
        k_src = tl.make_tensor_descriptor(K + k_base, shape=[k_rows, HEAD_D], strides=[stride_ks, 1],
                                          block_shape=[BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(V + v_base, shape=[k_rows, HEAD_DV], strides=[stride_vs, 1],
                                          block_shape=[BLOCK_N, BLOCK_DV])
    else:
        q_mask = offs_m[:, None] < seqlen_q
        if BLOCK_D != HEAD_D:
            q_mask = q_mask & (offs_d[None, :] < HEAD_D)
        q = tl.load(Q + q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
        k_src = K + k_base
        v_src = V + v_base

    # Running state. The sink is an extra logit with no value row: it seeds (m, l) = (sink * log2 e, 1).
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if HAS_SINK:
        sink = tl.load(Sink + h).to(tl.float32) * 1.4426950408889634
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    lo, full_lo, full_hi, hi = visible_key_range(m_start, seqlen_q, seqlen_k, window_left, window_right,
                                                 BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    rows_k = offs_m + (seqlen_k - seqlen_q)  # query rows in key coordinates (bottom-right alignment)
    # Left boundary blocks (sliding window only: without a left edge the range is empty and not compiled),
    # unmasked interior, right boundary blocks (causal diagonal, window's right edge, the last partial block).
    if HAS_LEFT:
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_src, v_src, lo, full_lo, offs_n, offs_d, offs_dv,
                                      rows_k, pt_row, page_size, seqlen_k, window_left, window_right,
                                      qk_scale, cap_scale, cap_log2, stride_kb, stride_ks, stride_vb, stride_vs,
                                      HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, True, HAS_LEFT, HAS_RIGHT,
                                      HAS_SOFTCAP, PAGED, PAGE_ALIGNED, USE_TMA, LAZY_RESCALE, DOT_PRECISION)
    if OVERLAP:
        acc, m_i, l_i = _attend_range_overlap(acc, m_i, l_i, q, k_src, v_src, full_lo, full_hi, offs_n, offs_d,
                                              offs_dv, pt_row, page_size, seqlen_k, qk_scale, cap_scale,
                                              cap_log2, stride_kb, stride_ks, stride_vb, stride_vs, HEAD_D,
                                              HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, HAS_SOFTCAP, PAGED,
                                              PAGE_ALIGNED, USE_TMA, DOT_PRECISION)
    else:
        acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_src, v_src, full_lo, full_hi, offs_n, offs_d, offs_dv,
                                      rows_k, pt_row, page_size, seqlen_k, window_left, window_right,
                                      qk_scale, cap_scale, cap_log2, stride_kb, stride_ks, stride_vb, stride_vs,
                                      HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, False, HAS_LEFT, HAS_RIGHT,
                                      HAS_SOFTCAP, PAGED, PAGE_ALIGNED, USE_TMA, LAZY_RESCALE, DOT_PRECISION)
    acc, m_i, l_i = _attend_range(acc, m_i, l_i, q, k_src, v_src, full_hi, hi, offs_n, offs_d, offs_dv, rows_k,
                                  pt_row, page_size, seqlen_k, window_left, window_right,
                                  qk_scale, cap_scale, cap_log2, stride_kb, stride_ks, stride_vb, stride_vs,
                                  HEAD_D, HEAD_DV, BLOCK_D, BLOCK_DV, BLOCK_N, True, HAS_LEFT, HAS_RIGHT,
                                  HAS_SOFTCAP, PAGED, PAGE_ALIGNED, USE_TMA, LAZY_RESCALE, DOT_PRECISION)

    # Epilogue. A row with no visible key and no sink has l = 0: out 0, lse -inf.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = (acc / l_safe[:, None]).to(Out.dtype.element_ty)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(Lse + lse_base + offs_m, lse, mask=offs_m < seqlen_q)
    if USE_TMA:
        o_desc = tl.make_tensor_descriptor(Out + o_base, shape=[seqlen_q, HEAD_DV], strides=[stride_os, 1],
                                           block_shape=[BLOCK_M, BLOCK_DV])
        o_desc.store([m_start, 0], out)
    else:
        o_mask = offs_m[:, None] < seqlen_q
        if BLOCK_DV != HEAD_DV:
            o_mask = o_mask & (offs_dv[None, :] < HEAD_DV)
        tl.store(Out + o_base + offs_m[:, None] * stride_os + offs_dv[None, :], out, mask=o_mask)


# ----------------------------------------------------------------------------------------------------------
# Tile configurations
# ----------------------------------------------------------------------------------------------------------

class Config(NamedTuple):
    """Tile shape and schedule of one launch.

    `tma`: load Q/K/V and store O through tensor descriptors (the TMA copy engine on sm_90+), used only where
    the tensors allow it. `maxnreg`: cap on registers per thread; at 128 with 8 warps two programs share an
    SM, so one's softmax runs under the other's matrix products (the overlap FA2 gets from occupancy).
    `overlap`: the unmasked key blocks run software-pipelined by one block, P V of block j-1 issued before the
    softmax of block j, so the two overlap inside one program (see _attend_range_overlap); the table's D = 64
    causal row on sm_90 uses it (measured there, off elsewhere).
    """
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = False
    maxnreg: int = 0  # 0 = no cap
    lazy_rescale: bool = False  # rescale O only when a row maximum grows by more than 2^8 (see _softmax_pv)
    overlap: bool = False  # unmasked key blocks pipelined by one: P V of block j-1 under the softmax of block j
    #                        (those blocks then rescale O eagerly: lazy_rescale is for the plain loop only)


# Static table: (arch, padded head dim, causal) -> Config for fp16/bf16. "Padded head dim" is the power of two
# max(BLOCK_D, BLOCK_DV, 64). BLOCK_M 128 with 8 warps gives each warp 16 query rows (one MMA fragment; on
# sm_90 two 64-row wgmma groups). BLOCK_N shrinks as the head dim grows so that the fp32 accumulator
# (BLOCK_M x BLOCK_DV) and the score tile (BLOCK_M x BLOCK_N) stay in registers. Every entry compiles with at
# most a register or two in local memory under every feature mix, and its K/V ring fits the shared memory
# (`python benchmarks/tune_forward.py sass --table --check`, run by the CPU tests).
# The sm90 rows are to be (re)filled from `python benchmarks/tune_forward.py time` measured on an H100.
_TABLE = {
    # sm90 rows: the fastest per (head dim, causal) on an H100 (benchmarks/results/raw/*-tune-forward-r1.log).
    ("sm90", 64, False): Config(128, 128, 4, 3, tma=True),
    # D = 64 causal: the unmasked key blocks software-pipelined (overlap), 2 programs per SM. H100 2026-11-25
    # (tune_forward time --new, raw ...-tune-forward-r2.log): 365 / 430 TFLOP/s at S = 4096 / 16384 against 295 /
    # 348 for the plain (128, 64, 8, 3); at D = 64 the softmax is as long as the products, so hiding it pays most.
    ("sm90", 64, True): Config(128, 64, 4, 3, tma=True, overlap=True),
    ("sm90", 128, False): Config(128, 64, 8, 2, tma=True, maxnreg=128),
    ("sm90", 128, True): Config(128, 64, 8, 2, tma=True, maxnreg=128),
    ("sm90", 256, False): Config(128, 64, 8, 2, tma=True),
    ("sm90", 256, True): Config(128, 64, 8, 2, tma=True),
    # sm_100 (B200: 228 KiB shared memory, TMA, tcgen05 products): the H100 rows, except where they spill there.
    # Not timed on a Blackwell card (none is lent to us): chosen offline so that every row keeps the table's
    # no-spill rule (`tune_forward.py sass --table --check --cc 100`). The H100's D = 64 (128, 128, 4, 3) took 88-112
    # bytes of stack on sm_100 and D = 128's maxnreg=128 cap 24-40; (128, 128, 8, 2) takes 156-180 registers and
    # (128, 64, 8, 2) uncapped 137-143, with no stack (session 37).
    ("sm100", 64, False): Config(128, 128, 8, 2, tma=True),
    ("sm100", 64, True): Config(128, 64, 4, 3, tma=True, overlap=True),
    ("sm100", 128, False): Config(128, 64, 8, 2, tma=True),
    ("sm100", 128, True): Config(128, 64, 8, 2, tma=True),
    ("sm100", 256, False): Config(128, 64, 8, 2, tma=True),
    ("sm100", 256, True): Config(128, 64, 8, 2, tma=True),
    # A100 (164 KiB shared memory per block): mma.sync, register-resident score tile.
    ("sm80", 64, False): Config(128, 64, 8, 3),
    ("sm80", 64, True): Config(128, 64, 8, 3),
    ("sm80", 128, False): Config(128, 32, 8, 3),
    ("sm80", 128, True): Config(128, 32, 8, 3),
    ("sm80", 256, False): Config(64, 32, 8, 2),
    ("sm80", 256, True): Config(64, 32, 8, 2),
    # Consumer parts (sm_86/89/120: ~100 KiB shared memory per block).
    ("small", 64, False): Config(128, 64, 8, 2),
    ("small", 64, True): Config(128, 64, 8, 2),
    ("small", 128, False): Config(128, 32, 8, 2),
    ("small", 128, True): Config(128, 32, 8, 2),
    ("small", 256, False): Config(64, 32, 8, 2),
    ("small", 256, True): Config(64, 32, 8, 2),
}
# Where TMA cannot be used (paged keys, unaligned strides, sm_80), a TMA config runs as its plain-load twin
# (_without_tma).
_FP32 = {64: Config(64, 32, 4, 2), 128: Config(64, 32, 4, 2), 256: Config(32, 32, 4, 2)}
_INTERPRETER = Config(32, 16, 4, 1)  # CPU interpreter: small tiles keep numpy fast and exercise every loop


_CAPABILITIES = {}


def capability(device):
    """(major, minor) of a CUDA device, cached: torch's query costs ~10 µs of host time, asked on every call."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _CAPABILITIES.get(index)
    if cap is None:
        cap = _CAPABILITIES[index] = torch.cuda.get_device_capability(index)
    return cap


def _arch(device):
    major, minor = capability(device)
    if major == 9:
        return "sm90"
    if major == 10:
        return "sm100"
    if (major, minor) == (8, 0):
        return "sm80"
    return "small"


def _padded_dim(d):
    return max(16, triton.next_power_of_2(d))


def default_config(device, dtype, head_dim, head_dim_v, causal):
    """The table's config for this call (fp32 gets small tiles: twice the bytes per element)."""
    if device.type != "cuda":
        return _INTERPRETER
    dim = max(64, _padded_dim(head_dim), _padded_dim(head_dim_v))
    if dtype == torch.float32:
        return _FP32[dim]
    return _TABLE[(_arch(device), dim, causal)]


# Configs that failed to launch for want of shared memory, per device, and what replaced them: the fallback is
# deterministic (fewer stages, then narrower key blocks) and computed once per process.
_fallback = {}


def _shrink(cfg):
    if cfg.num_stages > 1:
        return cfg._replace(num_stages=cfg.num_stages - 1)
    if cfg.block_n > 16:
        return cfg._replace(block_n=cfg.block_n // 2, num_stages=2)
    if cfg.block_m > 16:
        return cfg._replace(block_m=cfg.block_m // 2, num_stages=2)
    return None


def _tma_allowed(device, tensors, paged):
    """TMA needs 16-byte aligned base addresses and row strides; paged keys are gathered, not tiled."""
    if paged:
        return False
    if device.type == "cuda" and capability(device)[0] < 9:
        return False
    for t in tensors:
        if t.data_ptr() % 16 or any((st * t.element_size()) % 16 for st in t.stride()[:-1]):
            return False
    return True


def _without_tma(cfg, block_dim):
    """The plain-load twin of a TMA config: no register cap (the cap was sized for TMA, which needs no address
    registers) and, at head dim 256, key blocks of 32 rows so that the row addresses fit beside the 128x256
    accumulator without spilling."""
    cfg = cfg._replace(tma=False, maxnreg=0)
    if block_dim >= 256 and cfg.block_n > 32:
        cfg = cfg._replace(block_n=32, num_stages=3)
    return cfg


def _torch_scratch(size, alignment, stream):
    """Global scratch for device-side tensor descriptors (128 bytes per program), from torch's allocator."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator():
    # Triton keeps the allocator in a ContextVar: set it in whatever thread launches, unless the caller did.
    from triton.runtime import _allocation
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)


# ----------------------------------------------------------------------------------------------------------
# Host wrapper
# ----------------------------------------------------------------------------------------------------------

def forward(q, k, v, *, softmax_scale, window_left, window_right, softcap, sink,
            cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, max_seqlen_q=None, max_seqlen_k=None,
            page_table=None):
    """Attention forward per docs/INTERNALS.md -> (out, lse). Arguments are already validated.

    The plain training call (forward_lean.config_for) runs the one-loop, warp-specialized kernel of
    forward_lean.py; everything else the general kernel with the table's config."""
    key = None
    lean_path = USE_LEAN and q.device.type == "cuda"
    if (lean_path and cu_seqlens_q is None and page_table is None and seqused_k is None and sink is None
            and softcap == 0.0):
        key = forward_lean.signature(q, k, v, softmax_scale, window_left, window_right)
        again = forward_lean.repeat_call(key, q, k, v)
        if again is not None:
            return again
    kwargs = dict(softmax_scale=softmax_scale, window_left=window_left, window_right=window_right, softcap=softcap,
                  sink=sink, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k,
                  max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, page_table=page_table)
    if not lean_path:
        return forward_with_config(q, k, v, **kwargs)
    out, lse, launch = prepare(q, k, v, **kwargs)
    if launch is None:
        return out, lse
    lean = forward_lean.config_for(q, k, v, window_left=window_left, window_right=window_right, softcap=softcap,
                                   sink=sink, varlen=cu_seqlens_q is not None, paged=page_table is not None,
                                   seqused_k=seqused_k, tma_ok=launch["tma_ok"])
    if lean is None:
        _run_general(q, launch, None)
        return out, lse
    with torch.cuda.device(q.device):
        _ensure_allocator()
        forward_lean.launch(launch, lean, remember=key)
    return out, lse


def forward_with_config(q, k, v, *, config=None, **kwargs):
    """`forward` with an explicit Config (None = the table's); tests and the tuning script use it."""
    out, lse, launch = prepare(q, k, v, **kwargs)
    if launch is None:
        return out, lse
    _run_general(q, launch, config)
    return out, lse


def _run_general(q, launch, config):
    """The general kernel for a prepared call, with `config` (None = the table's) or the smaller config that
    replaced it on this device after an out-of-shared-memory launch failure."""
    if config is None:
        config = default_config(q.device, q.dtype, q.shape[-1], launch["v"].shape[-1], launch["causal"])
    if q.device.type != "cuda":
        _launch(launch, config)
        return
    with torch.cuda.device(q.device):
        key = (q.device.index, config, tuple(sorted(launch["flags"].items())))
        config = _fallback.get(key, config)
        while True:
            try:
                _launch(launch, config)
                break
            except triton.runtime.errors.OutOfResources:
                smaller = _shrink(config)
                if smaller is None:
                    raise
                _fallback[key] = config = smaller


def prepare(q, k, v, *, softmax_scale, window_left, window_right, softcap, sink,
            cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, max_seqlen_q=None, max_seqlen_k=None,
            page_table=None):
    """Allocate (out, lse) and describe the launch: a dict for `kernel_call`, or None when there is no work."""
    varlen = cu_seqlens_q is not None
    paged = page_table is not None
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "last dim must have stride 1"
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32) and k.dtype == q.dtype == v.dtype
    head_dim, head_dim_v = q.shape[-1], v.shape[-1]
    assert head_dim % 8 == 0 and head_dim_v % 8 == 0 and max(head_dim, head_dim_v) <= 256

    if varlen:
        total_q, num_heads, _ = q.shape
        batch = cu_seqlens_q.numel() - 1
        if max_seqlen_q is None:
            max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item()) if batch > 0 else 0
        seqlen_q = max_seqlen_q
        q_strides = (0, q.stride(0), q.stride(1))
        lse = torch.empty((num_heads, total_q), dtype=torch.float32, device=q.device)
        lse_strides = (0, lse.stride(0))
    else:
        batch, seqlen_q, num_heads, _ = q.shape
        q_strides = (q.stride(0), q.stride(1), q.stride(2))
        lse = torch.empty((batch, num_heads, seqlen_q), dtype=torch.float32, device=q.device)
        lse_strides = (lse.stride(0), lse.stride(1))
    out = torch.empty(q.shape[:-1] + (head_dim_v,), dtype=q.dtype, device=q.device)
    o_strides = (0, out.stride(0), out.stride(1)) if varlen else (out.stride(0), out.stride(1), out.stride(2))

    page_size = 1
    if paged:
        assert seqused_k is not None, "paged keys need seqused_k"
        _, page_size, num_heads_k, _ = k.shape
        seqlen_k = 0  # per sequence, from seqused_k
        k_strides = (k.stride(0), k.stride(1), k.stride(2))
        v_strides = (v.stride(0), v.stride(1), v.stride(2))
    elif varlen:
        _, num_heads_k, _ = k.shape
        seqlen_k = 0  # per sequence, from cu_seqlens_k
        k_strides = (0, k.stride(0), k.stride(1))
        v_strides = (0, v.stride(0), v.stride(1))
    else:
        _, seqlen_k, num_heads_k, _ = k.shape
        k_strides = (k.stride(0), k.stride(1), k.stride(2))
        v_strides = (v.stride(0), v.stride(1), v.stride(2))
    assert num_heads % num_heads_k == 0

    if batch * num_heads == 0 or seqlen_q == 0:
        lse.fill_(float("-inf"))
        return out, lse, None

    dummy = lse  # stands in for absent optional tensors (never read: their constexpr flag is off)
    has_softcap = softcap > 0.0
    launch = dict(
        q=q, k=k, v=v, out=out, lse=lse,
        sink=sink if sink is not None else dummy,
        cu_q=cu_seqlens_q if varlen else dummy,
        cu_k=cu_seqlens_k if (varlen and not paged) else dummy,
        seqused=seqused_k if seqused_k is not None else dummy,
        page_table=page_table if paged else dummy,
        strides=(*q_strides, *k_strides, *v_strides, *o_strides, *lse_strides,
                 page_table.stride(0) if paged else 0),
        ints=(num_heads, num_heads // num_heads_k, seqlen_q, seqlen_k, page_size),
        scalars=(softmax_scale * LOG2E,
                 softmax_scale / softcap if has_softcap else 1.0,
                 softcap * LOG2E if has_softcap else 1.0,
                 max(window_left, 0), max(window_right, 0)),
        flags=dict(HEAD_D=head_dim, HEAD_DV=head_dim_v,
                   BLOCK_D=_padded_dim(head_dim), BLOCK_DV=_padded_dim(head_dim_v),
                   IS_VARLEN=varlen, PAGED=paged, HAS_SEQUSED=seqused_k is not None,
                   HAS_LEFT=window_left >= 0, HAS_RIGHT=window_right >= 0,
                   HAS_SOFTCAP=softcap_level(softcap, q.dtype), HAS_SINK=sink is not None,
                   DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32"),
        batch=batch, num_heads=num_heads, seqlen_q=seqlen_q, page_size=page_size,
        causal=window_right == 0 and window_left < 0,
        tma_ok=_tma_allowed(q.device, (q, k, v, out), paged),
    )
    return out, lse, launch


def kernel_call(a, cfg):
    """(grid, positional args, constexpr kwargs, config actually used) of the launch described by `a`."""
    if cfg.tma and not a["tma_ok"]:
        cfg = _without_tma(cfg, max(a["flags"]["BLOCK_D"], a["flags"]["BLOCK_DV"]))
    flags = a["flags"]
    both_padded = (flags["BLOCK_D"] != flags["BLOCK_DV"] and flags["BLOCK_D"] != flags["HEAD_D"]
                   and flags["BLOCK_DV"] != flags["HEAD_DV"])
    if cfg.overlap and both_padded:
        # The overlapped loop hits the same class of fault with TMA: (D, Dv) = (40, 24) causal gave max error
        # 0.41 on the H100 (tests/gpu/test_triton_forward.py::test_head_dims, 2026-11-25), while the plain TMA
        # loop is right there. Such head-dim pairs take the plain loop.
        cfg = cfg._replace(overlap=False)
    if both_padded or flags["BLOCK_DV"] < flags["BLOCK_D"]:
        # Triton 3.6 on sm_90 computes a wrong O (and can read out of bounds) when the head dims take different
        # blocks: (D, Dv) = (40, 24) on the plain-load path gave max error 0.74 against the reference (H100,
        # 2026-11-25), and with TMA (64, 32) and (40, 32) gave NaN in the second query block's rows at S >= 200
        # (a GPU fuzz, session 21) while (40, 40) and (40, 64) were right. One block for both (V and O masked to
        # Dv, TMA zero-filling and clipping the extra columns) is the layout every measured-right case has.
        block = max(flags["BLOCK_D"], flags["BLOCK_DV"])
        flags = dict(flags, BLOCK_D=block, BLOCK_DV=block)
    grid = (triton.cdiv(a["seqlen_q"], cfg.block_m) * a["batch"] * a["num_heads"],)
    page_aligned = a["flags"]["PAGED"] and a["page_size"] % cfg.block_n == 0
    args = (a["q"], a["k"], a["v"], a["out"], a["lse"], a["sink"], a["cu_q"], a["cu_k"], a["seqused"],
            a["page_table"], *a["strides"], *a["ints"], *a["scalars"])
    constexprs = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PAGE_ALIGNED=page_aligned,
                      USE_TMA=cfg.tma, LAZY_RESCALE=cfg.lazy_rescale, OVERLAP=cfg.overlap, **flags)
    return grid, args, constexprs, cfg


def _launch(a, cfg):
    grid, args, constexprs, cfg = kernel_call(a, cfg)
    if constexprs["USE_TMA"] and a["q"].device.type == "cuda":
        _ensure_allocator()
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.maxnreg and a["q"].device.type == "cuda":
        options["maxnreg"] = cfg.maxnreg
    _fwd_kernel[grid](*args, **constexprs, **options)
