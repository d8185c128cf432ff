"""The key of the sm90 backward's Replay (fa4.kernels.sm90.backward_fast.signature), on the CPU: a replayed call must
have made every decision of the full path the same way, so the key changes with anything those decisions read
(metadata, options, switches, a replaced function) and with nothing else (the tensors' addresses, at equal
alignment). The replay itself runs on the GPU: tests/gpu/test_sm90_backward_replay.py."""
import os

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

from fa4 import dispatch, ops  # noqa: E402
from fa4.kernels.sm90 import backward as bwd  # noqa: E402
from fa4.kernels.sm90 import backward_fast  # noqa: E402


# signature's arguments: dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
# max_seqlen_k, softmax_scale, window_left, window_right, softcap, deterministic
def _call(b=2, s=64, h=4, d=64, dlse=False):
    q, k, v, out, dout = (torch.randn(b, s, h, d, dtype=torch.bfloat16) for _ in range(5))
    lse = torch.randn(b, h, s)
    return [dout, q, k, v, out, lse, torch.randn(b, h, s) if dlse else None, None, None, None, s, s, 0.125, -1, 0,
            0.0, False]


def _packed(lens=(30, 34), h=4, d=64, max_q=None):
    total = sum(lens)
    q, k, v, out, dout = (torch.randn(total, h, d, dtype=torch.bfloat16) for _ in range(5))
    cu = torch.tensor([0, lens[0], total], dtype=torch.int32)
    m = max(lens) if max_q is None else max_q
    return [dout, q, k, v, out, torch.randn(h, total), None, cu, cu.clone(), None, m, m, 0.125, -1, 0, 0.0, False]


def _key(args):
    return backward_fast.signature(*args)


def test_same_metadata_other_addresses_same_key():
    assert _key(_call()) == _key(_call())


def test_packed_same_metadata_same_key_whatever_the_offsets():
    """The kernels read cu_seqlens; nothing is decided on their values beyond max_seqlen."""
    assert _key(_packed((30, 34))) == _key(_packed((50, 14), max_q=34))


@pytest.mark.parametrize("change", ["max_seqlen", "seqused_k", "cu_dtype"])
def test_packed_key_changes(change):
    base = _packed()
    other = _packed()
    if change == "max_seqlen":
        other[10] = other[11] = 40
    elif change == "seqused_k":
        other[9] = torch.tensor([30, 20], dtype=torch.int32)
    elif change == "cu_dtype":
        other[7] = other[7].long()
    assert _key(base) != _key(other)


@pytest.mark.parametrize("change", ["dlse", "shape", "dtype", "stride", "alignment", "scale", "window", "softcap",
                                    "deterministic"])
def test_key_changes_with_what_decisions_read(change):
    base = _call()
    other = list(base)
    if change == "dlse":
        other = _call(dlse=True)
    elif change == "shape":
        other = _call(s=65)
    elif change == "dtype":
        other[1] = other[1].half()
    elif change == "stride":
        other[2] = other[2].transpose(1, 2).contiguous().transpose(1, 2)
    elif change == "alignment":
        other[3] = torch.randn(other[3].numel() + 1, dtype=torch.bfloat16)[1:].view(other[3].shape)
    elif change == "scale":
        other[12] = 0.25
    elif change == "window":
        other[13] = 128
    elif change == "softcap":
        other[15] = 30.0
    elif change == "deterministic":
        other[16] = True
    assert _key(base) != _key(other)


@pytest.mark.parametrize("switch", ["CTA_CHUNK", "D256_PASS_FULL", "KT_DQ_CHAIN", "STATS_TMA", "KEYS_AS_ROWS_D128",
                                    "DQ_SPREAD"])
def test_key_changes_with_a_module_switch(switch, monkeypatch):
    before = _key(_call())
    monkeypatch.setattr(bwd, switch, not getattr(bwd, switch))
    assert _key(_call()) != before


def test_key_changes_with_an_environment_switch(monkeypatch):
    before = _key(_call())
    monkeypatch.setitem(os.environ, "FA4_SM90_BWD", "0")
    assert _key(_call()) != before


@pytest.mark.parametrize("owner, name", [(bwd, "backward_checked"), (bwd, "default_tile"), (bwd, "dq_route"),
                                         (dispatch, "resolve_auto_backward")])
def test_key_changes_when_a_decision_function_is_replaced(owner, name, monkeypatch):
    before = _key(_call())
    monkeypatch.setattr(owner, name, lambda *a, **kw: None)
    assert _key(_call()) != before


def test_run_backward_takes_a_remembered_replay_only_for_its_signature(monkeypatch):
    """ops._run_backward asks backward_fast for backend="auto" calls without a sink and returns what the Replay
    gave (dsink None); any other signature goes down the full path."""
    args = _call()
    seen = []

    class Fake:
        def __call__(self, *tensors):
            seen.append(len(tensors))
            return tensors[1], tensors[2], tensors[3]
    monkeypatch.setattr(backward_fast, "_REPLAYS", {})
    monkeypatch.setattr(backward_fast, "current_device", lambda: None)  # CPU tensors: device index None
    monkeypatch.setattr(backward_fast, "hooks_idle", lambda: True)
    backward_fast.remember(_key(args), Fake())
    dout, q, k, v, out, lse, dlse = args[:7]
    scale, left, right, softcap, det = args[12:]
    got = ops._run_backward(dout, q, k, v, out, lse, dlse, None, None, None, None, q.shape[1], k.shape[1], scale,
                            left, right, softcap, det, "auto")
    assert seen == [10] and got[0] is q and got[1] is k and got[2] is v and got[3] is None
    full = []
    monkeypatch.setattr(dispatch, "resolve_auto_backward", lambda *a, **kw: full.append(1) or "reference")
    other = _call(s=65)
    dout, q, k, v, out, lse, dlse = other[:7]
    from fa4 import reference
    out, lse = reference.forward(q.float(), k.float(), v.float(), softmax_scale=scale, window_right=0)
    ops._run_backward(dout, q, k, v, out.to(q.dtype), lse, None, None, None, None, None, q.shape[1], k.shape[1],
                      scale, -1, 0, 0.0, False, "auto")
    assert full == [1] and seen == [10]


def test_key_changes_with_the_gqa_split_heads(monkeypatch):
    """GQA_SPLIT_HEADS (a dict the split reads) is part of the key too."""
    before = _key(_call())
    monkeypatch.setattr(bwd, "GQA_SPLIT_HEADS", {**bwd.GQA_SPLIT_HEADS, 128: 1})
    assert _key(_call()) != before


def _gqa_call(packed):
    """A causal call with 8 query heads on 2 kv heads (G = 4), batched or packed, as signature's arguments."""
    lead = (64,) if packed else (2, 32)
    q, out, dout = (torch.randn(*lead, 8, 64, dtype=torch.bfloat16) for _ in range(3))
    k, v = (torch.randn(*lead, 2, 64, dtype=torch.bfloat16) for _ in range(2))
    if packed:
        cu = torch.tensor([0, 30, 64], dtype=torch.int32)
        return [dout, q, k, v, out, torch.randn(8, 64), None, cu, cu.clone(), None, 34, 34, 0.125, -1, 0, 0.0, False]
    return [dout, q, k, v, out, torch.randn(2, 8, 32), None, None, None, None, 32, 32, 0.125, -1, 0, 0.0, False]


@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
def test_split_call_remembers_a_split_replay(packed, monkeypatch):
    """remember_split files a SplitReplay under the outer (real kv heads) signature only where the inner signature
    (K / V repeated) has a Replay; the SplitReplay repeats K / V, runs that Replay and sums each kv head's virtual
    heads in fp32, as backward_checked's split does."""
    monkeypatch.setattr(backward_fast, "_REPLAYS", {})
    args = _gqa_call(packed)
    dout, q, k, v = args[:4]
    split = 2
    kr, vr = bwd.repeat_kv_heads(k, split), bwd.repeat_kv_heads(v, split)
    backward_fast.remember_split(split, dout, q, k, v, kr, vr, *args[4:])
    assert backward_fast._REPLAYS == {}, "no inner Replay: nothing to remember"
    seen = []
    inner = object.__new__(backward_fast.Replay)
    monkeypatch.setattr(backward_fast.Replay, "__call__", lambda self, *t: seen.append(t) or (
        t[1], (torch.arange(t[2].shape[-2]).view(-1, 1) + torch.zeros_like(t[2], dtype=torch.float32)).bfloat16(),
        (2 * torch.arange(t[3].shape[-2]).view(-1, 1) + torch.zeros_like(t[3], dtype=torch.float32)).bfloat16()))
    backward_fast.remember(_key([dout, q, kr, vr, *args[4:]]), inner)
    backward_fast.remember_split(split, dout, q, k, v, kr, vr, *args[4:])
    outer = backward_fast._REPLAYS.get(_key(args))
    assert isinstance(outer, backward_fast.SplitReplay) and outer.inner is inner and outer.split == split
    # Fresh tensors of the same signature.
    args2 = _gqa_call(packed)
    dq, dk, dv = outer(*args2[:7], *args2[7:10])
    (t,) = seen
    assert torch.equal(t[2], args2[2].repeat_interleave(split, dim=-2)) and torch.equal(
        t[3], args2[3].repeat_interleave(split, dim=-2)) and t[7] is args2[7]
    want = torch.tensor([0 + 1, 2 + 3], dtype=torch.float32)  # kv head hk: virtual heads 2·hk and 2·hk + 1
    assert dq is args2[1] and dk.shape == k.shape and dk.dtype == k.dtype
    assert torch.equal(dk.float().flatten(0, -3)[0, :, 0], want) and torch.equal(dv.float().flatten(0, -3)[0, :, 0],
                                                                                  2 * want)
