"""PyTorch integration: torch.compile without graph breaks or recompiles, opcheck, strides, autocast."""
import pytest
import torch
import torch._dynamo.testing

import fa4
from fa4 import ops
from naive import naive_attention


def _qkv(b=2, s=24, hq=4, hkv=2, d=16, grad=False):
    return [torch.randn(b, s, h, d, requires_grad=grad) for h in (hq, hkv, hkv)]


def test_compile_fullgraph_no_recompile():
    """A model step (forward + backward) compiles to one graph and is not recompiled for new inputs."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    def step(q, k, v, sink):
        out, lse = fa4.flash_attn_func(q, k, v, causal=True, learnable_sink=sink, return_lse=True)
        return (out.square().sum() + lse.sum())

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for _ in range(3):
        q, k, v = _qkv(grad=True)
        sink = torch.randn(4, requires_grad=True)
        loss = compiled(q, k, v, sink)
        loss.backward()
        ref_q, ref_k, ref_v = (t.detach().requires_grad_() for t in (q, k, v))
        ref_sink = sink.detach().requires_grad_()
        ro, rl = naive_attention(ref_q, ref_k, ref_v, causal=True, sink=ref_sink)
        (ro.square().sum() + rl.sum()).backward()
        assert torch.allclose(loss, ro.square().sum() + rl.sum(), rtol=1e-4)
        for t, r in ((q, ref_q), (k, ref_k), (v, ref_v), (sink, ref_sink)):
            assert torch.allclose(t.grad, r.grad, atol=1e-4)
    assert counter.frame_count == 1


def test_compile_inductor_varlen():
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    q, k, v = (torch.randn(12, h, 16) for h in (4, 2, 2))

    def f(q, k, v):
        return fa4.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7, causal=True) * 2

    got = torch.compile(f, fullgraph=True)(q, k, v)
    assert torch.allclose(got, f(q, k, v), atol=1e-5)


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("lens", ["int", "tensor", "none"])
@pytest.mark.parametrize("with_out", [False, True], ids=["", "out"])
def test_compile_kvcache_fullgraph(paged, lens, with_out):
    """flash_attn_with_kvcache under torch.compile(fullgraph=True): one graph, the same output, lse and in-place
    append as eager (the fa4::with_kvcache custom op)."""
    def inputs():
        g = torch.Generator().manual_seed(0)
        q = torch.randn(2, 2, 4, 32, generator=g)
        if paged:
            kc, vc = (torch.randn(10, 4, 2, 32, generator=g) for _ in range(2))
            table = torch.randperm(10, generator=g)[:8].view(2, 4).to(torch.int32)
        else:
            kc, vc = (torch.randn(2, 16, 2, 32, generator=g) for _ in range(2))
            table = None
        new = [torch.randn(2, 2, 2, 32, generator=g) for _ in range(2)]
        out = torch.full((2, 2, 4, 32), float("nan")) if with_out else None
        return q, kc, vc, new, table, out

    cache_seqlens = {"int": 5, "tensor": torch.tensor([3, 9], dtype=torch.int32), "none": None}[lens]
    torch._dynamo.reset()  # each parametrisation compiles the same code object afresh (no recompile limit)

    def step(q, kc, vc, kn, vn, table, out):
        kw = dict(k=kn, v=vn, cache_seqlens=cache_seqlens) if cache_seqlens is not None else {}
        res, lse = fa4.flash_attn_with_kvcache(q, kc, vc, page_table=table, causal=True, out=out, return_lse=True,
                                               **kw)
        return res * 2, lse

    results = []
    for compiled in (False, True):
        q, kc, vc, (kn, vn), table, out = inputs()
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        fn = torch.compile(step, backend=counter, fullgraph=True) if compiled else step
        res, lse = fn(q, kc, vc, kn, vn, table, out)
        results.append((res, lse, kc, vc, out))
        if compiled:
            assert counter.frame_count == 1
    (r0, l0, k0, v0, o0), (r1, l1, k1, v1, o1) = results
    assert torch.allclose(r0, r1, atol=1e-5) and torch.allclose(l0, l1, atol=1e-5)
    assert torch.equal(k0, k1) and torch.equal(v0, v1)
    if with_out:
        assert torch.allclose(o0, o1, atol=1e-5) and not o1.isnan().any()


def test_opcheck_kvcache():
    from fa4 import inference  # noqa: F401  (registers fa4::with_kvcache)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 1, 4, 16, generator=g)
    kc, vc = (torch.randn(2, 8, 2, 16, generator=g) for _ in range(2))
    kn, vn = (torch.randn(2, 1, 2, 16, generator=g) for _ in range(2))
    lens = torch.tensor([2, 5], dtype=torch.int32)
    torch.library.opcheck(torch.ops.fa4.with_kvcache, (q, kc, vc, kn, vn, None, None, lens, -1, None, None, None,
                                                        True, -1, -1, 0.0, None, True, 0, None, "reference"))


def _op_args(q, k, v, sink=None, backend="reference"):
    return (q, k, v, sink, None, None, None, None, q.shape[1], k.shape[1], 0.25, -1, 0, 0.0, backend, backend,
            False, True)


def test_opcheck_forward():
    q, k, v = _qkv(grad=True)
    torch.library.opcheck(ops.attn_fwd, _op_args(q, k, v, torch.randn(4, requires_grad=True)))
    torch.library.opcheck(ops.attn_fwd, _op_args(*_qkv(grad=False)))


def test_opcheck_varlen_and_backward():
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    q, k, v = (torch.randn(12, h, 16) for h in (4, 2, 2))
    args = (q, k, v, None, cu, cu, None, None, 7, 7, 0.25, 3, 0, 0.0, "reference", "reference", False, False)
    torch.library.opcheck(ops.attn_fwd, args)
    out, lse = ops.attn_fwd(*args)
    torch.library.opcheck(ops.attn_bwd, (torch.randn_like(out), q, k, v, out, lse, None, None, cu, cu, None, 7, 7,
                                         0.25, 3, 0, 0.0, False, "reference"))


def test_strided_inputs_match_contiguous():
    """Views of a packed qkv tensor and a transposed (B, H, S, D) tensor give the same result, no copies."""
    b, s, h, d = 2, 20, 4, 16
    qkv = torch.randn(b, s, 3, h, d)
    q, k, v = qkv.unbind(2)
    bhsd = torch.randn(b, h, s, d).transpose(1, 2)
    for qq, kk, vv in ((q, k, v), (bhsd, k, v)):
        assert not qq.is_contiguous()
        got = fa4.flash_attn_func(qq, kk, vv, causal=True)
        want = fa4.flash_attn_func(qq.contiguous(), kk.contiguous(), vv.contiguous(), causal=True)
        assert torch.equal(got, want)


def test_autocast_casts_fp32_inputs():
    q, k, v = _qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fa4.flash_attn_func(q, k, v)
    assert out.dtype == torch.bfloat16
    want = fa4.flash_attn_func(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert torch.equal(out, want)


def test_autocast_casts_half_inputs_like_matmul():
    """Under bf16 autocast an fp16 input is cast too, as matmul and SDPA cast it (fp16 with fp32 raised a dtype
    mismatch, all-fp16 stayed fp16: session 37 audit); fp64 is not an autocast dtype and still raises."""
    q, k, v = _qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = fa4.flash_attn_func(q.half(), k, v)
        halves = fa4.flash_attn_func(q.half(), k.half(), v.half())
        assert torch.matmul(q.half(), k.float().transpose(-1, -2)).dtype == torch.bfloat16
        with pytest.raises(TypeError):
            fa4.flash_attn_func(q.double(), k.double(), v.double())
    assert mixed.dtype == halves.dtype == torch.bfloat16
    assert torch.equal(mixed, fa4.flash_attn_func(q.half().bfloat16(), k.bfloat16(), v.bfloat16()))


def test_fake_tensor_mode_and_jit_trace():
    """FakeTensorMode: shapes from the custom ops' fake implementations for packed, kvcache and combine calls (the
    host value checks read .tolist() of fake tensors before session 37). torch.jit.trace records fa4::attn_fwd as
    a node, so the trace is right at another length (it inlined the reference's host code with sizes frozen)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q, k, v = (torch.randn(9, 4, 16) for _ in range(3))
        cu = torch.tensor([0, 4, 9], dtype=torch.int32)
        assert fa4.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5).shape == (9, 4, 16)
        out = fa4.flash_attn_with_kvcache(q[None, :1], k[None], v[None], cache_seqlens=3)
        assert out.shape == (1, 1, 4, 16)
        merged, lse = fa4.flash_attn_combine(torch.randn(3, 2, 1, 4, 16), torch.randn(3, 2, 1, 4))
        assert merged.shape == (2, 1, 4, 16) and lse.shape == (2, 1, 4)

    def f(q, k, v):
        return fa4.flash_attn_func(q, k, v, causal=True)
    with torch.no_grad():
        traced = torch.jit.trace(f, tuple(torch.randn(1, 16, 2, 16) for _ in range(3)), check_trace=False)
    assert any(node.kind() == "fa4::attn_fwd" for node in traced.graph.nodes())
    x = [torch.randn(1, 32, 2, 16) for _ in range(3)]
    assert torch.equal(traced(*x), f(*x))


def test_flop_counter_counts_attention():
    """FlopCounterMode counts fa4's ops as torch counts its fused SDPA kernels (dense: masks not subtracted),
    forward and backward, GQA and Dv != D; packed calls sum their sequences (0 before session 37: no formula)."""
    import torch.utils.flop_counter as fc
    from torch.utils.flop_counter import FlopCounterMode
    q = torch.randn(2, 12, 4, 32, requires_grad=True)
    k = torch.randn(2, 20, 2, 32, requires_grad=True)
    v = torch.randn(2, 20, 2, 16, requires_grad=True)

    def counted(fn):
        with FlopCounterMode(display=False) as mode:
            fn().sum().backward()
        return mode.get_total_flops()

    ours = counted(lambda: fa4.flash_attn_func(q, k, v, causal=True))
    # torch's formulas for its fused SDPA kernels (flash / efficient / cuDNN: the backward recomputes Q·Kᵀ); on a
    # CPU SDPA runs the math path, whose bmms count no recompute.
    shapes = [(2, 4, 12, 32), (2, 2, 20, 32), (2, 2, 20, 16)]
    sdpa = fc.sdpa_flop_count(*shapes) + fc.sdpa_backward_flop_count((2, 4, 12, 16), *shapes)
    assert ours == sdpa == 2 * 4 * 2 * 12 * 20 * (32 + 16) + 2 * 4 * 2 * 12 * 20 * (3 * 32 + 2 * 16)
    cu_q = torch.tensor([0, 5, 12], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 20], dtype=torch.int32)
    packed = [t[0].detach().requires_grad_() for t in (q, k, v)]
    flops = counted(lambda: fa4.flash_attn_varlen_func(*packed, cu_q, cu_k, 7, 11))
    assert flops == 2 * 4 * (5 * 9 + 7 * 11) * ((32 + 16) + (3 * 32 + 2 * 16))


def test_return_lse_gradient_flows():
    q, k, v = _qkv(grad=True)
    out, lse = fa4.flash_attn_func(q, k, v, return_lse=True)
    (gq,) = torch.autograd.grad(lse.sum(), [q])
    rq = q.detach().requires_grad_()
    _, rl = naive_attention(rq, k.detach(), v.detach())
    (want,) = torch.autograd.grad(rl.sum(), [rq])
    assert torch.allclose(gq, want, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 0, 4, 16), (0, 8, 4, 16)])
def test_empty_inputs(shape):
    q = torch.randn(*shape)
    k = torch.randn(shape[0], 8, 2, 16)
    out, lse = fa4.flash_attn_func(q, k, k, return_lse=True)
    assert out.shape == shape and lse.shape == (shape[0], 4, shape[1])


@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
@pytest.mark.parametrize("with_out", [False, True], ids=["", "out"])
def test_compile_combine_fullgraph(packed, with_out):
    """flash_attn_combine under torch.compile(fullgraph=True): one graph (the fa4::combine custom op; dynamo cannot
    trace the interpreter's kernel launch), the same out and lse, lse the same transposed view, out= written."""
    g = torch.Generator().manual_seed(2)
    shape = (3, 5, 4, 16) if packed else (3, 2, 5, 4, 16)
    op, lp = torch.randn(*shape, generator=g), torch.randn(*shape[:-1], generator=g)
    lp[1] = float("-inf")  # an empty split
    torch._dynamo.reset()

    def merge(a, b, o):
        res, lse = fa4.flash_attn_combine(a, b, out=o)
        return res * 1, lse

    results = []
    for compiled in (False, True):
        out = torch.full(shape[1:], float("nan"), dtype=torch.bfloat16) if with_out else None
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        fn = torch.compile(merge, backend=counter, fullgraph=True) if compiled else merge
        res, lse = fn(op, lp, out)
        results.append((res, lse, out))
        if compiled:
            assert counter.frame_count == 1
    (r0, l0, o0), (r1, l1, o1) = results
    assert torch.equal(r0, r1) and torch.equal(l0, l1) and l0.stride() == l1.stride()
    if with_out:
        assert torch.equal(o0, o1) and not o1.isnan().any()


def test_opcheck_combine():
    from fa4 import inference  # noqa: F401  (registers fa4::combine)
    g = torch.Generator().manual_seed(3)
    op, lp = torch.randn(3, 2, 5, 4, 16, generator=g), torch.randn(3, 2, 5, 4, generator=g)
    torch.library.opcheck(torch.ops.fa4.combine.default, (op, lp, None, None))
    torch.library.opcheck(torch.ops.fa4.combine.default, (op, lp, torch.empty(2, 5, 4, 16), torch.float32))
    torch.library.opcheck(torch.ops.fa4.combine.default, (op[:, 0], lp[:, 0], None, torch.bfloat16))


def test_compile_dynamic_lengths_one_graph():
    """torch.compile(dynamic=True, fullgraph=True): new sequence lengths reuse the graph (no recompile after the
    first call; dynamo's analysis may restart once within it, for the scale's Python float), forward and backward
    match eager."""
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = torch.compile(lambda q, k, v: fa4.flash_attn_func(q, k, v, causal=True), backend=counter, dynamic=True,
                         fullgraph=True)
    first = None
    for s in (37, 53, 64):
        q, k, v = _qkv(s=s, grad=True)
        out = step(q, k, v)
        first = counter.frame_count if first is None else first
        out.square().sum().backward()
        ref_q, ref_k, ref_v = (t.detach().requires_grad_() for t in (q, k, v))
        ref = naive_attention(ref_q, ref_k, ref_v, causal=True)[0]
        ref.square().sum().backward()
        assert torch.allclose(out, ref, atol=1e-5)
        for t, r in ((q, ref_q), (k, ref_k), (v, ref_v)):
            assert torch.allclose(t.grad, r.grad, atol=1e-4)
    assert counter.frame_count == first


def _graph_targets(ep):
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}


def test_export_attention_static_and_dynamic_lengths():
    """torch.export of a module calling flash_attn_func and flash_attn_varlen_func: the graph holds fa4's custom ops
    (not values traced through them), and the exported program, with a dynamic sequence dimension, matches eager at
    a length it was not exported with."""
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return fa4.flash_attn_func(q, k, v, causal=True)

    q, k, v = _qkv(s=37)
    seq = torch.export.Dim("seq", min=2, max=4096)
    ep = torch.export.export(Attn(), (q, k, v), dynamic_shapes=({1: seq}, {1: seq}, {1: seq}))
    assert any(t.startswith("fa4.") for t in _graph_targets(ep)), _graph_targets(ep)
    for s in (37, 53):
        q, k, v = _qkv(s=s)
        assert torch.allclose(ep.module()(q, k, v), naive_attention(q, k, v, causal=True)[0], atol=1e-5)

    class Packed(torch.nn.Module):
        def forward(self, q, k, v, cu):
            return fa4.flash_attn_varlen_func(q, k, v, cu, cu, 20, 20, causal=True)

    cu = torch.tensor([0, 10, 30, 40], dtype=torch.int32)
    q, k, v = (torch.randn(40, h, 16) for h in (4, 2, 2))
    ep = torch.export.export(Packed(), (q, k, v, cu))
    want = torch.cat([naive_attention(*(t[None, a:b] for t in (q, k, v)), causal=True)[0][0]
                      for a, b in ((0, 10), (10, 30), (30, 40))])
    assert torch.allclose(ep.module()(q, k, v, cu), want, atol=1e-5)


def test_export_kvcache_keeps_the_in_place_append():
    """torch.export of a decode step with new keys: the exported program appends into the caches it is given, as
    the eager call does, and returns the same output."""
    class Decode(torch.nn.Module):
        def forward(self, q, k_cache, v_cache, k, v, lens):
            return fa4.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=lens, causal=True)

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 4, 32, generator=g)
    k_cache, v_cache = (torch.randn(2, 64, 2, 32, generator=g) for _ in range(2))
    k, v = (torch.randn(2, 1, 2, 32, generator=g) for _ in range(2))
    lens = torch.tensor([5, 17], dtype=torch.int32)
    ep = torch.export.export(Decode(), (q, k_cache.clone(), v_cache.clone(), k, v, lens))
    kc, vc = k_cache.clone(), v_cache.clone()
    out = ep.module()(q, kc, vc, k, v, lens)
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    ref = fa4.flash_attn_with_kvcache(q, kc_ref, vc_ref, k=k, v=v, cache_seqlens=lens, causal=True)
    assert torch.equal(out, ref) and torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)
    assert torch.equal(kc[0, 5], k[0, 0]) and torch.equal(vc[1, 17], v[1, 0])  # the append happened
