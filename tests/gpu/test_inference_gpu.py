"""fa4.flash_attn_with_kvcache and flash_attn_combine on a real GPU (Triton kernels). Skipped without CUDA.

- the numerics rule over the feature matrix (paged with page sizes 1 to 256, contiguous with cache_batch_idx,
  append + rotary, speculative decoding and chunked prefill, window, softcap, sink, head dims), bf16 and fp16;
  the appended cache must equal the reference backend's append;
- the decode suite's shapes (bf16, Hq 32, Hkv 8, D 128), paged (page 128) and contiguous;
- a decode step (append + rotary + attention) captured in a CUDA graph and replayed, with no allocation and
  no host synchronisation once `out` is given;
- caches whose offsets pass 2^31 elements;
- the direct launch path (decode.Launch) after a signature's first call, and its fallbacks.
"""
import pytest
import torch

import fa4
from attention_check import case_seed, poison_allocator
from fa4 import inference
from numerics import assert_close_rule
from test_inference import _make, _rotary_tables, reference_on_cache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"
# The public names once fa4/__init__.py re-exports them; the module's own until then.
kvcache = getattr(fa4, "flash_attn_with_kvcache", inference.flash_attn_with_kvcache)
combine = getattr(fa4, "flash_attn_combine", inference.flash_attn_combine)


def _to(dev, *ts):
    return [t.to(dev) if isinstance(t, torch.Tensor) else t for t in ts]


def _check_call(q, k_cache, v_cache, kw, call_kw, dtype, backend=None):
    """Runs fa4 on the GPU; checks the append against the reference backend's and out/lse by the rule."""
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    kvcache(q, kc_ref, vc_ref, backend="reference", **kw, **call_kw)
    poison_allocator(DEV)
    out = torch.full((*q.shape[:3], v_cache.shape[-1]), float("nan"), dtype=dtype, device=DEV)
    res, lse = kvcache(q, k_cache, v_cache, return_lse=True, out=out, backend=backend, **kw, **call_kw)
    assert res is out
    # The append: values bitwise; rotated keys within one rounding of the input dtype (fp32 op order).
    torch.testing.assert_close(v_cache, vc_ref, atol=0, rtol=0)
    torch.testing.assert_close(k_cache, kc_ref, atol=1e-2, rtol=1e-2)
    ref_o, ref_l, low_o, low_l = reference_on_cache(q, k_cache, v_cache, kw, call_kw, dtype)
    softcap = call_kw.get("softcap", 0.0) > 0
    assert_close_rule("out", res.reshape(ref_o.shape), ref_o, low_o, softcap=softcap)
    assert_close_rule("lse", lse, ref_l, low_l, softcap=softcap)


# (name, _make kwargs, call kwargs)
MATRIX = [
    ("decode-paged128", dict(batch=4, hq=32, hkv=8, d=128, capacity=4096, page_size=128, seqlen_new=1), {}),
    ("decode-contig-batch-idx", dict(batch=3, cache_rows=7, hq=32, hkv=8, d=128, capacity=3000, seqlen_new=1),
     dict(causal=True)),
    ("paged1-splits5", dict(batch=2, hq=8, hkv=2, d=64, capacity=700, page_size=1, seqlen_new=2),
     dict(num_splits=5)),
    ("paged3-rotary-neox-spec3", dict(batch=3, hq=16, hkv=4, d=128, capacity=999, page_size=3, seqlen_new=3,
                                      seqlen_q=3), dict(causal=True, rotary=True, interleaved=False)),
    ("paged16-window", dict(batch=2, hq=32, hkv=8, d=128, capacity=2048, page_size=16, seqlen_q=4),
     dict(window_size=(200, 0))),
    ("paged256-rotary-gptj-spec5", dict(batch=2, hq=32, hkv=8, d=128, capacity=4096, page_size=256, seqlen_new=5,
                                        seqlen_q=5), dict(causal=True, rotary=True, interleaved=True)),
    ("softcap-sink", dict(batch=2, hq=32, hkv=8, d=128, capacity=5000, seqlen_new=1),
     dict(softcap=30.0, sink=True)),
    ("sink-unsplit", dict(batch=2, hq=8, hkv=2, d=128, capacity=1000), dict(sink=True, num_splits=1)),
    ("d256-mqa", dict(batch=2, hq=8, hkv=1, d=256, capacity=1500, seqlen_new=1), {}),
    ("d128-dv64", dict(batch=2, hq=16, hkv=4, d=128, dv=64, capacity=1500, seqlen_new=1), {}),
    ("d96-mha", dict(batch=3, hq=4, hkv=4, d=96, capacity=777, seqlen_new=2), dict(causal=True)),
    ("chunked-prefill-300", dict(batch=2, hq=32, hkv=8, d=128, capacity=2048, page_size=64, seqlen_q=300,
                                 seqlen_new=300), dict(causal=True, rotary=True)),
    ("non-causal-sq4-rotary", dict(batch=2, hq=32, hkv=8, d=128, capacity=1024, seqlen_new=4, seqlen_q=4),
     dict(rotary=True)),
    ("int-seqlens", dict(batch=3, hq=32, hkv=8, d=128, capacity=1024, seqlen_new=1), dict(int_lens=700)),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,make_kw,call_kw", MATRIX, ids=[m[0] for m in MATRIX])
def test_feature_matrix(name, make_kw, call_kw, dtype):
    call_kw = dict(call_kw)
    q, k_cache, v_cache, lens, kw = _make(dtype=dtype, seed=case_seed(name), **make_kw)
    q, k_cache, v_cache, lens = _to(DEV, q, k_cache, v_cache, lens)
    kw = {key: val.to(DEV) for key, val in kw.items()}
    int_lens = call_kw.pop("int_lens", None)
    call_kw["cache_seqlens"] = int_lens if int_lens is not None else lens
    if call_kw.pop("rotary", False):
        cos, sin = _rotary_tables(make_kw["capacity"] + make_kw.get("seqlen_q", 1), 64)
        call_kw.update(rotary_cos=cos.to(DEV), rotary_sin=sin.to(DEV),
                       rotary_interleaved=call_kw.pop("interleaved", True))
    if call_kw.pop("sink", False):
        call_kw["learnable_sink"] = torch.randn(q.shape[2], device=DEV)
    _check_call(q, k_cache, v_cache, kw, call_kw, dtype)


# ---------------------------------------------------------------------------------------------------------------
# The decode suite's shapes
# ---------------------------------------------------------------------------------------------------------------

SUITE = [(1, 8192), (1, 65536), (8, 8192), (32, 4096), (64, 8192), (128, 2048)]


def _suite_inputs(batch, length, paged, dtype=torch.bfloat16, page=128, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(batch, 1, 32, 128, device=DEV, dtype=dtype, generator=gen)
    k = torch.randn(batch, length, 8, 128, device=DEV, dtype=dtype, generator=gen)
    v = torch.randn(batch, length, 8, 128, device=DEV, dtype=dtype, generator=gen)
    lens = torch.randint(1, length + 1, (batch,), device=DEV, generator=gen, dtype=torch.int32)
    lens[0] = length
    kw = {}
    if paged:
        n_pages = batch * length // page
        k, v = k.view(n_pages, page, 8, 128), v.view(n_pages, page, 8, 128)
        order = torch.randperm(n_pages, device=DEV, generator=gen).to(torch.int32)
        kw["page_table"] = order.view(batch, length // page)
    return q, k, v, lens, kw


@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged128"])
@pytest.mark.parametrize("batch,length", SUITE, ids=[f"B{b}-L{n}" for b, n in SUITE])
def test_decode_suite_shapes(batch, length, paged):
    q, k, v, lens, kw = _suite_inputs(batch, length, paged)
    out = kvcache(q, k, v, cache_seqlens=lens, **kw)
    call_kw = dict(cache_seqlens=lens)
    ref_o, _, low_o, _ = reference_on_cache(q, k, v, kw, call_kw, torch.bfloat16)
    assert_close_rule(f"decode B={batch} L={length}", out.reshape(ref_o.shape), ref_o, low_o)


# ---------------------------------------------------------------------------------------------------------------
# CUDA graphs: no allocation, no host synchronisation, capture and replay
# ---------------------------------------------------------------------------------------------------------------

def _step_inputs(batch=4, hq=32, hkv=8, d=128, page=16, capacity=1024, dtype=torch.bfloat16):
    g = torch.Generator(device=DEV).manual_seed(7)
    pages = capacity // page
    n_pages = batch * pages + 5
    k_cache = torch.randn(n_pages, page, hkv, d, device=DEV, dtype=dtype, generator=g)
    v_cache = torch.randn(n_pages, page, hkv, d, device=DEV, dtype=dtype, generator=g)
    table = torch.randperm(n_pages, device=DEV, generator=g)[:batch * pages].view(batch, pages).to(torch.int32)
    cos, sin = _rotary_tables(capacity + 1, 64)
    static = dict(q=torch.randn(batch, 1, hq, d, device=DEV, dtype=dtype, generator=g),
                  k=torch.randn(batch, 1, hkv, d, device=DEV, dtype=dtype, generator=g),
                  v=torch.randn(batch, 1, hkv, d, device=DEV, dtype=dtype, generator=g),
                  cache_seqlens=torch.tensor([100, 517, 0, 1000][:batch], device=DEV, dtype=torch.int32),
                  out=torch.empty(batch, 1, hq, d, device=DEV, dtype=dtype))
    fixed = dict(page_table=table, rotary_cos=cos.to(DEV), rotary_sin=sin.to(DEV), causal=True)
    return k_cache, v_cache, static, fixed


def _call(k_cache, v_cache, static, fixed, **extra):
    s = dict(static)
    return kvcache(s.pop("q"), k_cache, v_cache, **s, **fixed, **extra)


@pytest.mark.parametrize("num_splits", [0, 1], ids=["split-heuristic", "unsplit"])
def test_no_allocation_no_sync_with_out(num_splits):
    k_cache, v_cache, static, fixed = _step_inputs(batch=1 if num_splits == 0 else 4)
    _call(k_cache, v_cache, static, fixed, num_splits=num_splits)  # compiles, fills the workspace, checks values
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        _call(k_cache, v_cache, static, fixed, num_splits=num_splits)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


@pytest.mark.parametrize("batch", [1, 4], ids=["B1-split", "B4"])
def test_cuda_graph_capture_and_replay(batch):
    """One decode step (append + rotary + attention) captured once, replayed for three steps; each must equal
    the eager call on a mirror cache, bitwise (same kernels, same split)."""
    k_cache, v_cache, static, fixed = _step_inputs(batch=batch)
    k_mirror, v_mirror = k_cache.clone(), v_cache.clone()
    k0, v0 = k_cache.clone(), v_cache.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile, value checks
        _call(k_cache, v_cache, static, fixed)
    torch.cuda.current_stream().wait_stream(side)
    k_cache.copy_(k0)
    v_cache.copy_(v0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _call(k_cache, v_cache, static, fixed)
    g = torch.Generator(device=DEV).manual_seed(3)
    for _ in range(3):
        for name in ("q", "k", "v"):
            static[name].copy_(torch.randn(static[name].shape, device=DEV, generator=g))
        graph.replay()
        eager = _call(k_mirror, v_mirror, dict(static, out=None), fixed)
        torch.cuda.synchronize()
        assert torch.equal(static["out"], eager)
        assert torch.equal(k_cache, k_mirror) and torch.equal(v_cache, v_mirror)
        static["cache_seqlens"] += 1  # the next step appends one slot further, as a server would


# ---------------------------------------------------------------------------------------------------------------
# The splits merged in a thread-block cluster (decode.CLUSTER_MERGE) against the combine's merge
# ---------------------------------------------------------------------------------------------------------------

# (name, _make kwargs, call kwargs): cluster sizes 2 to 8 (what the Step takes), non-power-of-two counts, sink,
# softcap, several row blocks (chunked prefill: grid axis 2), Dv = 64 / 96 (padded columns) / 256, fp16 and bf16.
CLUSTER_CASES = [
    ("splits2-decode", dict(batch=3, hq=32, hkv=8, d=128, capacity=4096, page_size=128, seqlen_new=1),
     dict(num_splits=2)),
    ("splits3-sink-lse", dict(batch=2, hq=8, hkv=2, d=128, capacity=1500, seqlen_new=1), dict(num_splits=3, sink=True)),
    ("splits5-softcap-paged16", dict(batch=2, hq=16, hkv=4, d=128, capacity=2000, page_size=16, seqlen_new=1),
     dict(num_splits=5, softcap=20.0)),
    ("splits7-d96", dict(batch=2, hq=4, hkv=4, d=96, capacity=3000, seqlen_new=2), dict(num_splits=7, causal=True)),
    ("splits8-dv64", dict(batch=2, hq=16, hkv=4, d=128, dv=64, capacity=4000, seqlen_new=1), dict(num_splits=8)),
    ("splits8-d256-sink", dict(batch=2, hq=8, hkv=1, d=256, capacity=5000, seqlen_new=1),
     dict(num_splits=8, sink=True)),
    ("splits4-chunked-prefill", dict(batch=2, hq=32, hkv=8, d=128, capacity=2048, page_size=64, seqlen_q=40,
                                     seqlen_new=40), dict(num_splits=4, causal=True)),
    ("splits6-empty-splits", dict(batch=3, hq=32, hkv=8, d=128, capacity=600, seqlen_new=1),
     dict(num_splits=6, window_size=(100, 0))),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name,make_kw,call_kw", CLUSTER_CASES, ids=[m[0] for m in CLUSTER_CASES])
def test_cluster_merge(name, make_kw, call_kw, dtype, monkeypatch):
    """Out and lse under the numerics rule with the splits merged in a cluster, a spy proving that the step ran
    clustered with no combine, and the result equal (to fp32 rounding of the merge order) to the combine's."""
    from fa4.kernels.triton import decode
    if not decode.cluster_size(torch.device(DEV), call_kw["num_splits"], make_kw.get("dv", make_kw["d"])):
        pytest.skip("this GPU / Triton has no cluster merge")
    call_kw = dict(call_kw)
    q, k_cache, v_cache, lens, kw = _make(dtype=dtype, seed=case_seed(name), **make_kw)
    q, k_cache, v_cache, lens = _to(DEV, q, k_cache, v_cache, lens)
    kw = {key: val.to(DEV) for key, val in kw.items()}
    call_kw["cache_seqlens"] = lens
    if call_kw.pop("sink", False):
        call_kw["learnable_sink"] = torch.randn(q.shape[2], device=DEV)
    kc0, vc0 = k_cache.clone(), v_cache.clone()
    built = []
    real_init = decode.Step.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        built.append(self)

    monkeypatch.setattr(decode.Step, "__init__", spy)
    inference._steps.clear()
    _check_call(q, k_cache, v_cache, kw, call_kw, dtype)
    assert built and built[-1].cluster == call_kw["num_splits"] and built[-1].combine is None
    # The same call again takes the direct (kept) launch: still right.
    k_cache.copy_(kc0)
    v_cache.copy_(vc0)
    _check_call(q, k_cache, v_cache, kw, call_kw, dtype)
    clustered = kvcache(q, kc0.clone(), vc0.clone(), return_lse=True, **kw, **call_kw)
    monkeypatch.setattr(decode, "CLUSTER_MERGE", False)
    inference._steps.clear()
    combined = kvcache(q, kc0.clone(), vc0.clone(), return_lse=True, **kw, **call_kw)
    inference._steps.clear()
    assert built[-1].cluster == 0 and built[-1].combine is not None
    torch.testing.assert_close(clustered[0], combined[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(clustered[1], combined[1], atol=1e-5, rtol=1e-5)


def test_sixteen_splits_keep_the_combine():
    """B = 1 on the suite's shape takes 16 splits on an H100: more than a portable cluster, so the PDL combine
    merges them (16-CTA clusters measured slower, decode.MAX_CLUSTER)."""
    from fa4.kernels.triton import decode
    q, k, v, lens, kw = _suite_inputs(1, 8192, True)
    inference._steps.clear()
    out = kvcache(q, k, v, cache_seqlens=lens, num_splits=16, **kw)
    _, step = next(reversed(inference._steps.values()))
    assert step.num_splits == 16 and step.cluster == 0 and step.combine is not None
    ref_o, _, low_o, _ = reference_on_cache(q, k, v, kw, dict(cache_seqlens=lens), torch.bfloat16)
    assert_close_rule("out", out.reshape(ref_o.shape), ref_o, low_o)


# ---------------------------------------------------------------------------------------------------------------
# The host path: direct launches of the compiled kernels once a signature has run
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged128"])
def test_direct_launches_after_first_call(paged, monkeypatch):
    """The second call of a signature launches the kept kernels without JITFunction (same output, bitwise); a q
    whose address loses the 16-byte alignment goes back through JITFunction and is still right; so does a call
    made while another stream is current."""
    from fa4.kernels.triton import decode
    monkeypatch.setattr(inference, "_steps", {})  # a signature cached by an earlier test would not be the last one
    q, k, v, lens, kw = _suite_inputs(1, 8192, paged)  # split: attention + combine
    first = kvcache(q, k, v, cache_seqlens=lens, **kw)
    _, step = next(reversed(inference._steps.values()))
    assert step.ready and step.combine is not None
    jit = []
    launch_jit = decode.Launch.jit
    monkeypatch.setattr(decode.Launch, "jit", lambda self, head, keep: (jit.append(keep), launch_jit(self, head, keep)))
    again = kvcache(q, k, v, cache_seqlens=lens, **kw)
    torch.cuda.synchronize()
    assert jit == [] and torch.equal(again, first)
    q_off = torch.empty(q.numel() + 1, device=DEV, dtype=q.dtype)[1:].view(q.shape).copy_(q)
    shifted = kvcache(q_off, k, v, cache_seqlens=lens, **kw)
    assert jit == [False, False]
    torch.testing.assert_close(shifted, first, atol=1e-2, rtol=0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        other = kvcache(q, k, v, cache_seqlens=lens, **kw)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(other, first)


# ---------------------------------------------------------------------------------------------------------------
# Offsets past 2^31 elements
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["paged", "contiguous"])
def test_offsets_past_2_31(layout):
    """Sequences whose keys live past element 2^31 of the cache (pages / cache rows at the end)."""
    dtype, hkv, d, page, length = torch.bfloat16, 8, 128, 128, 1024
    per_row = length * hkv * d
    g = torch.Generator(device=DEV).manual_seed(11)
    q = torch.randn(2, 1, 32, d, device=DEV, dtype=dtype, generator=g)
    k_new = torch.randn(2, 1, hkv, d, device=DEV, dtype=dtype, generator=g)
    v_new = torch.randn(2, 1, hkv, d, device=DEV, dtype=dtype, generator=g)
    lens = torch.tensor([length - 1, 300], device=DEV, dtype=torch.int32)
    if layout == "paged":
        n_pages = (2 ** 31) // (page * hkv * d) + 2 * (length // page) + 1
        k_cache = torch.zeros(n_pages, page, hkv, d, device=DEV, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        used = torch.arange(n_pages - 2 * (length // page), n_pages, device=DEV, dtype=torch.int32)
        table = used.flip(0).view(2, length // page).contiguous()
        k_cache[used.long()] = torch.randn(len(used), page, hkv, d, device=DEV, dtype=dtype, generator=g)
        v_cache[used.long()] = torch.randn(len(used), page, hkv, d, device=DEV, dtype=dtype, generator=g)
        where = dict(page_table=table)
        # The reference sees only the used pages, renumbered.
        small = lambda c: c[used.long()]  # noqa: E731
        small_kw = dict(page_table=(table - used[0]).contiguous())
    else:
        rows = (2 ** 31) // per_row + 2
        k_cache = torch.zeros(rows, length, hkv, d, device=DEV, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        idx = torch.tensor([rows - 1, rows - 2], device=DEV, dtype=torch.int32)
        k_cache[idx.long()] = torch.randn(2, length, hkv, d, device=DEV, dtype=dtype, generator=g)
        v_cache[idx.long()] = torch.randn(2, length, hkv, d, device=DEV, dtype=dtype, generator=g)
        where = dict(cache_batch_idx=idx)
        small = lambda c: c[idx.long()]  # noqa: E731
        small_kw = {}
    assert k_cache.numel() > 2 ** 31
    out, lse = kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=lens, return_lse=True, **where)
    kc, vc = small(k_cache), small(v_cache)  # after the append
    call_kw = dict(cache_seqlens=lens)
    ref_o, ref_l, low_o, low_l = reference_on_cache(q, kc, vc, dict(small_kw, k=k_new), call_kw, dtype)
    assert_close_rule("out", out.reshape(ref_o.shape), ref_o, low_o)
    assert_close_rule("lse", lse, ref_l, low_l)
    for b in range(2):
        n = int(lens[b])
        if layout == "paged":
            p, r = divmod(n, page)
            assert torch.equal(kc[int(small_kw["page_table"][b, p]), r], k_new[b, 0])
        else:
            assert torch.equal(kc[b, n], k_new[b, 0])


# ---------------------------------------------------------------------------------------------------------------
# Combine
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("splits,d", [(2, 128), (37, 128), (200, 64), (5, 72)])
def test_combine_gpu(splits, d):
    g = torch.Generator(device=DEV).manual_seed(splits)
    b, s, h = 3, 5, 16
    out_partial = torch.randn(splits, b, s, h, d, device=DEV, generator=g)
    lse_partial = torch.randn(splits, b, h, s, device=DEV, generator=g).transpose(2, 3) * 4
    lse_partial[0, 0] = float("-inf")
    lse_partial[:, 1, 2, 3] = float("-inf")
    out, lse = combine(out_partial, lse_partial, out_dtype=torch.bfloat16)
    total = torch.logsumexp(lse_partial, 0)
    w = torch.exp(lse_partial - total).nan_to_num(0.0)
    ref = (w[..., None] * out_partial).sum(0)
    assert out.dtype == torch.bfloat16 and lse.shape == (b, s, h)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(lse, total, atol=1e-5, rtol=1e-5)
    assert (out[1, 2, 3] == 0).all() and lse[1, 2, 3] == float("-inf")
