"""The two host paths of the training API give the same results: the eager autograd.Function (plain tensors,
no torch.compile) and the fa4::attn_fwd custom op (what torch.compile traces); and the backward op's "auto"
backend hands the sm90 backward exactly the backend contract's arguments (docs/INTERNALS.md)."""
import torch

import fa4
from fa4 import dispatch, ops, reference


def _inputs(seed, sink=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 37, 4, 16, generator=g, dtype=torch.float32)
    k = torch.randn(2, 45, 2, 16, generator=g, dtype=torch.float32)
    v = torch.randn(2, 45, 2, 24, generator=g, dtype=torch.float32)
    s = torch.randn(4, generator=g, dtype=torch.float32) if sink else None
    return q, k, v, s


def test_eager_function_matches_the_custom_op():
    q, k, v, s = _inputs(0)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, s)]
    out, lse = fa4.flash_attn_func(*leaves[:3], causal=True, learnable_sink=leaves[3], return_lse=True,
                                   backend="reference")
    assert out.grad_fn is not None and "EagerAttention" in type(out.grad_fn).__name__
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    eager = torch.autograd.grad((out, lse), leaves, (g_out, g_lse))

    leaves2 = [t.clone().requires_grad_(True) for t in (q, k, v, s)]
    out2, lse2 = ops.attn_fwd(*leaves2[:3], leaves2[3], None, None, None, None, 37, 45, 16 ** -0.5, -1, 0, 0.0,
                              "reference", "reference", False, True)
    op = torch.autograd.grad((out2, lse2), leaves2, (g_out, g_lse))
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    for a, b in zip(eager, op):
        assert torch.equal(a, b)


def test_eager_without_grad_and_lse_not_differentiable_unless_returned():
    q, k, v, _ = _inputs(1, sink=False)
    with torch.no_grad():
        out = fa4.flash_attn_func(q, k, v, backend="reference")
    assert out.grad_fn is None
    qg = q.clone().requires_grad_(True)
    out = fa4.flash_attn_func(qg, k, v, backend="reference")
    (dq,) = torch.autograd.grad(out.sum(), qg)
    ref_out, ref_lse = reference.forward(q, k, v, softmax_scale=16 ** -0.5)
    torch.testing.assert_close(out.detach(), ref_out)
    assert dq.shape == q.shape


def test_auto_backward_calls_sm90_with_the_backend_contract(monkeypatch):
    """With resolve_auto_backward choosing sm90, the backward op calls sm90's backward(dout, q, k, v, out, lse,
    dlse, **contract) with the same keywords as the other backends (here recorded and served by the
    reference)."""
    from fa4.kernels.sm90 import backward as sm90_backward
    seen = {}

    def recorder(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        return reference.backward(*args, **kwargs)

    monkeypatch.setattr(dispatch, "resolve_auto_backward", lambda *a, **kw: "sm90")
    monkeypatch.setattr(sm90_backward, "backward_checked", lambda *a, **kw: recorder(*a, **kw))
    monkeypatch.setattr(sm90_backward, "backward", recorder)
    q, k, v, s = _inputs(2)
    out, lse = reference.forward(q, k, v, softmax_scale=0.3, window_right=0, sink=s)
    dout = torch.randn_like(out)
    got = ops._run_backward(dout, q, k, v, out, lse, None, s, None, None, None, 37, 45, 0.3, -1, 0, 0.0, True,
                            "auto")
    want = reference.backward(dout, q, k, v, out, lse, None, softmax_scale=0.3, window_right=0, sink=s)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert len(seen["args"]) == 7
    assert set(seen["kwargs"]) == {"softmax_scale", "window_left", "window_right", "softcap", "sink",
                                   "cu_seqlens_q", "cu_seqlens_k", "seqused_k", "max_seqlen_q", "max_seqlen_k",
                                   "deterministic"}
    assert seen["kwargs"]["deterministic"] is True and seen["kwargs"]["window_right"] == 0
