"""FLOP formulas of fa4's custom ops for torch.utils.flop_counter.FlopCounterMode (MFU tools count model FLOPs
with it; without a formula an op counts 0).

The convention is torch's own for scaled_dot_product_attention: dense products, masks not subtracted. The forward
is Q·Kᵀ and P·V, so 2·Hq·pairs·(D + Dv), where pairs = Σ_b Sq_b·Sk_b. The backward recomputes Q·Kᵀ, then forms
dO·Vᵀ, Pᵀ·dO, dS·K and dSᵀ·Q: 2·Hq·pairs·(3·D + 2·Dv).
Packed calls sum the sequences' pairs from cu_seqlens where the values can be read (one host read, in a counting
mode), else bound them by total_q · max_seqlen_k (fake tensors, CUDA-graph capture).
"""
import torch
from torch.utils.flop_counter import register_flop_formula

from . import checks


def _pairs(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_k):
    """Σ over sequences of (query rows) x (keys)."""
    if cu_seqlens_q is None:
        return q.shape[0] * q.shape[1] * k.shape[1]
    if checks.can_read_values(cu_seqlens_q, cu_seqlens_k, seqused_k):
        rows = cu_seqlens_q[1:].long() - cu_seqlens_q[:-1].long()
        keys = seqused_k.long() if seqused_k is not None else cu_seqlens_k[1:].long() - cu_seqlens_k[:-1].long()
        return int((rows * keys).sum())
    return q.shape[0] * max_seqlen_k


@register_flop_formula(torch.ops.fa4.attn_fwd, get_raw=True)
def attn_fwd_flops(q, k, v, sink, cu_seqlens_q, cu_seqlens_k, seqused_k, page_table, max_seqlen_q, max_seqlen_k,
                   *args, out_val=None, **kwargs):
    pairs = _pairs(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_k)
    return 2 * q.shape[-2] * pairs * (q.shape[-1] + v.shape[-1])


@register_flop_formula(torch.ops.fa4.attn_bwd, get_raw=True)
def attn_bwd_flops(dout, q, k, v, out, lse, dlse, sink, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                   max_seqlen_k, *args, out_val=None, **kwargs):
    pairs = _pairs(q, k, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_k)
    return 2 * q.shape[-2] * pairs * (3 * q.shape[-1] + 2 * v.shape[-1])
