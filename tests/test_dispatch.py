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
