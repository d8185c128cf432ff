"""Calls at the edges of the contract that must compute the right thing on every backend (API audits, sessions 20
and 21): a softmax scale of zero or below, a learnable sink that is a strided view, q / k / v whose last dimension
is strided, autograd modes fa4 does not implement (which must raise, not return wrong values), and a packed call
compiled with max_seqlen read from the device."""
import pytest
import torch

import fa4
from numerics import assert_close_rule

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


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_last_dimension_is_copied(backend):
    """As FlashAttention (maybe_contiguous): q, k, v whose head dim is not the innermost dimension, e.g. a
    (B, S, D, H) tensor transposed, are accepted (copied); outputs and gradients equal the contiguous call's."""
    torch.manual_seed(4)
    base = [torch.randn(2, 9, 16, 2) for _ in range(3)]
    strided = [t.clone().requires_grad_() for t in base]
    dense = [t.transpose(-1, -2).contiguous().requires_grad_() for t in base]
    q, k, v = (t.transpose(-1, -2) for t in strided)
    assert q.stride(-1) != 1
    out = fa4.flash_attn_func(q, k, v, causal=True, backend=backend)
    ref = fa4.flash_attn_func(*dense, causal=True, backend=backend)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    out.sum().backward()
    ref.sum().backward()
    for s_, d_ in zip(strided, dense):
        torch.testing.assert_close(s_.grad.transpose(-1, -2), d_.grad, atol=0, rtol=0)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    packed = [t.detach()[0] for t in (q, k, v)]
    res = fa4.flash_attn_varlen_func(*packed, cu, cu, 5, 5, backend=backend)
    want = fa4.flash_attn_varlen_func(*(t.contiguous() for t in packed), cu, cu, 5, 5, backend=backend)
    torch.testing.assert_close(res, want, atol=0, rtol=0)


def test_strided_last_dimension_kvcache():
    """flash_attn_with_kvcache: q and the new k, v may have a strided last dimension too (the caches may not)."""
    torch.manual_seed(5)
    q = torch.randn(2, 1, 16, 4).transpose(-1, -2)
    k_new, v_new = (torch.randn(2, 1, 16, 2).transpose(-1, -2) for _ in range(2))
    caches = [torch.randn(2, 12, 2, 16) for _ in range(2)]
    lens = torch.tensor([3, 7], dtype=torch.int32)
    got_caches = [c.clone() for c in caches]
    out = fa4.flash_attn_with_kvcache(q, *got_caches, k=k_new, v=v_new, cache_seqlens=lens, backend="reference")
    want_caches = [c.clone() for c in caches]
    want = fa4.flash_attn_with_kvcache(q.contiguous(), *want_caches, k=k_new.contiguous(), v=v_new.contiguous(),
                                       cache_seqlens=lens, backend="reference")
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(got_caches, want_caches))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad_raises(backend):
    """fa4 has no jvp rule: torch.func.jvp raises (it returned a zero tangent), and so do dual tensors entering a
    kernel backend (their tangent was dropped); the reference backend's torch ops carry dual tangents correctly."""
    import torch.autograd.forward_ad as fwAD
    torch.manual_seed(6)
    q, k, v = (torch.randn(1, 7, 2, 16) for _ in range(3))
    tangent = torch.randn_like(q)
    with pytest.raises(RuntimeError, match="no forward-mode AD rule"):
        torch.func.jvp(lambda x: fa4.flash_attn_func(x, k, v, backend=backend), (q, ), (tangent, ))
    want_t = torch.func.jvp(lambda x: _naive(x, k, v, 16 ** -0.5), (q.double(), ), (tangent.double(), ))[1]
    with fwAD.dual_level():
        dual = fwAD.make_dual(q, tangent)
        if backend == "reference":
            out_t = fwAD.unpack_dual(fa4.flash_attn_func(dual, k, v, backend=backend)).tangent
            assert (out_t.double() - want_t).abs().max().item() < 1e-4
        else:
            with pytest.raises(RuntimeError, match="no forward-mode AD rule"):
                fa4.flash_attn_func(dual, k, v, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_raises(backend):
    """A gradient penalty through attention needs second derivatives fa4 does not have. With a loss linear in out,
    torch's once_differentiable left the first-order gradient without a graph, so the penalty's attention term was
    silently dropped; now differentiating through the gradient raises."""
    torch.manual_seed(7)
    q, k, v = (torch.randn(1, 7, 2, 16, requires_grad=True) for _ in range(3))
    w = torch.randn(1, 7, 2, 16)
    loss = (fa4.flash_attn_func(q, k, v, backend=backend) * w).sum()
    (g, ) = torch.autograd.grad(loss, q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        (loss + (g ** 2).sum()).backward()
    # create_graph=True whose gradient is only used as a value is fine
    q2 = q.detach().requires_grad_()
    (g2, ) = torch.autograd.grad((fa4.flash_attn_func(q2, k, v, backend=backend) * w).sum(), q2, create_graph=True)
    torch.testing.assert_close(g2.detach(), g.detach(), atol=0, rtol=0)


def test_compiled_packed_call_with_max_seqlen_from_the_device():
    """torch.compile(fullgraph=True) of the usual unpad step: max_seqlen = (cu[1:] - cu[:-1]).max().item() (an
    unbacked value under capture_scalar_outputs) reaches fa4's argument checks, which must not guard on it."""
    import torch._dynamo
    torch._dynamo.reset()
    torch.manual_seed(8)

    def step(q, k, v, cu):
        m = int((cu[1:] - cu[:-1]).max().item())
        return fa4.flash_attn_varlen_func(q, k, v, cu, cu, m, m, causal=True, backend="reference")

    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    q, k, v = (torch.randn(8, 2, 16) for _ in range(3))
    old = torch._dynamo.config.capture_scalar_outputs
    torch._dynamo.config.capture_scalar_outputs = True
    try:
        out = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, cu)
    finally:
        torch._dynamo.config.capture_scalar_outputs = old
        torch._dynamo.reset()
    torch.testing.assert_close(out, step(q, k, v, cu), atol=1e-6, rtol=1e-6)


def test_jvp_through_constant_attention_inputs():
    """A jvp whose tangent does not reach attention (its inputs are constants of the function) is fine: only a
    tangent that would pass through attention raises."""
    torch.manual_seed(9)
    q, k, v = (torch.randn(1, 5, 2, 16) for _ in range(3))
    x = torch.randn(3)
    att = fa4.flash_attn_func(q, k, v, backend="reference").sum()
    _, tangent = torch.func.jvp(lambda t: t.sum() * fa4.flash_attn_func(q, k, v, backend="triton").sum(), (x, ),
                                (torch.ones(3), ))
    assert abs(tangent.item() - 3 * att.item()) < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_functorch_grad_and_vjp(backend):
    """torch.func.grad and vjp (reverse mode, what the jvp error recommends) give autograd's gradients and the naive
    float64 ones, lse's gradient included; grad of grad raises like a double backward instead of returning a
    second derivative without attention's term."""
    torch.manual_seed(10)
    q, k, v = torch.randn(1, 7, 4, 16), torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16)
    w = torch.randn(1, 7, 4, 16)

    def loss(q, k, v):
        out, lse = fa4.flash_attn_func(q, k, v, causal=True, return_lse=True, backend=backend)
        return (out * w).sum() + 0.5 * lse.sum()

    got = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    loss(*leaves).backward()
    for g, leaf in zip(got, leaves):
        torch.testing.assert_close(g, leaf.grad, atol=0, rtol=0)
    naive = [t.double().requires_grad_() for t in (q, k, v)]
    s = torch.einsum("bqhd,bkhd->bhqk", naive[0], naive[1].repeat_interleave(2, 2)) * 16 ** -0.5
    keep = torch.arange(9)[None, :] <= torch.arange(7)[:, None] + 2
    s = s.masked_fill(~keep, float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), naive[2].repeat_interleave(2, 2))
    ((out * w.double()).sum() + 0.5 * torch.logsumexp(s, -1).sum()).backward()
    for g, ref in zip(got, naive):
        assert (g.double() - ref.grad).abs().max().item() < 1e-4
    out, pullback = torch.func.vjp(lambda x: fa4.flash_attn_func(x, k, v, backend=backend), q)
    (gq, ) = pullback(w)
    leaf = q.clone().requires_grad_()
    (fa4.flash_attn_func(leaf, k, v, backend=backend) * w).sum().backward()
    torch.testing.assert_close(gq, leaf.grad, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.func.grad(lambda x: torch.func.grad(lambda y: loss(y, k, v))(x).square().sum())(q)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients(backend):
    """vmap(grad(f)) and grad(vmap(f)): per-sample gradients, each sample's own autograd gradient (it raised torch's
    "must override setup_context" before session 37: only a grad-only stack took the functorch autograd.Function)."""
    torch.manual_seed(11)
    q, k, v = (torch.randn(3, 8, 2, 16) for _ in range(3))

    def f(q, k, v):
        return fa4.flash_attn_func(q[None], k[None], v[None], causal=True, backend=backend).sin().sum()

    per_sample = torch.func.vmap(torch.func.grad(f, argnums=(0, 1, 2)))(q, k, v)
    of_sum = torch.func.grad(lambda *x: torch.func.vmap(f)(*x).sum(), argnums=(0, 1, 2))(q, k, v)
    for i in range(3):
        leaves = [t[i].clone().requires_grad_() for t in (q, k, v)]
        f(*leaves).backward()
        for name, a, b, leaf in zip("qkv", per_sample, of_sum, leaves):
            torch.testing.assert_close(a[i], leaf.grad, atol=1e-6, rtol=1e-5, msg=name)
            torch.testing.assert_close(b[i], leaf.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_packed_call_checks_values(backend):
    """Under torch.compile the interface sees fake tensors and cannot read cu_seqlens; the op's body reads them on
    the real ones, so bad offsets raise the eager call's ValueError instead of indexing past the packed rows."""
    import torch._dynamo
    torch._dynamo.reset()
    q, k, v = (torch.randn(9, 2, 16) for _ in range(3))

    def step(q, k, v, cu_q, cu_k, m):
        return fa4.flash_attn_varlen_func(q, k, v, cu_q, cu_k, m, m, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    good = torch.tensor([0, 4, 9], dtype=torch.int32)
    try:
        torch.testing.assert_close(compiled(q, k, v, good, good, 5), step(q, k, v, good, good, 5), atol=1e-6,
                                   rtol=1e-6)
        cases = [(good, torch.tensor([0, 4, 20], dtype=torch.int32), 5, "cu_seqlens_k\\[-1\\] = 20"),
                 (torch.tensor([0, 6, 3], dtype=torch.int32), good, 6, "cu_seqlens_q must be non-decreasing"),
                 (good, good, 4, "max_seqlen_q = 4")]
        for cu_q, cu_k, m, message in cases:
            with pytest.raises(ValueError, match=message):
                compiled(q, k, v, cu_q, cu_k, m)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_scalar_options(backend):
    """numpy scalars (np.float32 is not a float subclass, np.int64 not an int one) are accepted where FlashAttention
    takes Python numbers, with the same result as the Python numbers."""
    import numpy as np  # the test extra installs it
    torch.manual_seed(11)
    q, k, v = (torch.randn(10, 2, 16) for _ in range(3))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    want = fa4.flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, softmax_scale=0.3, window_size=(2, 0), softcap=5.0,
                                      backend=backend)
    got = fa4.flash_attn_varlen_func(q, k, v, cu, cu, np.int64(6), np.int32(6), softmax_scale=np.float32(0.3),
                                     window_size=(np.int64(2), np.int64(0)), softcap=np.float32(5.0),
                                     backend=backend)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    with pytest.raises(TypeError, match="softmax_scale"):
        fa4.flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, softmax_scale="0.3", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [(2**31 - 1, -1), (-1, 2**31 - 1), (0, 2**63 - 1), (2**63 - 1, 2**31 - 2)])
def test_huge_window_side_is_unbounded(backend, window):
    """A window side wider than every sequence ("unbounded" spelled as INT_MAX or sys.maxsize, as configs do) sees
    what -1 sees. It reached the kernels' int32 bounds (m_start + offset − left) and the reference's int64 ones, and
    masked every key (session 37 audit). Sq ≠ Sk, batched and packed, the backward too."""
    torch.manual_seed(3)
    q = torch.randn(1, 47, 2, 16, requires_grad=True)
    k, v = (torch.randn(1, 33, 1, 16, requires_grad=True) for _ in range(2))
    want_window = tuple(-1 if w >= 33 else w for w in window)
    out = fa4.flash_attn_func(q, k, v, window_size=window, backend=backend)
    want = fa4.flash_attn_func(q, k, v, window_size=want_window, backend=backend)
    assert torch.equal(out, want)
    dout = torch.randn_like(out)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout)):
        assert torch.equal(g, w)
    cu_q, cu_k = torch.tensor([0, 20, 47], dtype=torch.int32), torch.tensor([0, 13, 33], dtype=torch.int32)
    packed = [t[0].detach() for t in (q, k, v)]
    out = fa4.flash_attn_varlen_func(*packed, cu_q, cu_k, 27, 20, window_size=window, backend=backend)
    want = fa4.flash_attn_varlen_func(*packed, cu_q, cu_k, 27, 20, window_size=want_window, backend=backend)
    assert torch.equal(out, want)


@pytest.mark.parametrize("window", [(2**31 - 1, -1), (-1, 2**63 - 1)])
def test_huge_window_side_is_unbounded_kvcache(window):
    torch.manual_seed(4)
    q = torch.randn(2, 3, 2, 16)
    k_cache, v_cache = (torch.randn(2, 24, 1, 16) for _ in range(2))
    lens = torch.tensor([5, 19], dtype=torch.int32)
    out = fa4.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, window_size=window)
    want = fa4.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, window_size=(-1, -1))
    assert torch.equal(out, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e8, 1e12])
def test_huge_softmax_scale_gives_finite_gradients(backend, scale):
    """The backward recomputes P = exp2(s2 − lse2) from the forward's lse, whose ulp at |lse2| ~ 1e9 is tens of
    units: the exponent's error overflowed exp2, and dq / dk came back NaN, dv inf (session 37 audit). P <= 1
    holds exactly, so the kernels clamp it. The values themselves are not checked: at such a scale that exponent
    error decides whether a row's one-hot P comes back as 1 or as 0 (README: accuracy at huge scales), and NaN
    inputs still give NaN. CPU only: on a GPU the forward's fused multiply-add already returns NaN at this scale
    (its rounding of max·scale enters the exponent; H100, session 37), which the README states."""
    for seed in range(3):
        torch.manual_seed(seed)
        q, k, v = (torch.randn(1, 8, 1, 16, requires_grad=True) for _ in range(3))
        out = fa4.flash_attn_func(q, k, v, softmax_scale=scale, causal=True, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        for name, g in zip("qkv", grads):
            assert torch.isfinite(g).all(), (seed, name)
    q = q.detach().clone().requires_grad_()
    with torch.no_grad():
        q[0, 3, 0, 0] = float("nan")
    out = fa4.flash_attn_func(q, k, v, softmax_scale=scale, causal=True, backend=backend)
    assert torch.isnan(torch.autograd.grad(out.sum(), q)[0]).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap", [0.3, 50.0, 1e5, 1e30])
def test_softcap_any_size(backend, softcap):
    """c·tanh(s/c) for small and huge c (huge: plain attention). The Triton kernels' tanh, 1 − 2/(exp(2x) + 1),
    cancels for small x: at c = 1e6 the logits moved by ~0.06 and fp16 failed the numerics rule from c ≈ 1e5
    (session 37 audit); fp32 calls and caps above common.PRECISE_TANH_ABOVE now take the series near 0. fp32
    against a float64 naive softmax, gradients included."""
    torch.manual_seed(6)
    q, k, v = (torch.randn(1, 32, 2, 32, requires_grad=True) for _ in range(3))
    out = fa4.flash_attn_func(q, k, v, softcap=softcap, backend=backend)
    qd, kd, vd = (t.double() for t in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * 32 ** -0.5
    want = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(softcap * torch.tanh(s / softcap), dim=-1), vd)
    assert (out.double() - want).abs().max().item() < 2e-6
    dout = torch.randn_like(out)
    for name, g, w in zip("qkv", torch.autograd.grad(out, (q, k, v), dout),
                          torch.autograd.grad(want, (q, k, v), dout.double())):
        assert (g.double() - w).abs().max().item() < 4e-6, name


@pytest.mark.parametrize("softcap", [30.0, 1e5])
def test_softcap_fp16_numerics_rule(softcap):
    """fp16 through the Triton kernels under the numerics rule (r = 3 with softcap): a Gemma-sized cap on the fast
    tanh, a huge one on the precise one (common.softcap_level)."""
    from fa4.kernels.triton.common import softcap_level
    assert softcap_level(softcap, torch.float16) == (1 if softcap < 1e3 else 2)
    assert softcap_level(softcap, torch.float32) == 2 and softcap_level(0.0, torch.float32) == 0
    torch.manual_seed(7)
    q, k, v = (torch.randn(1, 64, 2, 32, dtype=torch.float16, requires_grad=True) for _ in range(3))
    out = fa4.flash_attn_func(q, k, v, softcap=softcap, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    def run(dtype):  # the reference backend in fp32 (ref) and in fp16 (x_lowp)
        x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o = fa4.flash_attn_func(*x, softcap=softcap, backend="reference")
        return (o, *torch.autograd.grad(o, x, dout.to(dtype)))
    ref, low = run(torch.float32), run(torch.float16)
    for name, got, r, lo in zip(("out", "dq", "dk", "dv"), (out, *grads), ref, low):
        assert_close_rule(name, got, r, lo, softcap=True)
