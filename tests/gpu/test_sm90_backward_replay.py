"""The sm90 backward's Replay (fa4.kernels.sm90.backward_fast): a backend="auto" call whose signature the plain route
served before skips the checks and decisions and replays its launches. Each case runs the same signature three
times through ops._run_backward, the numerics rule on every call (outputs poisoned first): the first call takes
the full path and leaves a Replay, the second replays it on the same inputs, the third on fresh inputs (new
addresses: the descriptors' tensor maps are encoded anew). Without an lse gradient (drawn anew each call) dK and dV
of the first two calls are compared bitwise (the kernel writes them in a fixed order). Skipped without an sm_90 GPU."""
import pytest
import torch

from attention_check import check_backend_backward, cu_seqlens, make_inputs
from fa4 import ops

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm_90 GPU")


def _auto_backward(dout, q, k, v, out, lse, dlse, *, softmax_scale, window_left, window_right, softcap, sink,
                   deterministic, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, max_seqlen_q=None,
                   max_seqlen_k=None):
    if cu_seqlens_q is None:
        max_seqlen_q, max_seqlen_k = q.shape[1], k.shape[1]
    dq, dk, dv, dsink = ops._run_backward(dout, q, k, v, out, lse, dlse, sink, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                          max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right,
                                          softcap, deterministic, "auto")
    return dq, dk, dv, dsink


def _counting(monkeypatch):
    from fa4.kernels.sm90 import backward_fast
    monkeypatch.setattr(backward_fast, "_REPLAYS", {})  # none left by an earlier test of this process
    calls = []
    real = backward_fast.Replay.__call__

    def counted(self, *a):
        calls.append(self.tile)
        return real(self, *a)
    monkeypatch.setattr(backward_fast.Replay, "__call__", counted)
    return calls


# (b, s, hq, hkv, d, left, right, softcap, dlse, dtype, replayed): the plain route's tiles (the persistent keys-as-rows
# D = 128 causal grid, the D = 64 keys-as-rows tile, the queries-as-rows D = 128 tile, D = 256 causal), padding rows
# (S % 64 != 0), GQA, windows, softcap and the lse gradient; D = 256 without a window takes dQ from the ordered pass
# and D = 64 softcap calls (the two-consumer tile with a separate dQ) take dQ from the ordered pass: not the plain
# route, never replayed.
CASES = [
    (2, 1024, 8, 8, 128, -1, 0, 0.0, False, torch.bfloat16, True),
    (2, 1000, 8, 2, 128, -1, -1, 0.0, True, torch.bfloat16, True),
    (2, 777, 4, 4, 64, -1, 0, 0.0, False, torch.float16, True),
    (1, 1200, 4, 2, 64, 100, 50, 30.0, True, torch.bfloat16, False),  # softcap at D = 64: the ordered pass
    (1, 1500, 4, 4, 96, 256, 0, 0.0, False, torch.bfloat16, True),
    (1, 700, 4, 2, 256, -1, 0, 0.0, False, torch.bfloat16, True),
    (1, 700, 4, 2, 256, -1, -1, 0.0, False, torch.bfloat16, False),
    # GQA groups of 8 and 16, causal: split over virtual kv heads (backward.gqa_split), replayed by a SplitReplay.
    (2, 1024, 16, 2, 128, -1, 0, 0.0, False, torch.bfloat16, True),
    (1, 777, 16, 1, 64, -1, 0, 0.0, True, torch.float16, True),
    (1, 700, 8, 1, 256, -1, 0, 0.0, False, torch.bfloat16, True),
    # bf16 at D = 64: the statistics' K extensions (backward.stats_ext_serves) allocated by the Replay, with padding rows
    # and with the one-allocation workspace (S a multiple of the tile's rows). Added in session 30 after its device
    # time was spent: first run in the next verify_device.sh.
    (2, 777, 4, 4, 64, -1, 0, 0.0, False, torch.bfloat16, True),
    (2, 1024, 4, 2, 64, -1, -1, 0.0, True, torch.bfloat16, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}s{c[1]}h{c[2]}-{c[3]}d{c[4]}w{c[5]},{c[6]}"
                         f"cap{c[7]}{'-dlse' if c[8] else ''}-{str(c[9])[6:]}")
def test_replay_matches_full_path(case, monkeypatch):
    b, s, hq, hkv, d, left, right, softcap, dlse, dtype, replayed = case
    calls = _counting(monkeypatch)
    torch.manual_seed(hash(case) % 2**31)
    q, k, v, _ = make_inputs(b, s, s, hq, hkv, d, d, dtype, "cuda")
    dout = torch.randn(b, s, hq, d, dtype=dtype, device="cuda")
    first = check_backend_backward(_auto_backward, q, k, v, left=left, right=right, softcap=softcap,
                                   with_dlse=dlse, dout=dout)
    assert calls == [], "the first call of a signature takes the full path"
    second = check_backend_backward(_auto_backward, q, k, v, left=left, right=right, softcap=softcap,
                                    with_dlse=dlse, dout=dout)
    assert len(calls) == (1 if replayed else 0), calls
    if hq // hkv >= 8:  # the GQA split's calls: their signature holds a SplitReplay
        from fa4.kernels.sm90 import backward_fast
        assert any(isinstance(r, backward_fast.SplitReplay) for r in backward_fast._REPLAYS.values())
    if replayed and not dlse:  # check_backend_backward draws a new dlse each call
        assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2]), "dK / dV differ from the full path"
    q2, k2, v2, _ = make_inputs(b, s, s, hq, hkv, d, d, dtype, "cuda")
    check_backend_backward(_auto_backward, q2, k2, v2, left=left, right=right, softcap=softcap, with_dlse=dlse)
    assert len(calls) == (2 if replayed else 0), calls


def test_replay_through_autograd_and_switch(monkeypatch):
    """flash_attn_func's eager backward replays on its second step; flipping a module switch the decisions read
    (CTA_CHUNK) sends the next call down the full path again, with the right gradients."""
    import fa4
    from fa4.kernels.sm90 import backward as bwd
    calls = _counting(monkeypatch)
    q, k, v = (torch.randn(2, 1024, 8, 128, dtype=torch.bfloat16, device="cuda", requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    grads = []
    for step in range(3):
        if step == 2:
            monkeypatch.setattr(bwd, "CTA_CHUNK", not bwd.CTA_CHUNK)
        out = fa4.flash_attn_func(q, k, v, causal=True)
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    assert len(calls) == 1, calls
    for g in grads[1:]:
        for a, b_ in zip(grads[0], g):
            torch.testing.assert_close(a, b_, atol=2e-2, rtol=0)  # dQ's reduce-add order differs between calls


# deterministic=True on the routes the Replay serves (the main kernel's ordered dQ chain: the shared-dQ D = 128 tile,
# the keys-as-rows D = 64 tile with a right window, the persistent keys-as-rows grid at 2,048 causal D = 128 rows and
# at 1,024 D = 64 rows without a window, backward.D64_PERSIST_DET) and one it does not (a left window: the ordered
# pass). The replayed call must give the full path's gradients bit for bit, dQ included.
DET_CASES = [(2, 1024, 8, 2, 128, -1, 0, True), (2, 1024, 8, 8, 64, -1, 0, True), (1, 1000, 4, 2, 64, 200, 0, False),
             (2, 1024, 8, 8, 64, -1, -1, True), (1, 2048, 8, 2, 128, -1, 0, True),
             (1, 2048, 16, 2, 128, -1, 0, True)]  # split over virtual kv heads: a SplitReplay


@pytest.mark.parametrize("case", DET_CASES, ids=lambda c: f"b{c[0]}s{c[1]}h{c[2]}-{c[3]}d{c[4]}w{c[5]},{c[6]}")
def test_replay_deterministic_bitwise(case, monkeypatch):
    b, s, hq, hkv, d, left, right, replayed = case
    calls = _counting(monkeypatch)
    torch.manual_seed(hash(case) % 2**31)
    q, k, v, _ = make_inputs(b, s, s, hq, hkv, d, d, torch.bfloat16, "cuda")
    dout = torch.randn(b, s, hq, d, dtype=torch.bfloat16, device="cuda")
    first = check_backend_backward(_auto_backward, q, k, v, left=left, right=right, dout=dout, deterministic=True)
    second = check_backend_backward(_auto_backward, q, k, v, left=left, right=right, dout=dout, deterministic=True)
    assert len(calls) == (1 if replayed else 0), calls
    for name, a, b_ in zip(("dq", "dk", "dv"), first, second):
        assert torch.equal(a, b_), f"{name} differs between the full path and the replay"


# Packed sequences (the keys-as-rows D = 128 causal tile off the persistent grid, the shared-dQ tile, D = 64; one
# sequence of a single query) and seqused_k on a batched call, whose dK / dV rows past seqused_k must come back zero
# from the replay too (its buffers are allocated anew, over poisoned memory). Fresh inputs every call.
VARLEN_CASES = [((300, 1, 700), (300, 1, 700), 8, 2, 128, 0, True), ((513, 64, 1000), (600, 64, 900), 4, 4, 128, -1,
                                                                                                    False),
                ((257, 1024), (257, 1024), 8, 8, 64, 0, True),
                ((300, 1, 700), (300, 1, 700), 16, 2, 128, 0, False)]  # G = 8, split: a SplitReplay


@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: f"q{'-'.join(map(str, c[0]))}d{c[4]}r{c[5]}")
def test_replay_packed(case, monkeypatch):
    lens_q, lens_k, hq, hkv, d, right, dlse = case
    calls = _counting(monkeypatch)
    torch.manual_seed(sum(lens_q) + d)
    for i in range(3):
        q, k, v, varlen = make_inputs(0, 0, 0, hq, hkv, d, d, torch.bfloat16, "cuda", varlen_lens=(lens_q, lens_k))
        check_backend_backward(_auto_backward, q, k, v, right=right, with_dlse=dlse, varlen=varlen)
        assert len(calls) == i, calls


def test_replay_seqused_k(monkeypatch):
    calls = _counting(monkeypatch)
    b, s, hq, hkv, d = 3, 640, 8, 2, 128
    for i in range(3):
        q, k, v, _ = make_inputs(b, s, s, hq, hkv, d, d, torch.bfloat16, "cuda")
        varlen = dict(seqused_k=torch.tensor([640, 333, 1], dtype=torch.int32, device="cuda"))
        check_backend_backward(_auto_backward, q, k, v, right=-1, varlen=varlen)
        assert len(calls) == i, calls
