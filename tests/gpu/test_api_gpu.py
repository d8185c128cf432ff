"""The public API on a real GPU: the numerics rule over the feature matrix at real sizes, bf16 and fp16.

Runs through backend=None (what users get: sm90 forward where it serves, Triton otherwise) and through
backend="triton" explicitly. Skipped without CUDA.
"""
import pytest
import torch

import fa4
from attention_check import case_seed, check_attention, make_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"

# Cases with a sink have 8 query heads: dsink has one entry per head, and the numerics rule's max over only
# 2 entries failed an ideal kernel (O rounded once to fp16, the rest fp32) in ~2.5% of random draws
# (benchmarks/NOTES.md, "dsink and few heads").
# (b, sq, sk, hq, hkv, d, dv, causal, window, softcap, sink)
MATRIX = [
    (2, 1000, 1000, 8, 8, 64, 64, False, (-1, -1), 0.0, False),
    (2, 1000, 1000, 8, 2, 128, 128, True, (-1, -1), 0.0, False),
    (1, 2049, 2049, 4, 4, 256, 256, True, (-1, -1), 0.0, False),
    (1, 777, 1543, 8, 1, 128, 128, True, (-1, -1), 0.0, True),     # Sq < Sk, MQA, sink
    (1, 1543, 777, 4, 2, 64, 64, True, (-1, -1), 0.0, False),      # Sq > Sk: leading rows empty
    (2, 1, 3001, 8, 2, 128, 128, True, (-1, -1), 0.0, False),      # Sq = 1
    (1, 1500, 1500, 4, 4, 96, 96, False, (256, 0), 0.0, False),   # sliding window
    (1, 1200, 1200, 4, 2, 64, 64, False, (100, 50), 30.0, False),  # window both sides + softcap
    (1, 1000, 1000, 6, 3, 192, 128, True, (-1, -1), 0.0, False),   # Dv != D (192/128)
    (1, 513, 513, 8, 2, 40, 24, False, (-1, -1), 0.0, True),       # small odd head dims, GQA
    (1, 3000, 3000, 8, 1, 128, 128, False, (-1, -1), 50.0, True),
]


def _ids(case):
    b, sq, sk, hq, hkv, d, dv, causal, window, softcap, sink = case
    return f"b{b}-sq{sq}-sk{sk}-h{hq}/{hkv}-d{d}/{dv}-c{int(causal)}-w{window[0]}_{window[1]}-cap{softcap}-s{int(sink)}"


@pytest.mark.parametrize("backend", [None, "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", MATRIX, ids=[_ids(c) for c in MATRIX])
def test_feature_matrix(case, dtype, backend):
    torch.manual_seed(case_seed(case, str(dtype)))
    b, sq, sk, hq, hkv, d, dv, causal, window, softcap, sink = case
    q, k, v, _ = make_inputs(b, sq, sk, hq, hkv, d, dv, dtype, DEV)
    s = torch.randn(hq, device=DEV) if sink else None
    check_attention(q, k, v, causal=causal, window_size=window, softcap=softcap, sink=s, backend=backend)


# A few query tokens against long keys: backend=None takes the split-KV decode kernels for the forward
# (dispatch.splitkv_wanted) and the usual backward from its out and lse.
SHORT_QUERIES = [
    (1, 1, 8192, 32, 8, 128, 128, True, (-1, -1), 0.0, False),
    (2, 16, 4096, 16, 2, 64, 64, True, (512, -1), 0.0, False),     # sliding window
    (1, 7, 5000, 8, 1, 256, 256, True, (-1, -1), 0.0, True),       # MQA, D = 256, sink
    (3, 2, 3000, 8, 4, 128, 128, False, (-1, -1), 30.0, False),    # softcap, no mask
    (1, 16, 2100, 8, 2, 192, 128, True, (-1, -1), 0.0, False),     # Dv != D
]


@pytest.mark.parametrize("beside", ["sm90", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", SHORT_QUERIES, ids=[_ids(c) for c in SHORT_QUERIES])
def test_short_queries_take_splitkv(case, dtype, beside, monkeypatch):
    """beside="triton": FA4_SM90=0, the route decided against the portable forward (what GPUs other than
    Hopper get)."""
    from fa4 import dispatch
    if beside == "sm90" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm90 forward runs on Hopper only")
    if beside == "triton":
        monkeypatch.setenv("FA4_SM90", "0")  # every case here has at most 32 programs on the portable forward
    chosen = []
    real = dispatch.resolve_auto
    monkeypatch.setattr(dispatch, "resolve_auto", lambda *a, **kw: chosen.append(real(*a, **kw)) or chosen[-1])
    torch.manual_seed(case_seed(case, str(dtype)))
    b, sq, sk, hq, hkv, d, dv, causal, window, softcap, sink = case
    q, k, v, _ = make_inputs(b, sq, sk, hq, hkv, d, dv, dtype, DEV)
    s = torch.randn(hq, device=DEV) if sink else None
    check_attention(q, k, v, causal=causal, window_size=window, softcap=softcap, sink=s)
    assert chosen and set(chosen) == {"splitkv"}, chosen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen(dtype, causal):
    torch.manual_seed(3)
    lens_q, lens_k = [513, 0, 1000, 1, 257], [700, 128, 1000, 65, 0]
    q, k, v, vl = make_inputs(0, 0, 0, 8, 2, 128, 128, dtype, DEV, varlen_lens=(lens_q, lens_k))
    check_attention(q, k, v, causal=causal, varlen=vl)
    vl["seqused_k"] = torch.tensor([650, 100, 999, 1, 0], dtype=torch.int32, device=DEV)
    check_attention(q, k, v, causal=causal, varlen=vl, sink=torch.randn(8, device=DEV))


def test_strided_views_gpu():
    b, s, h, d = 2, 1031, 8, 128
    qkv = torch.randn(b, s, 3, h, d, device=DEV, dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    check_attention(q, k, v, causal=True)
    bhsd = torch.randn(b, h, s, d, device=DEV, dtype=torch.bfloat16).transpose(1, 2)
    check_attention(bhsd, k, v)


@pytest.mark.parametrize("backend", [None, "triton"])
def test_deterministic_backward_is_bitwise_reproducible(backend):
    torch.manual_seed(5)
    q, k, v, _ = make_inputs(2, 1500, 1500, 8, 2, 128, 128, torch.bfloat16, DEV)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    sink = torch.randn(8, device=DEV, requires_grad=True)
    dout = torch.randn(2, 1500, 8, 128, device=DEV, dtype=torch.bfloat16)
    first = None
    for _ in range(20):
        out = fa4.flash_attn_func(*leaves, causal=True, learnable_sink=sink, deterministic=True, backend=backend)
        grads = torch.autograd.grad(out, leaves + [sink], dout)
        if first is None:
            first = grads
        else:
            assert all(torch.equal(a, b) for a, b in zip(first, grads))


def test_offsets_past_2_31_elements():
    """B·S·H·D > 2^31: 64-bit offsets. Checks the last batch element (highest offsets) against the reference."""
    b, s, h, d = 1040, 1024, 16, 128  # 2.18e9 elements per tensor
    torch.manual_seed(7)
    q, k, v = (torch.randn(b, s, h, d, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    assert q.numel() > 2**31
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = fa4.flash_attn_func(*leaves, causal=True)
    dout = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, leaves, dout)
    tail = [t[-2:].detach() for t in (q, k, v)]
    want_out = fa4.flash_attn_func(*tail, causal=True, backend="reference")
    assert (out[-2:].float() - want_out.float()).abs().max() < 0.05
    rl = [t.clone().requires_grad_() for t in tail]
    ro = fa4.flash_attn_func(*rl, causal=True, backend="reference")
    for g, r in zip((dq, dk, dv), torch.autograd.grad(ro, rl, dout[-2:])):
        assert (g[-2:].float() - r.float()).abs().max() < 0.1
    del q, k, v, leaves, out, dout, dq, dk, dv
    torch.cuda.empty_cache()


def test_compile_fullgraph_cuda():
    import torch._dynamo.testing
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")

    @torch.compile(backend=counter, fullgraph=True)
    def step(q, k, v):
        return fa4.flash_attn_func(q, k, v, causal=True).float().square().mean()

    for _ in range(3):
        q, k, v, _ = make_inputs(2, 512, 512, 8, 2, 64, 64, torch.bfloat16, DEV)
        leaves = [t.requires_grad_() for t in (q, k, v)]
        step(*leaves).backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
    assert counter.frame_count == 1


def test_autocast_cuda():
    q, k, v, _ = make_inputs(2, 300, 300, 4, 4, 64, 64, torch.float32, DEV)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fa4.flash_attn_func(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16
    want = fa4.flash_attn_func(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    assert torch.equal(out, want)


def test_short_query_forward_in_cuda_graph():
    """The splitkv route captured in a CUDA graph (a decoding loop through flash_attn_func): replays with new
    query values equal eager calls bitwise."""
    g = torch.Generator(device=DEV).manual_seed(3)
    q = torch.randn(2, 4, 32, 128, device=DEV, dtype=torch.bfloat16, generator=g)
    k = torch.randn(2, 4096, 8, 128, device=DEV, dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    with torch.no_grad():
        fa4.flash_attn_func(q, k, v, causal=True)  # compile, and route
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fa4.flash_attn_func(q, k, v, causal=True)  # warm the side stream (workspaces)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fa4.flash_attn_func(q, k, v, causal=True)
        for _ in range(3):
            q.copy_(torch.randn(q.shape, device=DEV, generator=g))
            graph.replay()
            eager = fa4.flash_attn_func(q, k, v, causal=True)
            torch.cuda.synchronize()
            assert torch.equal(out, eager)


@pytest.mark.parametrize("backend", [None, "triton"])
@pytest.mark.parametrize("scale", [0.0, -0.2])
def test_nonpositive_softmax_scale_gpu(backend, scale):
    """softmax_scale <= 0 (session 20's audit): a negative scale runs on -q, zero on 0·q (exact zeros for dq, dk);
    the numerics rule on out, lse and every gradient."""
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 700, 4, 128, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    check_attention(q, k, v, causal=True, softmax_scale=scale, backend=backend)


def test_strided_sink_gpu():
    """A column of a (heads, layers) sink parameter reads as its contiguous copy on the GPU paths."""
    torch.manual_seed(6)
    q, k, v = (torch.randn(2, 600, 8, 128, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    sinks = torch.randn(8, 3, device=DEV)
    for backend in (None, "triton"):
        got = fa4.flash_attn_func(q, k, v, learnable_sink=sinks[:, 1], causal=True, backend=backend)
        want = fa4.flash_attn_func(q, k, v, learnable_sink=sinks[:, 1].clone(), causal=True, backend=backend)
        assert torch.equal(got, want), backend


@pytest.mark.parametrize("backend", [None, "triton"])
def test_functorch_grad_gpu(backend):
    """torch.func.grad through the GPU kernels (the sm90 backward with backend=None) gives autograd's gradients
    bitwise: the same kernels, reached through ops._FunctorchAttention."""
    torch.manual_seed(31)
    q, k, v = (torch.randn(2, 700, 8, 128, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    w = torch.randn(2, 700, 8, 128, device=DEV, dtype=torch.bfloat16)

    def loss(q, k, v):
        return (fa4.flash_attn_func(q, k, v, causal=True, deterministic=True, backend=backend) * w).float().sum()

    got = torch.func.grad(loss, argnums=(0, 1, 2))(q, k, v)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    loss(*leaves).backward()
    for g, leaf in zip(got, leaves):
        assert torch.equal(g, leaf.grad)


def test_compiled_packed_call_checks_values_gpu():
    """Under torch.compile the op body reads cu_seqlens on the device tensors: a cu_seqlens_k past k's rows raises
    the eager ValueError instead of a read past the end of k."""
    import torch._dynamo
    torch._dynamo.reset()
    q, k, v = (torch.randn(900, 4, 64, device=DEV, dtype=torch.bfloat16) for _ in range(3))

    def step(q, k, v, cu_q, cu_k):
        return fa4.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 500, 500, causal=True)

    compiled = torch.compile(step, fullgraph=True)
    good = torch.tensor([0, 400, 900], dtype=torch.int32, device=DEV)
    try:
        torch.testing.assert_close(compiled(q, k, v, good, good), step(q, k, v, good, good), atol=0, rtol=0)
        with pytest.raises(ValueError, match="cu_seqlens_k\\[-1\\] = 5000"):
            compiled(q, k, v, good, torch.tensor([0, 400, 5000], dtype=torch.int32, device=DEV))
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("backend", [None, "triton"])
@pytest.mark.parametrize("window", [(2**31 - 1, 0), (2**63 - 1, 2**31 - 1), (-1, 2**31 - 1)])
def test_huge_window_side_gpu(backend, window):
    """A window side past every sequence is -1 (checks.window_reach): bitwise the unbounded call, gradients too
    (it overflowed the kernels' int32 bounds before session 37)."""
    q, k, v = (torch.randn(2, 1000, 8, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    want_window = tuple(-1 if w >= 1000 else w for w in window)
    a = fa4.flash_attn_func(q, k, v, window_size=window, deterministic=True, backend=backend)
    b = fa4.flash_attn_func(q, k, v, window_size=want_window, deterministic=True, backend=backend)
    assert torch.equal(a, b)
    dout = torch.randn_like(a)
    for x, y in zip(torch.autograd.grad(a, (q, k, v), dout), torch.autograd.grad(b, (q, k, v), dout)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", [None, "triton"])
def test_per_sample_gradients_gpu(backend):
    """vmap(grad(f)) through the GPU kernels (torch's per-sample loop over the custom ops): each sample's gradient
    is its own autograd gradient, bitwise (deterministic calls, the same kernels)."""
    torch.manual_seed(32)
    q, k, v = (torch.randn(3, 300, 4, 64, device=DEV, dtype=torch.bfloat16) for _ in range(3))

    def f(q, k, v):
        out = fa4.flash_attn_func(q[None], k[None], v[None], causal=True, deterministic=True, backend=backend)
        return out.float().sin().sum()

    per_sample = torch.func.vmap(torch.func.grad(f, argnums=(0, 1, 2)))(q, k, v)
    for i in range(3):
        leaves = [t[i].clone().requires_grad_() for t in (q, k, v)]
        f(*leaves).backward()
        for g, leaf in zip(per_sample, leaves):
            assert torch.equal(g[i], leaf.grad)
