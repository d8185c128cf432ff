"""Bad input: each raises ValueError/TypeError naming the argument, before anything is computed."""
import re

import pytest
import torch

import fa4


def _qkv(b=2, s=16, hq=4, hkv=2, d=16, dtype=torch.float32):
    return (torch.randn(b, s, hq, d, dtype=dtype), torch.randn(b, s, hkv, d, dtype=dtype),
            torch.randn(b, s, hkv, d, dtype=dtype))


def _varlen(total=20, hq=4, hkv=2, d=16):
    q = torch.randn(total, hq, d)
    k = torch.randn(total, hkv, d)
    v = torch.randn(total, hkv, d)
    cu = torch.tensor([0, 8, 20], dtype=torch.int32)
    return q, k, v, cu


def _raises(exc, pattern, fn, *args, **kwargs):
    with pytest.raises(exc, match=pattern):
        fn(*args, **kwargs)


BATCHED_CASES = [
    # (description, mutate(q, k, v, kwargs) -> (q, k, v, kwargs), exception, regex naming the argument)
    ("q not a tensor", lambda q, k, v, kw: (q.tolist(), k, v, kw), TypeError, r"^q must be a torch\.Tensor"),
    ("mixed devices", lambda q, k, v, kw: (q, k.to("meta"), v, kw), ValueError, r"^k is on meta.*q's device"),
    ("dtype mismatch", lambda q, k, v, kw: (q, k, v.double(), kw), TypeError, r"^v has dtype torch\.float64"),
    ("unsupported dtype", lambda q, k, v, kw: (q.double(), k.double(), v.double(), kw), TypeError,
     r"^q has dtype torch\.float64; expected"),
    ("heads don't divide", lambda q, k, v, kw: (q[:, :, :3], k, v, kw), ValueError,
     r"^k has 2 heads; it must divide q's 3 heads"),
    ("head dim not multiple of 8", lambda q, k, v, kw: (q[..., :12], k[..., :12], v, kw), ValueError,
     r"^q has head dim 12; expected a multiple of 8"),
    ("head dim too large", lambda q, k, v, kw: (q, k, torch.randn(2, 16, 2, 264), kw), ValueError,
     r"^v has head dim 264"),
    ("qk head dims differ", lambda q, k, v, kw: (q, k[..., :8], v, kw), ValueError,
     r"^k has head dim 8; it must equal q's head dim 16"),
    ("wrong rank", lambda q, k, v, kw: (q[0], k, v, kw), ValueError, r"^q must have 4 dimensions"),
    ("batch mismatch", lambda q, k, v, kw: (q, k[:1], v[:1], kw), ValueError, r"^k has batch size 1"),
    ("k/v length mismatch", lambda q, k, v, kw: (q, k, v[:, :8], kw), ValueError, r"^v has shape"),
    ("window below -1", lambda q, k, v, kw: (q, k, v, dict(kw, window_size=(-2, 0))), ValueError,
     r"^window_size left must be >= -1"),
    ("window not a pair", lambda q, k, v, kw: (q, k, v, dict(kw, window_size=5)), ValueError,
     r"^window_size must be a pair"),
    ("negative softcap", lambda q, k, v, kw: (q, k, v, dict(kw, softcap=-1.0)), ValueError,
     r"^softcap must be >= 0"),
    ("sink wrong shape", lambda q, k, v, kw: (q, k, v, dict(kw, learnable_sink=torch.zeros(2))), ValueError,
     r"^learnable_sink must have shape \(4,\)"),
    ("sink wrong dtype", lambda q, k, v, kw: (q, k, v, dict(kw, learnable_sink=torch.zeros(4).half())),
     TypeError, r"^learnable_sink must be torch\.float32"),
    ("unknown backend", lambda q, k, v, kw: (q, k, v, dict(kw, backend="cuda")), ValueError, r"^backend must be"),
    ("causal not bool", lambda q, k, v, kw: (q, k, v, dict(kw, causal="yes")), TypeError, r"^causal must be"),
    ("scale not a number", lambda q, k, v, kw: (q, k, v, dict(kw, softmax_scale="0.1")), TypeError,
     r"^softmax_scale must be"),
]


@pytest.mark.parametrize("desc,mutate,exc,pattern", BATCHED_CASES, ids=[c[0] for c in BATCHED_CASES])
def test_flash_attn_func_bad_input(desc, mutate, exc, pattern):
    q, k, v = _qkv()
    q, k, v, kw = mutate(q, k, v, {})
    _raises(exc, pattern, fa4.flash_attn_func, q, k, v, **kw)


def _cu(vals):
    return torch.tensor(vals, dtype=torch.int32)


VARLEN_CASES = [
    ("cu_seqlens not int32", dict(cu_seqlens_q=torch.tensor([0, 8, 20])), TypeError,
     r"^cu_seqlens_q must be torch\.int32"),
    ("cu_seqlens_k wrong length", dict(cu_seqlens_k=_cu([0, 20])), ValueError,
     r"^cu_seqlens_k must have shape \(3,\)"),
    ("cu_seqlens decreasing", dict(cu_seqlens_q=_cu([0, 12, 8])), ValueError,
     r"^cu_seqlens_q must be non-decreasing"),
    ("cu_seqlens past the tensor", dict(cu_seqlens_k=_cu([0, 8, 21]), max_seqlen_k=13), ValueError,
     r"^cu_seqlens_k\[-1\] = 21 exceeds"),
    ("max_seqlen too small", dict(max_seqlen_q=10), ValueError,
     r"^max_seqlen_q = 10 is smaller than the longest sequence"),
    ("max_seqlen not int", dict(max_seqlen_k=12.0), TypeError, r"^max_seqlen_k must be an int"),
    ("seqused_k too long", dict(seqused_k=_cu([9, 3])), ValueError, r"^seqused_k\[0\] = 9"),
    ("seqused_k wrong shape", dict(seqused_k=_cu([1, 2, 3])), ValueError, r"^seqused_k must have shape \(2,\)"),
    # Strided index vectors: the kernels read consecutive entries (an audit found Triton reading the wrong ones).
    ("cu_seqlens strided", dict(cu_seqlens_q=_cu([0, 0, 8, 8, 20, 20])[::2]), ValueError,
     r"^cu_seqlens_q must be contiguous \(stride 1\); got stride 2"),
    ("seqused_k strided", dict(seqused_k=_cu([3, 0, 4, 0])[::2]), ValueError,
     r"^seqused_k must be contiguous \(stride 1\); got stride 2"),
]


@pytest.mark.parametrize("desc,over,exc,pattern", VARLEN_CASES, ids=[c[0] for c in VARLEN_CASES])
def test_flash_attn_varlen_func_bad_input(desc, over, exc, pattern):
    q, k, v, cu = _varlen()
    kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=12, max_seqlen_k=12)
    kw.update(over)
    _raises(exc, pattern, fa4.flash_attn_varlen_func, q, k, v, **kw)


def test_varlen_page_table_out_of_range():
    q = torch.randn(5, 4, 16)
    k_cache = torch.randn(3, 4, 2, 16)
    table = _cu([[0, 1], [2, 3]])
    _raises(ValueError, r"^page_table\[1, 1\] = 3 is out of range: k has 3 pages", fa4.flash_attn_varlen_func, q,
            k_cache, k_cache, _cu([0, 2, 5]), None, 3, 8, seqused_k=_cu([8, 8]), page_table=table)
    # Entries past a sequence's last page are never read: padding them (-1, as serving stacks do) is fine, and
    # an entry the sequence does read is still checked.
    padded = _cu([[0, -1], [2, 1]])
    out = fa4.flash_attn_varlen_func(q, k_cache, k_cache, _cu([0, 2, 5]), None, 3, 8, seqused_k=_cu([4, 8]),
                                     page_table=padded)
    assert out.shape == (5, 4, 16)
    _raises(ValueError, r"^page_table\[0, 1\] = -1 is out of range", fa4.flash_attn_varlen_func, q, k_cache,
            k_cache, _cu([0, 2, 5]), None, 3, 8, seqused_k=_cu([5, 8]), page_table=padded)


def test_varlen_page_table_layout_and_page_size():
    """A page table whose last dimension is strided (a transposed table) and a pool of empty pages are errors
    naming the argument; rows of a wider table (stride(0) > columns) are fine."""
    q = torch.randn(5, 4, 16)
    k_cache = torch.randn(4, 4, 2, 16)
    _raises(ValueError, r"^page_table's last dimension must be contiguous \(stride 1\); got stride 2",
            fa4.flash_attn_varlen_func, q, k_cache, k_cache, _cu([0, 2, 5]), None, 3, 8, seqused_k=_cu([8, 8]),
            page_table=_cu([[0, 2], [1, 3]]).t())
    wide = _cu([[0, 1, 9], [2, 3, 9]])[:, :2]
    out = fa4.flash_attn_varlen_func(q, k_cache, k_cache, _cu([0, 2, 5]), None, 3, 8, seqused_k=_cu([8, 8]),
                                     page_table=wide)
    want = fa4.flash_attn_varlen_func(q, k_cache, k_cache, _cu([0, 2, 5]), None, 3, 8, seqused_k=_cu([8, 8]),
                                      page_table=wide.contiguous())
    assert torch.equal(out, want)
    empty = torch.randn(4, 0, 2, 16)
    _raises(ValueError, r"^k has page size 0; a paged cache", fa4.flash_attn_varlen_func, q, empty, empty,
            _cu([0, 2, 5]), None, 3, 0, seqused_k=_cu([0, 0]), page_table=_cu([[0], [1]]))


def test_flag_type_error_names_the_foreign_type():
    np = pytest.importorskip("numpy")
    q, k, v = _qkv()
    _raises(TypeError, r"^causal must be a bool; got numpy\.bool", fa4.flash_attn_func, q, k, v,
            causal=np.bool_(True))


def test_varlen_paged_key_counts_from_cu_seqlens_k():
    """Without seqused_k a paged call takes cu_seqlens_k's differences as the key counts (FlashAttention's
    reading); more keys than a page-table row holds is an error naming cu_seqlens_k."""
    torch.manual_seed(0)
    q = torch.randn(5, 2, 16)
    k_cache, v_cache = torch.randn(8, 4, 2, 16), torch.randn(8, 4, 2, 16)
    table = _cu([[0, 1, 2], [3, 4, 5]])
    by_cu = fa4.flash_attn_varlen_func(q, k_cache, v_cache, _cu([0, 2, 5]), _cu([0, 5, 14]), 3, 9, page_table=table)
    by_used = fa4.flash_attn_varlen_func(q, k_cache, v_cache, _cu([0, 2, 5]), None, 3, 9, seqused_k=_cu([5, 9]),
                                         page_table=table)
    assert torch.equal(by_cu, by_used)
    full = fa4.flash_attn_varlen_func(q, k_cache, v_cache, _cu([0, 2, 5]), None, 3, 12, seqused_k=_cu([12, 12]),
                                      page_table=table)
    assert not torch.allclose(by_cu, full)
    _raises(ValueError, r"^cu_seqlens_k gives sequence 1 14 keys; its page_table row holds 12",
            fa4.flash_attn_varlen_func, q, k_cache, v_cache, _cu([0, 2, 5]), _cu([0, 5, 19]), 3, 14,
            page_table=table)


def test_explicit_backend_that_cannot_serve_raises(monkeypatch):
    from fa4 import dispatch
    monkeypatch.setattr(dispatch, "_interpreting", lambda: False)
    _raises(ValueError, r"^backend='triton' cannot serve this call: CPU tensors need TRITON_INTERPRET=1",
            fa4.flash_attn_func, *_qkv(), backend="triton")
    _raises(ValueError, r"^backend='sm90' cannot serve this call: the sm90 backend needs a CUDA device",
            fa4.flash_attn_func, *_qkv(), backend="sm90")


def test_errors_leave_inputs_untouched():
    q, k, v = _qkv()
    before = [t.clone() for t in (q, k, v)]
    with pytest.raises(ValueError):
        fa4.flash_attn_func(q, k, v, window_size=(-3, 0))
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v)))


def test_error_messages_name_expected_and_received():
    q, k, v = _qkv()
    with pytest.raises(ValueError) as info:
        fa4.flash_attn_func(q, k[:, :, :1].expand(2, 16, 3, 16), v[:, :, :1].expand(2, 16, 3, 16))
    msg = str(info.value)
    assert re.search(r"k has 3 heads", msg) and "4 heads" in msg


def test_varlen_value_checks_are_remembered_until_a_tensor_changes(monkeypatch):
    """The host read of cu_seqlens / seqused_k / page_table runs once per argument set: again for an in-place
    change (which is then caught), for another tensor, and on every call for inference-mode tensors."""
    from fa4 import checks
    reads = []
    real = checks._check_varlen_values
    monkeypatch.setattr(checks, "_check_varlen_values", lambda *a: (reads.append(1), real(*a)))
    q = torch.randn(12, 4, 16)
    k = v = torch.randn(12, 2, 16)
    cu = _cu([0, 5, 12])
    for _ in range(3):
        fa4.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7)
    assert len(reads) == 1
    cu[1] = 6  # in place: the version counter moves, the values are read again
    fa4.flash_attn_varlen_func(q, k, v, cu, cu, 7, 7)
    assert len(reads) == 2
    cu[1] = 13
    _raises(ValueError, r"^cu_seqlens_q must be non-decreasing", fa4.flash_attn_varlen_func, q, k, v, cu, cu, 13, 13)
    with torch.inference_mode():
        cu_inf = _cu([0, 5, 12])
        for _ in range(2):
            fa4.flash_attn_varlen_func(q, k, v, cu_inf, cu_inf, 7, 7)
    assert len(reads) == 5
