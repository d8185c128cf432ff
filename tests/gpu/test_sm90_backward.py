"""The Gluon Hopper backward (fa4.kernels.sm90.backward) on an H100, by itself: out and lse come from
fa4.reference, so a failure here is the backward's. DESIGN.md's numerics rule against fa4.reference.backward
(fp32, and the input dtype for the "lowp" bound), bf16 and fp16, over the feature matrix it claims; the
deterministic mode repeated 100 times and compared bitwise. Skipped without an sm_90 GPU.

This kernel had never run on a GPU when this file was written: run it under a timeout
(`timeout 600 python -m pytest -x -q tests/gpu/test_sm90_backward.py`), since a barrier protocol bug hangs.
"""
import functools

import pytest
import torch
import triton

from attention_check import (assert_first_capture_creates_no_stream, backend_options, backward_case_id,
                             backward_case_inputs, check_backend_backward, reference_backward_inputs,
                             dsink_error_ratios, make_inputs)
from fa4 import reference
from fa4.kernels.sm90.configs import tile_dim as configs_tile_dim

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm_90 GPU")
DEV = "cuda"


def _bwd():
    from fa4.kernels.sm90 import backward
    return backward


def _opts(q, left, right, softcap, sink, varlen):
    return backend_options(q, left, right, softcap, sink, varlen)


def _run(q, k, v, *, left=-1, right=-1, softcap=0.0, sink=None, varlen=None, tile=None, **kw):
    """Kernel backward vs the fp32 reference and the reference in the input dtype (its scope checked first);
    tile: a backward.BwdTile other than the shipped one."""
    reason = _bwd().unsupported_reason(q, k, v, tile=tile, **_opts(q, left, right, softcap, sink, varlen))
    assert reason is None, reason
    backward = _bwd().backward if tile is None else functools.partial(_bwd().backward, tile=tile)
    return check_backend_backward(backward, q, k, v, left=left, right=right, softcap=softcap, sink=sink,
                                  varlen=varlen, **kw)


# Cases with a sink have 8 query heads: dsink has one entry per head, and the numerics rule's max over only
# 2 entries failed an ideal kernel (O rounded once to fp16, the rest fp32) in ~2.5% of random draws
# (benchmarks/NOTES.md, "dsink and few heads").
# (b, sq, sk, hq, hkv, d, dv, left, right, softcap, sink, dlse); scope order: plain, causal, GQA first.
MATRIX = [
    (2, 1024, 1024, 4, 4, 128, 128, -1, -1, 0.0, False, False),
    (2, 1024, 1024, 4, 4, 64, 64, -1, -1, 0.0, False, False),
    (2, 1000, 1000, 8, 2, 128, 128, -1, 0, 0.0, False, True),      # GQA, causal, odd length, lse gradient
    (2, 1000, 1000, 8, 8, 64, 64, -1, 0, 0.0, False, False),
    (1, 777, 1543, 8, 1, 128, 128, -1, 0, 0.0, True, True),        # Sq < Sk, MQA, sink
    (1, 1543, 777, 4, 2, 64, 64, -1, 0, 0.0, False, True),         # Sq > Sk: leading rows empty
    (2, 1, 3001, 8, 2, 128, 128, -1, 0, 0.0, False, False),        # Sq = 1
    (1, 1500, 1500, 4, 4, 96, 96, 256, 0, 0.0, False, False),      # sliding window, D padded to 128
    (1, 1200, 1200, 4, 2, 64, 64, 100, 50, 30.0, False, True),     # window both sides + softcap
    (1, 513, 513, 8, 2, 40, 24, -1, -1, 0.0, True, False),         # small odd head dims, GQA
    (1, 3000, 3000, 8, 1, 128, 128, -1, -1, 50.0, True, True),
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "ordered"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", MATRIX, ids=[backward_case_id(c) for c in MATRIX])
def test_feature_matrix(case, dtype, deterministic):
    q, k, v, kw = backward_case_inputs(case, dtype, DEV)
    _run(q, k, v, deterministic=deterministic, **kw)


# dQ shared over the consumers (tile.shared_dq): the D = 128 tile's cases (D padded to 128 included), with the
# shipped two stages and with the third stage the freed memory allows.
SHARED_CASES = [c for c in MATRIX if 64 < max(c[5], c[6]) <= 128]


@pytest.mark.parametrize("over", [dict(stages=2), dict(stages=3), dict(stages=3, dq_writer=True)],
                         ids=["stages2", "stages3", "writer"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", SHARED_CASES, ids=[backward_case_id(c) for c in SHARED_CASES])
def test_shared_dq(case, dtype, over):
    """dQ shared over the consumers, with two and three stages, and issued by the writer warp (tile.dq_writer)."""
    q, k, v, kw = backward_case_inputs(case, dtype, DEV)
    tile = _bwd().get_tile(128, 128, shared_dq=True, **over)
    assert tile is not None
    _run(q, k, v, tile=tile, **kw)


@pytest.mark.parametrize("tile", [None, dict(shared_dq=True, stages=3), dict(ping_pong=True),
                                  dict(num_wg=2, consumer_regs=240), dict(shared_dq=True, dq_writer=True)],
                         ids=["shipped", "shared-dq3", "pingpong", "two-consumers", "writer"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128])
def test_varlen(d, causal, tile):
    if tile is not None and tile.get("shared_dq") and d < 128:
        pytest.skip("shared dQ needs the 128 tile")
    if tile is not None and tile.get("num_wg") == 2 and d > 64:
        pytest.skip("the D = 64 tile's two-consumer form (the shipped D = 128 tile has two)")
    torch.manual_seed(d + causal)
    lens_q, lens_k = [300, 1, 517, 64, 1000], [300, 129, 700, 64, 999]
    hq, hkv = 4, 2
    q, k, v, varlen = make_inputs(None, None, None, hq, hkv, d, d, torch.bfloat16, DEV, varlen_lens=(lens_q, lens_k))
    _run(q, k, v, right=0 if causal else -1, varlen=varlen,
         tile=None if tile is None else _bwd().get_tile(d, d, **tile))


# tile.ping_pong (a probe variant): the shipped tile of each head dim with the consumers taking turns. Causal with
# Sq != Sk and GQA (a key block's two 64-key slices see different parts of the causal band, some query blocks none
# of one slice: both consumers must still take every turn), odd lengths, Sq = 1, windows, a sink; varlen is in
# test_varlen. At D = 64 the shipped tile's dQ is the ordered pass either way (no dQ product in the main kernel).
PINGPONG_CASES = [
    (2, 1024, 1024, 4, 4, 64, 64, -1, -1, 0.0, False, False),
    (2, 1000, 1000, 8, 2, 64, 64, -1, 0, 0.0, False, True),
    (1, 1543, 777, 4, 2, 64, 64, -1, 0, 0.0, False, True),         # Sq > Sk: leading rows see nothing
    (1, 1200, 1200, 4, 2, 64, 64, 100, 50, 30.0, False, True),     # window both sides + softcap
    (2, 1024, 1024, 4, 4, 128, 128, -1, -1, 0.0, False, False),
    (2, 1000, 1000, 8, 2, 128, 128, -1, 0, 0.0, False, True),
    (1, 777, 1543, 8, 1, 128, 128, -1, 0, 0.0, True, True),        # Sq < Sk, MQA, sink
    (2, 1, 3001, 8, 2, 128, 128, -1, 0, 0.0, False, False),        # Sq = 1: one query block per key block
    (1, 1500, 1500, 4, 4, 96, 96, 256, 0, 0.0, False, False),      # sliding window, D padded to 128
]


# The queries-as-rows D = 64 tile (three consumers, dQ by the ordered pass) shipped before keys_as_rows: the base of
# the D = 64 ping-pong and writer variants (the keys-as-rows kernel builds neither).
OLD64 = dict(keys_as_rows=False, block_m=64, num_wg=3, consumer_regs=160, separate_dq=True)


def _ping_pong_tile(case, **over):
    from fa4.kernels.sm90 import configs
    td, tdv = configs.tile_dim(case[5]), configs.tile_dim(case[6])
    base = OLD64 if max(td, tdv) == 64 else {}
    tile = _bwd().get_tile(td, tdv, **dict(base, ping_pong=True, **over))
    assert tile is not None and tile.ping_pong
    return tile


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "ordered"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", PINGPONG_CASES, ids=[backward_case_id(c) for c in PINGPONG_CASES])
def test_ping_pong(case, dtype, deterministic):
    q, k, v, kw = backward_case_inputs(case, dtype, DEV)
    _run(q, k, v, tile=_ping_pong_tile(case), deterministic=deterministic, **kw)


# The turn placements of the other dQ builds: at D = 64 the in-kernel reduce-add (dQ in the second turn), at
# D = 128 one dQ share per consumer in two column slices (the turn passes after the first).
@pytest.mark.parametrize("over", [dict(separate_dq=False), dict(shared_dq=False, stages=2)],
                         ids=["d64-reduce-add", "d128-unshared"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_ping_pong_dq_builds(over, causal):
    d = 64 if "separate_dq" in over else 128
    case = (2, 1000, 1000, 8, 2, d, d, -1, 0 if causal else -1, 0.0, False, True)
    q, k, v, kw = backward_case_inputs(case, torch.bfloat16, DEV)
    _run(q, k, v, tile=_ping_pong_tile(case, **over), **kw)


@pytest.mark.parametrize("over", [dict(shared_dq=False, stages=2),
                                  dict(OLD64, num_wg=2, consumer_regs=240, separate_dq=False, dq_writer=True)],
                         ids=["d128-unshared", "d64-two-consumers"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_writer_one_share_per_consumer(over, causal):
    """The writer warp issuing one dQ share per consumer (all D columns of its 64 keys), not the shared tile's
    column halves: D = 128 unshared and D = 64 with two consumers (probe variants; causal calls keep the
    consumers issuing, launch_plan)."""
    d = 64 if over.get("num_wg") else 128
    case = (2, 1000, 1000, 8, 2, d, d, -1, 0 if causal else -1, 0.0, False, True)
    q, k, v, kw = backward_case_inputs(case, torch.bfloat16, DEV)
    tile = _bwd().get_tile(d, d, **over)
    assert tile is not None and tile.dq_writer and not tile.shared_dq
    _run(q, k, v, tile=tile, **kw)


# seqused_k on batched calls, D = 128 non-causal (the shared-dQ tile) and the session-31 routes: causal D = 128 from
# 512 rows and D = 64 without a window up to 1,024 rows (the persistent grid's chain by default, its accumulator
# zeroed since key block 0 may be missing), causal D = 64 (the persistent grid's reduce-add).
@pytest.mark.parametrize("d,causal", [(128, False), (128, True), (64, False), (64, True)])
def test_seqused_k(d, causal):
    torch.manual_seed(7)
    q = torch.randn(2, 600, 4, d, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(2, 900, 4, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(2, 900, 4, d, device=DEV, dtype=torch.bfloat16)
    used = torch.tensor([900, 333], dtype=torch.int32, device=DEV)
    _run(q, k, v, right=0 if causal else -1, varlen=dict(seqused_k=used))


@pytest.mark.parametrize("d,causal,persist", [(128, True, False), (128, True, True), (64, False, False),
                                             (64, False, True), (64, True, False), (64, True, True)])
def test_deterministic_bitwise_100x(monkeypatch, d, causal, persist):
    """deterministic=True: 100 calls on the same inputs give bitwise-identical gradients (D = 128 causal: the
    persistent keys-as-rows grid's chain at 2048 rows, and without persist the shared-dQ tile's chain; D = 64 causal:
    with persist the persistent grid's chain (D64_CAUSAL_CHAIN, shipped), without it the keys-as-rows kernel's
    descending chain; D = 64 at 2048 rows without a window: with persist the persistent grid's chain
    (D64_PERSIST_DET, shipped), without it the ordered pass)."""
    bwd = _bwd()
    if d == 128:
        monkeypatch.setattr(bwd, "KT_PERSIST_CHAIN", persist)
    if d == 64:
        monkeypatch.setattr(bwd, "D64_CAUSAL_CHAIN" if causal else "D64_PERSIST_DET", persist)
    torch.manual_seed(11)
    q, k, v, opts, out, lse, dout = reference_backward_inputs(2, 2048, 8, 2, d, causal=causal, device=DEV)
    first = bwd.backward(dout, q, k, v, out, lse, None, deterministic=True, **opts)
    for _ in range(100):
        again = bwd.backward(dout, q, k, v, out, lse, None, deterministic=True, **opts)
        for a, b in zip(first[:3], again[:3]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("d,causal", [(128, True), (128, False), (64, True)])
def test_deterministic_bitwise_full_card(d, causal):
    """deterministic=True on a grid that fills the card (B 16, S 1024, H·D 2048, the shipped routes: the ascending
    chains whose first link stores): 60 calls bitwise equal to the first. The small grids above ran through the
    store-first race (session 34: a successor's reduce-add overtaken by the first link's TMA store, 3-8 of 150 calls
    differing at this shape on an H100, benchmarks/repeat_stress.py); at that rate 60 calls catch it with ~90%."""
    bwd = _bwd()
    torch.manual_seed(12)
    q, k, v, opts, out, lse, dout = reference_backward_inputs(16, 1024, 2048 // d, 2048 // d, d, causal=causal,
                                                              device=DEV)
    first = bwd.backward(dout, q, k, v, out, lse, None, deterministic=True, **opts)
    differ = 0
    for _ in range(60):
        again = bwd.backward(dout, q, k, v, out, lse, None, deterministic=True, **opts)
        differ += not all(torch.equal(a, b) for a, b in zip(first[:3], again[:3]))
    assert differ == 0, f"{differ} of 60 repeated calls differ from the first"


@pytest.mark.parametrize("d,deterministic", [(64, True), (128, True)])
def test_concurrent_dq_pass(monkeypatch, d, deterministic):
    """The ordered dQ pass on a side stream beside the main kernel (CONCURRENT_DQ) gives bitwise the gradients of
    the serial order, on a non-default caller stream whose next work reads them without synchronising."""
    bwd = _bwd()
    torch.manual_seed(12)
    q, k, v, opts, out, lse, dout = reference_backward_inputs(2, 2048, 8, 2, d, causal=True, device=DEV)
    assert bwd.CONCURRENT_DQ
    monkeypatch.setattr(bwd, "DQ_CHAIN", False)  # deterministic D = 128 through the pass, not the in-kernel chain
    caller = torch.cuda.Stream()
    caller.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(caller):
        grads = bwd.backward(dout, q, k, v, out, lse, None, deterministic=deterministic, **opts)
        sums = [g.float().sum() for g in grads[:3]]
    torch.cuda.synchronize()
    monkeypatch.setattr(bwd, "CONCURRENT_DQ", False)
    serial = bwd.backward(dout, q, k, v, out, lse, None, deterministic=deterministic, **opts)
    for name, a, g, total in zip("qkv", grads[:3], serial[:3], sums):
        assert torch.equal(a, g), f"d{name} differs between the concurrent and the serial order"
        assert torch.equal(total, g.float().sum()), f"d{name} was read before its pass finished"


def test_capture_before_any_side_stream(monkeypatch):
    """The deterministic D = 128 backward (its dQ pass on the side stream when one exists) captured before any
    side stream exists: no stream is created during the capture, and the replay equals an eager call bitwise."""
    bwd = _bwd()
    torch.manual_seed(13)
    q, k, v, opts, out, lse, dout = reference_backward_inputs(1, 1024, 4, 2, 128, causal=True, device=DEV)
    monkeypatch.setattr(bwd, "DQ_CHAIN", False)  # the pass (on the side stream), not the in-kernel chain
    assert_first_capture_creates_no_stream(
        lambda: bwd.backward(dout, q, k, v, out, lse, None, deterministic=True, **opts), monkeypatch)


# deterministic=True at D = 128 through the main kernel's ordered dQ chain (ORDERED_DQ): ascending without a
# window, descending with a right window (causal or not; its CTAs dispatched last block first), Sq != Sk both ways
# (the descending chain's bound moves with seq_k − seq_q), GQA and MQA, Sq = 1, softcap, and enough CTAs for
# several waves (a chain whose CTAs are not all resident at once).
CHAIN_CASES = [
    (2, 2048, 2048, 8, 2, 128, 128, -1, -1, 0.0, False, False),     # ascending, GQA
    (2, 2048, 2048, 8, 2, 128, 128, -1, 0, 0.0, False, True),       # descending (causal), lse gradient
    (1, 777, 1543, 8, 1, 128, 128, -1, 0, 0.0, False, True),        # Sq < Sk, MQA
    (1, 1543, 777, 4, 2, 128, 128, -1, 0, 0.0, False, False),       # Sq > Sk: leading rows see no key
    (1, 1500, 1500, 4, 4, 96, 96, -1, 200, 0.0, False, False),      # right window only, D padded to 128
    (2, 1, 3001, 8, 2, 128, 128, -1, 0, 0.0, False, False),         # Sq = 1
    (1, 3000, 3000, 8, 1, 128, 128, -1, -1, 50.0, False, True),     # softcap
    (4, 4096, 4096, 8, 8, 128, 128, -1, 0, 0.0, False, False),      # 1024 CTAs: ~8 waves
]


def _chain_only(monkeypatch, bwd):
    """Fail if a deterministic call falls back to the ordered pass: these calls must take the chain."""
    def no_pass(*_a, **_k):
        raise AssertionError("a deterministic call took the ordered pass, not the in-kernel chain")
    monkeypatch.setattr(bwd, "ordered_dq_pass", no_pass)


def _repeating(backward, times):
    """backward, run `times` more on the same arguments, each compared bitwise with the first."""
    def run(*args, **opts):
        got = backward(*args, **opts)
        for _ in range(times):
            again = backward(*args, **opts)
            for name, a, b in zip("qkv", got[:3], again[:3]):
                assert torch.equal(a, b), f"d{name} differs between two deterministic calls"
        return got
    return run


# The same chain in the keys-as-rows kernel (D = 64 and D padded to 64; the same writer warp, backward.dq_writer):
# 128 keys a CTA and 128 query rows a step, each consumer's share 64 rows of a query block.
KT_CHAIN_CASES = [
    (2, 2048, 2048, 8, 2, 64, 64, -1, -1, 0.0, False, False),       # ascending, GQA
    (2, 2048, 2048, 8, 2, 64, 64, -1, 0, 0.0, False, True),         # descending (causal), lse gradient
    (1, 777, 1543, 8, 1, 64, 64, -1, 0, 0.0, False, True),          # Sq < Sk, MQA
    (1, 1543, 777, 4, 2, 64, 64, -1, 0, 0.0, False, False),         # Sq > Sk: leading rows see no key
    (1, 1500, 1500, 4, 4, 40, 40, -1, 200, 0.0, False, False),      # right window only, D padded to 64
    (2, 1, 3001, 8, 2, 64, 64, -1, 0, 0.0, False, False),           # Sq = 1
    (4, 4096, 4096, 16, 4, 64, 64, -1, 0, 0.0, False, False),       # 512 CTAs: ~4 waves
]


def _tile_dims(q, v):
    return max(64, triton.next_power_of_2(q.shape[-1])), max(64, triton.next_power_of_2(v.shape[-1]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", CHAIN_CASES + KT_CHAIN_CASES,
                         ids=[backward_case_id(c) for c in CHAIN_CASES + KT_CHAIN_CASES])
def test_dq_chain(monkeypatch, case, dtype):
    """The in-kernel chain, repeated bitwise: D = 128 batched without a left window or softcap on the persistent
    keys-as-rows grid's ascending chain (KT_PERSIST_CHAIN, KT_PERSIST_CHAIN_FULL), else on the shared-dQ tile;
    D <= 64 on the one-CTA keys-as-rows tile."""
    bwd = _bwd()
    q, k, v, kw = backward_case_inputs(case, dtype, DEV)
    tile = bwd.default_tile(*_tile_dims(q, v), kw["left"], kw["softcap"], window_right=kw["right"],
                            deterministic=True)
    persistent = q.shape[-1] > 64 and kw["left"] < 0 and kw["softcap"] == 0
    assert tile.keys_as_rows == (q.shape[-1] <= 64 or persistent)
    assert bwd.persistent_tiles(tile) == persistent
    monkeypatch.setattr(bwd, "KT_ASC_CHAIN_MIN_ROWS", 0)  # the ascending keys-as-rows chain at these lengths too
    monkeypatch.setattr(bwd, "KT_PERSIST_CHAIN_MIN_ROWS", 0)  # and the persistent grid's chain
    assert bwd.dq_chain_serves(tile, kw["left"], kw["sink"], kw["right"], q.shape[1])
    _chain_only(monkeypatch, bwd)
    check_backend_backward(_repeating(bwd.backward, 3), q, k, v, deterministic=True, **kw)


@pytest.mark.parametrize("case", CHAIN_CASES, ids=[backward_case_id(c) for c in CHAIN_CASES])
def test_dq_chain_shared_tile(monkeypatch, case):
    """The same D = 128 calls on the shared-dQ tile's chains (KT_PERSIST_CHAIN off): descending under a right
    window, else ascending."""
    bwd = _bwd()
    monkeypatch.setattr(bwd, "KT_PERSIST_CHAIN", False)
    q, k, v, kw = backward_case_inputs(case, torch.bfloat16, DEV)
    tile = bwd.default_tile(*_tile_dims(q, v), kw["left"], kw["softcap"], window_right=kw["right"],
                            deterministic=True)
    assert tile.shared_dq and not tile.keys_as_rows
    assert bwd.dq_chain_serves(tile, kw["left"], kw["sink"], kw["right"], q.shape[1])
    _chain_only(monkeypatch, bwd)
    check_backend_backward(_repeating(bwd.backward, 3), q, k, v, deterministic=True, **kw)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("seqused", [False, True], ids=["full", "seqused_k"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dq_chain_varlen(monkeypatch, causal, seqused, d):
    """The chain over packed sequences of different lengths (counters per sequence; key blocks past a sequence's
    end exit without releasing, and no chain waits on them)."""
    bwd = _bwd()
    torch.manual_seed(21 + causal)
    lens_q, lens_k = [300, 1, 517, 64, 1000], [300, 129, 700, 64, 999]
    hq, hkv = 4, 2
    q, k, v, varlen = make_inputs(None, None, None, hq, hkv, d, d, torch.bfloat16, DEV, varlen_lens=(lens_q, lens_k))
    if seqused:
        varlen["seqused_k"] = torch.tensor([300, 100, 650, 0, 999], dtype=torch.int32, device=DEV)
    monkeypatch.setattr(bwd, "KT_ASC_CHAIN_MIN_ROWS", 0)
    _chain_only(monkeypatch, bwd)
    check_backend_backward(_repeating(bwd.backward, 3), q, k, v, right=0 if causal else -1, varlen=varlen,
                           deterministic=True)


def test_unsupported_is_reported():
    bwd = _bwd()
    q = torch.randn(1, 128, 2, 256, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(1, 128, 2, 128, device=DEV, dtype=torch.bfloat16)
    assert "(256, 128)" in bwd.unsupported_reason(q, q, v)  # no tile pairs D = 256 with Dv = 128
    q32 = torch.randn(1, 128, 2, 64, device=DEV)
    assert bwd.unsupported_reason(q32, q32, q32) is not None


@pytest.mark.parametrize("varlen", [False, True], ids=["batched", "varlen"])
def test_planned_launch(varlen):
    """The second and third calls of a signature launch the main kernel from its cached plan
    (backward._launch_main) with new tensors: the numerics rule must still hold."""
    from fa4.kernels.sm90 import launch
    for seed in range(3):
        torch.manual_seed(100 + seed)
        if varlen:
            lens = [300, 1, 777]
            cu = torch.tensor([0, 300, 301, 1078], dtype=torch.int32, device=DEV)
            q = torch.randn(sum(lens), 8, 128, device=DEV, dtype=torch.bfloat16)
            k = torch.randn(sum(lens), 2, 128, device=DEV, dtype=torch.bfloat16)
            v = torch.randn(sum(lens), 2, 128, device=DEV, dtype=torch.bfloat16)
            _run(q, k, v, right=0, with_dlse=True,
                 varlen=dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=777, max_seqlen_k=777))
        else:
            q = torch.randn(2, 1100, 8, 128, device=DEV, dtype=torch.bfloat16)
            k = torch.randn(2, 1100, 2, 128, device=DEV, dtype=torch.bfloat16)
            v = torch.randn(2, 1100, 2, 128, device=DEV, dtype=torch.bfloat16)
            _run(q, k, v, right=0, sink=torch.randn(8, device=DEV))
    assert any(key[0] == "bwd" for key in launch._PLANS), "the first call should have kept a plan"


@pytest.mark.parametrize("d,deterministic", [(40, True), (128, True), (64, False), (128, False), (256, False)])
def test_sink_gradient_from_p_dp(d, deterministic):
    """Every sink call takes its gradient from Σ_j P·dP, never from the rounded O: the ordered pass's where dQ comes
    from it (any D when deterministic, D = 64 and D = 256 with a sink), the main kernel's partials on the D = 128
    tiles (default_tile's sink_pdp). Over 20 fresh draws far inside the numerics rule."""
    ratios = dsink_error_ratios(_bwd().backward, range(20), d=d, dv=d, device=DEV, deterministic=deterministic)
    assert max(ratios) < 0.5, sorted(ratios)[-3:]


# tile.sink_pdp (a probe variant, not yet the default): the D = 128 reduce-add path takes the sink gradient from
# Σ_j P·dP summed in the main kernel.
SINK_CASES = [c for c in MATRIX if c[10] and 64 < max(c[5], c[6]) <= 128]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", SINK_CASES, ids=[backward_case_id(c) for c in SINK_CASES])
def test_sink_partials_in_main_kernel(case, dtype):
    q, k, v, kw = backward_case_inputs(case, dtype, DEV)
    _run(q, k, v, tile=_bwd().get_tile(128, 128, sink_pdp=True), **kw)


def test_sink_partials_far_inside_the_rule():
    tile = _bwd().get_tile(128, 128, sink_pdp=True)
    ratios = dsink_error_ratios(functools.partial(_bwd().backward, tile=tile), range(20), d=128, dv=128, device=DEV)
    assert max(ratios) < 0.5, sorted(ratios)[-3:]


# The D = 256 kernel (fa4/kernels/sm90/backward_d256.py, tile backward.D256_TILE): 64 keys a CTA, the two
# consumers splitting the head dim and handing S, dP partials and P, dS over through shared memory. Never run on a
# GPU when written: run under a timeout (`timeout 300 python -m pytest -q -x tests/gpu/test_sm90_backward.py -k d256`).
D256_CASES = [
    (2, 1024, 1024, 4, 4, 256, 256, -1, -1, 0.0, False, False),
    (2, 1024, 1024, 4, 4, 256, 256, -1, 0, 0.0, False, False),     # causal
    (2, 1000, 1000, 8, 2, 256, 256, -1, 0, 0.0, False, True),      # GQA, causal, odd length, lse gradient
    (1, 777, 1543, 8, 1, 256, 256, -1, 0, 0.0, True, True),        # Sq < Sk, MQA, sink (preprocess partials)
    (1, 1543, 777, 4, 2, 256, 256, -1, 0, 0.0, False, True),       # Sq > Sk: leading rows see nothing
    (1, 1000, 700, 4, 4, 256, 256, -1, -1, 0.0, False, False),     # Sq != Sk, odd lengths
    (2, 1, 3001, 8, 2, 256, 256, -1, 0, 0.0, False, False),        # Sq = 1
    (1, 1500, 1500, 4, 4, 256, 256, 256, 0, 0.0, False, False),    # sliding window
    (1, 1200, 1200, 4, 2, 256, 256, 100, 50, 30.0, False, True),   # window both sides + softcap
    (1, 513, 513, 8, 2, 192, 192, -1, -1, 0.0, True, False),       # D padded to the 256 tile, GQA, sink
    # D != Dv in the 256 width class: dispatch sends these to this kernel too (session 21's docs audit), and no
    # case named them before. Written in session 21 after its device time was spent: first run in session 22.
    (1, 1000, 1000, 4, 2, 192, 256, -1, 0, 0.0, False, True),
    (1, 777, 777, 4, 4, 256, 136, -1, -1, 0.0, False, False),
    (1, 640, 640, 8, 2, 144, 160, 100, 0, 0.0, True, False),
]


def _d256_tile():
    tile = _bwd().get_tile(256, 256, d256=True)
    assert tile is not None and tile.d256
    return tile


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "ordered"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", D256_CASES, ids=[backward_case_id(c) for c in D256_CASES])
def test_d256(case, dtype, deterministic):
    q, k, v, kw = backward_case_inputs(case, dtype, DEV)
    _run(q, k, v, tile=_d256_tile(), deterministic=deterministic, **kw)


D256_FULL_CASES = [c for c in D256_CASES if c[7] < 0 and c[8] < 0]


@pytest.mark.parametrize("case", D256_FULL_CASES, ids=[backward_case_id(c) for c in D256_FULL_CASES])
def test_d256_reduce_add_without_window(monkeypatch, case):
    """D = 256 calls without a window take dQ from the ordered pass (D256_PASS_FULL); the main kernel's in-kernel
    reduce-add (what windowed calls use) on those shapes too."""
    bwd = _bwd()
    monkeypatch.setattr(bwd, "D256_PASS_FULL", False)
    q, k, v, kw = backward_case_inputs(case, torch.bfloat16, DEV)
    _run(q, k, v, tile=_d256_tile(), deterministic=False, **kw)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "ordered"])
@pytest.mark.parametrize("case", D256_CASES, ids=[backward_case_id(c) for c in D256_CASES])
def test_d256_partials(case, deterministic):
    """tile.d256_roles off: each consumer forms S and dP over its own 128 columns and consumer 1 hands its partial
    sums over (the shipped tile until 2026-11-27, kept as the A/B's other side)."""
    q, k, v, kw = backward_case_inputs(case, torch.bfloat16 if sum(case[:3]) % 2 else torch.float16, DEV)
    _run(q, k, v, tile=_bwd().get_tile(256, 256, d256=True, d256_roles=False, d256_early_dv=False,
                                       d256_stats_ahead=False, d256_hand_swizzle=False),
         deterministic=deterministic, **kw)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "ordered"])
@pytest.mark.parametrize("case", D256_CASES, ids=[backward_case_id(c) for c in D256_CASES])
def test_d256_roles_without_early_dv(case, deterministic):
    """tile.d256_roles without d256_early_dv (the shipped tile for a few hours of 2026-11-27): P and dS handed over
    together, dV issued after both."""
    q, k, v, kw = backward_case_inputs(case, torch.float16 if sum(case[:3]) % 2 else torch.bfloat16, DEV)
    _run(q, k, v, tile=_bwd().get_tile(256, 256, d256=True, d256_early_dv=False), deterministic=deterministic, **kw)


D256_SWITCHES = {"hand-128b-swizzle": dict(d256_hand_swizzle=False), "stats-behind": dict(d256_stats_ahead=False)}


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "ordered"])
@pytest.mark.parametrize("case", D256_CASES, ids=[backward_case_id(c) for c in D256_CASES])
@pytest.mark.parametrize("switch", list(D256_SWITCHES))
def test_d256_switch(switch, case, deterministic):
    """The D = 256 tile with one of its later switches off (the dP hand-over in the dQ descriptor's 128-byte swizzle;
    lse2 and Delta loaded in their own step)."""
    q, k, v, kw = backward_case_inputs(case, torch.float16 if sum(case[:3]) % 2 else torch.bfloat16, DEV)
    _run(q, k, v, tile=_bwd().get_tile(256, 256, d256=True, **D256_SWITCHES[switch]), deterministic=deterministic,
         **kw)


@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (200, 0)], ids=["full", "causal", "window"])
def test_d256_varlen(window):
    torch.manual_seed(256 + window[0] + window[1])
    lens_q, lens_k = [300, 1, 517, 64, 1000], [300, 129, 700, 64, 999]
    hq, hkv, d = 4, 2, 256
    q, k, v, varlen = make_inputs(None, None, None, hq, hkv, d, d, torch.bfloat16, DEV, varlen_lens=(lens_q, lens_k))
    _run(q, k, v, left=window[0], right=window[1], varlen=varlen, tile=_d256_tile(), with_dlse=True)


def test_d256_seqused_k():
    torch.manual_seed(8)
    q = torch.randn(2, 600, 4, 256, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(2, 900, 4, 256, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(2, 900, 4, 256, device=DEV, dtype=torch.bfloat16)
    used = torch.tensor([900, 333], dtype=torch.int32, device=DEV)
    _run(q, k, v, varlen=dict(seqused_k=used), tile=_d256_tile())


def test_d256_deterministic_bitwise_20x():
    """deterministic=True with the D = 256 tile: dK, dV from the main kernel (fixed order by construction), dQ from
    the ordered pass; 20 calls give bitwise-identical gradients."""
    bwd = _bwd()
    torch.manual_seed(12)
    q, k, v, opts, out, lse, dout = reference_backward_inputs(2, 1024, 8, 2, 256, causal=True, device=DEV)
    first = bwd.backward(dout, q, k, v, out, lse, None, deterministic=True, tile=_d256_tile(), **opts)
    for _ in range(20):
        again = bwd.backward(dout, q, k, v, out, lse, None, deterministic=True, tile=_d256_tile(), **opts)
        for a, b in zip(first[:3], again[:3]):
            assert torch.equal(a, b)


def test_d256_planned_launch():
    """Later calls of a signature launch the D = 256 kernel from its cached plan (launch.Plan with this kernel's
    compiled object), with new tensors: the numerics rule must still hold."""
    for seed in range(3):
        torch.manual_seed(200 + seed)
        q = torch.randn(2, 700, 8, 256, device=DEV, dtype=torch.bfloat16)
        k = torch.randn(2, 700, 2, 256, device=DEV, dtype=torch.bfloat16)
        v = torch.randn(2, 700, 2, 256, device=DEV, dtype=torch.bfloat16)
        _run(q, k, v, right=0, tile=_d256_tile())


def test_d256_declines_what_it_does_not_build():
    bwd = _bwd()
    q = torch.randn(1, 128, 2, 128, device=DEV, dtype=torch.bfloat16)
    assert "256" in bwd.unsupported_reason(q, q, q, tile=_d256_tile())
    q = torch.randn(1, 128, 2, 256, device=DEV, dtype=torch.bfloat16)
    assert bwd.unsupported_reason(q, q, q, tile=_d256_tile()) is None
    assert bwd.unsupported_reason(q, q, q) is None  # the shipped D = 256 tile is this kernel (since 2026-11-26)
    v = torch.randn(1, 128, 2, 128, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        bwd.backward(v, q, q, v, v, torch.zeros(1, 2, 128, device=DEV), None, softmax_scale=0.1)


# The D = 64 tile's forms beside the shipped keys-as-rows tile over the matrix (forms its kernel does not build are
# skipped): two consumers (what a softcap takes, backward.default_tile), the three-consumer tile shipped before it,
# three with the in-kernel dQ reduce-add (a probe variant), and keys as rows with dV issued before dPᵀ is waited for
# and without the one-step lag of the dQ share (three Q / dO stages).
_QROWS = dict(keys_as_rows=False, block_m=64)
VARIANTS = {"two-consumers": dict(_QROWS, num_wg=2, consumer_regs=240, separate_dq=True),
            "three-consumers": dict(_QROWS, num_wg=3, consumer_regs=160, separate_dq=True),
            "three-consumers-reduce-add": dict(_QROWS, num_wg=3, consumer_regs=160, separate_dq=False),
            "keys-as-rows-dv-early": dict(dv_early=True),
            "keys-as-rows-no-lag-3-stages": dict(dq_lag=False, stages=3),
            # the writer warp issuing the unordered reduce-adds (tile.dq_writer, a probe since session 24)
            "keys-as-rows-writer": dict(dq_writer=True),
            # on the persistent grid (what batched causal calls and short deterministic ones take since session 31,
            # backward.D64_PERSIST_CAUSAL / D64_PERSIST_DET) and off it (packed calls, the non-causal default)
            "keys-as-rows-persistent": dict(persistent=True),
            "keys-as-rows-one-cta-a-tile": dict(persistent=False)}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", MATRIX, ids=[backward_case_id(c) for c in MATRIX])
def test_d64_forms(case, dtype, variant):
    from fa4.kernels.sm90 import configs
    td, tdv = configs.tile_dim(case[5]), configs.tile_dim(case[6])
    if max(td, tdv) != 64:
        pytest.skip("the 64 tile's forms")
    over = VARIANTS[variant]
    if over.get("keys_as_rows", True) and case[9] > 0:
        pytest.skip("the keys-as-rows kernel does not build softcap")
    q, k, v, kw = backward_case_inputs(case, dtype, DEV)
    tile = _bwd().get_tile(td, tdv, **over)
    assert tile is not None and all(getattr(tile, f) == val for f, val in over.items())
    _run(q, k, v, tile=tile, **kw)


# The causal D = 128 keys-as-rows tile off the persistent grid with its writer warp issuing the unordered reduce-adds
# (tile.dq_writer, a probe since session 24), over the matrix's D = 128 cases with a right window, no softcap and no
# sink (whose dQ comes from the ordered pass).
KT128_WRITER_CASES = [c for c in MATRIX if max(c[5], c[6]) == 128 and c[8] >= 0 and c[9] == 0 and not c[10]]


@pytest.mark.parametrize("case", KT128_WRITER_CASES, ids=[backward_case_id(c) for c in KT128_WRITER_CASES])
def test_kt128_writer(case):
    bwd = _bwd()
    q, k, v, kw = backward_case_inputs(case, torch.bfloat16, DEV)
    tile = bwd.get_tile(128, 128, keys_as_rows=True, block_m=64, num_wg=2, stages=2, consumer_regs=240,
                        dv_early=False, dq_lag=True, shared_dq=False, early_dp=False, dq_writer=True)
    assert tile is not None and tile.dq_writer and not bwd.persistent_tiles(tile)
    _run(q, k, v, tile=tile, **kw)


# deterministic=False calls that chain_by_default sends to the persistent grid's ordered chain (measured faster).
CHAIN_DEFAULT_CASES = [
    (1, 2048, 2048, 4, 4, 128, 128, -1, -1, 0.0, False, False),
    (2, 2048, 2048, 8, 2, 128, 128, -1, 0, 0.0, False, True),      # GQA, causal, lse gradient
    (1, 4096, 4096, 4, 1, 96, 96, -1, -1, 0.0, False, False),      # MQA, D padded to 128
    (1, 2048, 2100, 4, 4, 128, 128, -1, 700, 0.0, False, False),   # a right window, Sq < Sk
    (2, 1000, 1000, 8, 2, 64, 64, -1, -1, 0.0, False, True),       # D = 64 (CHAIN_BY_DEFAULT_D64), GQA, odd length
    (1, 1024, 700, 4, 4, 40, 40, -1, -1, 0.0, False, False),       # D padded to 64, Sq > Sk
    (1, 2048, 2048, 8, 2, 64, 64, -1, -1, 0.0, False, False),      # D = 64 GQA up to 2048 rows
    (2, 1000, 1000, 8, 2, 64, 64, -1, 0, 0.0, False, True),        # causal D = 64 (D64_CAUSAL_CHAIN), lse gradient
    (1, 700, 1024, 4, 4, 40, 40, -1, 0, 0.0, False, False),        # causal D padded to 64, Sq < Sk
    (3, 200, 200, 4, 2, 128, 128, -1, 0, 0.0, False, False),       # causal D = 128 from 128 rows, GQA, odd length
    (1, 1900, 1900, 4, 2, 128, 128, -1, 0, 0.0, False, False),     # causal D = 128 up to 2048 rows, GQA, odd length
]


@pytest.mark.parametrize("case", CHAIN_DEFAULT_CASES, ids=[backward_case_id(c) for c in CHAIN_DEFAULT_CASES])
def test_chain_by_default(monkeypatch, case):
    """Such a call runs the chain (its counters are made) and its gradients pass the numerics rule, bitwise equal
    over repeats."""
    bwd = _bwd()
    q, k, v, kw = backward_case_inputs(case, torch.bfloat16, DEV)
    assert bwd.chain_by_default(q.shape[-1], v.shape[-1], kw["left"], kw["right"], kw["softcap"],
                                kw["sink"] is not None, False, q.shape[1], q.shape[-1] ** -0.5,
                                q.shape[-2] // k.shape[-2])
    made = []
    real = bwd.dq_chain_counters
    monkeypatch.setattr(bwd, "dq_chain_counters", lambda *a: made.append(a) or real(*a))
    check_backend_backward(_repeating(bwd.backward, 3), q, k, v, **kw)
    assert len(made) == 4, made


# Calls whose persistent chain's last links write dQ themselves (backward.DQ_CAST, dq_cast_serves: under a right
# window), with and without deterministic=True: odd lengths (the last query block clipped by the TMA store), head
# dims padded (its columns clipped), Sq < Sk, GQA, D = 64; and one without a right window, which casts after the
# kernel.
DQ_CAST_CASES = [
    (1, 2048, 2100, 4, 4, 128, 128, -1, 700, 0.0, False, False),    # a right window, Sq < Sk
    (3, 200, 200, 4, 2, 128, 128, -1, 0, 0.0, False, False),        # causal, GQA, odd length
    (1, 700, 1024, 4, 4, 128, 128, -1, 0, 0.0, False, False),       # causal, Sq < Sk
    (1, 1500, 1500, 4, 1, 96, 96, -1, 0, 0.0, False, False),        # causal, MQA, D padded to 128, odd length
    (2, 1000, 1000, 8, 2, 64, 64, -1, 0, 0.0, False, False),        # causal D = 64, GQA
    (1, 700, 1024, 4, 4, 40, 40, -1, 0, 0.0, False, False),         # causal, D padded to 64, Sq < Sk
    (1, 2048, 2048, 4, 4, 128, 128, -1, -1, 0.0, False, False),     # no right window: the cast after the kernel
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", DQ_CAST_CASES, ids=[backward_case_id(c) for c in DQ_CAST_CASES])
def test_dq_cast(monkeypatch, case, dtype, deterministic):
    """The kernel writes dQ (dq_out given to the launch), the gradients pass the numerics rule with the allocator
    poisoned (every row of dQ written), and they equal bitwise those of the same call with the cast after the kernel
    (DQ_CAST off): the same fp32 sums, rounded to nearest either way."""
    bwd = _bwd()
    # DQ_CAST needs the first link's stores (fenced since session 35 against their race, benchmarks/NOTES.md): the
    # shipped state. A rare failure of the bitwise comparison below would be that race (a lost add), not the cast.
    assert bwd.DQ_STORE_FIRST and bwd.DQ_CAST and bwd.CHAIN_FENCE
    q, k, v, kw = backward_case_inputs(case, dtype, DEV)
    dout = torch.randn(*q.shape[:-1], v.shape[-1], device=DEV, dtype=dtype)
    cast = []
    real = bwd._launch_main
    monkeypatch.setattr(bwd, "_launch_main", lambda *a, **o: cast.append(o.get("dq_out") is not None) or real(*a, **o))
    got = check_backend_backward(bwd.backward, q, k, v, dout=dout, deterministic=deterministic, **kw)
    assert cast == [kw["right"] >= 0], cast
    monkeypatch.setattr(bwd, "DQ_CAST", False)
    cast.clear()
    after = check_backend_backward(bwd.backward, q, k, v, dout=dout, deterministic=deterministic, **kw)
    assert cast == [False], cast
    for name, a, b in zip(("dq", "dk", "dv"), got[:3], after[:3]):
        assert torch.equal(a, b), f"{name} differs with the cast after the kernel"


# The default's unordered reduce-add on the shared-dQ tile over an unzeroed accumulator, key block 0 storing its
# shares first and the other key blocks waiting for them (backward.DQ_FIRST_STORE, dq_first_store_serves): calls
# without a window off the chain (non-causal D = 128 below KT_PERSIST_CHAIN_MIN_ROWS, softcap or sink ones at any
# length): odd lengths, Sq < Sk and Sq > Sk, one query row (every key block adds into one block), GQA / MQA, D padded
# to 128, softcap and sink (the sink's P·dP partials), the lse gradient.
FIRST_STORE_CASES = [
    (2, 1024, 1024, 4, 4, 128, 128, -1, -1, 0.0, False, False),
    (2, 1000, 1000, 8, 2, 128, 128, -1, -1, 0.0, False, True),     # GQA, odd length, lse gradient
    (1, 700, 1300, 4, 1, 96, 96, -1, -1, 0.0, False, False),       # Sq < Sk, MQA, D padded to 128
    (1, 1300, 700, 4, 4, 128, 128, -1, -1, 0.0, False, False),     # Sq > Sk
    (2, 1, 3001, 8, 2, 128, 128, -1, -1, 0.0, False, False),       # one query row, 24 key blocks into it
    (1, 3000, 3000, 8, 1, 128, 128, -1, -1, 50.0, True, True),     # softcap, sink, MQA, off the chain at 3000 rows
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", FIRST_STORE_CASES, ids=[backward_case_id(c) for c in FIRST_STORE_CASES])
def test_dq_first_store(monkeypatch, case, dtype):
    """Such a call launches the first-link build (counters made, no zeroed accumulator) and its gradients pass the
    numerics rule with the allocator poisoned (a row no store reached would be NaN); with DQ_FIRST_STORE off the
    same call zeroes the accumulator and passes too."""
    bwd = _bwd()
    q, k, v, kw = backward_case_inputs(case, dtype, DEV)
    first = []
    real = bwd._launch_main
    monkeypatch.setattr(bwd, "_launch_main", lambda *a, **o: first.append(
        (o.get("dq_first_only"), o.get("dq_store_first"), o.get("dq_chain") is not None)) or real(*a, **o))
    check_backend_backward(bwd.backward, q, k, v, **kw)
    assert first == [(True, True, True)], first
    monkeypatch.setattr(bwd, "DQ_FIRST_STORE", False)
    first.clear()
    check_backend_backward(bwd.backward, q, k, v, **kw)
    assert first == [(False, False, False)], first


# Causal calls with large GQA groups: each kv head's group split over virtual kv heads (backward.gqa_split).
GQA_SPLIT_CASES = [
    (2, 1000, 1000, 16, 1, 128, 128, -1, 0, 0.0, False, True),     # MQA, odd length, lse gradient
    (1, 777, 1543, 16, 2, 128, 128, -1, 0, 0.0, True, False),      # Sq < Sk, a sink
    (1, 2048, 2048, 16, 2, 64, 64, -1, 0, 0.0, False, False),
    (1, 1500, 1500, 16, 1, 96, 96, -1, 300, 0.0, False, False),    # a right window, D padded to 128
    (1, 1100, 1100, 8, 1, 256, 256, -1, 0, 0.0, False, True),      # the D = 256 tile, MQA, lse gradient
    (1, 900, 1300, 16, 2, 192, 192, -1, 0, 0.0, False, False),     # D = 192 on the D = 256 tile, Sq < Sk
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "ordered"])
@pytest.mark.parametrize("case", GQA_SPLIT_CASES, ids=[backward_case_id(c) for c in GQA_SPLIT_CASES])
def test_gqa_split(monkeypatch, case, deterministic):
    """The kernel runs on group / split query heads a kv head, and the summed dK / dV pass the numerics rule."""
    bwd = _bwd()
    q, k, v, kw = backward_case_inputs(case, torch.bfloat16, DEV)
    split = bwd.gqa_split(q, k, v, kw["left"], kw["right"], None, deterministic)
    # deterministic D = 256 calls stay whole (their ordered dQ pass would read every virtual head's K / V copy).
    assert split == 1 if deterministic and q.shape[-1] > 128 else split > 1
    heads = _spy_main_kv_heads(monkeypatch, bwd)
    backward = _repeating(bwd.backward, 2) if deterministic else bwd.backward
    check_backend_backward(backward, q, k, v, deterministic=deterministic, **kw)
    assert heads and all(h == k.shape[-2] * split for h in heads), heads


def _spy_main_kv_heads(monkeypatch, bwd):
    """The kv head counts of every main-kernel launch, appended as they come."""
    heads = []
    real = bwd._launch_main
    monkeypatch.setattr(bwd, "_launch_main", lambda dout, q_, k_, *a, **o: heads.append(k_.shape[-2]) or
                        real(dout, q_, k_, *a, **o))
    return heads


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "ordered"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gqa_split_packed(monkeypatch, d, deterministic):
    """The split on packed sequences of different lengths (one of a single row, Sq != Sk, seqused_k cutting one
    short): each kv head's virtual heads are summed over the packed rows, and rows past seqused_k stay 0."""
    bwd = _bwd()
    torch.manual_seed(31 + d)
    lens_q, lens_k = [300, 1, 517, 64, 1000], [300, 129, 700, 64, 999]
    hq, hkv = 16, 2
    q, k, v, varlen = make_inputs(None, None, None, hq, hkv, d, d, torch.bfloat16, DEV, varlen_lens=(lens_q, lens_k))
    varlen["seqused_k"] = torch.tensor([300, 100, 650, 64, 999], dtype=torch.int32, device=DEV)
    split = bwd.gqa_split(q, k, v, -1, 0, None, deterministic)
    assert split == (1 if deterministic and d == 256 else hq // hkv // bwd.GQA_SPLIT_HEADS[d])
    heads = _spy_main_kv_heads(monkeypatch, bwd)
    backward = _repeating(bwd.backward, 2) if deterministic else bwd.backward
    check_backend_backward(backward, q, k, v, right=0, varlen=varlen, deterministic=deterministic)
    assert heads and all(h == hkv * split for h in heads), heads


# The fp32 dQ staging stores without bank conflicts (tile.dq_spread, dq_staging.py): the same bytes through a
# permuted view, so any error in the view's layout shows as wrong dQ. Every kernel that stages dQ: the keys-as-rows
# tiles (D = 64, causal D = 128 on the persistent grid), the shared-dQ tile (D = 128 without a mask) and the D = 256
# kernel (its in-kernel reduce-add under a window; the ordered chain's staging with deterministic=True).
SPREAD_CASES = [c for c in MATRIX if c[9] == 0] + [c for c in D256_CASES if c[7] >= 0 or c[8] >= 0][:3]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "ordered"])
@pytest.mark.parametrize("case", SPREAD_CASES, ids=[backward_case_id(c) for c in SPREAD_CASES])
def test_dq_spread(case, deterministic):
    from dataclasses import replace
    from fa4.kernels.sm90 import configs
    bwd = _bwd()
    q, k, v, kw = backward_case_inputs(case, torch.bfloat16, DEV)
    td, tdv = configs.tile_dim(case[5]), configs.tile_dim(case[6])
    if max(td, tdv) == 256:
        tile = _d256_tile()
    else:
        tile = bwd.default_tile(td, tdv, kw["left"], kw["softcap"], window_right=kw["right"],
                                deterministic=deterministic, sink=kw["sink"] is not None,
                                softmax_scale=q.shape[-1] ** -0.5, seqlen_q=q.shape[1])
    tile = replace(tile, dq_spread=True)
    _run(q, k, v, tile=tile, deterministic=deterministic, **kw)


# lse2 and Delta as a K extension of Sᵀ and dPᵀ (tile.stats_ext, the D = 64 default for batched bf16 calls): the
# preprocess's [hi, mid, lo] parts (padding rows included), the extension wgmmas, under the numerics rule; a spy
# proves the kernel built STATS_EXT, and the same case with the extension off agrees.
EXT_CASES = [c for c in MATRIX if configs_tile_dim(c[5]) == 64 == configs_tile_dim(c[6]) and c[9] == 0.0]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "ordered"])
@pytest.mark.parametrize("case", EXT_CASES, ids=[backward_case_id(c) for c in EXT_CASES])
def test_stats_ext(case, deterministic, monkeypatch):
    from dataclasses import replace
    bwd = _bwd()
    q, k, v, kw = backward_case_inputs(case, torch.bfloat16, DEV)
    tile = bwd.default_tile(64, 64, kw["left"], kw["softcap"], window_right=kw["right"], deterministic=deterministic,
                            sink=kw["sink"] is not None, softmax_scale=q.shape[-1] ** -0.5, seqlen_q=q.shape[1])
    if not tile.keys_as_rows:
        pytest.skip("not a keys-as-rows tile")
    built = []
    real = bwd.launch_plan

    def spy(*a, **k):
        grid, args, constexprs = real(*a, **k)
        built.append(constexprs.get("STATS_EXT"))
        return grid, args, constexprs

    monkeypatch.setattr(bwd, "launch_plan", spy)
    monkeypatch.setattr(bwd.launch, "lookup", lambda key: None)  # build every plan: the spy sees each launch
    _run(q, k, v, tile=replace(tile, stats_ext=True), deterministic=deterministic, **kw)
    assert built and all(built), built
    built.clear()
    _run(q, k, v, tile=replace(tile, stats_ext=False), deterministic=deterministic, **kw)
    assert built and not any(built), built
