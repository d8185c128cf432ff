"""Calls at the edges of the contract that must compute the right thing on every backend (an API audit, session
20): a softmax scale of zero or below, and a learnable sink that is a strided view."""
import pytest
import torch

import fa4

BACKENDS = ["reference", "triton"]


def _naive(q, k, v, scale, causal=False, sink=None):
    """float64 softmax(scale · q kᵀ) v over (B, S, H, D), GQA by repetition, causal bottom-right, sink logits."""
    q, k, v = (t.double() for t in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    sq, sk = q.shape[1], k.shape[1]
    if causal:
        keep = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
        s = s.masked_fill(~keep, float("-inf"))
    if sink is not None:
        s = torch.cat([s, sink.double().view(1, -1, 1, 1).expand(*s.shape[:3], 1)], dim=-1)
    p = torch.softmax(s, dim=-1)
    if sink is not None:
        p = p[..., :-1]
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.0, -0.5])
@pytest.mark.parametrize("causal", [False, True])
def test_nonpositive_softmax_scale(backend, scale, causal):
    """The kernels scale the row max of the raw scores, which holds for a positive scale only: a negative one runs
    on -q, zero on 0·q (uniform weights, zero dq and dk). No NaN, the naive result, gradients included."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 9, 2, 16, requires_grad=True) for _ in range(3))
    out = fa4.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, backend=backend)
    want = _naive(q, k, v, scale, causal)
    assert torch.isfinite(out).all()
    assert (out.double() - want).abs().max().item() < 1e-4
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    wants = torch.autograd.grad(want, (q, k, v), dout.double())
    for name, g, w in zip("qkv", grads, wants):
        assert (g.double() - w).abs().max().item() < 1e-4, name
        if scale == 0.0 and name in "qk":
            assert not g.any(), name  # exactly zero, as the references give


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonpositive_softmax_scale_varlen(backend):
    torch.manual_seed(2)
    q, k, v = (torch.randn(11, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 4, 11], dtype=torch.int32)
    for scale in (0.0, -0.3):
        out = fa4.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, softmax_scale=scale, causal=True, backend=backend)
        for b0, b1 in ((0, 4), (4, 11)):
            want = _naive(q[None, b0:b1], k[None, b0:b1], v[None, b0:b1], scale, causal=True)[0]
            assert (out[b0:b1].double() - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_learnable_sink(backend):
    """A column of a (heads, layers) sink parameter: the same result and gradient as its contiguous copy, and the
    gradient lands in the parameter's column."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 8, 4, 16) for _ in range(3))
    sinks = torch.randn(4, 3, requires_grad=True)
    out = fa4.flash_attn_func(q, k, v, learnable_sink=sinks[:, 1], causal=True, backend=backend)
    column = sinks.detach()[:, 1].clone().requires_grad_(True)
    want = fa4.flash_attn_func(q, k, v, learnable_sink=column, causal=True, backend=backend)
    assert torch.allclose(out, want, atol=1e-6)
    assert (out.double() - _naive(q, k, v, 16 ** -0.5, True, sinks.detach()[:, 1])).abs().max().item() < 1e-4
    dout = torch.randn_like(out)
    (g, ) = torch.autograd.grad(out, (sinks, ), dout)
    (w, ) = torch.autograd.grad(want, (column, ), dout)
    assert torch.allclose(g[:, 1], w, atol=1e-5) and not g[:, 0].any() and not g[:, 2].any()


def test_strided_learnable_sink_kvcache():
    torch.manual_seed(4)
    q = torch.randn(2, 1, 4, 16)
    k_cache, v_cache = torch.randn(2, 12, 2, 16), torch.randn(2, 12, 2, 16)
    sinks = torch.randn(4, 3)
    got = fa4.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=10, learnable_sink=sinks[:, 2])
    want = fa4.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=10, learnable_sink=sinks[:, 2].clone())
    assert torch.allclose(got, want, atol=1e-6)
