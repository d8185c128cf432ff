"""Backend choice: explicit backends raise when they cannot serve; backend=None falls back with a reason."""
import logging

import pytest
import torch

import fa4
from fa4 import dispatch


def _qkv(device="cpu"):
    return [torch.randn(1, 8, 2, 16, device=device) for _ in range(3)]


def test_cpu_uses_reference_even_under_the_interpreter():
    assert dispatch.choose(*_qkv(), None) == ("reference", "reference")


def test_explicit_backends():
    q, k, v = _qkv()
    assert dispatch.choose(q, k, v, "reference") == ("reference", "reference")
    with pytest.raises(ValueError, match="backend='sm90' cannot serve this call"):
        dispatch.choose(q, k, v, "sm90")


def test_resolve_auto_falls_back_with_a_reason(caplog):
    q, k, v = _qkv()
    with caplog.at_level(logging.DEBUG, logger="fa4"):
        assert dispatch.resolve_auto(q, k, v, max_seqlen_q=8) == "triton"
    assert "sm90 path not used" in caplog.text


def test_meta_tensors_are_rejected_with_the_device_named():
    with pytest.raises(ValueError, match="q is on meta"):
        fa4.flash_attn_func(*_qkv("meta"))


def test_resolve_auto_backward_falls_back_with_a_reason(caplog, monkeypatch):
    q, k, v = _qkv()
    with caplog.at_level(logging.DEBUG, logger="fa4"):
        assert dispatch.resolve_auto_backward(q, k, v) == "triton"
    assert "sm90 backward not used" in caplog.text
    monkeypatch.setenv("FA4_SM90_BWD", "0")
    assert dispatch.resolve_auto_backward(q, k, v) == "triton"


def test_splitkv_wanted_for_few_query_tokens_against_long_keys():
    """dispatch.splitkv_wanted: the sm90 forward's units (GQA packing counted) under half the SMs, at least
    SPLITKV_MIN_KEYS keys, at most SPLITKV_MAX_ROWS query rows per kv head; batched calls only."""
    def wanted(b, sq, sk, hq, hkv, d=128, sms=132, **kw):
        q = torch.empty(b, sq, hq, d, device="meta")
        k = torch.empty(b, sk, hkv, d, device="meta")
        return dispatch.splitkv_wanted(q, k, k, num_sms=sms, **kw)

    assert wanted(1, 1, 8192, 32, 8)             # 8 units (one per kv head, the group packed)
    assert wanted(4, 16, 8192, 32, 8)            # 32 units
    assert wanted(1, 64, 32768, 32, 8)           # 8 kv heads x 2 tiles of 32 tokens
    assert wanted(8, 1, 8192, 32, 8)             # 64 units: at the bound
    assert not wanted(9, 1, 8192, 32, 8)         # 72 units
    assert not wanted(4, 128, 8192, 32, 8)       # 128 units: the sm90 forward fills the GPU (measured faster)
    assert not wanted(4, 16, 8192, 32, 32)       # MHA: 128 units
    assert not wanted(1, 1, 2047, 32, 8)         # too few keys to split
    assert not wanted(1, 65, 32768, 32, 8)       # 260 query rows for one kv head
    assert wanted(1, 16, 4096, 16, 2, d=64) and wanted(1, 16, 4096, 8, 8, d=256)
    cu = torch.zeros(2, dtype=torch.int32)
    assert not wanted(1, 1, 8192, 32, 8, cu_seqlens_q=cu)
    assert not wanted(1, 1, 8192, 32, 8, seqused_k=cu)


def test_splitkv_wanted_beside_the_triton_forward():
    """path="triton": the portable forward's tiles are mostly empty at these row counts whatever the grid, so
    only the key length and the rows per kv head decide."""
    def wanted(b, sq, sk, hq, hkv):
        q = torch.empty(b, sq, hq, 128, device="meta")
        k = torch.empty(b, sk, hkv, 128, device="meta")
        return dispatch.splitkv_wanted(q, k, k, num_sms=132, path="triton")

    assert wanted(1, 1, 8192, 32, 8) and wanted(64, 1, 8192, 32, 8) and wanted(4, 16, 8192, 32, 8)
    assert wanted(1, 64, 32768, 32, 8)
    assert not wanted(4, 128, 8192, 32, 8)  # 512 rows per kv head: the portable forward was 1.3x faster
    assert not wanted(1, 1, 1024, 32, 8)


def test_a_cached_sm90_plan_does_not_take_a_splitkv_call(monkeypatch):
    """backend=None first looks for an sm90 launch plan of the same signature (left by any earlier sm90 call,
    backend="sm90" included); a call that splitkv_wanted routes elsewhere must not be served by it."""
    import sys
    import types
    served = []
    fake = types.SimpleNamespace(planned_forward=lambda *a, **kw: served.append(1) or ("out", "lse"))
    monkeypatch.setitem(sys.modules, "fa4.kernels.sm90.attention_fwd", fake)
    monkeypatch.setattr(dispatch, "_num_sms", lambda device: 132)
    monkeypatch.delenv("FA4_SM90", raising=False)
    opts = dict(max_seqlen_q=None, window_left=-1, window_right=0, softmax_scale=0.1, softcap=0.0, sink=None,
                cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, max_seqlen_k=None)
    short_q = torch.empty(1, 1, 32, 128, device="meta")
    long_kv = torch.empty(1, 8192, 8, 128, device="meta")
    assert dispatch.planned_sm90_forward(short_q, long_kv, long_kv, **opts) is None and not served
    monkeypatch.setenv("FA4_SPLITKV", "0")
    assert dispatch.planned_sm90_forward(short_q, long_kv, long_kv, **opts) == ("out", "lse")
    monkeypatch.delenv("FA4_SPLITKV")
    train_q = torch.empty(1, 4096, 32, 128, device="meta")
    assert dispatch.planned_sm90_forward(train_q, long_kv, long_kv, **opts) == ("out", "lse")


def test_splitkv_route_is_remembered_per_signature(monkeypatch):
    """resolve_auto's "splitkv" answers are cached by everything they depend on (shapes, strides, dtypes,
    alignment, window, softcap, sink, the FA4_SM90 / FA4_SPLITKV switches); batched calls only."""
    monkeypatch.setattr(dispatch, "_SPLITKV_ROUTES", {})
    feats = dict(window_left=-1, window_right=0, softcap=0.0, sink=None, cu_seqlens_q=None, page_table=None,
                 seqused_k=None)
    q = torch.zeros(1, 1, 32, 128)
    k = torch.zeros(1, 8192, 8, 128)
    assert not dispatch.routed_splitkv(q, k, k, **feats)
    dispatch._remember_splitkv(q, k, k, feats)
    assert dispatch.routed_splitkv(q, k, k, **feats)
    assert dispatch.routed_splitkv(torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(k), **feats)
    assert not dispatch.routed_splitkv(q, k, k, **dict(feats, window_right=-1))
    assert not dispatch.routed_splitkv(q, k, k, **dict(feats, softcap=5.0))
    assert not dispatch.routed_splitkv(q, k, k, **dict(feats, sink=torch.zeros(32)))
    assert not dispatch.routed_splitkv(q.to(torch.float16), k.to(torch.float16), k.to(torch.float16), **feats)
    assert not dispatch.routed_splitkv(torch.zeros(1, 2, 32, 128), k, k, **feats)
    assert not dispatch.routed_splitkv(q, k[:, :4096], k[:, :4096], **feats)  # strides kept, shape differs
    assert not dispatch.routed_splitkv(q, k, k, **dict(feats, seqused_k=torch.zeros(1, dtype=torch.int32)))
    unaligned = torch.zeros(q.numel() + 1)[1:].view(q.shape)
    assert not dispatch.routed_splitkv(unaligned, k, k, **feats)
    monkeypatch.setenv("FA4_SPLITKV", "0")
    assert not dispatch.routed_splitkv(q, k, k, **feats)


def test_triton_older_than_its_kernels_need_is_a_reason(monkeypatch):
    """The portable kernels need Triton's tensor descriptors (3.4+): an older Triton is a reason, so an explicit
    backend='triton' raises a ValueError saying so (it crashed on an import inside the kernels before)."""
    import triton
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    monkeypatch.setattr(dispatch, "_TOO_OLD", {})
    q = torch.randn(1, 8, 2, 16)
    assert "older than 3.4" in dispatch.triton_reason(q)
    with pytest.raises(ValueError, match=r"backend='triton' cannot serve this call: triton 3.2.0 is older than 3.4"):
        dispatch.choose(q, q, q, "triton")
    monkeypatch.setattr(triton, "__version__", "3.6.0+git1234")
    monkeypatch.setattr(dispatch, "_TOO_OLD", {})
    assert dispatch._triton_too_old() is None


class _FakeCuda:
    """Just enough of a CUDA tensor for the dispatch rules (no GPU needed)."""

    def __init__(self, shape, requires_grad=False, dtype=torch.bfloat16):
        self.shape, self.dtype, self.device, self.requires_grad = torch.Size(shape), dtype, torch.device("cuda", 0), \
            requires_grad
        strides, acc = [], 1
        for size in reversed(shape):
            strides.append(acc)
            acc *= size
        self._strides = tuple(reversed(strides))

    def stride(self, i=None):
        return self._strides if i is None else self._strides[i]

    def dim(self):
        return len(self.shape)

    def data_ptr(self):
        return 1 << 20

    def element_size(self):
        return 2

    def numel(self):
        n = 1
        for size in self.shape:
            n *= size
        return n


def test_explicit_sm90_raises_when_its_backward_cannot_serve(monkeypatch, caplog):
    """backend='sm90' whose gradients the sm90 backward has no tile for (D = 192, Dv = 128): the backward raises when
    it runs (DESIGN: an explicit backend that cannot serve raises), the forward is served either way (a forward-only
    call never raises), and backend=None logs the sm90 forward and the Triton backward. A simulated sm_90 device."""
    from fa4.kernels import sm90
    monkeypatch.setitem(dispatch._CAPABILITY_REASONS, 0, None)
    monkeypatch.setattr(sm90, "_capability", lambda index: (9, 0))
    sm90._triton_reason.cache_clear()
    feat = dict(window_left=-1, window_right=-1, softcap=0.0, sink=None, cu_seqlens_q=None, page_table=None,
                seqused_k=None)
    try:
        for grad in (False, True):
            q, k = _FakeCuda((2, 1024, 8, 192), grad), _FakeCuda((2, 1024, 8, 192), grad)
            v = _FakeCuda((2, 1024, 8, 128), grad)
            assert dispatch.choose(q, k, v, "sm90", **feat) == ("sm90", dispatch.EXPLICIT_SM90)
        bwd_feat = {key: val for key, val in feat.items() if key != "page_table"}
        with pytest.raises(ValueError, match=r"backend='sm90' cannot serve the backward of this call: no "
                                             r"sm90 backward tile for head dims \(192, 128\)"):
            dispatch.explicit_sm90_backward(q, k, v, **bwd_feat)
        square = [_FakeCuda((2, 1024, 8, 128), True) for _ in range(3)]
        assert dispatch.explicit_sm90_backward(*square, **bwd_feat) == "sm90-checked"
        with caplog.at_level(logging.DEBUG, logger="fa4"):
            assert dispatch.choose(q, k, v, None, **feat) == ("auto", "auto")
            assert dispatch.resolve_auto(q, k, v, max_seqlen_q=1024, **feat) == "sm90"
            assert dispatch.resolve_auto_backward(q, k, v, **feat) == "triton"
        assert "fa4: sm90 forward" in caplog.text and "sm90 backward not used" in caplog.text
    finally:
        sm90._triton_reason.cache_clear()
