"""The training/prefill API: flash_attn_func and flash_attn_varlen_func (FlashAttention's names and layouts).

This module turns user arguments into the canonical form of docs/INTERNALS.md: it validates them (fa4.checks),
applies autocast and defaults, folds `causal` into the window, asks fa4.dispatch for a backend and calls the
custom op in fa4.ops. It never touches kernel internals.
"""
import math

import torch

from . import checks, dispatch, ops


def _autocast(q, k, v):
    """Under torch.autocast, floating q/k/v are cast to the autocast dtype as matmul and SDPA inputs are: fp32, fp16
    and bf16 alike (an fp16 tensor under bf16 autocast too); fp64 is left to the dtype check, as autocast leaves it."""
    device_type = q.device.type if isinstance(q, torch.Tensor) else "cuda"
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = (t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float16,
                                                                              torch.bfloat16) else t
                   for t in (q, k, v))
    return q, k, v


def _attention(q, k, v, *, softmax_scale, causal, window_size, softcap, learnable_sink, deterministic,
               return_lse, backend, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, page_table=None,
               max_seqlen_q=None, max_seqlen_k=None):
    for name, flag in (("causal", causal), ("deterministic", deterministic), ("return_lse", return_lse)):
        checks.check_flag(name, flag)
    left, right = checks.check_options(softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                                       learnable_sink=learnable_sink, num_heads=q.shape[-2], device=q.device,
                                       backend=backend)
    if causal:
        right = 0  # causal is the window (left, 0), aligned bottom-right as in FlashAttention
    # Bounds on every sequence's key and query counts: the batched shapes, or the packed totals (a paged cache:
    # its table's pages).
    max_keys = k.shape[1] if cu_seqlens_q is None else (
        k.shape[0] if page_table is None else page_table.shape[1] * k.shape[1])
    left, right = checks.window_reach(left, right, max_keys, q.shape[1] if cu_seqlens_q is None else q.shape[0])
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if scale < 0:
        # The kernels take the row max of the raw scores and scale it (max(s)·scale, folded into exp2's
        # multiply-add), which holds for scale > 0 only. softmax(scale·s) = softmax(|scale|·(−s)): run on −q
        # (exact; autograd carries the sign into dq).
        q, scale = torch.neg(q), -scale
    elif scale == 0.0:
        # Uniform weights over the visible keys. A masked score is −inf and −inf·0 is NaN in the kernels, so the
        # scores are made 0 instead: run on 0·q with scale 1 (exact, and autograd gives dq = dk = 0 exactly).
        q, scale = q * 0.0, 1.0
    learnable_sink = checks.contiguous_sink(learnable_sink)
    features = dict(window_left=left, window_right=right, softcap=float(softcap), sink=learnable_sink,
                    cu_seqlens_q=cu_seqlens_q, page_table=page_table, seqused_k=seqused_k)
    fwd_backend, bwd_backend = dispatch.choose(q, k, v, backend, **features)
    out, lse = ops.attention(q, k, v, learnable_sink, cu_seqlens_q, cu_seqlens_k, seqused_k, page_table,
                             max_seqlen_q, max_seqlen_k, scale, left, right, float(softcap), fwd_backend,
                             bwd_backend, deterministic, return_lse)
    return (out, lse) if return_lse else out


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    learnable_sink=None, deterministic=False, return_lse=False, backend=None):
    """Exact attention over (batch, seqlen, heads, head_dim) tensors.

    q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv) -> out (B, Sq, Hq, Dv), and lse (B, Hq, Sq) fp32
    (natural log) when return_lse=True. Hq must be a multiple of Hkv (GQA/MQA). causal aligns bottom-right when
    Sq != Sk; window_size=(left, right) with -1 for unbounded; softcap s -> c·tanh(s/c); learnable_sink (Hq,)
    fp32 adds one logit per head to the normaliser. backend: None (fastest available), "triton", "sm90" or
    "reference".
    """
    q, k, v = checks.unit_last_stride(*_autocast(q, k, v))
    checks.check_qkv(q, k, v, varlen=False)
    return _attention(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                      softcap=softcap, learnable_sink=learnable_sink, deterministic=deterministic,
                      return_lse=return_lse, backend=backend, max_seqlen_q=q.shape[1], max_seqlen_k=k.shape[1])


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k=None,
                           page_table=None, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           learnable_sink=None, deterministic=False, return_lse=False, backend=None):
    """Exact attention over packed sequences.

    q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); sequence b spans rows
    cu_seqlens_q[b]:cu_seqlens_q[b+1] of q and cu_seqlens_k[b]:cu_seqlens_k[b+1] of k/v (int32, B+1 entries).
    seqused_k (B,) int32 limits sequence b to its first seqused_k[b] keys. With page_table (B, max_pages) int32,
    k/v are a paged cache (num_pages, page_size, Hkv, D) and seqused_k (or, without it, cu_seqlens_k's
    differences) gives each sequence's key count (paged prefill; forward only); table entries past a sequence's
    last page are never read. Returns out (total_q, Hq, Dv), and lse (Hq, total_q) fp32 when return_lse=True.
    A sequence with no keys gives zeros and lse = -inf.
    """
    q, k, v = checks.unit_last_stride(*_autocast(q, k, v))
    checks.check_qkv(q, k, v, varlen=True, paged=page_table is not None)
    checks.check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, page_table)
    # Python ints for the op's schema (a numpy integer passes the check); traced SymInts stay as they are.
    max_seqlen_q, max_seqlen_k = (m if isinstance(m, torch.SymInt) else int(m) for m in (max_seqlen_q, max_seqlen_k))
    if page_table is not None and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("page_table: a paged KV cache is for inference; gradients through it are not supported")
    if page_table is not None and seqused_k is None:
        # FlashAttention's paged varlen: without seqused_k, cu_seqlens_k's differences are the key counts.
        seqused_k = cu_seqlens_k[1:] - cu_seqlens_k[:-1]
    return _attention(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                      softcap=softcap, learnable_sink=learnable_sink, deterministic=deterministic,
                      return_lse=return_lse, backend=backend, cu_seqlens_q=cu_seqlens_q,
                      cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k, page_table=page_table,
                      max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
