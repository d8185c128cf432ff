"""Correctness before speed: fa4 against `fa4.reference` on small shapes, under DESIGN.md's numerics rule.

For the output and each gradient: max|x − ref| ≤ 2·max|x_lowp − ref| + atol, with ref the reference in fp32 on
the same inputs, x_lowp the reference computing in the input dtype (it rounds scores and P as a kernel does),
and atol = 2·max|(ref + 0.3 − 0.3) − ref|, the rounding noise of ref's own magnitude. NaN never passes.
"""
import math
from dataclasses import dataclass

import torch

from .peers import backend_kwargs, first


@dataclass(frozen=True)
class Check:
    name: str     # e.g. "training D=64 S=128 causal: dq"
    err: float    # max |x - ref|
    bound: float  # r·max|x_lowp - ref| + atol
    ok: bool

    def line(self):
        return f"{self.name:<48} max err {self.err:.2e}  bound {self.bound:.2e}  {'PASS' if self.ok else 'FAIL'}"


def rule(name, x, ref, lowp, r=2.0):
    x, ref, lowp = x.float(), ref.float(), lowp.float()
    if x.shape != ref.shape:
        return Check(f"{name} (shape {tuple(x.shape)} != {tuple(ref.shape)})", math.inf, 0.0, False)
    atol = 2 * ((ref + 0.3 - 0.3) - ref).abs().max().item()
    err = (x - ref).abs().max().item()
    bound = r * (lowp - ref).abs().max().item() + atol
    ok = not torch.isnan(x).any().item() and err <= bound
    return Check(name, err, bound, ok)


def _randn(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def check_training(api, *, B, S, H, D, causal, dtype, device, backend=None, with_backward=True, seed=0, Hkv=None):
    """fa4.flash_attn_func's output (and dq, dk, dv) against the reference on one shape (Hkv: GQA's kv heads)."""
    from fa4 import reference
    gen = torch.Generator().manual_seed(seed)
    hkv = Hkv or H
    q, k, v, dout = (_randn((B, S, h, D), dtype, device, gen) for h in (H, hkv, hkv, H))
    tag = f"training D={D} S={S} B={B} H={H}{f' Hkv={hkv}' if hkv != H else ''} {'causal' if causal else 'full'}"
    kw = dict(softmax_scale=D ** -0.5, window_left=-1, window_right=0 if causal else -1)

    qg, kg, vg = (t.clone().requires_grad_(with_backward) for t in (q, k, v))
    out = first(api.flash_attn_func(qg, kg, vg, causal=causal, backend=backend))
    ref_out, ref_lse = reference.forward(q.float(), k.float(), v.float(), **kw)
    low_out, low_lse = reference.forward(q, k, v, compute_dtype=dtype, **kw)
    checks = [rule(f"{tag}: out", out, ref_out, low_out)]
    if with_backward:
        grads = torch.autograd.grad(out, (qg, kg, vg), dout)
        ref_g = reference.backward(dout.float(), q.float(), k.float(), v.float(), ref_out, ref_lse, None, **kw)
        low_g = reference.backward(dout, q, k, v, low_out, low_lse, None, compute_dtype=dtype, **kw)
        for name, x, r, lo in zip(("dq", "dk", "dv"), grads, ref_g, low_g):
            checks.append(rule(f"{tag}: {name}", x, r, lo))
    return checks


def check_decode(api, *, B, L, Hq, Hkv, D, page_size, paged, dtype, device, backend=None, seed=0):
    """fa4.flash_attn_with_kvcache on one decode step of sequences of different lengths (one full)."""
    from fa4 import reference
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = L // page_size
    n_pages = B * pages_per_seq + 2  # a pool with pages no sequence uses, as in a serving system
    q = _randn((B, 1, Hq, D), dtype, device, gen)
    lens = [L, L // 2 + 3, 1, L - page_size + 1][:B]
    seqlens = torch.tensor(lens + [L] * (B - len(lens)), dtype=torch.int32, device=device)
    kw = dict(softmax_scale=D ** -0.5, seqused_k=seqlens)
    if paged:
        k = _randn((n_pages, page_size, Hkv, D), dtype, device, gen)
        v = _randn((n_pages, page_size, Hkv, D), dtype, device, gen)
        order = torch.randperm(n_pages, generator=gen)[:B * pages_per_seq]
        kw["page_table"] = order.to(device=device, dtype=torch.int32).view(B, pages_per_seq)
    else:
        k = _randn((B, L, Hkv, D), dtype, device, gen)
        v = _randn((B, L, Hkv, D), dtype, device, gen)
    call_kw = dict(cache_seqlens=seqlens, page_table=kw.get("page_table"),
                   **backend_kwargs(api.flash_attn_with_kvcache, backend))
    with torch.no_grad():
        out = first(api.flash_attn_with_kvcache(q, k, v, **call_kw))
        ref_out, _ = reference.forward(q.float(), k.float(), v.float(), **kw)
        low_out, _ = reference.forward(q, k, v, compute_dtype=dtype, **kw)
    tag = f"decode B={B} L={L} Hq={Hq} Hkv={Hkv} D={D} {'paged' if paged else 'contiguous'}"
    return [rule(f"{tag}: out", out, ref_out, low_out)]
