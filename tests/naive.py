"""The simplest possible attention: materialised scores, autograd for gradients.

The oracle of the oracle: `fa4.reference` is checked against this at small sizes. Batched layout only;
varlen is tested by slicing sequences out and calling this per sequence.
"""
import math

import torch


def visible_mask(sq, sk, window_left, window_right, device):
    """(sq, sk) bool: query i sees key j (bottom-right aligned, -1 = unbounded)."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    off = sk - sq
    mask = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if window_left >= 0:
        mask &= j >= i + off - window_left
    if window_right >= 0:
        mask &= j <= i + off + window_right
    return mask


def naive_attention(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    sink=None):
    """q (B, Sq, Hq, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv) -> out (B, Sq, Hq, Dv), lse (B, Hq, Sq).

    Computes in the dtype it is given (pass fp32/fp64 tensors for a precise oracle).
    """
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    left, right = window_size
    if causal:
        right = 0
    g = hq // hkv
    kk = k.repeat_interleave(g, dim=2)
    vv = v.repeat_interleave(g, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    mask = visible_mask(sq, sk, left, right, q.device)
    s = s.masked_fill(~mask, float("-inf"))
    if sink is not None:
        sink_col = sink.to(s.dtype)[None, :, None, None].expand(b, hq, sq, 1)
        s = torch.cat([s, sink_col], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    p = torch.nan_to_num(p, nan=0.0)  # rows with nothing visible: exp(-inf - -inf)
    if sink is not None:
        p = p[..., :-1]
    out = torch.einsum("bhij,bjhd->bihd", p, vv)
    return out, lse
