"""fa4.flash_attn_with_kvcache and fa4.flash_attn_combine on the CPU.

The reference backend against the naive materialised softmax (append, rotary and paging done by hand here);
the Triton kernels (append + rotary, split-KV decode, combine) under TRITON_INTERPRET=1 against the reference
backend at tiny sizes; argument errors, raised before the cache is touched.
"""
import math

import pytest
import torch

from fa4 import inference
from fa4.inference import flash_attn_combine, flash_attn_with_kvcache
from naive import naive_attention
from numerics import assert_close_rule


def _rotary_tables(seqlen, rotary_dim, dtype=torch.float32):
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    ang = torch.arange(seqlen, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _rotate_by_hand(x, cos, sin, positions, interleaved):
    """x (S, H, D) rotated at integer positions (S,), one pair at a time (the definition, no vectorisation)."""
    x = x.double().clone()
    half = cos.shape[1]
    out = x.clone()
    for s, p in enumerate(positions):
        for c in range(half):
            a, b = (2 * c, 2 * c + 1) if interleaved else (c, c + half)
            co, si = float(cos[p, c]), float(sin[p, c])
            out[s, :, a] = x[s, :, a] * co - x[s, :, b] * si
            out[s, :, b] = x[s, :, b] * co + x[s, :, a] * si
    return out


def _capacity(k_cache, kw):
    """Keys one sequence's cache can hold: a contiguous cache's length, or the page table's pages x page size."""
    return k_cache.shape[1] * (kw["page_table"].shape[1] if "page_table" in kw else 1)


def _rotates_per_token(left, right, capacity):
    """FlashAttention's rotary position of q: cache_seqlens + i when the call is local (causal is right = 0), else
    cache_seqlens for every row; as in FlashAttention 2, a window side at least as wide as the cache's capacity
    does not make the call local (benchmarks/gpu_fuzz_kvcache.py found this model without that rule)."""
    return 0 <= left < capacity or 0 <= right < capacity


def _make(batch=2, seqlen_q=1, hq=4, hkv=2, d=32, dv=None, capacity=48, seqlen_new=0, page_size=None,
          cache_rows=None, dtype=torch.float32, lens=None, seed=0):
    """Random q, cache (contiguous or paged with shuffled pages), new k/v and per-sequence cached lengths."""
    g = torch.Generator().manual_seed(seed)
    dv = dv or d
    q = torch.randn(batch, seqlen_q, hq, d, generator=g).to(dtype)
    if lens is None:
        lens = torch.randint(0, capacity - seqlen_new + 1, (batch,), generator=g)
    lens = torch.as_tensor(lens, dtype=torch.int32)
    kw = {}
    if page_size is None:
        rows = cache_rows or batch
        k_cache = torch.randn(rows, capacity, hkv, d, generator=g).to(dtype)
        v_cache = torch.randn(rows, capacity, hkv, dv, generator=g).to(dtype)
        if cache_rows is not None:
            kw["cache_batch_idx"] = torch.randperm(rows, generator=g)[:batch].to(torch.int32)
    else:
        pages = capacity // page_size
        n_pages = batch * pages + 3  # pages no sequence uses, as in a serving pool
        k_cache = torch.randn(n_pages, page_size, hkv, d, generator=g).to(dtype)
        v_cache = torch.randn(n_pages, page_size, hkv, dv, generator=g).to(dtype)
        table = torch.randperm(n_pages, generator=g)[:batch * pages].view(batch, pages).to(torch.int32)
        kw["page_table"] = table
    if seqlen_new:
        kw["k"] = torch.randn(batch, seqlen_new, hkv, d, generator=g).to(dtype)
        kw["v"] = torch.randn(batch, seqlen_new, hkv, dv, generator=g).to(dtype)
    return q, k_cache, v_cache, lens, kw


def _sequence_keys(k_cache, b, n, kw):
    """The first n keys of sequence b, gathered through the page table or cache_batch_idx."""
    if "page_table" in kw:
        ps = k_cache.shape[1]
        pos = torch.arange(n)
        return k_cache[kw["page_table"][b, pos // ps].long(), pos % ps]
    row = int(kw["cache_batch_idx"][b]) if "cache_batch_idx" in kw else b
    return k_cache[row, :n]


# ---------------------------------------------------------------------------------------------------------------
# Reference backend against the naive softmax, append and rotary done by hand
# ---------------------------------------------------------------------------------------------------------------

REFERENCE_CASES = [
    dict(),
    dict(seqlen_q=3, causal=True, seqlen_new=3),
    dict(page_size=4, seqlen_new=2, window_size=(5, 0)),
    dict(cache_rows=5, seqlen_new=1, softcap=5.0, sink=True),
    dict(page_size=3, seqlen_q=2, seqlen_new=2, rotary=True, interleaved=False, causal=True),
    dict(cache_rows=3, seqlen_q=2, seqlen_new=1, rotary=True, interleaved=True),
    # A right side past every query (the mask: no window) but under the capacity (the rotary: local, per token).
    dict(seqlen_q=3, seqlen_new=2, rotary=True, window_size=(-1, 5)),
    dict(seqlen_q=2, seqlen_new=1, rotary=True, window_size=(2**31 - 1, -1)),
]


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_reference_backend_matches_naive(case):
    case = dict(case)
    causal = case.pop("causal", False)
    window = case.pop("window_size", (-1, -1))
    softcap = case.pop("softcap", 0.0)
    use_sink = case.pop("sink", False)
    rotary = case.pop("rotary", False)
    interleaved = case.pop("interleaved", True)
    q, k_cache, v_cache, lens, kw = _make(**case)
    batch, seqlen_q, hq, d = q.shape
    sink = torch.randn(hq) if use_sink else None
    k0, v0 = k_cache.clone(), v_cache.clone()
    cos = sin = None
    if rotary:
        cos, sin = _rotary_tables(64, 16)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens,
                                       causal=causal, window_size=window, softcap=softcap, learnable_sink=sink,
                                       rotary_interleaved=interleaved, return_lse=True, backend="reference", **kw)
    sn = kw["k"].shape[1] if "k" in kw else 0
    per_token = _rotates_per_token(window[0], 0 if causal else window[1], _capacity(k_cache, kw))
    for b in range(batch):
        n = int(lens[b])
        new_pos = list(range(n, n + sn))
        k_new = kw["k"][b] if sn else None
        if sn and rotary:
            k_new = _rotate_by_hand(k_new, cos, sin, new_pos, interleaved).float()
        # The append: exactly the new rows changed, to the (rotated) new keys and values.
        keys = _sequence_keys(k_cache, b, n + sn, kw)
        vals = _sequence_keys(v_cache, b, n + sn, kw)
        torch.testing.assert_close(keys[:n], _sequence_keys(k0, b, n, kw))
        if sn:
            torch.testing.assert_close(keys[n:], k_new, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(vals[n:], kw["v"][b])
        qb = q[b]
        if rotary:
            qpos = [n + i for i in range(seqlen_q)] if per_token else [n] * seqlen_q
            qb = _rotate_by_hand(qb, cos, sin, qpos, interleaved).float()
        ref_o, ref_l = naive_attention(qb[None].double(), keys[None].double(), vals[None].double(),
                                       softmax_scale=1 / math.sqrt(d), causal=causal, window_size=window,
                                       softcap=softcap, sink=sink.double() if sink is not None else None)
        torch.testing.assert_close(out[b:b + 1].double(), ref_o, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(lse[b:b + 1].double(), ref_l, atol=2e-5, rtol=1e-5)
    # Untouched: caches of the pages/rows no sequence writes.
    changed = (k_cache != k0).flatten(1).any(1).nonzero().flatten().tolist()
    assert len(changed) <= batch * max(sn, 1) * 2


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels (interpreter) against the reference backend
# ---------------------------------------------------------------------------------------------------------------

TRITON_CASES = [
    # (name, _make kwargs, call kwargs)
    ("decode", dict(batch=3), dict()),
    ("decode-splits", dict(batch=1, capacity=80), dict(num_splits=3)),
    ("decode-heuristic-split", dict(batch=1, hkv=1, hq=4, capacity=160), dict()),
    ("gqa8-sq2-causal", dict(hq=8, hkv=1, seqlen_q=2, seqlen_new=2), dict(causal=True, num_splits=2)),
    ("paged-1", dict(page_size=1, capacity=24, seqlen_new=1), dict(num_splits=2)),
    ("paged-3", dict(page_size=3, capacity=45, seqlen_q=3, seqlen_new=3), dict(causal=True)),
    ("paged-16-aligned", dict(page_size=16, capacity=64, seqlen_new=1), dict(num_splits=2)),
    ("batch-idx", dict(cache_rows=5, seqlen_new=2, seqlen_q=2), dict(causal=True)),
    ("window", dict(seqlen_q=4, capacity=64), dict(window_size=(7, 1), num_splits=2)),
    ("softcap-sink", dict(seqlen_new=1), dict(softcap=3.0, sink=True, num_splits=3)),
    ("sink-unsplit", dict(seqlen_q=2), dict(sink=True, causal=True, num_splits=1)),
    ("rotary-interleaved", dict(seqlen_new=2, seqlen_q=2, page_size=3, capacity=24),
     dict(rotary=True, interleaved=True, causal=True)),
    ("rotary-neox-partial", dict(seqlen_new=1, d=48), dict(rotary=True, interleaved=False)),
    ("dv-differs", dict(d=32, dv=16, seqlen_new=1), dict(num_splits=2)),
    ("int-seqlens", dict(batch=2, seqlen_new=1), dict(int_lens=20)),
    ("full-cache", dict(batch=2, capacity=24), dict(no_lens=True, num_splits=2)),
    ("empty-sequence", dict(batch=2, lens=[0, 5]), dict(num_splits=2)),
    ("prefill-chunk-2-row-blocks", dict(batch=1, seqlen_q=9, seqlen_new=9, hq=16, hkv=2, capacity=40),
     dict(causal=True)),
    # A left window wider than the cache is no window (FlashAttention 2), so q rotates at cache_seqlens for every
    # query row, not at cache_seqlens + i.
    ("rotary-window-wider-than-cache", dict(seqlen_new=3, seqlen_q=3, page_size=3, capacity=24),
     dict(rotary=True, window_size=(100, -1), num_splits=2)),
]


def _run_both(make_kw, call_kw, dtype):
    call_kw = dict(call_kw)
    rotary = call_kw.pop("rotary", False)
    interleaved = call_kw.pop("interleaved", True)
    use_sink = call_kw.pop("sink", False)
    int_lens = call_kw.pop("int_lens", None)
    no_lens = call_kw.pop("no_lens", False)
    q, k_cache, v_cache, lens, kw = _make(dtype=dtype, **make_kw)
    if rotary:
        call_kw["rotary_cos"], call_kw["rotary_sin"] = _rotary_tables(make_kw.get("capacity", 48) + q.shape[1], 16)
        call_kw["rotary_interleaved"] = interleaved
    if use_sink:
        call_kw["learnable_sink"] = torch.randn(q.shape[2])
    call_kw["cache_seqlens"] = None if no_lens else (int_lens if int_lens is not None else lens)
    results = {}
    for backend in ("reference", "triton"):
        kc, vc = k_cache.clone(), v_cache.clone()
        out = torch.full((*q.shape[:3], v_cache.shape[-1]), float("nan"), dtype=dtype)  # poisoned
        res, lse = flash_attn_with_kvcache(q, kc, vc, return_lse=True, out=out, backend=backend,
                                           **kw, **call_kw)
        assert res is out
        results[backend] = (res, lse, kc, vc)
    return q, k_cache, v_cache, kw, call_kw, results


@pytest.mark.parametrize("name,make_kw,call_kw", TRITON_CASES, ids=[c[0] for c in TRITON_CASES])
def test_triton_matches_reference_fp32(name, make_kw, call_kw):
    *_, results = _run_both(make_kw, call_kw, torch.float32)
    (o_r, l_r, kc_r, vc_r), (o_t, l_t, kc_t, vc_t) = results["reference"], results["triton"]
    torch.testing.assert_close(kc_t, kc_r, atol=1e-6, rtol=1e-6)  # append + rotary, in place
    torch.testing.assert_close(vc_t, vc_r, atol=0, rtol=0)
    torch.testing.assert_close(o_t, o_r, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(l_t, l_r, atol=2e-5, rtol=2e-5)


# Split steps whose splits take several key tiles each (the interpreter's tiles are 16 keys), for both orders of
# handing tiles out (decode.STRIDED_*: chunks as shipped, tiles dealt out in turn when switched on).
SPLIT_ORDER_CASES = [
    ("contiguous", dict(batch=2, capacity=160, lens=[160, 77]), dict(num_splits=3)),
    ("paged-16", dict(batch=2, page_size=16, capacity=160, lens=[160, 93]), dict(num_splits=3)),
    ("paged-1-gather", dict(batch=2, page_size=1, capacity=96, lens=[96, 50]), dict(num_splits=4)),
    ("paged-48-append", dict(batch=2, page_size=48, capacity=192, lens=[150, 61], seqlen_new=2, seqlen_q=2),
     dict(causal=True, num_splits=3)),
    ("window", dict(batch=2, seqlen_q=4, capacity=160, lens=[156, 120], page_size=16),
     dict(window_size=(40, 0), num_splits=3)),
    ("softcap-sink", dict(batch=1, page_size=16, capacity=160, lens=[160]), dict(softcap=3.0, sink=True, num_splits=5)),
    ("empty-sequence", dict(batch=2, capacity=160, lens=[0, 150], page_size=16), dict(num_splits=3)),
    # 9 tokens x 8 query heads a kv head: two row blocks; the first one's causal bound ends before the cache does.
    ("prefill-two-row-blocks", dict(batch=1, seqlen_q=9, seqlen_new=9, hq=16, hkv=2, capacity=160, lens=[140],
                                    page_size=16), dict(causal=True, num_splits=3)),
]


@pytest.mark.parametrize("name,make_kw,call_kw", SPLIT_ORDER_CASES, ids=[c[0] for c in SPLIT_ORDER_CASES])
@pytest.mark.parametrize("strided", [False, True])
def test_split_orders_match_reference(name, make_kw, call_kw, strided, monkeypatch):
    from fa4.kernels.triton import decode
    monkeypatch.setattr(decode, "STRIDED_PAGED", strided)
    monkeypatch.setattr(decode, "STRIDED_CONTIGUOUS", strided)
    inference._steps.clear()  # so that the last Step cached is this call's
    *_, results = _run_both(make_kw, call_kw, torch.float32)
    (o_r, l_r, kc_r, vc_r), (o_t, l_t, kc_t, vc_t) = results["reference"], results["triton"]
    _, step = next(reversed(inference._steps.values()))
    assert step.attend.constexprs["STRIDED"] == strided and step.num_splits == call_kw["num_splits"]
    torch.testing.assert_close(kc_t, kc_r, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(vc_t, vc_r, atol=0, rtol=0)
    torch.testing.assert_close(o_t, o_r, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(l_t, l_r, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("paged_on,contiguous_on", [(False, False), (True, False), (False, True)])
def test_split_order_of_each_layout(paged_on, contiguous_on, monkeypatch):
    """decode.STRIDED_PAGED / STRIDED_CONTIGUOUS pick the order of each layout's split steps (both chunked as
    shipped); unsplit steps never stride."""
    from fa4.kernels.triton import decode
    assert not decode.STRIDED_PAGED and not decode.STRIDED_CONTIGUOUS
    monkeypatch.setattr(decode, "STRIDED_PAGED", paged_on)
    monkeypatch.setattr(decode, "STRIDED_CONTIGUOUS", contiguous_on)
    for page_size in (None, 16):
        for splits in (1, 2):
            q, k_cache, v_cache, lens, kw = _make(batch=1, capacity=64, page_size=page_size)
            inference._steps.clear()
            flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, num_splits=splits, backend="triton", **kw)
            _, step = next(reversed(inference._steps.values()))
            want = splits > 1 and (paged_on if page_size else contiguous_on)
            assert step.attend.constexprs["STRIDED"] == want, (page_size, splits)
    inference._steps.clear()


def reference_on_cache(q, k_cache, v_cache, kw, call_kw, low_dtype):
    """fp32 reference and the low-precision reference of the attention alone over an already appended cache.

    q is rotated as flash_attn_with_kvcache rotates it. Returns (ref_out, ref_lse, low_out, low_lse), out as
    (B * Sq, Hq, Dv) and lse as (B, Hq, Sq).
    """
    from fa4 import reference
    b, sq, hq, d = q.shape
    lens = call_kw.get("cache_seqlens")
    if lens is None:
        lens = _capacity(k_cache, kw)
    sn = kw["k"].shape[1] if kw.get("k") is not None else 0
    lens = torch.as_tensor(lens, dtype=torch.int32, device=q.device).expand(b).contiguous()
    window = call_kw.get("window_size", (-1, -1))
    left, right = window[0], 0 if call_kw.get("causal") else window[1]
    if call_kw.get("rotary_cos") is not None:
        steps = torch.arange(sq, device=q.device)[None, :]
        per_token = _rotates_per_token(left, right, _capacity(k_cache, kw))
        pos = lens.long()[:, None] + (steps if per_token else 0 * steps)
        q = inference.apply_rotary(q, call_kw["rotary_cos"], call_kw["rotary_sin"], pos,
                                   call_kw.get("rotary_interleaved", True))
    table = kw.get("page_table")
    if table is None:
        rows = kw.get("cache_batch_idx")
        rows = torch.arange(b, device=q.device) if rows is None else rows
        table = rows.to(torch.int32)[:, None]
    common = dict(softmax_scale=call_kw.get("softmax_scale") or d ** -0.5, window_left=left, window_right=right,
                  softcap=call_kw.get("softcap", 0.0), sink=call_kw.get("learnable_sink"),
                  cu_seqlens_q=torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device),
                  max_seqlen_q=sq, seqused_k=lens + sn, max_seqlen_k=0, page_table=table)
    q2 = q.reshape(b * sq, hq, d)
    ref_o, ref_l = reference.forward(q2.float(), k_cache.float(), v_cache.float(), **common)
    low_o, low_l = reference.forward(q2, k_cache, v_cache, compute_dtype=low_dtype, **common)
    return ref_o, ref_l.view(hq, b, sq).permute(1, 0, 2), low_o, low_l.view(hq, b, sq).permute(1, 0, 2)


FP16_RULE_CASES = [TRITON_CASES[i] for i in (1, 5, 9, 11, 18)]


@pytest.mark.parametrize("name,make_kw,call_kw", FP16_RULE_CASES, ids=[c[0] for c in FP16_RULE_CASES])
def test_triton_fp16_numerics_rule(name, make_kw, call_kw):
    """fp16 kernels against the fp32 reference under DESIGN's rule, over the cache the Triton append wrote."""
    q, k_cache, v_cache, kw, call_kw, results = _run_both(make_kw, call_kw, torch.float16)
    o_t, l_t, kc_t, vc_t = results["triton"]
    ref_o, ref_l, low_o, low_l = reference_on_cache(q, kc_t, vc_t, kw, call_kw, torch.float16)
    softcap = call_kw.get("softcap", 0.0) > 0
    assert_close_rule("out", o_t.reshape(ref_o.shape), ref_o, low_o, softcap=softcap)
    assert_close_rule("lse", l_t, ref_l, low_l, softcap=softcap)


def test_triton_without_out_or_lse():
    q, k_cache, v_cache, lens, kw = _make(batch=1, capacity=64)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, num_splits=2, backend="triton", **kw)
    ref = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, backend="reference", **kw)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------------------------
# Combine
# ---------------------------------------------------------------------------------------------------------------

def _combine_by_hand(out_partial, lse_partial):
    lse = torch.logsumexp(lse_partial.double(), dim=0)
    w = torch.exp(lse_partial.double() - lse).nan_to_num(0.0)
    return (w[..., None] * out_partial.double().nan_to_num(0.0)).sum(0), lse


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_combine(backend, monkeypatch):
    if backend == "torch":
        monkeypatch.setattr(inference.dispatch, "triton_reason", lambda t: "forced off")
    g = torch.Generator().manual_seed(1)
    n, b, s, h, d = 5, 2, 3, 4, 24
    out_partial = torch.randn(n, b, s, h, d, generator=g)
    lse_partial = torch.randn(n, b, h, s, generator=g).transpose(2, 3)  # FlashAttention's strides
    lse_partial[1] = float("-inf")  # an empty split: its partial output must not be read
    out_partial[1] = float("nan")
    lse_partial[:, 1, 2, 3] = float("-inf")  # a row where every split is empty
    out, lse = flash_attn_combine(out_partial, lse_partial)
    ref_o, ref_l = _combine_by_hand(out_partial, lse_partial)
    assert out.shape == (b, s, h, d) and out.dtype == torch.float32
    assert lse.shape == (b, s, h) and lse.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out.double(), ref_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_l, atol=1e-5, rtol=1e-5)
    assert lse[1, 2, 3] == float("-inf") and (out[1, 2, 3] == 0).all()
    # Into a given output, in another dtype; and packed sequences without the batch dimension.
    dst = torch.empty(b, s, h, d, dtype=torch.float16)
    res, _ = flash_attn_combine(out_partial, lse_partial, out=dst)
    assert res is dst
    torch.testing.assert_close(dst.double(), ref_o, atol=2e-3, rtol=2e-3)
    out_p, lse_p = flash_attn_combine(out_partial[:, 0], lse_partial[:, 0], out_dtype=torch.float16)
    assert out_p.shape == (s, h, d) and out_p.dtype == torch.float16 and lse_p.shape == (s, h)
    torch.testing.assert_close(out_p.double(), ref_o[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse_p.double(), ref_l[0], atol=1e-5, rtol=1e-5)


def test_combine_many_splits_takes_the_chunked_merge():
    """More splits than one (splits, Dv) tile holds (40 at Dv = 256, CHUNK 16): the lse-first, chunked merge, with
    dead splits poisoned in two chunks, must equal the one-tile merge's math."""
    from fa4.kernels.triton import combine
    g = torch.Generator().manual_seed(3)
    n, b, s, h, d = 40, 1, 2, 2, 256
    grid, tail, constexprs, _, _ = combine.combine_launch(
        num_splits=n, batch=b, seqlen=s, num_heads=h, head_dv=d, partial_strides=(1, 1, 1, 1),
        lse_partial_strides=(1, 1, 1, 1), out_strides=(1, 1, 1), lse_strides=(1, 1, 1), has_sink=False,
        write_lse=True)
    assert constexprs["BLOCK_SPLITS"] > constexprs["CHUNK"]  # the case this test is for
    out_partial = torch.randn(n, b, s, h, d, generator=g)
    lse_partial = torch.randn(n, b, h, s, generator=g).transpose(2, 3)
    for dead in (3, 21):  # one empty split in the first chunk, one in a later chunk
        lse_partial[dead] = float("-inf")
        out_partial[dead] = float("nan")
    out, lse = flash_attn_combine(out_partial, lse_partial)
    ref_o, ref_l = _combine_by_hand(out_partial, lse_partial)
    torch.testing.assert_close(out.double(), ref_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_l, atol=1e-5, rtol=1e-5)


def test_combine_of_two_halves_is_attention_over_all_keys():
    """Cascade attention: attention over two key sets, merged by their lse, equals attention over both."""
    q, k_cache, v_cache, _, _ = _make(batch=2, capacity=32)
    halves = [flash_attn_with_kvcache(q, kc, vc, return_lse=True, backend="reference")
              for kc, vc in ((k_cache[:, :13], v_cache[:, :13]), (k_cache[:, 13:], v_cache[:, 13:]))]
    out_partial = torch.stack([o.float() for o, _ in halves])
    lse_partial = torch.stack([lse.transpose(1, 2) for _, lse in halves])
    out, lse = flash_attn_combine(out_partial, lse_partial)
    full_o, full_l = flash_attn_with_kvcache(q, k_cache, v_cache, return_lse=True, backend="reference")
    torch.testing.assert_close(out, full_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_l.transpose(1, 2), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Split heuristic, workspace
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch,length,expect", [
    (1, 8192, "many"), (1, 65536, "many"), (8, 8192, "some"), (32, 4096, 1), (64, 8192, 1), (128, 2048, 1)])
def test_split_heuristic_on_decode_suite(batch, length, expect):
    n = inference.choose_num_splits(batch * 8, length, 64, 132)  # Hkv 8, one row block, H100's 132 SMs
    if expect == "many":
        assert 16 <= n <= inference.MAX_SPLITS
    elif expect == "some":
        assert 2 <= n <= 8
    else:
        assert n == expect
    assert inference.choose_num_splits(1, 100, 64, 132) == 1  # too few key tiles to share


def test_workspace_is_reused_and_never_released():
    from fa4.kernels.triton import decode
    dev = torch.device("cpu")
    a = decode._workspace(dev, 1000)
    assert decode._workspace(dev, 10) is a
    b = decode._workspace(dev, a.numel() + 1)
    assert b.numel() >= 2 * a.numel() and any(r is a for r in decode._retired)


# ---------------------------------------------------------------------------------------------------------------
# Host path: one cached Step per call signature, launches per call, direct launches of the compiled kernels
# ---------------------------------------------------------------------------------------------------------------

def _count_launches(monkeypatch):
    """Patches decode.Launch so every launch (JITFunction path or direct) is recorded by kernel name."""
    from fa4.kernels.triton import decode
    seen = []
    jit, fast = decode.Launch.jit, decode.Launch.fast

    def name(launch):
        return getattr(launch.fn, "__name__", None) or launch.fn.fn.__name__

    monkeypatch.setattr(decode.Launch, "jit", lambda self, head, keep: (seen.append(name(self)), jit(self, head, keep)))
    monkeypatch.setattr(decode.Launch, "fast", lambda self, head, stream: (seen.append(name(self)),
                                                                            fast(self, head, stream)))
    return seen


@pytest.mark.parametrize("splits,new,expect", [
    (1, 0, ["_decode_kernel"]),
    (3, 0, ["_decode_kernel", "_combine_kernel"]),
    (1, 1, ["_append_kv_kernel", "_decode_kernel"]),
    (2, 2, ["_append_kv_kernel", "_decode_kernel", "_combine_kernel"]),
], ids=["unsplit", "split", "append-unsplit", "append-split"])
def test_launches_per_call(splits, new, expect, monkeypatch):
    """The combine runs only when split, the append only with new keys; a repeated signature skips the checks."""
    q, k_cache, v_cache, lens, kw = _make(batch=1, capacity=64, seqlen_new=new, page_size=16)
    seen = _count_launches(monkeypatch)
    flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, num_splits=splits, **kw)
    assert seen == expect
    seen.clear()
    static = []
    check = inference._check_static
    monkeypatch.setattr(inference, "_check_static", lambda *a: (static.append(1), check(*a))[1])
    back = (lens - new).clamp(min=0)  # another tensor, same signature
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=back, num_splits=splits, **kw)
    assert seen == expect and not static  # the cached Step, no static checks
    ref = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=back, num_splits=splits,
                                  backend="reference", **kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_cached_step_still_checks_values_and_ints():
    """The cached path keeps the checks that depend on values: tensor contents and an int cache_seqlens."""
    q, k_cache, v_cache, lens, kw = _make(batch=2, capacity=16, seqlen_new=1, page_size=4)
    flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, **kw)
    flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=3, **kw)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=0, **kw)  # cached; 0 is a length, not a tensor
    kc, vc = k_cache.clone(), v_cache.clone()
    ref = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=0, backend="reference", **kw)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    k0 = k_cache.clone()
    with pytest.raises(ValueError, match=r"^k: appending 1 keys after cache_seqlens = 16 needs 17 slots"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=16, **kw)
    with pytest.raises(ValueError, match=r"^k: appending 1 keys after cache_seqlens\[1\] = 16 needs 17"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([2, 16], dtype=torch.int32), **kw)
    with pytest.raises(TypeError, match=r"^causal must be"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=3, causal=0, **kw)  # not the causal=False step
    assert torch.equal(k_cache, k0)


class _FakeLauncher:
    """Stands in for a CompiledKernel's launcher: records (grid, stream, function, args)."""

    def __init__(self, log):
        self.log = log

    def __call__(self, gx, gy, gz, stream, function, metadata, launch_metadata, enter_hook, exit_hook, *args):
        assert launch_metadata is None and enter_hook is None and exit_hook is None
        self.log.append(((gx, gy, gz), stream, function, args))


@pytest.mark.parametrize("splits", [1, 2])
def test_direct_launch_arguments(splits, monkeypatch):
    """Once compiled, a Step launches the kept kernels with raw pointers, the per-call int and its fixed tail;
    an unaligned pointer sends the call back through JITFunction. CUDA is simulated (device index 0)."""
    from fa4.kernels.triton import decode
    q, k_cache, v_cache, lens, kw = _make(batch=2, capacity=64, page_size=16)
    out = torch.empty(*q.shape[:3], v_cache.shape[-1])
    step = inference.make_step(inference._check_static(
        q, k_cache, v_cache, None, None, None, None, lens, None, kw["page_table"], None, False, (-1, -1), 0.0, None,
        True, splits, False, out, None), q, k_cache, v_cache, None, None, None, None, lens, None, kw["page_table"],
        0.0, None, True, splits, False, out)
    log = []
    for i, launch in enumerate(step.launches):
        launch.compiled = (_FakeLauncher(log), f"function{i}", None)
    step.device_index, step.ready = 0, True
    monkeypatch.setattr(decode, "_current_device", lambda: 0)
    monkeypatch.setattr(decode, "_raw_stream", lambda index: 77)
    res, lse = step(q, k_cache, v_cache, None, None, None, None, lens, None, kw["page_table"], None, out, 0)
    assert res is out and lse is None and len(log) == splits
    grid, stream, function, args = log[0]
    ptrs = (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), None)
    assert grid == step.attend.grid and stream == 77 and function == "function0"
    assert args[:5] == ptrs and args[7:14] == (None, lens.data_ptr(), None, kw["page_table"].data_ptr(), None, None, 0)
    assert args[14:] == step.attend.tail_all
    if splits > 1:
        ws = decode._workspaces[(q.device, 77)]
        assert args[5] == ws.data_ptr() and args[6] == ws.data_ptr() + 4 * step.ws_lse_offset
        assert log[1][3] == (args[5], args[6], out.data_ptr(), None, None) + step.combine.tail_all
    else:
        assert args[5:7] == (None, None)
    # A q whose address is not 16-byte aligned (same shape and strides) must not reach the kept kernel.
    log.clear()
    jit = []
    monkeypatch.setattr(decode.Launch, "jit", lambda self, head, keep: jit.append(keep))
    q_off = torch.empty(q.numel() + 1)[1:].view(q.shape).copy_(q)
    step(q_off, k_cache, v_cache, None, None, None, None, lens, None, kw["page_table"], None, out, 0)
    assert not log and jit == [False] * splits


def _binding_report():
    """Steps covering every launch kind, bound by JITFunction's own binder (as JITFunction.run does) for the
    sm_90 backend: each direct launch's fixed argument list must equal the binder's, and the per-call head
    (pointers of aligned tensors, seqlen_fixed) must not change Triton's specialisation. Returns the problems."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from fa4.kernels.triton import decode
    backend = make_backend(GPUTarget("cuda", 90, 32))
    problems = []
    dt = torch.bfloat16
    for paged, splits, new, rotary, lse, clustered in [
            (16, 3, 2, True, True, False), (None, 1, 1, False, False, False), (128, 4, 0, False, True, False),
            (None, 1, 0, True, False, False), (16, 3, 2, True, True, True), (128, 4, 0, False, True, True)]:
        batch, cap, hkv, d = 2, 256, 2, 128
        q = torch.zeros(batch, max(new, 1), 8, d, dtype=dt)
        if paged:
            k_cache = torch.zeros(batch * cap // paged, paged, hkv, d, dtype=dt)
            table = torch.zeros(batch, cap // paged, dtype=torch.int32)
        else:
            k_cache, table = torch.zeros(batch, cap, hkv, d, dtype=dt), None
        k = torch.zeros(batch, new, hkv, d, dtype=dt) if new else None
        cos = torch.zeros(cap + 4, 32) if rotary else None
        lens, out = torch.zeros(batch, dtype=torch.int32), torch.zeros_like(q)
        build = (_clustered if clustered else lambda fn, *a: fn(*a))
        step = build(lambda: decode.Step(
            q, k_cache, k_cache, out, want_lse=lse, k=k, v=k, cache_seqlens=lens, cache_batch_idx=None,
            page_table=table, rotary_cos=cos, rotary_sin=cos, rotary_interleaved=True, rotary_per_token=True,
            softmax_scale=0.1, window_left=-1, window_right=0, softcap=0.0, sink=None, num_splits=splits,
            config=decode.Config(64, 4, 3)))
        if clustered and (step.cluster != splits or step.combine is not None):
            problems.append(f"clustered step: cluster {step.cluster}, combine {step.combine}")
        part = torch.zeros(16, dtype=torch.float32)
        lse_t = torch.zeros(batch, 8, q.shape[1]) if lse else None
        heads = {step.append: lambda n: (k, k, k_cache, k_cache, lens, None, table, cos, cos, n),
                 step.attend: lambda n: (q, k_cache, k_cache, out, lse_t, part if splits > 1 else None,
                                         part if splits > 1 else None, None, lens, None, table, cos, cos, n),
                 step.combine: lambda n: (part, part, out, lse_t, None)}
        for launch in step.launches:
            fn = launch.fn
            binder = create_function_from_signature(fn.signature, fn.params, backend)
            specs = []
            for n in (0, 1, 16, 17):
                head = heads[launch](n)
                params, spec, _ = binder(*launch.args(head), **launch.constexprs, num_warps=launch.num_warps,
                                         num_stages=launch.num_stages)
                if list(params.values()) != [*head, *launch.tail_all]:
                    problems.append(f"{fn.__name__}: direct arguments differ from the binder's")
                specs.append(spec)
            if any(s != specs[0] for s in specs):
                problems.append(f"{fn.__name__}: the per-call int changes the specialisation")
    return problems


def test_direct_launch_matches_triton_binding():
    import json
    import os
    import subprocess
    import sys
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    code = ("import json, sys; sys.path[:0] = ['tests', '.']; import test_inference as t; "
            "print(json.dumps(t._binding_report()))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


# ---------------------------------------------------------------------------------------------------------------
# Errors: raised before anything is written
# ---------------------------------------------------------------------------------------------------------------

def _bad(mutate):
    q, k_cache, v_cache, lens, kw = _make(batch=2, capacity=16, seqlen_new=1, page_size=4)
    kw = dict(kw, cache_seqlens=lens)
    q, k_cache, v_cache, kw = mutate(q, k_cache, v_cache, kw)
    return q, k_cache, v_cache, kw


ERROR_CASES = [
    ("page index too large", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, page_table=kw["page_table"] + 100)),
     ValueError, r"^page_table\[0, 0\] = \d+ is out of range: k_cache has 11 pages"),
    ("page index negative", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, page_table=-kw["page_table"] - 1)),
     ValueError, r"^page_table\[0, 0\] = -\d+ is out of range"),
    ("seqlens beyond cache", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, cache_seqlens=torch.tensor(
        [3, 17], dtype=torch.int32))), ValueError, r"^cache_seqlens\[1\] = 17 is beyond the cache: it holds 16"),
    ("append past capacity", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, cache_seqlens=torch.tensor(
        [16, 2], dtype=torch.int32))), ValueError, r"^k: appending 1 keys after cache_seqlens\[0\] = 16"),
    ("append past capacity (int)", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, cache_seqlens=16)), ValueError,
     r"^k: appending 1 keys after cache_seqlens = 16 needs 17 slots; the cache holds 16"),
    ("negative seqlens (int)", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, cache_seqlens=-2)), ValueError,
     r"^cache_seqlens = -2; it must be >= 0"),
    ("negative seqlens", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, cache_seqlens=torch.tensor(
        [2, -1], dtype=torch.int32))), ValueError, r"^cache_seqlens\[1\] = -1; it must be >= 0"),
    ("seqlens dtype", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, cache_seqlens=kw["cache_seqlens"].float())),
     TypeError, r"^cache_seqlens must be torch\.int32; got torch\.float32"),
    ("seqlens shape", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, cache_seqlens=kw["cache_seqlens"][:1])),
     ValueError, r"^cache_seqlens must have shape \(2,\); got \(1,\)"),
    ("page table batch", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, page_table=kw["page_table"][:1])),
     ValueError, r"^page_table has 1 rows; it must have one per sequence of q \(2\)"),
    ("page table dtype", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, page_table=kw["page_table"].long())),
     TypeError, r"^page_table must be torch\.int32; got torch\.int64"),
    ("page table strided", lambda q, kc, vc, kw: (q, kc, vc, dict(
        kw, page_table=kw["page_table"].t().contiguous().t())),
     ValueError, r"^page_table's last dimension must be contiguous \(stride 1\); got stride 2"),
    ("seqlens strided", lambda q, kc, vc, kw: (q, kc, vc, dict(
        kw, cache_seqlens=torch.zeros(4, dtype=torch.int32)[::2])),
     ValueError, r"^cache_seqlens must be contiguous \(stride 1\); got stride 2"),
    ("rotary too short", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, cache_seqlens=torch.tensor(
        [12, 3], dtype=torch.int32), rotary_cos=torch.ones(12, 8), rotary_sin=torch.zeros(12, 8))),
     ValueError, r"^rotary_cos has 12 positions; positions up to 12 are needed"),
    ("rotary dim too wide", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, rotary_cos=torch.ones(32, 20),
                                                                   rotary_sin=torch.zeros(32, 20))),
     ValueError, r"^rotary_cos has 20 columns \(rotary_dim / 2\); rotary_dim must lie in \[2, 32\]"),
    ("rotary without sin", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, rotary_cos=torch.ones(32, 8))),
     ValueError, r"^rotary_cos and rotary_sin must be given together"),
    ("rotary without new keys", lambda q, kc, vc, kw: (q, kc, vc, {
        **{x: y for x, y in kw.items() if x not in ("k", "v")}, "rotary_cos": torch.ones(32, 8),
        "rotary_sin": torch.zeros(32, 8)}), ValueError, r"^rotary_cos/rotary_sin need the new keys"),
    ("k without v", lambda q, kc, vc, kw: (q, kc, vc, {x: y for x, y in kw.items() if x != "v"}), ValueError,
     r"^k and v must be given together"),
    ("k wrong heads", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, k=kw["k"][:, :, :1])), ValueError,
     r"^k must have shape \(2, 1, 2, 32\)"),
    ("k wrong dtype", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, k=kw["k"].half())), TypeError,
     r"^k has dtype torch\.float16; it must match k_cache's dtype torch\.float32"),
    ("cache heads", lambda q, kc, vc, kw: (q[:, :, :3], kc, vc, kw), ValueError,
     r"^k_cache has 2 heads; it must divide q's 3 heads"),
    ("v_cache shape", lambda q, kc, vc, kw: (q, kc, vc[:, :2], kw), ValueError, r"^v_cache has shape"),
    ("cache dtype", lambda q, kc, vc, kw: (q, kc.half(), vc, kw), TypeError,
     r"^k_cache has dtype torch\.float16; it must match q's dtype"),
    ("batch idx with pages", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, cache_batch_idx=torch.zeros(
        2, dtype=torch.int32))), ValueError, r"^cache_batch_idx must be None with page_table"),
    ("out shape", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, out=torch.empty(2, 1, 4, 16))), ValueError,
     r"^out must have shape \(2, 1, 4, 32\)"),
    ("num_splits negative", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, num_splits=-1)), ValueError,
     r"^num_splits must be an int from 0 \(the heuristic\) to 256"),
    ("num_splits huge", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, num_splits=70000)), ValueError,
     r"^num_splits must be an int from 0 \(the heuristic\) to 256; got 70000"),
    ("out overlapping itself", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, out=torch.empty(1, 1, 4, 32).expand(
        2, 1, 4, 32))), ValueError, r"^out has strides \(0, 128, 32, 1\) under which some of its elements share"),
    ("no seqlens with append", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, cache_seqlens=None)), ValueError,
     r"^cache_seqlens is required when k and v are appended"),
    ("sm90 backend", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, backend="sm90")), ValueError,
     r"^backend='sm90' has no KV-cache kernel"),
    ("unknown backend", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, backend="cuda")), ValueError,
     r"^backend must be one of \(None, 'triton', 'reference'\); got 'cuda'"),
    ("window", lambda q, kc, vc, kw: (q, kc, vc, dict(kw, window_size=(-3, 0))), ValueError,
     r"^window_size left must be >= -1"),
]


@pytest.mark.parametrize("name,mutate,exc,pattern", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_errors_leave_the_cache_untouched(name, mutate, exc, pattern):
    q, k_cache, v_cache, kw = _bad(mutate)
    k0, v0 = k_cache.clone(), v_cache.clone()
    with pytest.raises(exc, match=pattern):
        flash_attn_with_kvcache(q, k_cache, v_cache, **{"backend": "reference", **kw})
    assert torch.equal(k_cache, k0) and torch.equal(v_cache, v0)


def test_contiguous_cache_errors():
    q, k_cache, v_cache, lens, kw = _make(batch=2, capacity=16, cache_rows=3)
    with pytest.raises(ValueError, match=r"^cache_batch_idx\[\d\] = 3; it must be < 3"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens,
                                cache_batch_idx=torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^k_cache holds 1 sequences; q has 2"):
        flash_attn_with_kvcache(q, k_cache[:1], v_cache[:1], cache_seqlens=lens)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_repeated_cache_row_with_append(backend):
    """Appending, two sequences on one cache row would write the same slots: one's new keys lost (racily on a
    GPU). A ValueError before anything is written (session 37 audit); without new keys a shared row is legal
    (two queries reading one cached sequence)."""
    q, k_cache, v_cache, lens, kw = _make(batch=3, capacity=16, seqlen_new=2, cache_rows=4)
    lens = torch.tensor([2, 5, 2], dtype=torch.int32)
    k0, v0 = k_cache.clone(), v_cache.clone()
    rows = torch.tensor([1, 3, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^cache_batch_idx holds 1 more than once; when k and v are appended"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, backend=backend,
                                **dict(kw, cache_batch_idx=rows))
    assert torch.equal(k_cache, k0) and torch.equal(v_cache, v0)
    q[2] = q[0]  # the same query against the same cached row: the same output
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, backend=backend, cache_batch_idx=rows)
    assert torch.isfinite(out).all() and torch.equal(out[0], out[2])
    assert torch.equal(k_cache, k0)


def test_value_checks_see_in_place_changes():
    """A page table that passed is re-read once it is modified in place (the version counter moves)."""
    q, k_cache, v_cache, lens, kw = _make(batch=2, capacity=16, page_size=4)
    table = kw["page_table"]
    flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, page_table=table, backend="reference")
    table[0, 0] = 1000
    full = torch.full_like(lens, 16)
    with pytest.raises(ValueError, match=r"^page_table\[0, 0\] = 1000"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=full, page_table=table, backend="reference")
    with pytest.raises(ValueError, match=r"^page_table\[0, 0\] = 1000"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=full, page_table=table, backend="reference")


def test_value_checks_under_inference_mode():
    """Tensors made under torch.inference_mode have no version counter: the value checks still run (every call),
    and a bad value is still caught before anything is written."""
    with torch.inference_mode():
        q, k_cache, v_cache, lens, kw = _make(batch=2, capacity=16, seqlen_new=1)
        out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, backend="reference", **kw)
        assert out.shape == q.shape
        before = k_cache.clone()
        bad = torch.tensor([3, 16], dtype=torch.int32)
        with pytest.raises(ValueError, match=r"^k: appending 1 keys after cache_seqlens\[1\] = 16"):
            flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=bad, backend="reference", **kw)
        assert torch.equal(k_cache, before)


def test_int_lengths_are_part_of_the_remembered_page_check():
    """A page table that passed with a short int cache_seqlens is checked again for a longer one (its unused,
    -1 entries become used): an error, and the cache untouched."""
    q, k_cache, v_cache, _, kw = _make(batch=2, capacity=16, page_size=4, seqlen_new=1)
    table = kw.pop("page_table").clone()
    table[:, 2:] = -1
    flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=2, page_table=table, backend="reference", **kw)
    before = k_cache.clone()
    with pytest.raises(ValueError, match=r"^page_table\[0, 2\] = -1 is out of range"):
        flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=10, page_table=table, backend="reference", **kw)
    assert torch.equal(k_cache, before)


def test_empty_query_appends_and_returns_empty():
    """Sq = 0: the new keys are still appended; out and lse are empty."""
    q, k_cache, v_cache, lens, kw = _make(batch=2, capacity=16, seqlen_new=2)
    q = q[:, :0]
    k_before = k_cache.clone()
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, return_lse=True,
                                       backend="reference", **kw)
    assert out.shape == (2, 0, 4, 32) and lse.shape == (2, 4, 0)
    for b in range(2):
        assert torch.equal(k_cache[b, lens[b]:lens[b] + 2], kw["k"][b])
        assert torch.equal(k_cache[b, :lens[b]], k_before[b, :lens[b]])


def test_unused_page_entries_may_hold_anything():
    """Serving systems leave the tail of a page-table row unset: only pages a sequence uses are checked."""
    q, k_cache, v_cache, _, kw = _make(batch=2, capacity=16, page_size=4)
    table = kw["page_table"].clone()
    table[:, 2:] = -1
    lens = torch.tensor([8, 5], dtype=torch.int32)
    flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, page_table=table, backend="reference")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_rotary_table_checked_for_a_full_cache(backend):
    """cache_seqlens=None (every sequence fills the cache) with an empty append: q rotates at the cache's end, so the
    rotary table must reach past it (before: unchecked; the kernel read past the table)."""
    q, k_cache, v_cache, _, kw = _make(batch=2, capacity=16, seqlen_new=1)
    cos, sin = _rotary_tables(8, 16)
    k0 = k_cache.clone()
    with pytest.raises(ValueError, match=r"^rotary_cos has 8 positions; positions up to 16 are needed"):
        flash_attn_with_kvcache(q, k_cache, v_cache, kw["k"][:, :0], kw["v"][:, :0], rotary_cos=cos,
                                rotary_sin=sin, backend=backend)
    assert torch.equal(k_cache, k0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_batch_or_query_with_a_long_cache(backend):
    """Sq = 0 or B = 0 with the split heuristic on a long cache (no programs to split: one split, no error)."""
    q, k_cache, v_cache, lens, kw = _make(batch=2, capacity=256, seqlen_new=1)
    out = flash_attn_with_kvcache(q[:, :0], k_cache, v_cache, cache_seqlens=lens, backend=backend, **kw)
    assert out.shape == (2, 0, 4, 32)
    out = flash_attn_with_kvcache(q[:0], k_cache[:0], v_cache[:0], cache_seqlens=lens[:0], backend=backend,
                                  k=kw["k"][:0], v=kw["v"][:0])
    assert out.shape == (0, 1, 4, 32)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("window", [(10**6, -1), (-1, 10**6), (48, 48)], ids=["left", "right", "both"])
def test_window_as_wide_as_the_cache_is_no_window(backend, window):
    """FlashAttention 2 turns a window side >= the cache's capacity into -1 before choosing how q rotates (at
    cache_seqlens + i when causal or local, else at cache_seqlens): such a window gives the no-window output."""
    q, k_cache, v_cache, lens, kw = _make(batch=2, capacity=48, seqlen_q=3, seqlen_new=3)
    cos, sin = _rotary_tables(64, 16)
    outs = []
    for w in ((-1, -1), window):
        kc, vc = k_cache.clone(), v_cache.clone()
        outs.append(flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, rotary_cos=cos, rotary_sin=sin,
                                           window_size=w, backend=backend, **kw))
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("make_out", [
    lambda: torch.empty(2, 2, 4, 32).as_strided((2, 1, 4, 32), (256, 32, 64, 1)),  # heads interleaved, disjoint
    lambda: torch.empty(0, 1, 1, 32).expand(0, 1, 4, 32),  # no elements: nothing can overlap
], ids=["interleaved-strides", "zero-size"])
def test_out_with_unusual_but_disjoint_strides_is_accepted(make_out):
    q, k_cache, v_cache, lens, kw = _make(batch=2, capacity=16)
    out = make_out()
    if out.shape[0] == 0:
        q, k_cache, v_cache, lens = q[:0], k_cache[:0], v_cache[:0], lens[:0]
    res = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, out=out, backend="reference")
    assert res is out
    if out.numel():
        want = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, backend="reference")
        torch.testing.assert_close(out, want, atol=0, rtol=0)


def test_inference_mode_caches_written_outside_it():
    """Caches (and out) made under torch.inference_mode, used outside it: the reference backend appends k and v
    and writes out (as the Triton kernels do), instead of failing after k landed and before v."""
    with torch.inference_mode():
        q, k_cache, v_cache, lens, kw = _make(batch=2, capacity=16, seqlen_new=1)
        out = torch.empty(2, 1, 4, 32)
    res = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, out=out, backend="reference", **kw)
    assert res is out
    for b in range(2):
        assert torch.equal(k_cache[b, lens[b]], kw["k"][b, 0]) and torch.equal(v_cache[b, lens[b]], kw["v"][b, 0])
    # Without out, the result (and lse) are normal tensors, usable in place and by autograd, as on the Triton path.
    res, lse = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, return_lse=True,
                                       backend="reference")
    assert not res.is_inference() and not lse.is_inference()
    res.mul_(2)


def test_append_skips_slots_past_the_cache_on_a_stale_verdict(monkeypatch):
    """The value checks remember a passing set by version counters, which a write through .data does not move. The
    append kernel then skips a slot outside its sequence's cache instead of writing into the next sequence's."""
    monkeypatch.setattr(inference, "_steps", {})
    q, k_cache, v_cache, lens, kw = _make(batch=2, capacity=8, seqlen_new=1, lens=[2, 3])
    flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, backend="triton", **kw)
    lens.data[0] = 8  # past the cache (the remembered verdict is not invalidated)
    row1 = k_cache[1].clone()
    flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, backend="triton",
                            k=2 * kw["k"], v=2 * kw["v"])
    assert torch.equal(k_cache[1, :3], row1[:3]) and torch.equal(k_cache[1, 3], 2 * kw["k"][1, 0])


# ---------------------------------------------------------------------------------------------------------------
# The decode kernel compiled for the H100 (sm_90) without a GPU: no spills, K/V loads pipelined through cp.async
# ---------------------------------------------------------------------------------------------------------------

def _sample_step(paged, splits, config):
    """A bf16 decode-suite Step (B 2, L 1024, Hq 32, Hkv 8, D 128) on CPU tensors, for ahead-of-time compiles;
    returns (step, attention launch arguments, merge launch arguments)."""
    from fa4.kernels.triton import decode
    batch, length, dt = 2, 1024, torch.bfloat16
    q = torch.zeros(batch, 1, 32, 128, dtype=dt)
    if paged:
        k_cache = torch.zeros(batch * length // paged, paged, 8, 128, dtype=dt)
        table = torch.zeros(batch, length // paged, dtype=torch.int32)
    else:
        k_cache, table = torch.zeros(batch, length, 8, 128, dtype=dt), None
    out, lens = torch.zeros_like(q), torch.zeros(batch, dtype=torch.int32)
    step = decode.Step(
        q, k_cache, k_cache, out, want_lse=False, k=None, v=None, cache_seqlens=lens, cache_batch_idx=None,
        page_table=table, rotary_cos=None, rotary_sin=None, rotary_interleaved=True, rotary_per_token=False,
        softmax_scale=0.1, window_left=-1, window_right=-1, softcap=0.0, sink=None, num_splits=splits,
        config=config)
    part = torch.zeros(step.ws_numel if splits > 1 else 16, dtype=torch.float32)
    attend = step.attend.args((q, k_cache, k_cache, out, None, part, part, None, lens, None, table, None, None, 0))
    merge = step.combine.args((part, part, out, None, None)) if step.combine is not None else None
    return step, attend, merge


def _compile_sm90(fn, args, constexprs, options, cc=90):
    """Compile a Triton kernel for sm_90 (or compute capability cc) with the runtime's own specialisation of `args`
    (pointer alignment and ints divisible by 16); returns (CompiledKernel, SASS text, cuobjdump -res-usage text)."""
    import os
    import subprocess
    import tempfile

    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget

    signature, attrs, all_constexprs = {}, {}, dict(constexprs)
    for i, (name, value) in enumerate(zip(fn.arg_names, args)):
        ty, attr = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = ty
        if ty == "constexpr":
            all_constexprs[name] = attr
        elif attr == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in constexprs})
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=all_constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return kernel, sass, res


def _in_subprocess(expr):
    """json of `expr` (over the test_inference module as t) evaluated in a fresh interpreter without
    TRITON_INTERPRET: the ahead-of-time compiles, torch imported once."""
    import json
    import os
    import subprocess
    import sys
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    code = f"import json, sys; sys.path[:0] = ['tests', '.']; import test_inference as t; print(json.dumps({expr}))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _aot_report(paged, block_n, num_warps, num_stages, splits, pdl=False):
    """Compile the decode kernel for sm_90 as a bf16 decode-suite launch would; returns resource counts.
    `pdl`: as a CUDA sm_90 device builds a split step, with the combine a programmatic dependent launch (the
    CPU tensors here turn it off in Step); the PTX's griddepcontrol instructions are counted, the combine's
    too."""
    import re

    from fa4.kernels.triton import combine, decode
    cfg = decode.Config(block_n, num_warps, num_stages)
    step, args, merge_args = _sample_step(paged, splits, cfg)
    kernel, sass, res = _compile_sm90(decode._decode_kernel, args, dict(step.attend.constexprs, PDL_PRIMARY=pdl),
                                      {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    report = dict(regs=int(re.search(r"REG:(\d+)", res).group(1)), local=int(re.search(r"LOCAL:(\d+)", res).group(1)),
                  ldgsts128=len(re.findall(r"LDGSTS\.E\.BYPASS\.128", sass)), smem=kernel.metadata.shared)
    if pdl:
        report["launch_dependents"] = kernel.asm["ptx"].count("griddepcontrol.launch_dependents")
        merge = step.combine
        m_kernel = _compile_sm90(combine._combine_kernel, merge_args, dict(merge.constexprs, PDL_WAIT=True),
                                 {"num_warps": merge.num_warps, "launch_pdl": True})[0]
        report["combine_waits"] = m_kernel.asm["ptx"].count("griddepcontrol.wait")
        report["combine_launch_pdl"] = bool(m_kernel.metadata.launch_pdl)
    return report


# (page size, splits, regime): contiguous split; paged 128 unsplit (one tile per page); paged 16 split (per-key
# page gather); contiguous unsplit. The config is the one default_config gives that regime on a CUDA device.
AOT_CASES = [(None, 16, "split"), (128, 1, "wide"), (16, 4, "split"), (None, 1, "wide")]


@pytest.fixture(scope="module")
def aot_reports():
    """All AOT cases compiled in one subprocess (without the interpreter), torch imported once."""
    return _in_subprocess(f"[t._aot_report(p, *t.decode_config_h100(r), s, pdl=s > 1) for p, s, r in {AOT_CASES!r}]")


@pytest.mark.parametrize("case", range(len(AOT_CASES)),
                         ids=["contiguous-split", "paged128-wide", "paged16-gather-split", "contiguous-wide"])
def test_decode_kernel_compiles_for_sm90(case, aot_reports):
    """(stages - 1) K and V tiles in flight (16-byte cp.async into shared memory), no local-memory spills, and
    the shared memory that lets two split programs share an SM (when a call asks for more splits than SMs)."""
    rep = aot_reports[case]
    block_n, _, stages = decode_config_h100(AOT_CASES[case][2])
    assert rep["local"] == 0, rep
    tile_bytes = block_n * 128 * 2
    assert rep["smem"] >= 2 * (stages - 1) * tile_bytes, rep
    assert rep["ldgsts128"] > 0, rep
    if AOT_CASES[case][2] == "split":
        assert 2 * (rep["smem"] + 1024) <= 228 * 1024, rep
    if AOT_CASES[case][1] > 1:
        # The split step as an sm_90 device builds it: the attention kernel lets the combine launch early
        # (griddepcontrol.launch_dependents), and the combine, a programmatic dependent launch, waits for it.
        assert rep["launch_dependents"] >= 1 and rep["combine_waits"] >= 1, rep
        assert rep["combine_launch_pdl"], rep


def _clustered(fn, *args):
    """fn(*args) with decode.cluster_size granting every split count (a CPU Step never clusters by itself)."""
    from fa4.kernels.triton import decode
    real = decode.cluster_size
    decode.cluster_size = lambda device, num_splits, head_dv: num_splits if num_splits > 1 else 0
    try:
        return fn(*args)
    finally:
        decode.cluster_size = real


def _aot_cluster_report(paged, splits):
    """The decode kernel compiled for sm_90 as a clustered split step launches it: its cluster barrier (PTX and
    SASS), spills, and whether every load of the merge comes after the barrier's wait and bypasses L1."""
    import re

    from fa4.kernels.triton import decode
    cfg = decode.Config(*decode_config_h100("split"))
    step, args, merge_args = _clustered(_sample_step, paged, splits, cfg)
    kernel, sass, res = _compile_sm90(decode._decode_kernel, args, step.attend.constexprs,
                                      {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    lines = sass.splitlines()
    wait = [i for i, line in enumerate(lines) if "UCGABAR_WAIT" in line]
    arrive = [i for i, line in enumerate(lines) if "UCGABAR_ARV" in line]
    after = [line for line in lines[wait[-1]:] if re.search(r"\bLDG\b", line)] if wait else []
    return dict(local=int(re.search(r"LOCAL:(\d+)", res).group(1)),
                ptx_arrive=kernel.asm["ptx"].count("barrier.cluster.arrive.release"),
                ptx_wait=kernel.asm["ptx"].count("barrier.cluster.wait.acquire"),
                sass_arrive=len(arrive), sass_wait=len(wait),
                loads_after=len(after), loads_after_l1=sum(".STRONG.GPU" not in line for line in after),
                membar_before=bool(arrive) and any("MEMBAR" in line
                                                   for line in lines[max(0, arrive[0] - 24):arrive[0]]),
                combine=merge_args is not None, grid=list(step.attend.grid), cluster=step.attend.cluster,
                constexprs={k: step.attend.constexprs[k] for k in ("CLUSTER", "BLOCK_SPLITS", "MERGE_COLS")})


@pytest.mark.parametrize("paged,splits", [(128, 2), (None, 5), (16, 8)])
def test_clustered_decode_kernel_compiles_for_sm90(paged, splits):
    """A split step merged in a cluster: one cluster-wide barrier (release before, acquire after, a GPU-scope
    MEMBAR so the partial stores are visible), the merge's loads all after its wait and from L2 (.cg), no spills,
    no combine launch, and clusters of `splits` consecutive CTAs along grid axis 0."""
    rep = _in_subprocess(f"t._aot_cluster_report({paged!r}, {splits})")
    assert rep["local"] == 0, rep
    assert rep["ptx_arrive"] == rep["ptx_wait"] == 1 and rep["sass_arrive"] == rep["sass_wait"] == 1, rep
    assert rep["membar_before"], rep
    assert rep["loads_after"] >= 2 and rep["loads_after_l1"] == 0, rep
    assert not rep["combine"] and rep["cluster"] == splits, rep
    assert rep["grid"] == [2 * 8 * splits, 1, 1], rep  # _sample_step: B 2, Hkv 8, one row block
    cx = rep["constexprs"]
    assert cx["CLUSTER"] == splits and cx["BLOCK_SPLITS"] >= splits
    # The first 2^floor(log2 splits) CTAs cover all 128 columns.
    assert cx["MERGE_COLS"] * (1 << (splits.bit_length() - 1)) == 128


def test_decode_switches_are_in_the_step_key(monkeypatch):
    """Flipping one of decode.py's A/B switches (CLUSTER_MERGE, PDL, TILE_BASE, MAX_CLUSTER, STRIDED_*) between two
    calls of one signature builds a new Step rather than replaying the launches the old setting built."""
    from fa4.kernels.triton import decode
    q, k_cache, v_cache, lens, kw = _make(batch=2, capacity=64, seqlen_new=0)
    inference._steps.clear()
    inference.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
    assert len(inference._steps) == 1
    inference.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
    assert len(inference._steps) == 1
    for name, value in (("CLUSTER_MERGE", not decode.CLUSTER_MERGE), ("PDL", not decode.PDL),
                        ("TILE_BASE", not decode.TILE_BASE), ("MAX_CLUSTER", 4),
                        ("STRIDED_PAGED", not decode.STRIDED_PAGED),
                        ("STRIDED_CONTIGUOUS", not decode.STRIDED_CONTIGUOUS)):
        before = len(inference._steps)
        with monkeypatch.context() as m:
            m.setattr(decode, name, value)
            inference.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens)
        assert len(inference._steps) == before + 1, name
    inference._steps.clear()


def test_cluster_size_rule(monkeypatch):
    """Which split steps merge in a cluster: CUDA sm_90+ only, 2 to MAX_CLUSTER (8) splits, >= 4 merged columns a
    CTA, the switch on; everything else (CPU, sm_80, one split, 16 splits) keeps the combine."""
    from fa4.kernels.triton import decode
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert [decode.cluster_size(cuda, n, 128) for n in (1, 2, 3, 5, 8, 9, 16)] == [0, 2, 3, 5, 8, 0, 0]
    assert decode.cluster_size(cpu, 4, 128) == 0
    assert decode.cluster_size(cuda, 8, 32) == 8 and decode.cluster_size(cuda, 8, 16) == 0  # 16 / 8 = 2 columns
    monkeypatch.setattr(decode, "CLUSTER_MERGE", False)
    assert decode.cluster_size(cuda, 4, 128) == 0
    monkeypatch.setattr(decode, "CLUSTER_MERGE", True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert decode.cluster_size(cuda, 4, 128) == 0


def _config_on(smem_optin, *args, **kwargs):
    """decode.default_config on a CUDA device (index 0) whose blocks may opt in to smem_optin bytes."""
    from fa4.kernels.triton import decode
    saved = decode._SMEM_OPTIN.get(0)
    decode._SMEM_OPTIN[0] = smem_optin
    try:
        return decode.default_config(torch.device("cuda", 0), *args, **kwargs)
    finally:
        if saved is None:
            decode._SMEM_OPTIN.pop(0)
        else:
            decode._SMEM_OPTIN[0] = saved


def decode_config_h100(regime):
    """The bf16, D = 128 config that decode.default_config gives on an H100 ("split" or "wide")."""
    return tuple(_config_on(232448, torch.bfloat16, 128, 128, wide=regime == "wide"))


@pytest.mark.parametrize("smem_optin", [101376, 166912, 232448], ids=["sm86-89-120", "sm80", "sm90-100"])
def test_decode_configs_fit_shared_memory(smem_optin):
    """Every decode tile fits the device's shared memory: the wide D = 128 tile (136 KiB) would not launch on a
    ~99 KiB consumer part (RTX 30 / 40 / 50), where it gives way to the split tile (session 37: found compiling
    the decode kernel for sm_120). H100-class devices keep the wide tile."""
    from fa4.kernels.triton import decode
    for dtype in (torch.bfloat16, torch.float32):
        for d, dv in ((64, 64), (128, 128), (256, 256), (192, 128), (96, 96)):
            for wide in (False, True):
                for page_size in (0, 16, 128, 256):
                    cfg = _config_on(smem_optin, dtype, d, dv, wide=wide, page_size=page_size)
                    elem = 4 if dtype == torch.float32 else 2
                    assert decode.shared_bytes(cfg, d, dv, elem) <= smem_optin, (dtype, d, wide, page_size, cfg)
    wide = _config_on(smem_optin, torch.bfloat16, 128, 128, wide=True)
    assert tuple(wide) == ((128, 4, 3) if smem_optin > 139264 else tuple(decode._CUDA_SPLIT[128]))


def test_decode_shared_bytes_bounds_the_compiled_kernels():
    """decode.shared_bytes is an upper bound of what the compiled kernels take, for sm_90 and for a consumer
    Blackwell part (sm_120), split and wide D = 128 tiles."""
    got = _in_subprocess("[t._decode_smem(cc, r) for cc in (90, 120) for r in ('split', 'wide')]")
    for smem, bound in got:
        assert smem <= bound < smem + 4096, (smem, bound)


def _decode_smem(cc, regime):
    """(compiled shared memory, decode.shared_bytes) of the bf16 D = 128 decode kernel for compute capability cc."""
    from fa4.kernels.triton import decode
    cfg = decode.Config(*decode_config_h100(regime))
    step, args, _ = _sample_step(False, 16 if regime == "split" else 1, cfg)
    kernel = _compile_sm90(decode._decode_kernel, args, step.attend.constexprs,
                           {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}, cc=cc)[0]
    return kernel.metadata.shared, decode.shared_bytes(cfg, 128, 128)


def test_tile_offsets_fall_back_to_64_bit_for_huge_row_strides():
    """TILE_BASE's 32-bit in-tile offsets are used only where (rows - 1) x row stride + head dim fits in int32;
    a cache with a larger row stride keeps the 64-bit per-key addressing."""
    from fa4.kernels.triton import decode
    assert decode.tile_offsets_fit_int32(128, (8 * 128, 8 * 128), (128, 128))
    assert decode.tile_offsets_fit_int32(128, (1 << 24, 8 * 128), (128, 128))  # 127 * 2^24 + 128 < 2^31
    assert not decode.tile_offsets_fit_int32(128, (1 << 25, 8 * 128), (128, 128))
    assert not decode.tile_offsets_fit_int32(64, (8 * 128, (1 << 31) // 63), (128, 128))
    assert decode.tile_offsets_fit_int32(1, (1 << 40, 1 << 40), (128, 128))  # one row: no stride term


# ---------------------------------------------------------------------------------------------------------------
# The "splitkv" forward backend (dispatch.splitkv_wanted routes short query sequences there on Hopper)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window,softcap,sink,dv", [
    ((-1, 0), 0.0, False, 32),    # causal: aligned to the end of the keys
    ((-1, -1), 0.0, True, 32),    # no mask, sink
    ((40, 0), 20.0, False, 16),   # sliding window, softcap, Dv != D
    ((10, 5), 0.0, True, 32),     # window on both sides (the last queries see keys past their own position)
])
def test_forward_splitkv_is_the_forward_contract(window, softcap, sink, dv):
    """inference.forward_splitkv (the split-KV decode kernels under the interpreter) returns the forward
    contract's (out, lse) for batched calls: compared with fa4.reference.forward in fp32."""
    from fa4 import reference
    torch.manual_seed(7)
    b, sq, sk, hq, hkv, d = 2, 3, 150, 8, 2, 32
    q, k, v = torch.randn(b, sq, hq, d), torch.randn(b, sk, hkv, d), torch.randn(b, sk, hkv, dv)
    s = torch.randn(hq) if sink else None
    opts = dict(softmax_scale=0.2, window_left=window[0], window_right=window[1], softcap=softcap, sink=s)
    out, lse = inference.forward_splitkv(q, k, v, **opts)
    ref_out, ref_lse = reference.forward(q, k, v, **opts)
    assert lse.shape == (b, hq, sq) and lse.is_contiguous()
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_forward_splitkv_declines_varlen_and_paged():
    q = torch.randn(4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="batched calls only"):
        inference.forward_splitkv(q, q, q, softmax_scale=0.3, window_left=-1, window_right=-1, softcap=0.0,
                                  sink=None, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=4, max_seqlen_k=4)
