"""The reference backend against a materialised softmax (tests/naive.py), for every feature.

Inputs are fp64 so that the naive oracle is exact to ~1e-12 and the reference (fp32 products) is judged at
fp32 precision; gradients come from autograd through the naive version.
"""
import math

import pytest
import torch

import fa4
from fa4 import reference
from naive import naive_attention

TOL = 2e-5  # fp32 products over O(100) terms of unit size


def _inputs(b, sq, sk, hq, hkv, d, dv, dtype=torch.float64, grad=True):
    mk = lambda *s: torch.randn(*s, dtype=dtype).requires_grad_(grad)  # noqa: E731
    return mk(b, sq, hq, d), mk(b, sk, hkv, d), mk(b, sk, hkv, dv)


CASES = [
    # b, sq, sk, hq, hkv, d, dv, causal, window, softcap, sink
    (2, 37, 53, 4, 2, 16, 16, False, (-1, -1), 0.0, False),
    (2, 37, 53, 4, 2, 16, 8, True, (-1, -1), 0.0, True),
    (1, 53, 37, 4, 1, 24, 16, True, (-1, -1), 0.0, False),   # Sq > Sk: early rows see nothing
    (1, 53, 37, 4, 4, 16, 24, False, (5, 3), 2.0, True),
    (1, 1, 37, 4, 4, 16, 24, True, (5, -1), 0.0, True),      # Sq = 1
    (2, 65, 65, 2, 1, 8, 8, False, (-1, 0), 5.0, False),
    (1, 40, 40, 3, 3, 8, 8, False, (0, 0), 0.0, False),      # each query sees one key
]


@pytest.mark.parametrize("b,sq,sk,hq,hkv,d,dv,causal,window,softcap,sink", CASES)
def test_reference_matches_naive(b, sq, sk, hq, hkv, d, dv, causal, window, softcap, sink):
    torch.manual_seed(sq * 7 + sk)
    q, k, v = _inputs(b, sq, sk, hq, hkv, d, dv)
    s = torch.randn(hq, dtype=torch.float64, requires_grad=True) if sink else None
    out, lse = fa4.flash_attn_func(q.float(), k.float(), v.float(), causal=causal, window_size=window,
                                   softcap=softcap, learnable_sink=s.float() if sink else None,
                                   return_lse=True, backend="reference")
    ref_out, ref_lse = naive_attention(q, k, v, None, causal, window, softcap, s)
    assert torch.allclose(out.double(), ref_out, atol=TOL)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert torch.allclose(lse.double()[fin], ref_lse[fin], atol=TOL)
    assert torch.all(lse[~fin] == float("-inf"))

    # Gradients, including one through lse (only where lse is finite).
    dout = torch.randn_like(ref_out)
    dlse = torch.where(fin, torch.randn_like(ref_lse), torch.zeros_like(ref_lse))
    leaves = [q, k, v] + ([s] if sink else [])
    ref_grads = torch.autograd.grad((ref_out * dout).sum() + (torch.where(fin, ref_lse, 0) * dlse).sum(), leaves)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    sf = s.detach().float().requires_grad_() if sink else None
    out, lse = fa4.flash_attn_func(qf, kf, vf, causal=causal, window_size=window, softcap=softcap,
                                   learnable_sink=sf, return_lse=True, backend="reference")
    loss = (out * dout.float()).sum() + (torch.where(torch.isfinite(lse), lse, 0) * dlse.float()).sum()
    grads = torch.autograd.grad(loss, [qf, kf, vf] + ([sf] if sink else []))
    for name, g, rg in zip("q k v sink".split(), grads, ref_grads):
        assert torch.allclose(g.double(), rg, atol=10 * TOL), f"d{name}: {(g.double() - rg).abs().max()}"


def test_reference_varlen_matches_per_sequence():
    torch.manual_seed(1)
    lens_q, lens_k = [5, 0, 17, 1], [9, 4, 17, 0]
    used_k = [7, 4, 11, 0]
    hq, hkv, d = 4, 2, 16
    q = torch.randn(sum(lens_q), hq, d)
    k = torch.randn(sum(lens_k), hkv, d)
    v = torch.randn(sum(lens_k), hkv, d)
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)  # noqa: E731
    out, lse = fa4.flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k),
                                          seqused_k=torch.tensor(used_k, dtype=torch.int32), causal=True,
                                          return_lse=True, backend="reference")
    q0 = k0 = 0
    for lq, lk, uk in zip(lens_q, lens_k, used_k):
        o_b, l_b = naive_attention(q[q0:q0 + lq][None], k[k0:k0 + uk][None], v[k0:k0 + uk][None], causal=True)
        if lq:
            assert torch.allclose(out[q0:q0 + lq], o_b[0], atol=TOL)
            fin = torch.isfinite(l_b[0])
            assert torch.equal(torch.isfinite(lse[:, q0:q0 + lq]), fin)
            assert torch.allclose(lse[:, q0:q0 + lq][fin], l_b[0][fin], atol=TOL)
        if uk == 0:
            assert torch.all(out[q0:q0 + lq] == 0) and torch.all(lse[:, q0:q0 + lq] == float("-inf"))
        q0, k0 = q0 + lq, k0 + lk


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_reference_paged_matches_contiguous(page_size):
    torch.manual_seed(page_size)
    lens_q, lens_k = [3, 6], [10, 21]
    hq, hkv, d = 4, 1, 8
    max_pages = max(math.ceil(n / page_size) for n in lens_k) + 1
    num_pages = 2 * max_pages + 3
    k_cache = torch.randn(num_pages, page_size, hkv, d)
    v_cache = torch.randn(num_pages, page_size, hkv, d)
    page_table = torch.randperm(num_pages)[:2 * max_pages].view(2, max_pages).to(torch.int32)
    q = torch.randn(sum(lens_q), hq, d)
    cu_q = torch.tensor([0, 3, 9], dtype=torch.int32)
    out = fa4.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, None, 6, 21, page_table=page_table,
                                     seqused_k=torch.tensor(lens_k, dtype=torch.int32), causal=True,
                                     backend="reference")
    q0 = 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        kb = k_cache[page_table[b].long()].reshape(-1, hkv, d)[:lk]
        vb = v_cache[page_table[b].long()].reshape(-1, hkv, d)[:lk]
        o_b, _ = naive_attention(q[q0:q0 + lq][None], kb[None], vb[None], causal=True)
        assert torch.allclose(out[q0:q0 + lq], o_b[0], atol=TOL)
        q0 += lq


def test_reference_is_chunked(monkeypatch):
    """A long sequence never materialises Sq x Sk scores: every matmul output stays tile-sized."""
    largest = []
    real_matmul = torch.matmul

    def spy(a, b):
        r = real_matmul(a, b)
        largest.append(r.numel())
        return r

    monkeypatch.setattr(reference.torch, "matmul", spy)
    sq = sk = 8192
    q = torch.randn(1, sq, 1, 8)
    k = torch.randn(1, sk, 1, 8)
    v = torch.randn(1, sk, 1, 8)
    reference.forward(q, k, v, softmax_scale=0.3, window_left=64, window_right=0)
    assert max(largest) <= reference._TILE_ELEMENTS
    assert max(largest) < sq * sk // 8


def test_compute_dtype_lowp_is_less_accurate():
    """The low-precision run (for the numerics rule) really rounds: its error is larger than fp32's."""
    torch.manual_seed(0)
    q, k, v = _inputs(1, 64, 64, 2, 2, 32, 32, grad=False)
    ref, _ = naive_attention(q, k, v)
    kw = dict(softmax_scale=1 / math.sqrt(32), window_left=-1, window_right=-1)
    hi, _ = reference.forward(q.float(), k.float(), v.float(), **kw)
    lo, _ = reference.forward(q.half(), k.half(), v.half(), compute_dtype=torch.float16, **kw)
    assert (lo.double() - ref).abs().max() > 10 * (hi.double() - ref).abs().max()
