"""The Gluon Hopper backward (fa4/kernels/sm90/backward.py), checked without a GPU.

1. Every shipped configuration of the main kernel compiles for sm_90a (a child process per batch: a failing
   Gluon compile can abort the process); its SASS has wgmma (HGMMA), TMA loads (UTMALDG), the dQ TMA
   reduce-add (UTMAREDG, unless deterministic), no local memory in the main loop, and fits shared memory.
2. The block bookkeeping (query-block range of a key block, which (query block, key slab) pairs skip the
   mask), mirrored in Python, covers every visible pair and never skips a mask it needs.
3. The kernel's algorithm, emulated block by block in torch (padded lse2 / Delta, masks only where the
   bookkeeping asks, dQ summed over key slabs, dK / dV over the GQA group), matches fa4.reference.backward.
4. The consumers' barrier protocol (Q / dO ring, DQ_SHARED hand-over, PING_PONG turns), modelled in Python
   and run under random schedules: no deadlock, no parity wait off by two phases, no buffer overwritten
   while read.
"""
import dataclasses
import math
import os

import numpy as np
import pytest
import torch

from aot_children import compile_reports
from naive import visible_mask
from plan_check import assert_plan_matches_binding

try:
    import triton
    from triton.experimental import gluon  # noqa: F401
    _HAVE_GLUON = triton.__version__ == "3.6.0"
except Exception:  # pragma: no cover
    _HAVE_GLUON = False

# Allowance for local memory outside the main loop: values the epilogue needs, spilled once per CTA
# around the loop (D = 128 runs at the 240-register limit). Inside the loop: LOOP_ALLOWANCE below.
MAX_LDL_STL_OUTSIDE_LOOP = 64
# The sink-partials variant keeps its per-head accumulator and slot arithmetic around the loop: ~80 in all.
# The three-consumer D = 64 tile (160 registers a consumer) spills ~70-100 values around its loop under a causal
# mask (once per CTA, against 40-170 steps of ~600 instructions).
TOTAL_ALLOWANCE = {"d128-sink-partials": 96, "d128-sink-partials-causal-gqa2": 96, "d64-causal": 96,
                   "d64-early-dp-causal": 112, "d64-pingpong-ordered-varlen-causal": 96, "d64-varlen-causal": 96}

# In-loop local memory allowed per case (default 0). At D = 128 varlen (sequence start and length) and a
# left window (its mask bounds) keep a few more scalars live at the 240-register limit: ptxas reloads a few
# values (shared-memory descriptors, bounds) from local memory in the default partition's loop, L1 hits,
# a handful of instructions against ~2000 a step. A known cost, to be removed.
# The shipped D = 128 tile (shared dQ, three stages, dP under the softmax; 2026-11-25) keeps a few more values
# live: 8 reloads a step with a causal or left-window mask, against a step of ~2000 instructions; it measured
# 15-25% faster on the H100 than the tile these limits were 0-4 for. Its non-causal calls hand the dQ reduce-add
# to the writer warp (2026-11-26): their loops reload nothing (4 before).
LOOP_ALLOWANCE = {"d96-window": 8, "d96-shared-dq3-window": 8,
                  "d128-shared-dq-causal-gqa2": 8, "d128-early-dp-causal": 8,
                  "d128-causal": 8, "d128-sink-partials": 14,
                  "d128-sink-partials-causal-gqa2": 22,
                  # ping_pong at D = 128 (2026-11-26): as the shipped tile where it issues the same products
                  # (plain 4, causal 7 against 8). With varlen it still issues dP beside S (its first turn), which
                  # early_dp alone does not do there: 12 reloads of wgmma descriptors (L1 hits) against 0.
                  "d128-pingpong": 4, "d128-pingpong-causal-gqa2": 7, "d128-pingpong-varlen-causal": 14,
                  "d128-pingpong-unshared": 1, "d96-pingpong-window": 7,
                  # The dQ chain (2026-11-26): the writer warp keeps the chain's bookkeeping out of the consumers,
                  # whose loops then reload less than the shipped causal build's (1 against 8).
                  "d128-chain-causal-gqa2": 1, "d96-chain-right-window": 1,
                  # lse2 and Delta by TMA into shared memory (STATS_TMA, session 12): ptxas reloads 2 values a step
                  # more in some builds (L1 hits), against a global load's L2 round trip a step taken off the
                  # consumers' chain.
                  "d128-deterministic-causal": 2, "d128-chain": 2, "d128-writer-unshared": 2,
                  "d128-chain-varlen-causal": 3,
                  # The D = 256 kernel (backward_d256.py) with partial products (d256_roles off, the tile of
                  # 2026-11-26): consumer 0 (at 237 of its 240 registers) keeps the window's mask bounds and tanh's
                  # values in local memory and reloads them each step (L1 hits); with the second dQ half staged in
                  # the Q half (dq_in_q) one more value in the plain build.
                  "d256-partials": 1, "d256-partials-window-softcap-gqa2": 31,
                  # With whole products (d256_roles, the shipped tile since 2026-11-27, and P handed over before
                  # dS, d256_early_dv) consumer 0 no longer holds a partial S and dP beside each other: no reloads;
                  # with the next step's lse2 / Delta held in registers (d256_stats_ahead) one in the varlen window
                  # build.
                  "d256-varlen-window": 1, "d256-roles-late-dv": 1,
                  # The three-consumer D = 64 tile (160 registers a consumer, 2026-11-26): a causal mask keeps
                  # 4 values in local memory (L1 hits, against ~600 instructions a step); dP under the softmax
                  # 13; ping_pong with varlen 18. Softcap takes the two-consumer tile (default_tile).
                  "d64-three-consumers-causal": 4, "d64-early-dp-causal": 13,
                  "d64-pingpong-ordered-varlen-causal": 18,
                  # The keys-as-rows D = 64 kernel (backward_kt.py, session 13; its dQ share a step late): none in
                  # the plain build; causal 9, packed causal 10, a window 5, dV early 1 (scalars such as the
                  # sequence and mask bounds reloaded from L1), against ~1,100 instructions a step.
                  "d64-causal": 9, "d64-varlen-causal": 12, "d64-window-gqa2": 5, "d64-dv-early-causal": 1,
                  # its trace build (a probe: the stamps' addresses and clocks take registers)
                  "d64-trace-causal": 12,
                  # The same kernel for causal D = 128 (D128_CAUSAL_TILE): packed 16 (the sequence bounds).
                  "d128-varlen-causal": 16}
# Causal and windowed batched builds dispatch their CTAs in chunks of heads (backward.cta_chunk, session 15: the CTA
# coordinates from three grid axes, CTA_CHUNKED): 1-2 more reloads a step in these builds.
LOOP_ALLOWANCE.update({"d128-causal": 9, "d64-causal": 11, "d64-dv-early-causal": 3, "d64-window-gqa2": 6})
# Packed causal builds chunk their CTAs too since session 20 (+2-3% forward + backward at D = 128 measured with them).
LOOP_ALLOWANCE.update({"d128-varlen-causal": 18})
# Batched causal D = 128 runs the keys-as-rows kernel on the persistent grid (session 17: the tile loop's counters,
# ring slot and tile index live beside the step's): 2 more reloads a step (L1 hits), against a tile's fixed cost
# 6.4 -> 4.8 µs and +3% on the causal S = 1024 call.
LOOP_ALLOWANCE.update({"d128-causal": 11, "d96-window": 10})
# The keys-as-rows chain and writer builds (session 24): what the one-CTA-a-tile keys-as-rows builds reload (L1 hits).
LOOP_ALLOWANCE.update({"d64-chain-causal": 8, "d64-chain-varlen-causal-gqa2": 12, "d40-chain-right-window": 8,
                       "d64-kt-writer-causal": 4, "d128-kt-writer-causal": 9})
# deterministic=True for batched D = 128 calls without a left window runs on the persistent keys-as-rows grid
# (KT_PERSIST_CHAIN, session 26): the chain builds (causal: the walk top-down, query block by query block; the
# writer warp) reload 6 values a step, non-causal 7 (L1 hits; the default's causal build 11), the build without dQ
# (the ordered pass's side, DQ_CHAIN off) 5.
LOOP_ALLOWANCE.update({"d128-chain-causal-gqa2": 6, "d96-chain-right-window": 6, "d128-deterministic-causal": 5,
                       "d128-shared-chain-causal-gqa2": 1, "d128-chain": 7, "d128-shared-chain": 2})
TOTAL_ALLOWANCE.update({"d128-chain-causal-gqa2": 96, "d96-chain-right-window": 96})
# The chain's lagged release (backward.chain_release_lag, session 26): in the packed causal build the writer warp
# (its loader-sized register budget) keeps the previous step's coordinates in local memory, 4 accesses a step of one
# warp (L1 hits); the consumers' loops 2 + 2 against 3 + 0 before.
LOOP_ALLOWANCE.update({"d128-chain-varlen-causal": 8})
# The shared-dQ D = 128 consumers wait for each other's loop end before dK overwrites a K slot the other's dQ products
# read (loop_done, session 18): ptxas then keeps one value in local memory across the masked branch of a step (a
# partial key block only, L1 hits; the unmasked path of the loop has none). Before, 0.
LOOP_ALLOWANCE.update({"d128-plain": 2, "d128-gqa4-fp16": 2, "d128-shared-dq": 2, "d128-seqused": 4})
# The conflict-free dQ staging store (tile.dq_spread, session 29: one select a value beside the staging store) costs
# the persistent keys-as-rows chain builds 1-4 more reloads a step (L1 hits); on those calls it measured 0.94-1.08x
# (bwd_flag_ab.py --tile-field dq_spread, benchmarks/NOTES.md session 29).
LOOP_ALLOWANCE.update({"d128-chain": 8, "d128-chain-causal-gqa2": 10, "d96-chain-right-window": 10,
                       "d128-chain-varlen-causal": 10})
# lse2 and Delta as K extensions (tile.stats_ext, the D = 64 default since session 30): no statistics loads, so the
# causal build reloads fewer values (11 -> 5); the windowed one 3 more (6 -> 9, its mask bounds; L1 hits), against
# +2-8% measured on the D = 64 rows.
LOOP_ALLOWANCE.update({"d64-window-gqa2": 9})
# On the D = 128 keys-as-rows tile (its ones operand in shared memory): the persistent chain 8 -> 16 reloads a step
# (L1 hits), against 4.3% fewer main-kernel cycles measured at S = 16384 (Nsight Compute, benchmarks/NOTES.md session
# 30). The causal and windowed builds stay at their earlier 10-11 once the step's query columns, which only the
# statistics' loads use, are not made with the extensions.
LOOP_ALLOWANCE.update({"d128-chain": 16})
TOTAL_ALLOWANCE.update({"d128-chain": 80})
# The non-causal chain issues each dQ share before the step's dV and dK (backward.dq_first_serves, session 32): 16 -> 2
# reloads a step.
LOOP_ALLOWANCE.update({"d128-chain": 2})
# Batched causal D = 64 runs on the persistent grid since session 31 (backward.D64_PERSIST_CAUSAL; the tile loop's
# state beside the step's): 5 -> 13 reloads a step (L1 hits), against 1.5-3.3% faster calls measured.
LOOP_ALLOWANCE.update({"d64-causal": 13})

# The three-consumer D = 64 tile (queries as rows, dQ by the ordered pass) shipped before keys_as_rows: the base of
# the D = 64 probe variants below.
OLD64 = dict(keys_as_rows=False, block_m=64, num_wg=3, consumer_regs=160, separate_dq=True)

# (name, backward_aot.compile_config kwargs)
# The D = 256 tile of session 22: partial S and dP products, none of session 23's switches.
D256_PARTIALS = dict(d256_roles=False, d256_early_dv=False, d256_stats_ahead=False, d256_hand_swizzle=False)

CASES = [
    ("d128-plain", dict(d=128, dv=128)),
    ("d128-causal", dict(d=128, dv=128, causal=True)),
    ("d64-plain", dict(d=64, dv=64)),
    ("d64-causal", dict(d=64, dv=64, causal=True)),
    ("d128-gqa4-fp16", dict(d=128, dv=128, gqa=4, dtype="float16")),
    ("d128-deterministic-causal", dict(d=128, dv=128, causal=True, deterministic=True)),
    ("d64-deterministic", dict(d=64, dv=64, deterministic=True)),
    ("d128-varlen-causal", dict(d=128, dv=128, varlen=True, causal=True)),
    ("d64-window-softcap-gqa2", dict(d=64, dv=64, window=(100, 50), softcap=30.0, gqa=2)),
    ("d128-seqused", dict(d=128, dv=128, seqused=True)),
    ("d64-no-lag-stages3", dict(d=64, dv=64, tile=dict(dq_lag=False, stages=3))),
    # The D = 64 keys-as-rows kernel's other forms (backward_kt.py): dV issued before dPᵀ is waited for; a window
    # both sides with GQA; the three-consumer tile shipped before it, plain and causal.
    ("d64-dv-early-causal", dict(d=64, dv=64, causal=True, tile=dict(dv_early=True))),
    ("d64-window-gqa2", dict(d=64, dv=64, window=(100, 50), gqa=2)),
    ("d64-three-consumers", dict(d=64, dv=64, tile=OLD64)),
    ("d64-three-consumers-causal", dict(d=64, dv=64, causal=True, tile=OLD64)),
    # The keys-as-rows trace build (benchmarks/bwd_trace.py; %clock64 stamps to global memory at 11 points a step).
    ("d64-trace-causal", dict(d=64, dv=64, causal=True, tile=dict(trace=True))),
    ("d64-varlen-causal", dict(d=64, dv=64, varlen=True, causal=True)),
    ("d96-window", dict(d=96, dv=96, window=(256, 0))),             # head dims padded to the 128 tile
    ("d40-24", dict(d=40, dv=24)),
    # dQ shared over the consumers (one [64, D / 2] reduce-add per warpgroup), with two and three stages.
    ("d128-shared-dq", dict(d=128, dv=128, tile=dict(shared_dq=True))),
    ("d128-shared-dq-causal-gqa2", dict(d=128, dv=128, causal=True, gqa=2, tile=dict(shared_dq=True))),
    ("d128-shared-dq3-varlen-causal", dict(d=128, dv=128, varlen=True, causal=True,
                                           tile=dict(shared_dq=True, stages=3))),
    ("d96-shared-dq3-window", dict(d=96, dv=96, window=(256, 0), tile=dict(shared_dq=True, stages=3))),
    # dP issued right behind S (a probe variant).
    ("d64-early-dp-causal", dict(d=64, dv=64, causal=True, tile=dict(OLD64, early_dp=True))),
    ("d128-early-dp-causal", dict(d=128, dv=128, causal=True, tile=dict(early_dp=True))),
    # The sink gradient's Σ P·dP partials in the main kernel (tile.sink_pdp, a probe variant for now).
    ("d128-sink-partials", dict(d=128, dv=128, tile=dict(sink_pdp=True), sink_partials=True)),
    ("d128-sink-partials-causal-gqa2", dict(d=128, dv=128, causal=True, gqa=2, tile=dict(sink_pdp=True),
                                            sink_partials=True)),
    # The consumers taking turns (tile.ping_pong, a probe variant): the shipped tiles plus ping_pong. At D = 64
    # "ordered" is what the shipped separate_dq tile launches (no dQ product in the main kernel); the reduce-add
    # build is checked too. At D = 128 also one dQ share per consumer in two column slices (the turn passes
    # after the first).
    ("d64-pingpong-ordered", dict(d=64, dv=64, deterministic=True, tile=dict(OLD64, ping_pong=True))),
    ("d64-pingpong-ordered-varlen-causal", dict(d=64, dv=64, varlen=True, causal=True, deterministic=True,
                                                tile=dict(OLD64, ping_pong=True))),
    ("d64-pingpong", dict(d=64, dv=64, tile=dict(OLD64, ping_pong=True))),
    ("d64-pingpong-window-softcap-gqa2", dict(d=64, dv=64, window=(100, 50), softcap=30.0, gqa=2,
                                              tile=dict(OLD64, ping_pong=True, num_wg=2, consumer_regs=240))),
    ("d128-pingpong", dict(d=128, dv=128, tile=dict(ping_pong=True))),
    ("d128-pingpong-causal-gqa2", dict(d=128, dv=128, causal=True, gqa=2, tile=dict(ping_pong=True))),
    ("d128-pingpong-varlen-causal", dict(d=128, dv=128, varlen=True, causal=True, tile=dict(ping_pong=True))),
    ("d128-pingpong-ordered-causal", dict(d=128, dv=128, causal=True, deterministic=True,
                                          tile=dict(ping_pong=True))),
    ("d128-pingpong-unshared", dict(d=128, dv=128, tile=dict(ping_pong=True, shared_dq=False, stages=2))),
    ("d96-pingpong-window", dict(d=96, dv=96, window=(256, 0), tile=dict(ping_pong=True))),
    # deterministic=True through the main kernel's ordered dQ chain (ORDERED_DQ): ascending (no window) and
    # descending (a right window; CTAs dispatched last block first).
    ("d128-chain", dict(d=128, dv=128, dq_chain=True)),
    ("d128-chain-causal-gqa2", dict(d=128, dv=128, causal=True, gqa=2, dq_chain=True)),
    ("d128-chain-varlen-causal", dict(d=128, dv=128, varlen=True, causal=True, dq_chain=True)),
    ("d96-chain-right-window", dict(d=96, dv=96, window=(-1, 200), dq_chain=True)),
    # ... and the shared-dQ tile's descending chain (KT_PERSIST_CHAIN off; its writer releases a step late,
    # chain_release_lag).
    ("d128-shared-chain-causal-gqa2", dict(d=128, dv=128, causal=True, gqa=2, dq_chain=True,
                                           tile=dict(shared_dq=True))),
    ("d128-shared-chain", dict(d=128, dv=128, dq_chain=True, tile=dict(shared_dq=True))),
    # The chain in the keys-as-rows kernel (session 24: deterministic D = 64 with a right window, or from 8192 query
    # rows without one; the same writer warp, backward.dq_writer), and that writer issuing the unordered adds (tile.dq_writer, a
    # probe on the one-CTA-a-tile grid).
    ("d64-chain-causal", dict(d=64, dv=64, causal=True, dq_chain=True)),
    ("d64-chain", dict(d=64, dv=64, dq_chain=True)),
    # deterministic=True without a window below KT_ASC_CHAIN_MIN_ROWS rows: the persistent grid's chain
    # (D64_PERSIST_DET)
    ("d64-chain-persistent", dict(d=64, dv=64, dq_chain=True, tile=dict(persistent=True))),
    ("d64-chain-varlen-causal-gqa2", dict(d=64, dv=64, varlen=True, causal=True, gqa=2, dq_chain=True)),
    ("d40-chain-right-window", dict(d=40, dv=40, window=(-1, 200), dq_chain=True)),
    ("d64-kt-writer-causal", dict(d=64, dv=64, causal=True, tile=dict(dq_writer=True))),
    ("d128-kt-writer-causal", dict(d=128, dv=128, causal=True, tile=dict(keys_as_rows=True, block_m=64, num_wg=2,
                                                                         stages=2, consumer_regs=240, dv_early=False,
                                                                         dq_lag=True, shared_dq=False,
                                                                         early_dp=False, dq_writer=True))),
    # The writer warp for the unordered reduce-add: the shipped D = 128 tile (non-causal), one dQ share per
    # consumer at D = 128 and at D = 64 with two consumers (probe variants).
    ("d128-writer-unshared", dict(d=128, dv=128, tile=dict(shared_dq=False, stages=2))),
    ("d64-writer-wg2", dict(d=64, dv=64, tile=dict(OLD64, num_wg=2, consumer_regs=240, separate_dq=False,
                                                   dq_writer=True))),
    # The opt-in D = 256 kernel (backward_d256.py: 64 keys a CTA, the consumers split the head dim).
    ("d256-plain", dict(d=256, dv=256, tile=dict(d256=True))),
    ("d256-causal", dict(d=256, dv=256, causal=True, tile=dict(d256=True))),
    ("d256-varlen-causal", dict(d=256, dv=256, varlen=True, causal=True, tile=dict(d256=True))),
    ("d256-gqa4-fp16", dict(d=256, dv=256, gqa=4, dtype="float16", tile=dict(d256=True))),
    ("d256-window-softcap-gqa2", dict(d=256, dv=256, window=(100, 50), softcap=30.0, gqa=2, tile=dict(d256=True))),
    ("d256-deterministic-causal", dict(d=256, dv=256, causal=True, deterministic=True, tile=dict(d256=True))),
    ("d256-varlen-window", dict(d=256, dv=256, varlen=True, window=(256, 0), tile=dict(d256=True))),
    ("d192-seqused", dict(d=192, dv=192, seqused=True, tile=dict(d256=True))),   # D padded to the 256 tile
    # The D = 256 tile with its session-23 switches off one by one, down to the partial products (d256_roles off, the
    # shipped tile until 2026-11-27).
    ("d256-hand-128b-swizzle", dict(d=256, dv=256, tile=dict(d256=True, d256_hand_swizzle=False))),
    ("d256-stats-behind", dict(d=256, dv=256, tile=dict(d256=True, d256_stats_ahead=False))),
    ("d256-roles-late-dv", dict(d=256, dv=256, causal=True, tile=dict(d256=True, d256_early_dv=False))),
    ("d256-partials", dict(d=256, dv=256, tile=dict(d256=True, **D256_PARTIALS))),
    ("d256-partials-window-softcap-gqa2", dict(d=256, dv=256, window=(100, 50), softcap=30.0, gqa=2,
                                               tile=dict(d256=True, **D256_PARTIALS))),
]

@pytest.fixture(scope="module")
def reports():
    return compile_reports("backward_aot", CASES)


def _tile_of(kw):
    """The BwdTile a case compiles (backward_aot.compile_config's choice)."""
    import triton as _triton
    from fa4.kernels.sm90 import backward
    widths = (_triton.next_power_of_2(max(kw["d"], 64)), _triton.next_power_of_2(max(kw["dv"], 64)))
    if kw.get("tile"):
        return backward.get_tile(*widths, **kw["tile"])
    right = 0 if kw.get("causal") else kw.get("window", (-1, -1))[1]
    return backward.default_tile(*widths, kw.get("window", (-1, -1))[0], kw.get("softcap", 0.0), window_right=right,
                                 deterministic=bool(kw.get("deterministic") or kw.get("dq_chain")),
                                 varlen=bool(kw.get("varlen")))


@pytest.mark.skipif(not _HAVE_GLUON, reason="needs triton 3.6.0 with Gluon")
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_sass(reports, name):
    from fa4.kernels.sm90 import configs
    rep, log = reports[name]
    kw = dict(CASES)[name]
    assert rep is not None, f"{name} failed to compile for sm_90a:\n{log}"
    assert rep["hgmma"] > 0, f"{name}: no HGMMA (wgmma)"
    assert rep["utmaldg"] > 0, f"{name}: no UTMALDG (TMA load)"
    tile = _tile_of(kw)
    if not kw.get("deterministic") and not tile.separate_dq:
        assert rep["utmaredg"] > 0, f"{name}: no UTMAREDG (dQ TMA reduce-add)"
    assert rep["spill_bytes"] == 0, f"{name}: {rep}"
    assert rep["loop_ldl_stl"] <= LOOP_ALLOWANCE.get(name, 0), f"{name}: local memory in the main loop: {rep}"
    assert rep["ldl_stl"] <= TOTAL_ALLOWANCE.get(name, MAX_LDL_STL_OUTSIDE_LOOP), f"{name}: {rep}"
    assert rep["smem"] <= configs.SMEM_LIMIT, f"{name}: {rep['smem']} bytes of shared memory"


def test_tiles_fit():
    from fa4.kernels.sm90 import backward, configs
    for d, dv in backward.shipped_tiles():
        tile = backward.get_tile(d, dv)
        # smem_bytes counts the dQ staging tiles (fp32, one per consumer, or one [BM, D / NWG] each when shared).
        assert tile is not None and backward.smem_bytes(tile, d, dv) <= configs.SMEM_LIMIT
        assert backward.smem_bytes(tile, d, dv) >= tile.block_m * d * 4 * (1 if tile.shared_dq else tile.num_wg)
    # Sharing dQ halves the staging, which leaves room for a third Q / dO stage at D = 128; it needs two
    # consumers and whole 128-byte column slices (D >= 128).
    assert backward.get_tile(128, 128, shared_dq=False, stages=3) is None
    assert backward.get_tile(128, 128, shared_dq=True, stages=3) is not None
    assert backward.get_tile(64, 64, shared_dq=True) is None


def test_d256_tile():
    """The D = 256 kernel is the table's tile for (256, 256) and reachable explicitly (d256=True): (256, 256) only,
    none of the D <= 128 kernel's variants, and within shared memory."""
    from fa4.kernels.sm90 import backward, backward_d256, configs
    assert (256, 256) in backward.shipped_tiles() and backward.get_tile(256, 256) == backward.D256_TILE
    tile = backward.get_tile(256, 256, d256=True)
    assert tile == backward.D256_TILE and tile.d256 and tile.block_n == 64
    assert backward.smem_bytes(tile, 256, 256) == backward_d256.smem_bytes(tile) <= configs.SMEM_LIMIT
    # 64 + 64 KiB of K, V and two Q stages, one dO stage, P and dS, the fp32 hand-over tile (module docstring).
    assert backward_d256.smem_bytes(tile) - configs.SMEM_RESERVE == 208 * 1024
    assert backward.get_tile(256, 256, d256=True, stages=3) is None       # 240 KiB
    for over in (dict(ping_pong=True), dict(sink_pdp=True), dict(shared_dq=True), dict(num_wg=2)):
        assert backward.get_tile(256, 256, d256=True, **over) is None, over
    assert backward.get_tile(128, 128, d256=True) is None
    assert backward.kernel_for(tile) is backward_d256.attn_bwd_d256_kernel
    assert backward.kernel_for(backward.get_tile(128, 128)) is backward.attn_bwd_kernel


def _sample_plan(d, tile, varlen, gqa=1, window_right=-1):
    """(q, k, v, grid, args, constexprs) of backward.launch_plan for small CPU inputs of head dim d (aot's samples)."""
    from fa4.kernels.sm90 import aot, backward
    q, k, v, cu = aot.sample_inputs(d, d, torch.bfloat16, varlen=varlen, gqa=gqa)
    b, s = aot.SAMPLE_BATCH, aot.SAMPLE_SEQLEN
    lse = torch.zeros((q.shape[-2], b * s) if varlen else (b, q.shape[-2], s))
    grid, args, cx = backward.launch_plan(
        torch.zeros_like(q), q, k, v, torch.zeros(q.shape), torch.zeros_like(k), torch.zeros_like(v), lse, lse,
        softmax_scale=0.1, window_left=-1, window_right=window_right, softcap=0.0, cu_seqlens_q=cu, cu_seqlens_k=cu,
        max_seqlen_q=s if varlen else None, max_seqlen_k=s if varlen else None, tile=tile)
    return q, k, v, grid, args, cx


@pytest.mark.skipif(not _HAVE_GLUON, reason="needs triton 3.6.0 with Gluon")
def test_d256_plan_arguments():
    """The D = 256 tile's launch plan: head-dim halves as TMA boxes, dQ in quarters, one 64-key slab a CTA, the
    D = 256 kernel's parameters (the same as attn_bwd_kernel's, so launch.Plan serves both)."""
    from fa4.kernels.sm90 import aot, backward, backward_d256, backward_kt
    tile = backward.D256_TILE
    for varlen in (False, True):
        q, k, v, grid, args, cx = _sample_plan(256, tile, varlen, gqa=2, window_right=0)
        b, s = aot.SAMPLE_BATCH, aot.SAMPLE_SEQLEN
        chunk = backward.cta_chunk(tile, b * k.shape[-2], s * q.shape[-2] // k.shape[-2], 256, -1, 0, varlen, False)
        want = (chunk, s // 64, b * k.shape[-2] // chunk) if cx["CTA_CHUNKED"] else (s // 64, b * k.shape[-2])
        assert cx["CTA_CHUNKED"] == (chunk > 1) and grid == want and cx["NWG"] == 1 and cx["BM"] == 64
        assert not (cx["DQ_SHARED"] or cx["EARLY_DP"] or cx["SINK_PDP"] or cx["PING_PONG"])
        for name in ("q_desc", "k_desc", "v_desc", "do_desc", "dk_desc", "dv_desc"):
            assert args[name].block_shape[-1] == 128, name
        assert args["dq_desc"].block_shape[-1] == 64
        # attn_bwd_kernel's parameters, then the D = 256 kernel's own defaulted constexprs (tile.dq_in_q,
        # tile.d256_roles).
        names = list(backward_d256.attn_bwd_d256_kernel.arg_names)
        assert names == list(backward.attn_bwd_kernel.arg_names) + ["DQ_IN_Q", "ROLES", "EARLY_DV", "STATS_AHEAD",
                                                                     "HAND_SWZ"]
        assert cx["DQ_SPREAD"] is (tile.dq_spread and backward.DQ_SPREAD)
        assert list(backward_kt.attn_bwd_kt_kernel.arg_names)[:len(backward.attn_bwd_kernel.arg_names)] == list(
            backward.attn_bwd_kernel.arg_names)
        assert cx["DQ_IN_Q"] is tile.dq_in_q and cx["ROLES"] is tile.d256_roles
        assert cx["EARLY_DV"] is tile.d256_early_dv and cx["STATS_AHEAD"] is tile.d256_stats_ahead
        assert cx["HAND_SWZ"] is tile.d256_hand_swizzle


@pytest.mark.skipif(not _HAVE_GLUON, reason="needs triton 3.6.0 with Gluon")
@pytest.mark.parametrize("d", [64, 128])
def test_ping_pong_plumbing(d):
    """tile.ping_pong reaches the kernel as PING_PONG (off for the shipped tiles and with one consumer), and
    the tile, part of the launch plan's signature, keeps the two builds' cached plans apart."""
    from fa4.kernels.sm90 import backward
    t, tile = _bwd_case(3, d, False, False)
    # At D = 64 ping-pong is a variant of the queries-as-rows tile shipped before keys_as_rows.
    base = OLD64 if d == 64 else {}
    on = backward.get_tile(d, d, **dict(base, ping_pong=True))
    one = backward.get_tile(d, d, **dict(base, ping_pong=True, num_wg=1, shared_dq=False))

    def constexprs(tl):
        return backward.launch_plan(t["dout"], t["q"], t["k"], t["v"], t["dq"], t["dk"], t["dv"], t["lse2"],
                                    t["delta"], softmax_scale=0.1, window_left=-1, window_right=0, softcap=0.0,
                                    tile=tl)[2]
    assert on is not None and on.ping_pong and not tile.ping_pong and one is not None
    assert constexprs(on)["PING_PONG"] and not constexprs(tile)["PING_PONG"] and not constexprs(one)["PING_PONG"]
    sig = dict(softmax_scale=0.1, window_left=-1, window_right=0, softcap=0.0, cu_seqlens_q=None, cu_seqlens_k=None,
               seqused_k=None, max_seqlen_q=None, max_seqlen_k=None, deterministic=False)
    assert (backward.plan_signature(t["dout"], t["q"], t["k"], t["v"], on, **sig)
            != backward.plan_signature(t["dout"], t["q"], t["k"], t["v"], tile, **sig))


# ---------------------------------------------------------------------------------------------------------
# Block bookkeeping: Python mirrors of backward._q_range and backward._mask's skip test.
# ---------------------------------------------------------------------------------------------------------

SLAB = 64  # keys per consumer warpgroup


def _q_range(n0, bn, bm, seq_q, seq_k, wl, wr):
    off = seq_k - seq_q
    n_last = min(n0 + bn, seq_k) - 1
    lo, hi = 0, seq_q
    if wr >= 0:
        lo = max(n0 - off - wr, 0)
    if wl >= 0:
        hi = min(n_last - off + wl + 1, seq_q)
    hi = hi if n0 < seq_k else 0
    m_lo = lo // bm
    return m_lo, max(-(-hi // bm) if hi > 0 else 0, m_lo)


def _needs_mask(kr0, m0, bm, seq_q, seq_k, wl, wr):
    off = seq_k - seq_q
    need = kr0 + SLAB > seq_k
    if wr >= 0:
        need |= kr0 + SLAB - 1 > m0 + off + wr
    if wl >= 0:
        need |= kr0 < m0 + bm - 1 + off - wl
    return need


@pytest.mark.parametrize("bm,nwg", [(64, 2), (64, 1), (128, 2)])
def test_query_ranges_cover_and_masks(bm, nwg):
    bn = SLAB * nwg
    rng = np.random.default_rng(bm + nwg)
    for _ in range(300):
        seq_q, seq_k = int(rng.integers(1, 600)), int(rng.integers(1, 600))
        wl = int(rng.choice([-1, 0, 5, 100, 1000]))
        wr = int(rng.choice([-1, 0, 3, 200]))
        vis = visible_mask(seq_q, seq_k, wl, wr, "cpu").numpy()
        for n0 in range(0, seq_k, bn):
            m_lo, m_hi = _q_range(n0, bn, bm, seq_q, seq_k, wl, wr)
            rows = np.nonzero(vis[:, n0:n0 + bn].any(1))[0]
            if len(rows):
                assert m_lo * bm <= rows.min() and rows.max() < m_hi * bm, (seq_q, seq_k, wl, wr, n0)
            for w in range(nwg):
                kr0 = n0 + w * SLAB
                for mb in range(m_lo, m_hi):
                    m0 = mb * bm
                    if _needs_mask(kr0, m0, bm, seq_q, seq_k, wl, wr):
                        continue
                    # Unmasked: every real row of the block sees every key of the slab (rows past seq_q
                    # have P = 0 through lse2 = +inf; keys past seq_k always take the mask).
                    block = vis[m0:min(m0 + bm, seq_q), kr0:kr0 + SLAB]
                    assert block.shape[1] == SLAB and block.all(), (seq_q, seq_k, wl, wr, n0, kr0, m0)


def _chain_before(nb, m, bm, bn, seq_q, seq_k, wr):
    """backward._dq_chain_wait's count of key blocks ahead of nb in query block m's chain (per release round)."""
    if wr < 0:
        return nb
    x = (m + 1) * bm + (seq_k - seq_q) + wr
    return min((x - 1) // bn, (seq_k - 1) // bn) - nb


@pytest.mark.parametrize("bm,nwg", [(64, 2), (128, 2), (64, 1)])
def test_dq_chain_order(bm, nwg):
    """The in-kernel ordered dQ (ORDERED_DQ, no left window): for every query block m, the key blocks that add to
    it form one chain, and each one's wait count is exactly the number of chain members before it. Every member
    before it was dispatched earlier (ascending: lower block index; descending: the grid runs last block first),
    so a CTA never waits on one that may not be resident yet (no deadlock), and in the descending chain the
    predecessor reaches m at an earlier step of its walk (no waiting in the steady state): BN / BM steps earlier
    with BN >= 2·BM (the lagged release's premise, backward.chain_release_lag)."""
    bn = SLAB * nwg
    rng = np.random.default_rng(7 * bm + nwg)
    for _ in range(300):
        seq_q, seq_k = int(rng.integers(1, 700)), int(rng.integers(1, 700))
        wr = int(rng.choice([-1, 0, 0, 3, 200, 5000]))
        n_blocks = -(-seq_k // bn)
        ranges = [_q_range(nb * bn, bn, bm, seq_q, seq_k, -1, wr) for nb in range(n_blocks)]
        for m in range(-(-seq_q // bm)):
            members = [nb for nb, (lo, hi) in enumerate(ranges) if lo <= m < hi]
            order = members if wr < 0 else members[::-1]   # the chain's order of adds
            for pos, nb in enumerate(order):
                assert _chain_before(nb, m, bm, bn, seq_q, seq_k, wr) == pos, (seq_q, seq_k, wr, m, nb)
                if pos:
                    prev = order[pos - 1]
                    dispatch = (lambda j: j) if wr < 0 else (lambda j: n_blocks - 1 - j)
                    assert dispatch(prev) < dispatch(nb)
                    step = m - ranges[nb][0]
                    prev_step = m - ranges[prev][0]
                    assert prev_step <= step if wr >= 0 else prev_step == step
                    if wr >= 0 and bn >= 2 * bm and ranges[nb][0] > 0:
                        # backward.chain_release_lag's premise: where a walk starts past query block 0 the
                        # predecessor is BN / BM >= 2 steps ahead, so a release a step late is still in time.
                        assert step - prev_step == bn // bm, (seq_q, seq_k, wr, m, nb)


def _walk_top_down(n_m, m_lo, group):
    """backward._step_block's walk on the persistent grid's ascending chain (a right window): [(g, m)] by step,
    query block after query block from the last one down, the group's heads at each."""
    return [(it % group, m_lo + n_m - 1 - it // group) for it in range(group * n_m)]


def _persistent_chain_run(seed, seq_q, seq_k, wr, group, pairs, ctas, chunk=1, bm=64, bn=128):
    """The persistent keys-as-rows grid's ordered dQ (KT_PERSIST_CHAIN), one add a step: tiles in _tile_coords'
    order (chunks of `chunk` (sequence, kv head) pairs, key block after key block within one), each CTA drawing its
    next tile from the shared counter once its current one is done, walking _walk_top_down and, at each (query block,
    head), waiting until the chain counter reads its key block (_dq_chain_wait's ascending count) before adding.
    Random schedules. Returns (adds in order per chain, each tile's walk) or raises on a deadlock."""
    rng = np.random.default_rng(seed)
    n_kb = -(-seq_k // bn)
    tiles = [(c + j, nb) for c in range(0, pairs, chunk) for nb in range(n_kb) for j in range(chunk)]
    walks = {}
    for pair, nb in tiles:
        lo, hi = _q_range(nb * bn, bn, bm, seq_q, seq_k, -1, wr)
        walks[(pair, nb)] = _walk_top_down(hi - lo, lo, group)
    counters, adds = {}, {}
    drawn = 0
    state = [None] * ctas  # (tile, step) per CTA
    done = 0
    while done < len(tiles):
        movable = []
        for c in range(ctas):
            if state[c] is None:
                if drawn < len(tiles):
                    movable.append(c)
                continue
            (pair, nb), step = state[c]
            g, m = walks[(pair, nb)][step]
            if counters.get((pair, g, m), 0) >= nb:
                movable.append(c)
        if not movable:
            raise AssertionError(f"deadlock: {state}")
        c = movable[rng.integers(len(movable))]
        if state[c] is None:
            state[c] = (tiles[drawn], 0)
            drawn += 1
            if not walks[state[c][0]]:
                state[c], done = None, done + 1
            continue
        (pair, nb), step = state[c]
        g, m = walks[(pair, nb)][step]
        assert counters.get((pair, g, m), 0) == nb, "two adds of one chain at once"
        counters[(pair, g, m)] = nb + 1
        adds.setdefault((pair, g, m), []).append(nb)
        state[c] = ((pair, nb), step + 1) if step + 1 < len(walks[(pair, nb)]) else None
        done += state[c] is None
    return adds, walks


def test_dq_store_first_rule(monkeypatch):
    """backward.dq_store_first_serves: the ascending chain's first link stores into an unzeroed accumulator only where
    key block 0 visits every query block (checked against the _q_range model) and no row lies outside it."""
    from fa4.kernels.sm90 import backward as bwd
    monkeypatch.setattr(bwd, "DQ_STORE_FIRST", True)  # the rule itself, whatever ships
    persistent, shared = bwd.D128_CAUSAL_TILE, bwd.get_tile(128, 128)
    serves = bwd.dq_store_first_serves
    assert serves(persistent, -1, 0, False, None, 1000, 1000) and serves(shared, -1, -1, False, None, 1000, 1000)
    assert not serves(shared, -1, 0, False, None, 1000, 1000)            # descending: the diagonal block adds first
    assert not serves(persistent, -1, 0, False, None, 1001, 1000)        # the first row sees no key
    assert serves(persistent, -1, 5, False, None, 1005, 1000) and not serves(persistent, -1, 5, False, None, 1006, 1000)
    assert not serves(persistent, -1, 0, True, None, 1000, 1000)         # packed
    assert not serves(persistent, -1, 0, False, object(), 1000, 1000)    # seqused_k
    assert not serves(shared, 64, -1, False, None, 1000, 1000)           # a left window
    monkeypatch.setattr(bwd, "DQ_STORE_FIRST", False)
    assert not serves(shared, -1, -1, False, None, 1000, 1000)
    monkeypatch.setattr(bwd, "DQ_STORE_FIRST", True)
    rng = np.random.default_rng(5)
    for _ in range(400):
        seq_q, seq_k = int(rng.integers(1, 700)), int(rng.integers(1, 700))
        wr = int(rng.choice([-1, 0, 3, 200]))
        if serves(persistent, -1, wr, False, None, seq_q, seq_k):
            lo, hi = _q_range(0, 128, 64, seq_q, seq_k, -1, wr)
            assert (lo, hi) == (0, -(-seq_q // 64)), (seq_q, seq_k, wr)


def test_chain_fence_ptx():
    """CHAIN_FENCE (the store-first race's fix): a fenced release puts a fence.acq_rel.gpu after its proxy fence and
    before the relaxed add; at level 2 the wait has one too, after the spin and before the proxy fence; unfenced,
    neither. Level 3 ships with the first link's store: fenced releases there only."""
    from fa4.kernels.sm90 import backward as bwd
    rel_on, rel_off = bwd._release_asm.fn(0, 1), bwd._release_asm.fn(0, 0)
    wait_on, wait_off = bwd._wait_asm.fn(2), bwd._wait_asm.fn(0)
    assert "fence.acq_rel.gpu" not in rel_off + wait_off + bwd._wait_asm.fn(1) + bwd._wait_asm.fn(3)
    assert rel_on.index("fence.proxy.async.global") < rel_on.index("fence.acq_rel.gpu") < rel_on.index("red.relaxed")
    assert wait_on.index("@wait bra") < wait_on.index("fence.acq_rel.gpu") < wait_on.index("fence.proxy.async")
    assert rel_on.replace("fence.acq_rel.gpu; ", "") == rel_off and wait_on.replace("fence.acq_rel.gpu; ", "") == wait_off
    assert bwd.CHAIN_FENCE == 3 or not bwd.DQ_STORE_FIRST  # the store needs the fence (benchmarks/repeat_stress.py)


def test_dq_cast_rule(monkeypatch):
    """backward.dq_cast_serves: the kernel writes dQ itself only on the persistent keys-as-rows grid's ascending
    chain whose first link stores (so every row has a last link), under a right window (without one the last key
    block's tiles, handed out last, cast every step: measured 6-10% slower), where the read-back tile fits."""
    from fa4.kernels.sm90 import backward as bwd, backward_kt, configs
    persistent, shared = bwd.D128_CAUSAL_TILE, bwd.get_tile(128, 128)
    d64 = bwd.get_tile(64, 64, persistent=True)
    serves = bwd.dq_cast_serves
    assert serves(persistent, True, 128, 0) and serves(persistent, True, 128, 700) and serves(d64, True, 64, 0)
    assert not serves(persistent, True, 128, -1)              # no right window
    assert not serves(persistent, False, 128, 0)              # the first link adds: rows without a last link
    assert not serves(shared, True, 128, 0)                   # not the keys-as-rows kernel
    assert not serves(bwd.get_tile(64, 64, persistent=False), True, 64, 0)   # one CTA a tile: no handout order
    for tile, d in ((persistent, 128), (d64, 64)):
        assert backward_kt.smem_bytes(tile, d, d) + backward_kt.cast_bytes(tile, d) <= configs.SMEM_LIMIT
    monkeypatch.setattr(bwd, "DQ_CAST", False)
    assert not serves(persistent, True, 128, 0)


def test_dq_first_store_rule(monkeypatch):
    """backward.dq_first_store_serves: the default's unordered reduce-add skips the accumulator's zero fill (key block 0
    stores first, ORDERED_DQ_FIRST) on the shared-dQ tile with its writer, without a window (key block 0 must visit
    every query block), batched, without seqused_k; not on the keys-as-rows tiles or the D = 256 tile."""
    from fa4.kernels.sm90 import backward as bwd
    shared = bwd.get_tile(128, 128)
    serves = bwd.dq_first_store_serves
    assert serves(shared, -1, -1, False, None, 1024, 1024) and serves(shared, -1, -1, False, None, 1, 3001)
    assert not serves(shared, -1, 0, False, None, 1024, 1024)                  # a right window
    assert not serves(shared, 256, -1, False, None, 1024, 1024)                # a left window
    assert not serves(shared, -1, -1, True, None, 1024, 1024)                  # packed
    assert not serves(shared, -1, -1, False, object(), 1024, 1024)             # seqused_k
    assert not serves(shared, -1, -1, False, None, 1024, 0)                    # no keys: no key block 0
    from dataclasses import replace
    assert not serves(replace(shared, dq_writer=False), -1, -1, False, None, 1024, 1024)
    for tile in (bwd.D128_CAUSAL_TILE, bwd.get_tile(64, 64), bwd.D256_TILE):
        assert not serves(tile, -1, -1, False, None, 1024, 1024)
    monkeypatch.setattr(bwd, "DQ_FIRST_STORE", False)
    assert not serves(shared, -1, -1, False, None, 1024, 1024)


@pytest.mark.skipif(not _HAVE_GLUON, reason="needs triton 3.6.0 with Gluon")
def test_first_store_build(reports):
    """The default non-causal D = 128 build (compile_config routes as backward_checked: ORDERED_DQ_FIRST) has the
    first link's TMA stores in its writer beside the reduce-adds: eight UTMASTG (dK and dV: four) and four UTMAREDG.
    test_sass checks its registers and local memory like every case's."""
    rep, log = reports["d128-plain"]
    assert rep is not None, log
    assert rep["utmastg"] == 8 and rep["utmaredg"] == 4, rep


def _last_link(m0, bm, bn, seq_q, seq_k, wr):
    """backward.last_key_block in Python: the last key block that sees query block m0 / bm (no left window)."""
    last = (seq_k - 1) // bn
    if wr >= 0:
        last = min((m0 + bm + (seq_k - seq_q) + wr - 1) // bn, last)
    return last


@pytest.mark.parametrize("bm", [64, 128])
def test_last_link_closes_every_chain(bm, monkeypatch):
    """DQ_CAST casts a query block's share at key block last_key_block's add. Against the kernel's own walk ranges
    (_q_range's mirror), wherever dq_store_first_serves (every row sees key 0, no left window): the key blocks that
    visit each query block are exactly 0 .. last_key_block (the ascending chain's links, so the cast comes after every
    add), and every query block has one (no row of dQ left unwritten)."""
    from fa4.kernels.sm90 import backward as bwd
    monkeypatch.setattr(bwd, "DQ_STORE_FIRST", True)  # where DQ_CAST would serve, whatever ships
    bn = 2 * SLAB
    tile = bwd.D128_CAUSAL_TILE
    rng = np.random.default_rng(33 + bm)
    checked = 0
    for _ in range(300):
        seq_q, seq_k = int(rng.integers(1, 900)), int(rng.integers(1, 900))
        wr = int(rng.choice([-1, 0, 0, 5, 130, 700]))
        if not bwd.dq_store_first_serves(tile, -1, wr, False, None, seq_q, seq_k):
            continue
        n_kb = -(-seq_k // bn)
        visitors = [[] for _ in range(-(-seq_q // bm))]
        for j in range(n_kb):
            lo, hi = _q_range(j * bn, bn, bm, seq_q, seq_k, -1, wr)
            for m in range(lo, hi):
                visitors[m].append(j)
        for m, keys in enumerate(visitors):
            last = _last_link(m * bm, bm, bn, seq_q, seq_k, wr)
            assert keys == list(range(last + 1)), (seq_q, seq_k, wr, m, keys, last)
        checked += 1
    assert checked > 100


@pytest.mark.skipif(not _HAVE_GLUON, reason="needs triton 3.6.0 with Gluon")
@pytest.mark.parametrize("cast", [False, True], ids=["after-kernel", "in-kernel"])
def test_kt_plan_dq_out(cast):
    """The keys-as-rows launch's dQ descriptor (dqo_desc): over dQ itself with DQ_CAST (the accumulator's boxes, q's
    dtype), else over a placeholder; a cached plan puts a later call's dQ into that slot."""
    import torch
    from fa4.kernels.sm90 import aot, backward, launch
    b, s = aot.SAMPLE_BATCH, aot.SAMPLE_SEQLEN
    tile = backward.D128_CAUSAL_TILE

    def plan_args(seed):
        t, _ = _bwd_case(seed, 128, False, False)
        dq_out = torch.empty(t["q"].shape, dtype=t["q"].dtype) if cast else None
        return t, dq_out, backward.launch_plan(
            t["dout"], t["q"], t["k"], t["v"], t["dq"], t["dk"], t["dv"], t["lse2"], t["delta"], softmax_scale=0.1,
            window_left=-1, window_right=0, softcap=0.0, tile=tile, dq_store_first=True, dq_out=dq_out,
            dq_chain=backward.dq_chain_counters(tile, b, t["q"].shape[-2], s, "cpu"))

    t1, out1, (grid, args, cx) = plan_args(1)
    assert cx["DQ_CAST"] is cast and cx["DQ_STORE_FIRST"] and cx["PERSIST"]
    desc, acc = args["dqo_desc"], args["dq_desc"]
    assert desc.block_shape == acc.block_shape and desc.base.dtype == t1["q"].dtype
    assert (desc.base is out1) if cast else (desc.base.shape != t1["q"].shape)
    kern = backward.kernel_for(tile)
    plan = launch.Plan(kern.arg_names, args, cx, grid, descs=backward.BWD_KT_DESCS, tensors=backward.BWD_TENSORS)
    t2, out2, _ = plan_args(2)
    dq_out = backward._dq_out_tensor(out2, tile, t2["q"], False)
    vals = plan.bind(dict(q=t2["q"], k=t2["k"], v=t2["v"], dout=t2["dout"], dk=t2["dk"], dv=t2["dv"], dq=t2["dq"],
                          lse2=t2["lse2"], delta=t2["delta"], lse2_stats=t2["lse2"], delta_stats=t2["delta"],
                          sink=t2["lse2"], dsink=t2["lse2"], dq_chain=t2["dq_chain"], cu_q=t2["lse2"],
                          cu_k=t2["lse2"], seqused=t2["lse2"], dq_out=dq_out))
    bound = vals[kern.arg_names.index("dqo_desc")]
    assert bound.base is dq_out and bound.block_shape == desc.block_shape
    assert (dq_out is out2) if cast else dq_out.shape != t2["q"].shape


def test_chain_by_default_rule(monkeypatch):
    """backward.chain_by_default: deterministic=False D = 128 calls take the persistent chain where it measured
    faster (batched, no left window, from KT_PERSIST_CHAIN_MIN_ROWS rows; masked ones only up to
    CHAIN_BY_DEFAULT_MAX_ROWS_MASKED rows), never with a sink, a softcap, a zero scale or other head dims."""
    from fa4.kernels.sm90 import backward as bwd
    rule = bwd.chain_by_default
    base = dict(d=128, dv=128, window_left=-1, window_right=-1, softcap=0.0, sink=False, varlen=False,
                seqlen_q=4096, softmax_scale=0.1)
    assert rule(**base)
    assert rule(**{**base, "seqlen_q": 16384}) and rule(**{**base, "d": 96, "dv": 100})
    limit = bwd.CHAIN_BY_DEFAULT_MAX_ROWS_MASKED
    assert rule(**{**base, "window_right": 0, "seqlen_q": limit})
    assert not rule(**{**base, "window_right": 0, "seqlen_q": limit + 1})
    masked_rows = bwd.KT_PERSIST_CHAIN_MIN_ROWS_MASKED
    assert rule(**{**base, "window_right": 0, "seqlen_q": masked_rows})
    assert not rule(**{**base, "window_right": 0, "seqlen_q": masked_rows - 1})
    for change in (dict(seqlen_q=2047), dict(window_left=100, window_right=0), dict(sink=True), dict(softcap=5.0),
                   dict(varlen=True), dict(softmax_scale=0.0), dict(d=64, dv=64), dict(d=256, dv=256)):
        assert not rule(**{**base, **change}), change
    monkeypatch.setattr(bwd, "CHAIN_BY_DEFAULT", False)
    assert not rule(**base)
    # D = 64 (CHAIN_BY_DEFAULT_D64): calls without a window up to CHAIN_BY_DEFAULT_D64_MAX_ROWS query rows.
    d64 = {**base, "d": 64, "dv": 64, "seqlen_q": bwd.CHAIN_BY_DEFAULT_D64_MAX_ROWS}
    assert rule(**d64) and rule(**{**d64, "seqlen_q": 1, "d": 40, "dv": 24})
    gqa_rows = bwd.CHAIN_BY_DEFAULT_D64_MAX_ROWS_GQA
    assert rule(**{**d64, "seqlen_q": gqa_rows, "group": 4})
    assert not rule(**{**d64, "seqlen_q": gqa_rows + 1, "group": 2})
    assert gqa_rows == d64["seqlen_q"] or not rule(**{**d64, "seqlen_q": gqa_rows})  # GQA only
    for change in (dict(seqlen_q=d64["seqlen_q"] + 1), dict(window_left=100),
                   dict(sink=True), dict(softcap=5.0), dict(varlen=True), dict(softmax_scale=0.0)):
        assert not rule(**{**d64, **change}), change
    # ... and causal ones up to D64_CAUSAL_CHAIN_MAX_ROWS (D64_CAUSAL_CHAIN), GQA or not.
    causal_rows = bwd.D64_CAUSAL_CHAIN_MAX_ROWS
    causal64 = {**d64, "window_right": 0, "seqlen_q": causal_rows}
    assert rule(**causal64) and rule(**{**causal64, "group": 4}) and rule(**{**causal64, "seqlen_q": 1})
    for change in (dict(seqlen_q=causal_rows + 1), dict(window_left=100), dict(sink=True), dict(varlen=True)):
        assert not rule(**{**causal64, **change}), change
    monkeypatch.setattr(bwd, "D64_CAUSAL_CHAIN", False)
    assert not rule(**causal64) and rule(**d64)
    monkeypatch.setattr(bwd, "D64_CAUSAL_CHAIN", True)
    monkeypatch.setattr(bwd, "D64_PERSIST_DET", False)  # no persistent grid for it: no chain by default
    assert not rule(**d64)
    monkeypatch.setattr(bwd, "D64_PERSIST_DET", True)
    monkeypatch.setattr(bwd, "CHAIN_BY_DEFAULT_D64", False)
    assert not rule(**d64)


def test_dq_first_rule():
    """backward.dq_first_serves: the dQ share issued first (DQ_LAG = 2) on the D = 128 keys-as-rows tile's chain
    builds without a right window only; not on the D = 64 tile, not without the chain, not under a right window."""
    import dataclasses
    from fa4.kernels.sm90 import backward as bwd
    kt128 = bwd.D128_CAUSAL_TILE
    assert kt128.dq_first and bwd.dq_first_serves(kt128, True, -1)
    assert not bwd.dq_first_serves(kt128, False, -1) and not bwd.dq_first_serves(kt128, True, 0)
    assert not bwd.dq_first_serves(bwd.get_tile(64, 64), True, -1)
    assert not bwd.dq_first_serves(dataclasses.replace(kt128, dq_lag=False), True, -1)
    assert not bwd.dq_first_serves(bwd.get_tile(128, 128), True, -1)


def test_gqa_split_rule(monkeypatch):
    """backward.gqa_split: causal / right-window calls, batched or packed, with >= GQA_SPLIT_MIN_GROUP query heads a
    kv head on the shipped tiles are split down to GQA_SPLIT_HEADS query heads a virtual kv head, unless the
    repeated K / V would reach 2^31 elements; nothing else."""
    from fa4.kernels.sm90 import backward as bwd

    def split(hq, hkv, d=128, dv=None, left=-1, right=0, packed=False, tile=None, sk=8, det=False):
        lead = (sk,) if packed else (1, sk)
        q = torch.empty(*lead, hq, d)
        # K / V as views of one row (expand), so that 2^31-element shapes cost no memory.
        k = torch.empty(1, hkv, d).expand(*lead, hkv, d)
        v = torch.empty(1, hkv, dv or d).expand(*lead, hkv, dv or d)
        return bwd.gqa_split(q, k, v, left, right, tile, det)

    assert split(16, 1) == 8 and split(32, 2) == 8 and split(8, 1) == 4 and split(16, 1, d=64) == 4
    assert split(16, 1, d=96) == 8 and split(16, 1, right=100) == 8
    assert split(16, 1, packed=True) == 8 and split(16, 2, d=64, packed=True) == 2       # packed calls too
    assert split(8, 1, d=256) == 4 and split(16, 1, d=192) == 8                         # the D = 256 tile
    assert split(8, 1, d=256, det=True) == 1 and split(16, 1, det=True) == 8 and split(16, 1, d=64, det=True) == 4
    assert split(4, 1) == 1 and split(16, 16) == 1 and split(4, 1, d=256) == 1           # small groups
    assert split(16, 1, right=-1) == 1 and split(16, 1, left=100) == 1   # no window / a left window
    assert split(16, 1, d=128, dv=64) == 1 and split(16, 1, d=256, dv=128) == 1
    assert split(16, 1, tile=bwd.D128_CAUSAL_TILE) == 1
    assert split(24, 2) == 6 and split(12, 1, d=64) == 3 and split(10, 1, d=64) == 1   # the group's divisors
    # Repeated K / V of 2^31 elements or more: no split (the caller's tensors were checked, not the copies).
    assert split(16, 1, sk=2**31 // (128 * 8) - 1) == 8 and split(16, 1, sk=2**31 // (128 * 8)) == 1
    assert split(16, 1, sk=2**31 // (128 * 8), packed=True) == 1
    monkeypatch.setattr(bwd, "GQA_SPLIT", False)
    assert split(16, 1) == 1


@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
def test_gqa_split_sums_each_kv_heads_virtual_heads(monkeypatch, packed):
    """backward_checked with a split runs itself on K and V repeated per kv head (virtual head hk·split + j holds kv
    head hk) and returns, per kv head, the fp32 sum of its virtual heads' dK / dV; dQ and dsink as the inner call
    gave them. Packed calls ((tokens, heads, D), cu_seqlens passed through) the same way."""
    from fa4.kernels.sm90 import backward as bwd
    b, s, hq, hkv, d, split = 1, 16, 16, 2, 128, 4  # G = 8, 2 query heads a virtual kv head
    lead = (b * s,) if packed else (b, s)
    q = torch.randn(*lead, hq, d).bfloat16()
    k, v = torch.randn(*lead, hkv, d).bfloat16(), torch.randn(*lead, hkv, d).bfloat16()
    cu = torch.tensor([0, s], dtype=torch.int32)
    var = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=s, max_seqlen_k=s) if packed else {}
    outer = bwd.backward_checked
    seen = {}

    def inner(dout, q_, k_, v_, *args, **kw):
        seen["k"], seen["v"], seen["cu"] = k_, v_, kw.get("cu_seqlens_q")
        # Each virtual head's gradient: its index, so that the sums show which heads were added together.
        heads = torch.arange(k_.shape[-2], dtype=torch.float32).view(-1, 1)
        return "dq", (heads + torch.zeros_like(k_, dtype=torch.float32)).bfloat16(), \
            (2 * heads + torch.zeros_like(v_, dtype=torch.float32)).bfloat16(), "dsink"

    monkeypatch.setattr(bwd, "backward_checked", inner)
    lse = torch.zeros(hq, b * s) if packed else torch.zeros(b, hq, s)
    dq, dk, dv, dsink = outer(q, q, k, v, q, lse, None, softmax_scale=0.1, window_right=0, **var)
    assert torch.equal(seen["k"], k.repeat_interleave(split, dim=-2)) and torch.equal(
        seen["v"], v.repeat_interleave(split, dim=-2))
    assert seen["cu"] is var.get("cu_seqlens_q")
    want = torch.tensor([sum(range(h * split, (h + 1) * split)) for h in range(hkv)], dtype=torch.float32)
    assert dq == "dq" and dsink == "dsink" and dk.dtype == k.dtype and dk.shape == k.shape
    assert torch.equal(dk.float().flatten(0, -3)[0, :, 0], want) and torch.equal(dv.float().flatten(0, -3)[0, :, 0],
                                                                                  2 * want)


def test_backward_takes_the_chain_by_default(monkeypatch):
    """backward_checked routes a deterministic=False call that chain_by_default names as deterministic=True (the
    default tile and dQ route asked with it), and leaves other calls alone."""
    from fa4.kernels.sm90 import backward as bwd
    seen = []

    def stop(tile, deterministic, *args, **kw):
        seen.append((tile, deterministic))
        raise RuntimeError("stop")

    monkeypatch.setattr(bwd, "dq_route", stop)
    # (rows, causal, chain expected, head dim, query heads a kv head)
    for s, causal, want, d, group in ((4096, False, True, 128, 1), (1024, False, False, 128, 1),
                                      (1024, True, True, 128, 1), (512, True, True, 128, 1),
                                      (128, True, True, 128, 1), (64, True, False, 128, 1),
                                      (8192, True, False, 128, 1), (4096, True, False, 128, 1),
                                      (2048, True, True, 128, 1),
                                      (1024, False, True, 64, 1), (2048, False, False, 64, 1),
                                      (2048, False, True, 64, 2), (4096, False, False, 64, 4),
                                      (1024, True, True, 64, 1), (2048, True, False, 64, 1)):
        q = torch.randn(1, s, 2 * group, d).half()
        kv = torch.randn(1, s, 2, d).half()
        lse = torch.zeros(1, 2 * group, s)
        with pytest.raises(RuntimeError, match="stop"):
            bwd.backward_checked(q, q, kv, kv, q, lse, None, softmax_scale=0.1, window_right=0 if causal else -1)
        tile, det = seen[-1]
        assert det == want and (not want or bwd.persistent_tiles(tile)), (s, causal, d, group)


@pytest.mark.parametrize("wr", [0, 0, 200, 5000])
def test_persistent_chain_model(wr):
    """The ascending chain on the persistent grid under a right window: no deadlock under random schedules with few
    CTAs; every (query block, head)'s adds come in ascending key-block order and each key block that sees it adds
    (the count _dq_chain_wait waits for is its block index); and on the top-down walk consecutive key blocks reach
    every (query block, head) at the same step of their walks, so a tile waits only for its predecessor's add of
    that step (bottom up, the walks of BN / BM more query blocks would put it 2·BN / BM steps behind)."""
    rng = np.random.default_rng(wr + 11)
    for trial in range(60):
        seq_q, seq_k = int(rng.integers(1, 900)), int(rng.integers(1, 900))
        if trial % 3 == 0:
            seq_k = seq_q
        group, ctas, chunk = int(rng.choice([1, 2, 3])), int(rng.integers(1, 6)), int(rng.choice([1, 2, 4]))
        pairs = chunk * int(rng.integers(1, 3))
        adds, walks = _persistent_chain_run(trial, seq_q, seq_k, wr, group, pairs, ctas, chunk)
        n_kb = -(-seq_k // 128)
        for (pair, g, m), order in adds.items():
            members = [nb for nb in range(n_kb) if (g, m) in walks[(pair, nb)]]
            assert order == members == list(range(len(members))), (seq_q, seq_k, wr, m, order)
            for nb in members[1:]:
                assert walks[(pair, nb)].index((g, m)) == walks[(pair, nb - 1)].index((g, m)), (seq_q, seq_k, m, nb)


# ---------------------------------------------------------------------------------------------------------
# The consumers' barrier protocol (ping-pong turns, the DQ_SHARED hand-over, the Q / dO ring), modelled in
# Python with the kernel's parities and run under random schedules: no deadlock, no parity wait fooled by a
# barrier two phases away, no buffer overwritten while read.
# ---------------------------------------------------------------------------------------------------------

class _Bar:
    """An mbarrier: `count` arrivals complete a phase; a parity wait passes once the phase of that parity has
    completed, i.e. while the current phase's parity differs (a fresh barrier passes parity 1)."""

    def __init__(self, count):
        self.count, self.pending, self.done = count, 0, 0

    def arrive(self):
        self.pending += 1
        if self.pending == self.count:
            self.done, self.pending = self.done + 1, 0


def _parity_wait(bar, parity, need, errors):
    """A consumer's mbarrier wait in the barrier models: `need` is the number of completed phases the waiter
    means to wait for, counted independently of the parity formula, so a wait off by two phases is reported."""
    while True:
        if bar.done not in (need - 1, need) or parity != (need - 1) & 1:
            errors.append(f"parity wait on a barrier {bar.done} phases done, meant {need} (parity {parity})")
        if (bar.done & 1) != parity:
            return
        yield "blocked"


def _ring_loader(steps, stages, q_empty, slot_users, tma, errors):
    """The loader of the models with one Q / dO ring: each step waits for its slot's release by every consumer,
    reports a reload under a reader (`slot_users`: the consumers reading each slot), and puts the slot's load in
    flight (`tma`)."""
    for it in range(steps):
        idx, phase = it % stages, (it // stages) & 1
        yield from _parity_wait(q_empty[idx], phase ^ 1, it // stages, errors)
        if slot_users[idx]:
            errors.append(f"slot {idx} reloaded while consumers {slot_users[idx]} read it")
        tma.append(idx)


def _schedule(rng, procs, tma, land, state, errors):
    """Run the barrier models' processes (generators yielding at each operation, "blocked" at a short barrier) in a
    random interleaving with the TMA loads in flight (`tma`: what each completes, `land` completes one). Returns the
    first error, "deadlock" (every process blocked, no load in flight), or None."""
    blocked = set()  # processes found blocked since the last change of state
    while procs or tma:
        if tma and (not procs or rng.random() < 0.3):  # a load lands
            land(tma.pop(int(rng.integers(len(tma)))))
            blocked.clear()
            continue
        proc = procs[int(rng.integers(len(procs)))]
        before = state()
        try:
            # Blocked: it found a barrier short and changed nothing on the way there.
            if next(proc) == "blocked" and state() == before:
                blocked.add(proc)
            else:
                blocked.clear()
        except StopIteration:
            procs.remove(proc)
            blocked.clear()
        if errors:
            return errors[0]
        if procs and not tma and blocked == set(procs):
            return "deadlock"
    return None


def _protocol_run(seed, nwg, stages, steps, shared, ping_pong, steps_of=None, turn_before_hand_over=False,
                  no_k_wait=False):
    """One random interleaving of the loader and the consumers over `steps` Q/dO steps, in the kernel's order of
    barrier operations (_consumer, _loader; Q and dO as one load), and the epilogue's staging of dK in the
    consumer's own K slot, which (DQ_SHARED) the other consumer's dQ products read too. Returns None, or what went
    wrong. To show what the kernel must not do: steps_of(w), a consumer's own step count; turn_before_hand_over,
    the second turn taken before dS is handed over; no_k_wait, dK staged without waiting for the other consumer's
    last dQ product."""
    rng = np.random.default_rng(seed)
    steps_of = steps_of or (lambda w: steps)
    q_ready = [_Bar(1) for _ in range(stages)]
    q_empty = [_Bar(nwg) for _ in range(stages)]
    ds_ready, ds_free, turn, loop_done = ([_Bar(1) for _ in range(nwg)] for _ in range(4))
    tma = []                   # loads in flight: the slot whose q_ready they complete
    slot_users = [set() for _ in range(stages)]
    reading_ds = [set() for _ in range(nwg)]   # consumers whose dQ wgmma reads ds[w]
    reading_k = [set() for _ in range(nwg)]    # consumers whose dQ wgmma reads K[w] (all K slots, DQ_SHARED)
    errors = []

    def wait(bar, parity, need):
        return _parity_wait(bar, parity, need, errors)

    def consumer(w):
        turn0 = 1 if w == 0 else 0
        nxt = other = (w + 1) % nwg  # NEXT_WG and OTHER
        waits = 0  # this consumer's turn waits so far
        for it in range(steps_of(w)):
            idx, phase = it % stages, (it // stages) & 1
            yield from wait(q_ready[idx], phase, it // stages + 1)
            slot_users[idx].add(w)
            if ping_pong:  # turn 2·it: S and dP
                yield from wait(turn[w], turn0, waits + (w > 0))
                waits += 1
                turn[nxt].arrive()
            yield  # exp2, dS
            if ping_pong and turn_before_hand_over:
                yield from wait(turn[w], turn0 ^ 1, waits + (w > 0))
                waits += 1
            if shared:
                yield from wait(ds_free[w], (it & 1) ^ 1, it)
                if any(reading_ds[w]):
                    errors.append(f"ds[{w}] rewritten while read")
                ds_ready[w].arrive()
            if ping_pong and not turn_before_hand_over:  # turn 2·it + 1: dV, dK, dQ
                yield from wait(turn[w], turn0 ^ 1, waits + (w > 0))
                waits += 1
            if shared:
                yield from wait(ds_ready[other], it & 1, it + 1)
                reading_ds[other].add(w)
                for r in reading_k:
                    r.add(w)
            if ping_pong:
                turn[nxt].arrive()
            yield  # warpgroup_mma_wait(0)
            if shared:
                reading_ds[other].discard(w)
                for r in reading_k:
                    r.discard(w)
                ds_free[other].arrive()
            slot_users[idx].discard(w)
            q_empty[idx].arrive()
        if shared:
            loop_done[w].arrive()  # every product of this consumer completed
        yield  # dV staged in this consumer's V slot, stored
        if shared and not no_k_wait:
            # The other consumer left its loop, so its last dQ product, which reads K[w], completed (parity 0: once).
            yield from wait(loop_done[(w + 1) % nwg], 0, 1)
        if reading_k[w] - {w}:
            errors.append(f"K[{w}] overwritten by dK while consumers {reading_k[w] - {w}} read it")

    def _state():
        return [(b.pending, b.done) for b in q_ready + q_empty + ds_ready + ds_free + turn + loop_done], len(tma)

    return _schedule(rng, [_ring_loader(steps, stages, q_empty, slot_users, tma, errors)]
                     + [consumer(w) for w in range(nwg)], tma, lambda idx: q_ready[idx].arrive(),
                     _state, errors)


@pytest.mark.parametrize("nwg,stages,shared", [(2, 2, False), (2, 3, True), (2, 2, True), (3, 2, False)])
@pytest.mark.parametrize("ping_pong", [False, True])
def test_consumer_protocol_model(nwg, stages, shared, ping_pong):
    for seed in range(60):
        for steps in (0, 1, 2, 3, 7):
            assert _protocol_run(seed, nwg, stages, steps, shared, ping_pong) is None, (seed, steps)


def test_protocol_model_catches_what_the_kernel_avoids():
    """The model fails the orders the kernel avoids: a consumer skipping a step (say, one whose keys a causal
    mask hides from a query block) starves the other's turn wait; taking the second turn before handing dS
    over (DQ_SHARED) deadlocks, since the turn holder waits for the other's dS, which waits for the turn."""
    assert all(_protocol_run(seed, 2, 2, 4, False, True, steps_of=lambda w: 4 - w) == "deadlock" for seed in range(10))
    assert all(_protocol_run(seed, 2, 2, 3, True, True, turn_before_hand_over=True) == "deadlock" for seed in range(10))
    # DQ_SHARED: dK staged in K[w] before the other consumer's last dQ product (which reads K[w]) completed.
    assert any("overwritten by dK" in str(_protocol_run(seed, 2, 3, 2, True, False, no_k_wait=True))
               for seed in range(60))


def _d256_protocol_run(seed, steps, stages=2, mistake=None, dq_in_q=False, roles=False, early_dv=False):
    """One random interleaving of the D = 256 kernel's loader and two consumers (backward_d256.py: the Q ring of
    `stages`, the one dO stage, the hand-over tile and P / dS with part_ready / part_free / pds_ready / pds_free),
    in the kernel's order of barrier operations and with its parities. Returns None, or what went wrong.
    dq_in_q (tile.dq_in_q): each consumer's second dQ half is staged in its Q half of the step's slot, whose release
    (q_empty) waits for that reduce-add at the next step.
    mistake (to show the model catches them): "free_early", consumer 0 arrives part_free before reading the
    partials; "no_store_wait", consumer 0 arrives part_free without waiting for its dQ reduce-add to read slot 0;
    "skip", consumer 1 skips the last step; "q_early" (dq_in_q), a consumer releases its Q slot right after its
    products, with the reduce-add from its Q half still reading it.
    roles (tile.d256_roles): consumer 0 forms S (waiting for Q only), consumer 1 dP (waiting for dO only) and hands
    it over in slot 1, with no part_free: consumer 0 reads it before its pds_ready, which consumer 1 waits for
    before it stages its dQ half in slot 1 or writes the next dP. Mistake "read_late": consumer 0 arrives pds_ready
    before reading dP.
    early_dv (tile.d256_early_dv, with roles): consumer 0 writes P and arrives p_ready before it waits for dP, and
    both consumers' dV products read P and dO from then on; dS follows with pds_ready. Mistake "p_early": consumer 0
    writes P without waiting for pds_free."""
    rng = np.random.default_rng(seed)
    q_ready = [_Bar(1) for _ in range(stages)]
    q_empty = [_Bar(2) for _ in range(stages)]
    do_ready, do_empty = _Bar(1), _Bar(2)
    part_ready, part_free, pds_ready, pds_free = _Bar(1), _Bar(1), _Bar(1), _Bar(1)
    tma = []                                   # loads in flight: the barrier they complete
    q_users = [set() for _ in range(stages)]
    do_users = set()
    st = dict(hand=None, hand_read=False, slot0_tma=False, slot1_tma=False, pds=None, pds_readers=set(), p=None,
              p_readers=set())
    p_ready = _Bar(1)
    q_tma = [set() for _ in range(stages)]    # consumers whose reduce-add still reads their half of a Q slot
    errors = []

    def wait(bar, parity, need):
        return _parity_wait(bar, parity, need, errors)

    def loader():
        for it in range(steps):
            idx, phase = it % stages, (it // stages) & 1
            yield from wait(q_empty[idx], phase ^ 1, it // stages)
            if q_users[idx] or q_tma[idx]:
                errors.append(f"Q stage {idx} reloaded while consumers {q_users[idx] | q_tma[idx]} read it")
            tma.append(q_ready[idx])
            yield from wait(do_empty, (it & 1) ^ 1, it)
            if do_users:
                errors.append(f"dO reloaded while consumers {do_users} read it")
            tma.append(do_ready)

    def operands(w, it):
        idx, phase = it % stages, (it // stages) & 1
        yield from wait(q_ready[idx], phase, it // stages + 1)
        q_users[idx].add(w)
        yield from wait(do_ready, it & 1, it + 1)
        do_users.add(w)
        yield  # S_w, dP_w

    def products(w, it):
        if st["pds"] != it:
            errors.append(f"consumer {w} read P / dS of step {st['pds']} at step {it}")
        if early_dv and st["p"] != it:
            errors.append(f"consumer {w}'s dV read the P of step {st['p']} at step {it}")
        st["pds_readers"].add(w)
        yield  # dV, dK, dQ
        st["p_readers"].discard(w)
        do_users.discard(w)
        do_empty.arrive()
        q_users[it % stages].discard(w)
        if dq_in_q:
            q_tma[it % stages].add(w)  # the second dQ half's reduce-add reads this consumer's Q half
            if mistake == "q_early":
                q_empty[it % stages].arrive()
        else:
            q_empty[it % stages].arrive()
        st["pds_readers"].discard(w)

    def release_q(w, it):
        """dq_in_q, at step it > 0: tma.store_wait(0), then the previous step's Q slot released."""
        if dq_in_q and it > 0:
            q_tma[(it - 1) % stages].discard(w)
            if mistake != "q_early":
                q_empty[(it - 1) % stages].arrive()

    def publish_pds(it, wait_free=True):
        """Consumer 0 writes P / dS (or dS alone, P written earlier) of step it and arrives pds_ready."""
        if wait_free:
            yield from wait(pds_free, (it & 1) ^ 1, it)
        if st["pds_readers"]:
            errors.append("P / dS rewritten while read")
        st["pds"] = it
        pds_ready.arrive()

    def stage_slot0():
        """Consumer 0's first dQ half staged in slot 0 (its last reduce-add waited for at the step's start)."""
        if st["slot0_tma"]:
            errors.append("slot 0 staged while its reduce-add reads it")
        st["slot0_tma"] = True

    def consumer0():
        for it in range(steps):
            yield from operands(0, it)
            if it > 0 and mistake != "free_early":
                if mistake != "no_store_wait":
                    st["slot0_tma"] = False  # tma.store_wait(0)
                part_free.arrive()
            if mistake == "free_early":
                part_free.arrive()
            yield from wait(part_ready, it & 1, it + 1)
            if st["hand"] != it:
                errors.append(f"consumer 0 read the partials of step {st['hand']} at step {it}")
            st["hand_read"] = True
            yield  # P, dS
            st["hand_read"] = False
            yield from publish_pds(it)
            release_q(0, it)
            yield from products(0, it)
            stage_slot0()
        st["slot0_tma"] = False

    def consumer1():
        for it in range(steps - (mistake == "skip")):
            yield from operands(1, it)
            st["slot1_tma"] = False  # tma.store_wait(0)
            yield from wait(part_free, (it & 1) ^ 1, it)
            if st["hand_read"] or st["slot0_tma"]:
                errors.append("hand-over tile rewritten while read")
            st["hand"] = it
            part_ready.arrive()
            release_q(1, it)
            yield from wait(pds_ready, it & 1, it + 1)
            yield from products(1, it)
            pds_free.arrive()
            if st["hand_read"]:
                errors.append("slot 1 staged while consumer 0 reads dP_1")
            st["slot1_tma"] = True

    def roles_consumer0():
        for it in range(steps):
            idx, phase = it % stages, (it // stages) & 1
            yield from wait(q_ready[idx], phase, it // stages + 1)
            q_users[idx].add(0)
            yield  # S over both column halves
            if it > 0:
                st["slot0_tma"] = False  # tma.store_wait: its own staging slot
            yield  # P
            if early_dv:
                if mistake != "p_early":
                    yield from wait(pds_free, (it & 1) ^ 1, it)
                if st["pds_readers"] or st["p_readers"]:
                    errors.append("P rewritten while read")
                st["p"] = it
                p_ready.arrive()
                yield from wait(do_ready, it & 1, it + 1)
                do_users.add(0)
                st["p_readers"].add(0)  # dV in flight
            yield from wait(part_ready, it & 1, it + 1)
            if mistake == "read_late":
                yield from publish_pds(it)
            if st["hand"] != it:
                errors.append(f"consumer 0 read the dP of step {st['hand']} at step {it}")
            st["hand_read"] = True
            yield  # dS
            st["hand_read"] = False
            if st["hand"] != it:
                errors.append(f"consumer 0 read the dP of step {st['hand']} at step {it}")
            if mistake != "read_late":
                yield from publish_pds(it, wait_free=not early_dv)
            release_q(0, it)
            if not early_dv:
                yield from wait(do_ready, it & 1, it + 1)
                do_users.add(0)
            yield from products(0, it)
            stage_slot0()
        st["slot0_tma"] = False

    def roles_consumer1():
        for it in range(steps - (mistake == "skip")):
            idx, phase = it % stages, (it // stages) & 1
            yield from wait(do_ready, it & 1, it + 1)
            do_users.add(1)
            yield  # dP over both column halves
            st["slot1_tma"] = False  # tma.store_wait: its own staging slot
            if st["hand_read"]:
                errors.append("hand-over slot 1 rewritten while read")
            st["hand"] = it
            part_ready.arrive()
            release_q(1, it)
            if early_dv:
                yield from wait(p_ready, it & 1, it + 1)
                if st["p"] != it:
                    errors.append(f"consumer 1 read the P of step {st['p']} at step {it}")
                st["p_readers"].add(1)  # dV in flight
            yield from wait(q_ready[idx], phase, it // stages + 1)
            q_users[idx].add(1)
            yield from wait(pds_ready, it & 1, it + 1)
            yield from products(1, it)
            pds_free.arrive()
            if st["hand_read"]:
                errors.append("slot 1 staged while consumer 0 reads dP")
            st["slot1_tma"] = True

    bars = q_ready + q_empty + [do_ready, do_empty, part_ready, part_free, pds_ready, pds_free, p_ready]

    def _state():
        return [(b.pending, b.done) for b in bars], len(tma), dict(st, pds_readers=set(st["pds_readers"]),
                                                                  p_readers=set(st["p_readers"]))

    if roles:
        return _schedule(rng, [loader(), roles_consumer0(), roles_consumer1()], tma, lambda bar: bar.arrive(), _state,
                         errors)

    return _schedule(rng, [loader(), consumer0(), consumer1()], tma, lambda bar: bar.arrive(), _state, errors)


def _cta_block_model(grid, chunked, ctaid):
    """backward._cta_block in Python: (key block, batch · kv head) of the CTA at `ctaid` = (x, y, z)."""
    x, y, z = ctaid
    return (y, z * grid[0] + x) if chunked else (x, y)


@pytest.mark.parametrize("d,s,b,h,causal", [(256, 4096, 4, 8, True), (128, 1024, 16, 16, True), (128, 4096, 4, 16, True),
                                            (64, 4096, 4, 32, True), (64, 16384, 1, 32, True), (128, 4096, 3, 5, True),
                                            (128, 4096, 4, 16, False), (256, 16384, 1, 8, True)])
def test_cta_chunk_grid(d, s, b, h, causal):
    """The chunked grid dispatches every (key block, b · kv head) pair exactly once, key block after key block across
    C heads; C is a power of two dividing b · kv heads whose fp32 dQ rows fit CTA_CHUNK_BYTES (1 without a window)."""
    from fa4.kernels.sm90 import backward
    tile = backward.default_tile(d, d, -1, 0.0, window_right=0 if causal else -1)
    chunk = backward.cta_chunk(tile, b * h, s, d, -1, 0 if causal else -1, False, False)
    assert chunk & (chunk - 1) == 0 and (b * h) % chunk == 0 and chunk <= 32
    assert chunk == 1 or chunk * s * d * 4 <= backward.CTA_CHUNK_BYTES
    if not causal or b * h % 2 or s * d * 4 * 2 > backward.CTA_CHUNK_BYTES:
        assert chunk == 1
    n_kb = s // tile.block_n
    chunked = chunk > 1
    grid = (chunk, n_kb, b * h // chunk) if chunked else (n_kb, b * h, 1)
    order = [_cta_block_model(grid, chunked, (xx, yy, zz)) for zz in range(grid[2]) for yy in range(grid[1])
             for xx in range(grid[0])]  # hardware dispatch order: x fastest
    assert sorted(order) == [(nb, bh) for nb in range(n_kb) for bh in range(b * h)]
    if chunked:
        # The first C · n_kb CTAs are the C first heads' key blocks, key block 0 of each first.
        assert order[:chunk] == [(0, bh) for bh in range(chunk)]
        assert {bh for _, bh in order[:chunk * n_kb]} == set(range(chunk))
    # Packed calls chunk by the same rule (session 20), unless FA4_BWD_CHUNK_VARLEN=0.
    assert backward.cta_chunk(tile, b * h, s, d, -1, 0 if causal else -1, True, False) == chunk
    assert not backward.cta_chunk(tile, b * h, s, d, -1, 0, False, True) > 1  # ordered dQ / sink partials: never


def test_dq_in_q_is_the_d256_default_only():
    """The D = 256 tile stages its second dQ half in the Q half by default; the field builds nothing else (get_tile
    declines it on the D <= 128 kernels). test_d256_plan_arguments checks that the plan passes it as DQ_IN_Q."""
    from fa4.kernels.sm90 import backward
    assert backward.D256_TILE.dq_in_q and backward.get_tile(256, 256, d256=True).dq_in_q
    assert backward.get_tile(256, 256, d256=True, dq_in_q=False) is not None
    for d in (64, 128):
        assert not backward.get_tile(d, d).dq_in_q
        assert backward.get_tile(d, d, dq_in_q=True) is None


@pytest.mark.parametrize("dq_in_q", [False, True])
def test_d256_protocol_model(dq_in_q):
    _assert_d256_model_clean(dq_in_q=dq_in_q)


@pytest.mark.parametrize("dq_in_q", [False, True])
def test_d256_protocol_model_catches_mistakes(dq_in_q):
    assert any("rewritten while read" in str(_d256_protocol_run(seed, 4, mistake="free_early", dq_in_q=dq_in_q))
               for seed in range(40))
    assert any("rewritten while read" in str(_d256_protocol_run(seed, 4, mistake="no_store_wait", dq_in_q=dq_in_q))
               for seed in range(40))
    assert all(_d256_protocol_run(seed, 4, mistake="skip", dq_in_q=dq_in_q) == "deadlock" for seed in range(10))


def _assert_d256_model_clean(**kw):
    """The D = 256 barrier model under 150 random schedules and 0-8 steps: no deadlock, no buffer misuse."""
    for seed in range(150):
        for steps in (0, 1, 2, 3, 5, 8):
            assert _d256_protocol_run(seed, steps, **kw) is None, (seed, steps, kw)


@pytest.mark.parametrize("dq_in_q", [False, True])
def test_d256_roles_protocol_model(dq_in_q):
    """tile.d256_roles: consumer 0 forms S, consumer 1 dP and hands it over without part_free."""
    _assert_d256_model_clean(dq_in_q=dq_in_q, roles=True)
    # dP read after pds_ready: consumer 1's dQ staging in slot 1 overwrites it (the next dP cannot: its dO load
    # waits for consumer 0's dV product).
    assert any("slot 1 staged while consumer 0 reads dP" in str(_d256_protocol_run(seed, 4, mistake="read_late",
                                                                                    dq_in_q=dq_in_q, roles=True))
               for seed in range(60))
    assert all(_d256_protocol_run(seed, 4, mistake="skip", dq_in_q=dq_in_q, roles=True) == "deadlock"
               for seed in range(10))
    assert any("reloaded while" in str(_d256_protocol_run(seed, 5, mistake="q_early", dq_in_q=True, roles=True))
               for seed in range(60))


@pytest.mark.parametrize("dq_in_q", [False, True])
def test_d256_early_dv_protocol_model(dq_in_q):
    """tile.d256_early_dv: P handed over (p_ready) before dS, both dV products issued then."""
    _assert_d256_model_clean(dq_in_q=dq_in_q, roles=True, early_dv=True)
    assert any("P rewritten while read" in str(_d256_protocol_run(seed, 4, mistake="p_early", dq_in_q=dq_in_q,
                                                                  roles=True, early_dv=True))
               for seed in range(60))
    assert all(_d256_protocol_run(seed, 4, mistake="skip", dq_in_q=dq_in_q, roles=True, early_dv=True) == "deadlock"
               for seed in range(10))


def test_d256_protocol_model_catches_early_q_release():
    assert any("reloaded while" in str(_d256_protocol_run(seed, 5, mistake="q_early", dq_in_q=True))
               for seed in range(60))


def _kt_dq_issue(w, step, ds_ready, ds_free, ds_step, ds_readers, k_readers, wait, errors, free_early=False):
    """The first half of consumer w's dQ share of `step` in the keys-as-rows models (two consumers, two dSᵀ buffers
    each by step parity): wait for the other's dSᵀ of that step, then read both consumers' dSᵀ and both K slots
    (free_early: the other's buffer released at once, a mistake the models must catch)."""
    nwg = 2
    other = 1 - w
    base = (step & 1) * nwg
    yield from wait(ds_ready[base + other], (step >> 1) & 1, (step >> 1) + 1)
    if ds_step[base] != step or ds_step[base + 1] != step:
        errors.append(f"consumer {w} read dS of steps {ds_step[base:base + 2]} for step {step}")
    for b in (base, base + 1):
        ds_readers[b].add(w)
    k_readers[0].add(w)
    k_readers[1].add(w)
    if free_early:
        ds_free[base + other].arrive()


def _kt_dq_done(w, step, ds_free, ds_readers, k_readers, free_early=False):
    """The second half, once the share's wgmma completed: the reads end and the other's buffer is released."""
    base = (step & 1) * 2
    for b in (base, base + 1):
        ds_readers[b].discard(w)
    k_readers[0].discard(w)
    k_readers[1].discard(w)
    if not free_early:
        ds_free[base + 1 - w].arrive()


def _kt_dq_share(w, step, ds_ready, ds_free, ds_step, ds_readers, k_readers, wait, errors, free_early=False):
    """Consumer w's dQ share of `step`: issued (_kt_dq_issue), its wgmma waited for, done (_kt_dq_done)."""
    yield from _kt_dq_issue(w, step, ds_ready, ds_free, ds_step, ds_readers, k_readers, wait, errors, free_early)
    yield  # warpgroup_mma_wait(0)
    _kt_dq_done(w, step, ds_free, ds_readers, k_readers, free_early)


def _kt_ds_hand_over(w, s, previous, ds_ready, ds_free, ds_step, ds_readers, wait, errors, dq_share,
                     dq_first=None):
    """Consumer w's dSᵀ of the CTA's step s into its buffer of that step's parity (after ds_free of the buffer's
    previous use), handed over by ds_ready; then (previous: the tile's step before s exists) the dQ share of step
    s − 1, whose wgmma wait also completes dV and dK of step s; without one, that wait alone. Both keys-as-rows
    models run their steps through it. dq_first (DQ_FIRST): (issue, done) of the share, issued before this step's
    hand-over and completed after it, with dV and dK's wait last."""
    nwg = 2
    own = (s & 1) * nwg + w
    if dq_first is not None and previous:
        yield from dq_first[0](w, s - 1)
    yield from wait(ds_free[own], ((s >> 1) & 1) ^ 1, s >> 1)
    if ds_readers[own]:
        errors.append(f"dS buffer {own} rewritten while consumers {ds_readers[own]} read it")
    ds_step[own] = s
    ds_ready[own].arrive()
    if dq_first is not None and previous:
        yield  # warpgroup_mma_wait(2): the share
        dq_first[1](w, s - 1)
        yield  # the share staged and added; warpgroup_mma_wait(0): dV, dK
    elif previous:
        yield from dq_share(w, s - 1)
    else:
        yield  # warpgroup_mma_wait(0)


def _kt_lag_protocol_run(seed, steps, stages=2, mistake=None, dq_first=False):
    """One random interleaving of the keys-as-rows kernel with DQ_LAG (backward_kt.py): the loader's Q / dO ring, two
    consumers, two dSᵀ buffers a consumer (by step parity) with ds_ready / ds_free each, every step's dQ share issued
    at the next step (reading both consumers' dSᵀ of that step and both consumers' K), the last one after the loop,
    and the wait before dK is staged in the consumer's own K slot. The kernel's order of barrier operations and its
    parity formulas; returns None, or what went wrong. mistake: "no_k_wait" (dK staged without waiting for the
    other consumer's last dQ), "free_early" (ds_free arrived before the dQ product completed). dq_first: each
    step's share issued before its hand-over (DQ_FIRST)."""
    rng = np.random.default_rng(seed)
    nwg = 2
    q_ready = [_Bar(1) for _ in range(stages)]
    q_empty = [_Bar(nwg) for _ in range(stages)]
    ds_ready = [_Bar(1) for _ in range(2 * nwg)]
    ds_free = [_Bar(1) for _ in range(2 * nwg)]
    tma, slot_users = [], [set() for _ in range(stages)]
    ds_step = [None] * (2 * nwg)                # the step whose dSᵀ a buffer holds
    ds_readers = [set() for _ in range(2 * nwg)]
    k_readers = [set() for _ in range(nwg)]    # consumers whose dQ product reads K[w]
    errors = []

    def wait(bar, parity, need):
        return _parity_wait(bar, parity, need, errors)

    def dq_share(w, step):
        return _kt_dq_share(w, step, ds_ready, ds_free, ds_step, ds_readers, k_readers, wait, errors,
                            free_early=mistake == "free_early")

    first = None
    if dq_first:
        first = (lambda w, step: _kt_dq_issue(w, step, ds_ready, ds_free, ds_step, ds_readers, k_readers, wait,
                                              errors, mistake == "free_early"),
                 lambda w, step: _kt_dq_done(w, step, ds_free, ds_readers, k_readers, mistake == "free_early"))

    def consumer(w):
        for it in range(steps):
            idx, phase = it % stages, (it // stages) & 1
            yield from wait(q_ready[idx], phase, it // stages + 1)
            slot_users[idx].add(w)
            yield  # Sᵀ, dPᵀ, exp2, dS
            yield from _kt_ds_hand_over(w, it, it > 0, ds_ready, ds_free, ds_step, ds_readers, wait, errors,
                                        dq_share, first)
            slot_users[idx].discard(w)
            q_empty[idx].arrive()
        last = steps - 1
        if last >= 0:
            yield from dq_share(w, last)
        if mistake != "no_k_wait":
            yield from wait(ds_free[(last & 1) * nwg + w], (last >> 1) & 1, (last >> 1) + 1 if last >= 0 else 0)
        if k_readers[w]:
            errors.append(f"K[{w}] staged with dK while consumers {k_readers[w]} read it")

    bars = q_ready + q_empty + ds_ready + ds_free

    def _state():
        return [(b.pending, b.done) for b in bars], len(tma)

    return _schedule(rng, [_ring_loader(steps, stages, q_empty, slot_users, tma, errors)]
                     + [consumer(w) for w in range(nwg)], tma, lambda idx: q_ready[idx].arrive(),
                     _state, errors)


@pytest.mark.parametrize("dq_first", [False, True], ids=["lag", "dq_first"])
@pytest.mark.parametrize("stages", [2, 3])
def test_kt_lag_protocol_model(stages, dq_first):
    for seed in range(100):
        for steps in (0, 1, 2, 3, 4, 7):
            assert _kt_lag_protocol_run(seed, steps, stages, dq_first=dq_first) is None, (seed, steps)


@pytest.mark.parametrize("dq_first", [False, True], ids=["lag", "dq_first"])
def test_kt_lag_protocol_model_catches_mistakes(dq_first):
    assert any("while" in str(_kt_lag_protocol_run(seed, 3, mistake="no_k_wait", dq_first=dq_first))
               for seed in range(60))
    assert any("rewritten while" in str(_kt_lag_protocol_run(seed, 5, mistake="free_early", dq_first=dq_first))
               for seed in range(60))


def _kt_persistent_protocol_run(seed, tiles, stages=2, mistake=None, dq_first=False):
    """The keys-as-rows kernel on the persistent grid (backward_kt.py, PERSIST), one CTA: the loader draws the tiles
    (their step counts in `tiles`, then the end) into the two-slot id ring (tile_ready / tile_free), loads each
    tile's first min(steps, stages) Q / dO blocks, then K once both consumers handed it back (k_free) and V likewise
    (v_free, V on its own barrier), then the rest; the consumers take each id, wait for K, for V before the first
    dPᵀ, walk the steps with the dSᵀ buffers and parities of the CTA's global step count, issue the last dQ share,
    stage dK (after the other consumer's last dQ product) and hand K back, then dV and V. Ring slots, phases and
    tile counts carry across tiles, as in the kernel. Returns None, or what went wrong. mistake: "no_k_free" (K
    reloaded without waiting for k_free), "v_unwaited" (V never waited for), "dv_unwaited" (dV staged without the
    wait, which a tile without steps needs: its V may still be landing). dq_first: DQ_FIRST's order of a step."""
    rng = np.random.default_rng(seed)
    nwg = 2
    q_ready = [_Bar(1) for _ in range(stages)]
    q_empty = [_Bar(nwg) for _ in range(stages)]
    ds_ready = [_Bar(1) for _ in range(2 * nwg)]
    ds_free = [_Bar(1) for _ in range(2 * nwg)]
    tile_ready = [_Bar(1) for _ in range(2)]
    tile_free = [_Bar(nwg) for _ in range(2)]
    kv_ready, v_ready, k_free, v_free = _Bar(1), _Bar(1), _Bar(nwg), _Bar(nwg)
    ids = [None, None]
    tma, slot_users = [], [set() for _ in range(stages)]
    ds_step = [None] * (2 * nwg)
    ds_readers = [set() for _ in range(2 * nwg)]
    k_readers = [set() for _ in range(nwg)]    # consumers whose dQ product reads K[w]
    k_users, v_users = set(), set()            # consumers whose products (or dK / dV stores) use K / V
    loaded = {"k": None, "v": None}            # the tile count whose K / V the slots hold (or receive)
    errors = []
    end = len(tiles)

    def wait(bar, parity, need):
        return _parity_wait(bar, parity, need, errors)

    def land(item):
        kind, arg = item
        if kind == "q":
            q_ready[arg].arrive()
        else:
            (kv_ready if kind == "k" else v_ready).arrive()

    def loader():
        ring = 0
        for f in range(end + 1):
            yield from wait(tile_free[f % 2], ((f // 2) & 1) ^ 1, f // 2)
            ids[f % 2] = f
            tile_ready[f % 2].arrive()
            if f == end:
                return
            n = tiles[f]
            ahead = min(n, stages)
            for it in range(n + 1):
                if it == ahead:
                    if mistake != "no_k_free":
                        yield from wait(k_free, (f & 1) ^ 1, f)
                    if k_users:
                        errors.append(f"K of tile {f} loaded while consumers {k_users} use K")
                    loaded["k"] = f
                    tma.append(("k", None))
                    yield from wait(v_free, (f & 1) ^ 1, f)
                    if v_users:
                        errors.append(f"V of tile {f} loaded while consumers {v_users} use V")
                    loaded["v"] = f
                    tma.append(("v", None))
                if it == n:
                    break
                idx, phase = ring % stages, (ring // stages) & 1
                yield from wait(q_empty[idx], phase ^ 1, ring // stages)
                if slot_users[idx]:
                    errors.append(f"slot {idx} reloaded while consumers {slot_users[idx]} read it")
                tma.append(("q", idx))
                ring += 1

    def dq_share(w, step):
        return _kt_dq_share(w, step, ds_ready, ds_free, ds_step, ds_readers, k_readers, wait, errors)

    first = None
    if dq_first:
        first = (lambda w, step: _kt_dq_issue(w, step, ds_ready, ds_free, ds_step, ds_readers, k_readers, wait,
                                              errors),
                 lambda w, step: _kt_dq_done(w, step, ds_free, ds_readers, k_readers))

    def consumer(w):
        ring = gstep = 0
        for f in range(end + 1):
            yield from wait(tile_ready[f % 2], (f // 2) & 1, f // 2 + 1)
            t = ids[f % 2]
            tile_free[f % 2].arrive()
            if t == end:
                return
            n = tiles[t]
            yield from wait(kv_ready, f & 1, f + 1)
            if loaded["k"] != f:
                errors.append(f"consumer {w} started tile {f} on the K of tile {loaded['k']}")
            k_users.add(w)
            for it in range(n):
                idx, phase = ring % stages, (ring // stages) & 1
                yield from wait(q_ready[idx], phase, ring // stages + 1)
                slot_users[idx].add(w)
                if it == 0 and mistake != "v_unwaited":
                    yield from wait(v_ready, f & 1, f + 1)
                if it == 0:
                    if loaded["v"] != f or v_ready.done < f + 1:
                        errors.append(f"consumer {w} issued dPᵀ of tile {f} before its V arrived")
                    v_users.add(w)
                yield  # Sᵀ, dPᵀ, exp2, dS
                yield from _kt_ds_hand_over(w, gstep + it, it > 0, ds_ready, ds_free, ds_step, ds_readers, wait,
                                            errors, dq_share, first)
                slot_users[idx].discard(w)
                q_empty[idx].arrive()
                ring += 1
            s_last = gstep + n - 1
            if n > 0:
                yield from dq_share(w, s_last)
            yield from wait(ds_free[(s_last & 1) * nwg + w], (s_last >> 1) & 1, (s_last >> 1) + 1 if s_last >= 0 else 0)
            if k_readers[w]:
                errors.append(f"K[{w}] staged with dK while consumers {k_readers[w]} read it")
            yield  # dK staged in K[w], stored by TMA, store_wait
            k_users.discard(w)
            k_free.arrive()
            if mistake not in ("v_unwaited", "dv_unwaited"):
                yield from wait(v_ready, f & 1, f + 1)  # a tile without steps has not waited for its V yet
            if loaded["v"] != f or v_ready.done < f + 1:
                errors.append(f"consumer {w} staged dV of tile {f} in V[{w}] before that tile's V landed")
            v_users.add(w)
            yield  # dV staged in V[w], stored, store_wait
            v_users.discard(w)
            v_free.arrive()
            gstep += n

    bars = q_ready + q_empty + ds_ready + ds_free + tile_ready + tile_free + [kv_ready, v_ready, k_free, v_free]

    def _state():
        return [(b.pending, b.done) for b in bars], len(tma)

    return _schedule(rng, [loader()] + [consumer(w) for w in range(nwg)], tma, land, _state, errors)


@pytest.mark.parametrize("dq_first", [False, True], ids=["lag", "dq_first"])
@pytest.mark.parametrize("stages", [2, 3])
def test_kt_persistent_protocol_model(stages, dq_first):
    for seed in range(60):
        for tiles in ([3], [0], [1, 0, 2], [4, 1, 1, 5], [2, 2, 2, 2, 2], [0, 0, 3, 0]):
            assert _kt_persistent_protocol_run(seed, tiles, stages, dq_first=dq_first) is None, (seed, tiles)


def test_kt_persistent_protocol_model_catches_mistakes():
    assert any("loaded while" in str(_kt_persistent_protocol_run(seed, [3, 3, 3], mistake="no_k_free"))
               for seed in range(60))
    assert any("before its V" in str(_kt_persistent_protocol_run(seed, [2, 2, 2], mistake="v_unwaited"))
               for seed in range(60))
    assert any("before that tile's V" in str(_kt_persistent_protocol_run(seed, [1, 0, 2], mistake="dv_unwaited"))
               for seed in range(60))


# ---------------------------------------------------------------------------------------------------------
# The algorithm, emulated per CTA / consumer / step in fp64, against the reference.
# ---------------------------------------------------------------------------------------------------------

def _emulate(dout, q, k, v, out, lse, scale, wl, wr, softcap, bm=64, nwg=2, col_split=False):
    """dq, dk, dv of the main kernel's loop structure, batched layout (B, S, H, D). col_split: the D = 256 kernel's
    S and dP, each the sum of two partial products over the head-dim halves (nwg = 1: 64 keys a CTA)."""
    bsz, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    bn = SLAB * nwg
    sq_pad = -(-sq // bm) * bm
    # Preprocess: Delta, lse2 padded with (0, +inf).
    delta = torch.zeros(bsz, hq, sq_pad, dtype=torch.float64)
    lse2 = torch.full((bsz, hq, sq_pad), math.inf, dtype=torch.float64)
    delta[:, :, :sq] = (dout.double() * out.double()).sum(-1).transpose(1, 2)
    lse2[:, :, :sq] = torch.where(torch.isinf(lse), torch.full_like(lse, math.inf), lse).double() * math.log2(math.e)
    # TMA reads rows past the tensor as zeros.
    qz = torch.zeros(bsz, sq_pad, hq, d, dtype=torch.float64)
    doz = torch.zeros(bsz, sq_pad, hq, v.shape[-1], dtype=torch.float64)
    qz[:, :sq], doz[:, :sq] = q.double(), dout.double()
    skp = -(-sk // bn) * bn
    kz = torch.zeros(bsz, skp, hkv, d, dtype=torch.float64)
    vz = torch.zeros(bsz, skp, hkv, v.shape[-1], dtype=torch.float64)
    kz[:, :sk], vz[:, :sk] = k.double(), v.double()
    dq = torch.zeros_like(qz)
    dk = torch.zeros_like(kz)
    dv = torch.zeros_like(vz)
    qk_scale = (softcap if softcap > 0 else scale) * math.log2(math.e)
    off = sk - sq
    for b in range(bsz):
        for hk in range(hkv):
            for n0 in range(0, sk, bn):
                m_lo, m_hi = _q_range(n0, bn, bm, sq, sk, wl, wr)
                for w in range(nwg):
                    kr0 = n0 + w * SLAB
                    ks, vs = kz[b, kr0:kr0 + SLAB, hk], vz[b, kr0:kr0 + SLAB, hk]
                    for g in range(group):
                        h = hk * group + g
                        for mb in range(m_lo, m_hi):
                            m0 = mb * bm
                            qs, dos = qz[b, m0:m0 + bm, h], doz[b, m0:m0 + bm, h]
                            if col_split:
                                c = d // 2
                                s = qs[:, :c] @ ks[:, :c].T + qs[:, c:] @ ks[:, c:].T
                            else:
                                s = qs @ ks.T
                            if softcap > 0:
                                th = torch.tanh(s * scale / softcap)
                                s = th * qk_scale
                            else:
                                s = s * qk_scale
                            if _needs_mask(kr0, m0, bm, sq, sk, wl, wr):
                                r = torch.arange(m0, m0 + bm)[:, None]
                                c = torch.arange(kr0, kr0 + SLAB)[None, :]
                                ok = c < sk
                                if wr >= 0:
                                    ok = ok & (c <= r + off + wr)
                                if wl >= 0:
                                    ok = ok & (c >= r + off - wl)
                                s = torch.where(ok, s, -math.inf)
                            p = torch.exp2(s - lse2[b, h, m0:m0 + bm, None])
                            if col_split:
                                c = v.shape[-1] // 2
                                dp = dos[:, :c] @ vs[:, :c].T + dos[:, c:] @ vs[:, c:].T
                            else:
                                dp = dos @ vs.T
                            ds = p * (dp - delta[b, h, m0:m0 + bm, None])
                            if softcap > 0:
                                ds = ds * (1 - th * th)
                            dv[b, kr0:kr0 + SLAB, hk] += p.T @ dos
                            dk[b, kr0:kr0 + SLAB, hk] += ds.T @ qs
                            dq[b, m0:m0 + bm, h] += scale * (ds @ ks)
    return dq[:, :sq], scale * dk[:, :sk], dv[:, :sk]


@pytest.mark.parametrize("sq,sk,hq,hkv,d,wl,wr,softcap", [
    (100, 100, 2, 2, 32, -1, -1, 0.0),
    (150, 70, 4, 2, 16, -1, 0, 0.0),     # causal, Sq > Sk (leading rows see nothing), GQA
    (70, 190, 2, 1, 16, -1, 0, 5.0),     # causal, Sq < Sk, MQA, softcap
    (130, 130, 2, 2, 16, 20, 7, 0.0),    # window
])
@pytest.mark.parametrize("nwg,col_split", [(2, False), (1, True)], ids=["d128-kernel", "d256-kernel"])
def test_emulated_algorithm_matches_reference(sq, sk, hq, hkv, d, wl, wr, softcap, nwg, col_split):
    from fa4 import reference
    torch.manual_seed(sq + sk)
    q = torch.randn(1, sq, hq, d)
    k = torch.randn(1, sk, hkv, d)
    v = torch.randn(1, sk, hkv, d)
    dout = torch.randn(1, sq, hq, d)
    scale = d ** -0.5
    opts = dict(softmax_scale=scale, window_left=wl, window_right=wr, softcap=softcap, sink=None)
    out, lse = reference.forward(q, k, v, **opts)
    want = reference.backward(dout, q, k, v, out, lse, None, **opts)
    got = _emulate(dout, q, k, v, out, lse, scale, wl, wr, softcap, nwg=nwg, col_split=col_split)
    for name, x, ref in zip(("dq", "dk", "dv"), got, want[:3]):
        assert torch.allclose(x.float(), ref, atol=1e-4, rtol=1e-4), (name, (x.float() - ref).abs().max())


# ---------------------------------------------------------------------------------------------------------
# The host pieces around the Gluon kernel that run on the portable Triton kernels (interpreter on CPU):
# the padded preprocess and the deterministic dQ, with this module's argument plumbing.
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernels in the interpreter")
@pytest.mark.parametrize("wl,wr,sink,dlse", [(-1, -1, False, False), (-1, 0, True, True), (20, 5, False, True)])
def test_preprocess_and_deterministic_dq(wl, wr, sink, dlse):
    from fa4 import reference
    from fa4.kernels.sm90 import backward as bwd
    torch.manual_seed(wl + wr + 3)
    b, sq, sk, hq, hkv, d = 2, 70, 90, 4, 2, 32
    q = torch.randn(b, sq, hq, d).half()
    k = torch.randn(b, sk, hkv, d).half()
    v = torch.randn(b, sk, hkv, d).half()
    s = torch.randn(hq) if sink else None
    opts = dict(softmax_scale=d ** -0.5, window_left=wl, window_right=wr, softcap=0.0, sink=s)
    out, lse = reference.forward(q.float(), k.float(), v.float(), **opts)
    dout = torch.randn_like(out).half()
    dl = torch.randn_like(lse) if dlse else None
    delta, lse2, part = bwd.preprocess(dout, out.half(), lse, dl, s, None, b, sq, 64)
    assert delta.shape == lse2.shape == (b, hq, 128)
    assert torch.isinf(lse2[:, :, sq:]).all() and (delta[:, :, sq:] == 0).all()
    want_delta = (dout.float() * out.half().float()).sum(-1).transpose(1, 2) - (dl if dlse else 0)
    assert torch.allclose(delta[:, :, :sq], want_delta, atol=1e-3)
    dq, dsink = bwd.deterministic_dq(dout, q, k, v, lse2, delta, cu_seqlens_q=None, cu_seqlens_k=None,
                                     seqused_k=None, seqlen_q=sq, seqlen_k=sk, dlse=dl, **opts)
    ref = reference.backward(dout.float(), q.float(), k.float(), v.float(), out, lse, dl, **opts)
    low = reference.backward(dout, q, k, v, out.half(), lse, dl, compute_dtype=torch.float16, **opts)
    from numerics import assert_close_rule
    assert_close_rule("dq", dq, ref[0], low[0])
    assert (dsink is None) == (not sink)
    if sink:
        assert_close_rule("dsink", bwd.sink_gradient(part, s), ref[3], low[3])
        # The dQ kernel's sink gradient comes from Σ_j P·dP (no rounded O in it): at fp32 accuracy, far inside
        # the low-precision reference's error (which is what makes the numerics rule robust for dsink).
        err = (dsink - ref[3]).abs().max().item()
        assert err <= 0.1 * (low[3] - ref[3]).abs().max().item() + 1e-5, err


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernels in the interpreter")
@pytest.mark.parametrize("d, counter", [(40, True), (64, False)])
def test_preprocess_zeroes_the_dq_accumulator(d, counter):
    """zero=(dQ accumulator, tile counter): the preprocess zeroes every row of the (B, Sq, Hq, D) fp32 accumulator
    (D not a power of two, Sq not a multiple of the block) and the counter's 4 int32, and still gives Delta and
    lse2 as without it."""
    from fa4 import reference
    from fa4.kernels.sm90 import backward as bwd
    torch.manual_seed(d)
    b, sq, hq = 2, 70, 3
    q = torch.randn(b, sq, hq, d).half()
    out, lse = reference.forward(q.float(), q.float(), q.float(), softmax_scale=d ** -0.5, window_left=-1,
                                 window_right=0, softcap=0.0, sink=None)
    dout = torch.randn_like(out).half()
    acc = torch.full((b, sq, hq, d), float("nan"))
    ctr = torch.full((4,), 7, dtype=torch.int32) if counter else None
    delta, lse2, _ = bwd.preprocess(dout, out.half(), lse, None, None, None, b, sq, 64, zero=(acc, ctr))
    assert (acc == 0).all()
    if counter:
        assert (ctr == 0).all()
    want_delta, want_lse2, _ = bwd.preprocess(dout, out.half(), lse, None, None, None, b, sq, 64)
    assert torch.equal(delta, want_delta) and torch.equal(lse2, want_lse2)


def test_stats_ext_parts_sum_to_the_value():
    """stats_ext_parts: [hi, mid, lo] in bf16 sum (in fp32, as the wgmma's accumulator adds ones · parts) to x within
    fp32 rounding, over the magnitudes −lse2 / scale2 and −Delta take; ±inf rides in hi alone (mid = lo = 0, so no
    inf − inf); columns 3-15 are zero."""
    from fa4.kernels.sm90 import backward as bwd
    torch.manual_seed(5)
    x = torch.cat([torch.randn(4000) * 300, torch.randn(4000) * 1e-3, torch.tensor([float("inf"), -float("inf"),
                                                                                      0.0, 1e30, -7.0])])
    parts = bwd.stats_ext_parts(x, torch.bfloat16)
    assert parts.shape == (x.numel(), 16) and parts.dtype == torch.bfloat16
    assert (parts[:, 3:] == 0).all()
    total = parts[:, 0].float() + parts[:, 1].float() + parts[:, 2].float()
    finite = torch.isfinite(x)
    assert torch.equal(total[~finite], x[~finite]) and (parts[~finite, 1:] == 0).all()
    err = ((total - x).abs() / x.abs().clamp_min(1e-30))[finite & (x != 0)]
    assert err.max().item() <= 2 ** -22, err.max().item()
    assert (parts[x == 0] == 0).all()
    # The one extension tensor: lse2's parts in columns 0-2, Delta's from STATS_EXT_DELTA_COL, zeros elsewhere.
    col = bwd.STATS_EXT_DELTA_COL
    assert col >= 3 and col + 3 <= 16
    shifted = bwd.stats_ext_parts(x, torch.bfloat16, col)
    assert torch.equal(shifted[:, col:col + 3], parts[:, :3]) and (shifted[:, :col] == 0).all()
    assert (shifted[:, col + 3:] == 0).all()
    lse2, delta = torch.randn(50) * 20, torch.randn(50)
    both = bwd.stats_ext_combined(lse2, delta, -0.5, torch.bfloat16)
    assert torch.equal(both[:, :3], bwd.stats_ext_parts(lse2 * -0.5, torch.bfloat16)[:, :3])
    assert torch.equal(both[:, col:col + 3], bwd.stats_ext_parts(-delta, torch.bfloat16)[:, :3])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernels in the interpreter")
@pytest.mark.parametrize("sq", [70, 128, 150])
def test_preprocess_writes_the_stats_extensions(sq):
    """ext=(lse2 extension, Delta extension, −1 / scale2): the preprocess writes stats_ext_parts of −lse2 / scale2
    and of −Delta into every row up to the tile's padded length (padding rows: −inf and 0, so P = dS = 0 there,
    including whole blocks of padding beyond the last block of real rows), parts that sum to the value, and leaves
    Delta and lse2 as without it."""
    from fa4 import reference
    from fa4.kernels.sm90 import backward as bwd
    torch.manual_seed(sq)
    b, hq, d, scale = 2, 3, 64, 0.125
    q = torch.randn(b, sq, hq, d).bfloat16()
    out, lse = reference.forward(q.float(), q.float(), q.float(), softmax_scale=scale, window_left=-1,
                                 window_right=0, softcap=0.0, sink=None)
    dout = torch.randn_like(out).bfloat16()
    tile = bwd.get_tile(64, 64)
    assert tile.stats_ext
    rows = -(-sq // tile.block_m) * tile.block_m
    # One tensor for both extensions, as stats_ext_buffers makes it.
    poisoned = torch.full((b, hq, rows, 16), float("nan")).bfloat16()
    ext = (poisoned, -1.0 / (scale * bwd.LOG2E))
    delta, lse2, _ = bwd.preprocess(dout, out.bfloat16(), lse, None, None, None, b, sq, tile.block_m, ext=ext)
    want_delta, want_lse2, _ = bwd.preprocess(dout, out.bfloat16(), lse, None, None, None, b, sq, tile.block_m)
    assert torch.equal(delta, want_delta) and torch.equal(lse2, want_lse2)
    col = bwd.STATS_EXT_DELTA_COL
    assert (poisoned[..., col + 3:] == 0).all() and (poisoned[..., 3:col] == 0).all()
    for first, x in ((0, lse2 * ext[1]), (col, -delta)):
        # The cast's rounding may differ from torch's (the interpreter's): the parts' sum is what the kernel uses.
        total = poisoned[..., first:first + 3].float().sum(-1)
        finite = torch.isfinite(x)
        assert torch.equal(total[~finite], x[~finite])
        assert ((total - x).abs() <= 2 ** -21 * x.abs())[finite].all(), (total - x).abs().max()
    assert (poisoned[:, :, sq:, 0] == -float("inf")).all() and (poisoned[:, :, sq:, 1:] == 0).all()


def test_stats_ext_serves_only_batched_bf16_keys_as_rows(monkeypatch):
    """The K extensions serve the keys-as-rows tiles that ask for them (D = 64's default), batched bf16 calls with
    the statistics by TMA; not fp16, packed calls, other tiles, or with the module switch off."""
    from fa4.kernels.sm90 import backward as bwd
    t64 = bwd.get_tile(64, 64)
    assert bwd.stats_ext_serves(t64, False, torch.bfloat16)
    assert not bwd.stats_ext_serves(t64, False, torch.float16)
    assert not bwd.stats_ext_serves(t64, True, torch.bfloat16)
    assert not bwd.stats_ext_serves(bwd.get_tile(128, 128), False, torch.bfloat16)
    assert not bwd.stats_ext_serves(bwd.get_tile(128, 128, stats_ext=True), False, torch.bfloat16)  # not kt
    monkeypatch.setattr(bwd, "STATS_EXT", False)
    assert not bwd.stats_ext_serves(t64, False, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------
# The main kernel's cached launch plan (backward._launch_main): a Plan built from one call's arguments must
# give a later call with other tensors the argument list JITFunction binds for that call, with the same
# specialisation (the compiled kernel is reused without checking).
# ---------------------------------------------------------------------------------------------------------

def _bwd_case(seed, d, varlen, deterministic):
    import torch
    from fa4.kernels.sm90 import aot, backward
    from fa4.kernels.triton.backward import aligned_length
    q, k, v, cu = aot.sample_inputs(d, d, torch.bfloat16, varlen=varlen, gqa=2)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(t.shape, generator=g).to(t.dtype) for t in (q, k, v))
    tile = backward.get_tile(d, d) if d <= 128 else backward.get_tile(d, d, d256=True)
    b, s = aot.SAMPLE_BATCH, aot.SAMPLE_SEQLEN
    hq = q.shape[-2]
    lse_shape = (hq, b * s) if varlen else (b, hq, -(-s // tile.block_m) * tile.block_m)
    return dict(q=q, k=k, v=v, dout=torch.randn(q.shape, generator=g).to(q.dtype), dk=torch.zeros_like(k),
                dv=torch.zeros_like(v), dq=None if deterministic else torch.zeros(q.shape, dtype=torch.float32),
                lse2=torch.zeros(lse_shape), delta=torch.zeros(lse_shape), cu=cu,
                cu_k=None if cu is None else cu.clone(), sink=torch.randn(hq, generator=g),
                dsink=torch.zeros(b * hq, 4, tile.num_wg),
                dq_chain=backward.dq_chain_counters(tile, b, hq, s, "cpu"),
                stats_al=tuple(torch.zeros(hq, aligned_length(b * s, b)) for _ in range(2))), tile


@pytest.mark.skipif(not _HAVE_GLUON, reason="needs triton 3.6.0 with Gluon")
@pytest.mark.parametrize("d,varlen,deterministic,window,softcap,sink,chain", [
    (128, False, False, (-1, 0), 0.0, False, False), (64, True, True, (100, 50), 30.0, False, False),
    (128, True, False, (-1, -1), 0.0, False, False), (128, False, False, (-1, 0), 0.0, True, False),
    (128, False, False, (-1, 0), 0.0, False, True), (128, True, False, (-1, -1), 0.0, False, True),
    (256, False, False, (-1, 0), 0.0, False, False), (256, True, True, (100, 50), 30.0, False, False)])
def test_backward_plan_arguments(d, varlen, deterministic, window, softcap, sink, chain):
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    from fa4.kernels.sm90 import aot, backward, launch
    from fa4.kernels.sm90.attention_fwd import _dummy_i32
    kern = backward.attn_bwd_kernel if d <= 128 else backward.kernel_for(backward.D256_TILE)
    binder = create_function_from_signature(kern.signature, kern.params, make_backend(aot.TARGET))
    opts = dict(num_warps=4, debug=False, instrumentation_mode="")
    s = aot.SAMPLE_SEQLEN

    def plan_args(t, tile):
        return backward.launch_plan(t["dout"], t["q"], t["k"], t["v"], t["dq"], t["dk"], t["dv"], t["lse2"],
                                    t["delta"], softmax_scale=0.1, window_left=window[0], window_right=window[1],
                                    softcap=softcap, cu_seqlens_q=t["cu"], cu_seqlens_k=t["cu_k"],
                                    max_seqlen_q=s if varlen else None, max_seqlen_k=s if varlen else None,
                                    deterministic=deterministic, tile=tile, sink=t["sink"] if sink else None,
                                    dsink_part=t["dsink"] if sink else None,
                                    dq_chain=t["dq_chain"] if chain else None,
                                    stats_al=t["stats_al"] if varlen and d <= 128 else None)

    (first, tile), (later, _) = _bwd_case(1, d, varlen, deterministic), _bwd_case(2, d, varlen, deterministic)
    grid, args1, cx1 = plan_args(first, tile)
    plan = launch.Plan(kern.arg_names, args1, cx1, grid, descs=backward.BWD_DESCS, tensors=backward.BWD_TENSORS)
    assert plan.grid == (grid[0], grid[1], 1)
    dummy = _dummy_i32(later["q"].device)
    dq = later["dq"] if later["dq"] is not None else backward._dq_placeholder(tile, d, varlen, later["q"].device)
    # lse2 and Delta by TMA (the D <= 128 kernel; packed calls from the aligned copies), else descriptors over a
    # placeholder.
    stats = backward.stats_tma_serves(tile, varlen)
    assert stats == (d <= 128)
    placeholder = backward._stats_placeholder(later["q"].device, tile.block_m, varlen)
    stats_src = ((later["stats_al"] if varlen else (later["lse2"], later["delta"])) if stats
                 else (placeholder, placeholder))
    fast = plan.bind(dict(q=later["q"], k=later["k"], v=later["v"], dout=later["dout"], dk=later["dk"],
                          dv=later["dv"], dq=dq, lse2=later["lse2"], delta=later["delta"],
                          cu_q=later["cu"] if varlen else dummy, cu_k=later["cu_k"] if varlen else dummy,
                          seqused=dummy, sink=later["sink"] if sink else later["lse2"],
                          dsink=later["dsink"] if sink else later["lse2"],
                          dq_chain=later["dq_chain"] if chain else dummy,
                          lse2_stats=stats_src[0], delta_stats=stats_src[1]))
    _, args2, cx2 = plan_args(dict(later, dq=later["dq"]), tile)
    bound, spec, _ = binder(**args2, **cx2, **opts)
    # The deterministic dQ placeholder is built per call; the empty int32 stand-ins differ by identity only.
    assert_plan_matches_binding(plan, kern, fast, bound, spec, binder, opts,
                                fresh_descs=("dq_desc", ) if deterministic else (), empty_standins=True)


@pytest.mark.parametrize("varlen", [False, True], ids=["batched", "varlen"])
def test_sink_gradient_from_main_kernel_partials(varlen):
    """The host half of tile.sink_pdp: partials as the main kernel writes them (per head, key block and
    consumer: Σ_i exp(sink − lse_i)·Σ_{j in the consumer's 64 keys} P_ij dP_ij), emulated in fp64, give the
    reference's dsink through sink_gradient_from_pdp."""
    from fa4 import reference
    from fa4.kernels.sm90 import backward as bwd
    torch.manual_seed(5)
    b, s, hq, hkv, d = 2, 200, 4, 2, 16
    q, k, v = torch.randn(b, s, hq, d), torch.randn(b, s, hkv, d), torch.randn(b, s, hkv, d)
    sink = torch.randn(hq)
    opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0, softcap=0.0, sink=sink)
    out, lse = reference.forward(q, k, v, **opts)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    want = reference.backward(dout, q, k, v, out, lse, dlse, **opts)[3]
    kk, vv = (t.double().repeat_interleave(hq // hkv, dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk) * opts["softmax_scale"]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    p = torch.where(causal, torch.exp(scores - lse.double()[..., None]), 0.0)
    dp = torch.einsum("bqhd,bkhd->bhqk", dout.double(), vv)
    w = torch.exp(sink.double().view(1, -1, 1) - lse.double())                # (b, hq, s)
    per_key = (w[..., None] * p * dp).sum(dim=2)                                # (b, hq, keys)
    blocks = -(-s // 128)
    per_key = torch.nn.functional.pad(per_key, (0, blocks * 128 - s))
    parts = per_key.view(b * hq, blocks, 2, 64).sum(-1).float()                 # (b·hq, key blocks, consumers)
    if varlen:  # the same rows packed: lse and dlse as (Hq, tokens)
        lse_in, dlse_in = lse.transpose(0, 1).reshape(hq, b * s), dlse.transpose(0, 1).reshape(hq, b * s)
    else:
        lse_in, dlse_in = lse, dlse
    got = bwd.sink_gradient_from_pdp(parts, sink, lse_in, dlse_in, b)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got, want)


def test_preprocess_aligned_copies_of_packed_rows():
    """Packed calls: the preprocess also writes lse2 and Delta where the main kernel's TMA loads read them, each
    sequence starting at aligned_start (a multiple of 4 floats: a TMA box's innermost start must be 16-byte
    aligned), in order and without overlap; the (Hq, T) buffers are unchanged."""
    from fa4.kernels.sm90 import backward as bwd
    from fa4.kernels.triton.backward import aligned_length
    torch.manual_seed(3)
    lens = [300, 1, 517, 64, 6, 1000]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    t, hq, dv = int(cu[-1]), 4, 32
    out, dout = torch.randn(t, hq, dv).half(), torch.randn(t, hq, dv).half()
    lse = torch.randn(hq, t)
    al = tuple(torch.full((hq, aligned_length(t, len(lens))), float("nan")) for _ in range(2))
    delta, lse2, _ = bwd.preprocess(dout, out, lse, None, None, cu, len(lens), max(lens), None, aligned=al)
    starts = [(int(cu[b]) + 3 * b + 3) // 4 * 4 for b in range(len(lens))]
    for b, n in enumerate(lens):
        assert starts[b] % 4 == 0 and (b == 0 or starts[b] >= starts[b - 1] + lens[b - 1])
        assert starts[b] + n <= al[0].shape[1]
        rows = slice(int(cu[b]), int(cu[b]) + n)
        assert torch.equal(al[0][:, starts[b]:starts[b] + n], lse2[:, rows])
        assert torch.equal(al[1][:, starts[b]:starts[b] + n], delta[:, rows])
    want = (dout.float() * out.float()).sum(-1).transpose(0, 1)
    assert torch.allclose(delta, want, atol=1e-3)


def test_default_tile_routing(monkeypatch):
    """Which tile each kind of call gets (backward.default_tile, backward_checked): keys as rows at D = 64 and for
    causal D = 128 (deterministic ones too when batched); the queries-as-rows tiles for a D = 64 softcap, D = 128
    non-causal, packed deterministic or left-windowed deterministic calls, and
    for softmax_scale = 0 (the keys-as-rows kernel seeds its scores with −lse2 / scale); with a sink the keys-as-rows
    tiles take dQ from the ordered pass (checked in backward_checked's rule below)."""
    from fa4.kernels.sm90 import backward as bwd
    assert bwd.default_tile(64, 64).keys_as_rows and bwd.default_tile(64, 64).dq_lag
    assert bwd.default_tile(64, 64, window_right=0, varlen=True).keys_as_rows
    assert bwd.default_tile(64, 64, softcap=30.0) is bwd.D64_NARROW_TILE
    assert bwd.default_tile(64, 64, softmax_scale=0.0) is bwd.D64_NARROW_TILE
    shared = bwd.get_tile(128, 128)
    assert shared.shared_dq and not shared.keys_as_rows
    assert bwd.default_tile(128, 128) == shared
    assert bwd.default_tile(128, 128, window_right=0) is bwd.D128_CAUSAL_TILE
    # Packed causal calls: the same tile off the persistent grid (default_tile).
    assert bwd.default_tile(128, 128, window_right=0, varlen=True) == dataclasses.replace(bwd.D128_CAUSAL_TILE,
                                                                                          persistent=False)
    assert bwd.D128_CAUSAL_TILE.persistent and bwd.persistent_tiles(bwd.D128_CAUSAL_TILE)
    assert not bwd.persistent_tiles(bwd.default_tile(64, 64)) and not bwd.persistent_tiles(bwd.get_tile(128, 128))
    # D = 64 on the persistent grid (D64_PERSIST_CAUSAL, D64_PERSIST_DET): batched causal calls, and deterministic
    # ones without a window below KT_ASC_CHAIN_MIN_ROWS rows (then the grid's chain serves them, not the ordered pass).
    d64 = bwd.get_tile(64, 64)
    assert bwd.default_tile(64, 64, window_right=0) == dataclasses.replace(d64, persistent=True)
    short = bwd.KT_ASC_CHAIN_MIN_ROWS - 1
    det64 = bwd.default_tile(64, 64, deterministic=True, seqlen_q=short)
    assert bwd.persistent_tiles(det64) and bwd.dq_chain_serves(det64, -1, None, -1, short)
    # ... and deterministic causal ones up to D64_CAUSAL_CHAIN_MAX_ROWS_DET rows (the grid's chain again).
    causal_det = bwd.D64_CAUSAL_CHAIN_MAX_ROWS_DET
    det64c = bwd.default_tile(64, 64, window_right=0, deterministic=True, seqlen_q=causal_det)
    assert bwd.persistent_tiles(det64c) and bwd.dq_chain_serves(det64c, -1, None, 0, causal_det)
    for kw in (dict(window_right=0, varlen=True), dict(window_right=0, window_left=100),
               dict(window_right=0, sink=True), dict(window_right=0, deterministic=True),
               dict(window_right=0, deterministic=True, seqlen_q=causal_det + 1), dict(deterministic=True),
               dict(deterministic=True, seqlen_q=short + 1), dict(deterministic=True, seqlen_q=short, varlen=True),
               dict(deterministic=True, seqlen_q=short, window_left=100)):
        assert not bwd.persistent_tiles(bwd.default_tile(64, 64, **kw)), kw
    monkeypatch.setattr(bwd, "D64_PERSIST_DET", False)
    assert not bwd.persistent_tiles(bwd.default_tile(64, 64, deterministic=True, seqlen_q=short))
    monkeypatch.setattr(bwd, "D64_PERSIST_CAUSAL", False)
    assert not bwd.persistent_tiles(bwd.default_tile(64, 64, window_right=0))
    monkeypatch.setattr(bwd, "D64_PERSIST_DET", True)
    monkeypatch.setattr(bwd, "D64_PERSIST_CAUSAL", True)
    for kw in (dict(softcap=20.0), dict(softmax_scale=0.0), dict(sink=True, deterministic=True),
               dict(deterministic=True, varlen=True), dict(deterministic=True, window_left=100)):
        assert bwd.default_tile(128, 128, window_right=0, **kw) == shared, kw
    # deterministic=True on batched calls under a right window from KT_PERSIST_CHAIN_MIN_ROWS query rows: the
    # persistent grid's ascending chain (KT_PERSIST_CHAIN), else the shared-dQ tile's descending one.
    det = bwd.default_tile(128, 128, window_right=0, deterministic=True)
    assert det is bwd.D128_CAUSAL_TILE and bwd.dq_chain_serves(det, -1, None, 0)
    long_rows = bwd.KT_PERSIST_CHAIN_MIN_ROWS_MASKED  # under a right window
    assert bwd.default_tile(128, 128, window_right=0, deterministic=True, seqlen_q=long_rows) is det
    assert bwd.default_tile(128, 128, window_right=0, deterministic=True, seqlen_q=long_rows - 1) == shared
    assert bwd.default_tile(128, 128, deterministic=True, seqlen_q=bwd.KT_PERSIST_CHAIN_MIN_ROWS) is det
    assert bwd.default_tile(128, 128, deterministic=True, seqlen_q=bwd.KT_PERSIST_CHAIN_MIN_ROWS - 1) == shared
    # ... and without a window (KT_PERSIST_CHAIN_FULL); a left window keeps the shared-dQ tile.
    assert bwd.default_tile(128, 128, deterministic=True) is det and bwd.dq_chain_serves(det, -1, None, -1)
    assert bwd.default_tile(128, 128, 100, deterministic=True) == shared
    monkeypatch.setattr(bwd, "KT_PERSIST_CHAIN_FULL", False)
    assert bwd.default_tile(128, 128, deterministic=True) == shared and not bwd.dq_chain_serves(det, -1, None, -1)
    monkeypatch.setattr(bwd, "KT_PERSIST_CHAIN_FULL", True)
    monkeypatch.setattr(bwd, "KT_PERSIST_CHAIN", False)
    assert bwd.default_tile(128, 128, window_right=0, deterministic=True) == shared
    monkeypatch.setattr(bwd, "KT_PERSIST_CHAIN", True)
    # A sink: the queries-as-rows tiles with dQ in the kernel sum its P·dP partials (sink_pdp); the others' sink
    # calls take dQ and the sink gradient from the ordered pass (dq_route); nothing takes the O-based sum.
    from dataclasses import replace
    for right in (-1, 0):
        assert bwd.default_tile(128, 128, window_right=right, sink=True) == replace(shared, sink_pdp=True)
    sink = torch.zeros(8)
    dt = bwd.default_tile
    # (tile, deterministic, sink, window_right, seqlen_q) -> (in-kernel ordered chain, ordered dQ pass, sink
    # partials in the main kernel)
    for tile, det, s, right, sq, want in [
            (dt(128, 128, sink=True), False, sink, -1, 4096, (False, False, True)),
            (dt(128, 128, sink=True, deterministic=True), True, sink, -1, 4096, (False, True, False)),
            (dt(128, 128, deterministic=True), True, None, -1, 1024, (True, False, False)),
            (dt(128, 128), False, None, -1, 4096, (False, False, False)),
            (dt(64, 64, sink=True), False, sink, -1, 4096, (False, True, False)),
            (dt(64, 64), False, None, -1, 4096, (False, False, False)),
            (dt(64, 64, softcap=30.0, sink=True), False, sink, -1, 4096, (False, True, False)),
            # keys as rows, deterministic: the descending chain always, the ascending one from 8192 query rows
            (dt(64, 64, window_right=0, deterministic=True), True, None, 0, 1024, (True, False, False)),
            (dt(64, 64, deterministic=True), True, None, -1, 4096, (False, True, False)),
            (dt(64, 64, deterministic=True), True, None, -1, 16384, (True, False, False)),
            (dt(64, 64, deterministic=True), True, sink, -1, 16384, (False, True, False)),
            # D = 256: dQ by the pass without a window (D256_PASS_FULL), by the reduce-add with one
            (dt(256, 256, sink=True), False, sink, -1, 4096, (False, True, False)),
            (dt(256, 256), False, None, -1, 4096, (False, True, False)),
            (dt(256, 256), False, None, 0, 4096, (False, False, False)),
            (dt(256, 256, deterministic=True), True, None, 0, 4096, (False, True, False))]:
        assert bwd.dq_route(tile, det, -1, s, right, sq) == want, (tile, det, s is not None, right, sq)
    # An explicit keys-as-rows tile declines what its kernel does not build (the device checks, which a CPU tensor
    # fails first, stubbed out).
    from fa4.kernels import sm90
    monkeypatch.setattr(sm90, "common_reason", lambda *a, **k: None)
    q = torch.zeros(1, 128, 2, 64, dtype=torch.bfloat16)
    kt = bwd.default_tile(64, 64)
    assert bwd.unsupported_reason(q, q, q, tile=kt) is None
    assert "softcap" in bwd.unsupported_reason(q, q, q, tile=kt, softcap=30.0)
    assert "softmax_scale" in bwd.unsupported_reason(q, q, q, tile=kt, softmax_scale=0.0)


@pytest.mark.skipif(not _HAVE_GLUON, reason="needs triton 3.6.0 with Gluon")
def test_dq_spread_forms():
    """The conflict-free dQ staging store (tile.dq_spread) where it measured faster: every D <= 128 tile, batched or
    packed, except packed calls on the D = 64 keys-as-rows tile; never on the D = 256 tile or the ping-pong probes;
    the launch plan passes the decision as DQ_SPREAD, and backward.DQ_SPREAD = False turns it off everywhere."""
    from fa4.kernels.sm90 import backward
    for d, causal in ((64, False), (64, True), (128, False), (128, True)):
        tile = backward.default_tile(d, d, window_right=0 if causal else -1)
        assert tile.dq_spread and backward.dq_spread_serves(tile, False)
        assert backward.dq_spread_serves(tile, True) is (d == 128), (d, causal)
    assert not backward.D256_TILE.dq_spread
    assert not backward.get_tile(128, 128, ping_pong=True).dq_spread
    for varlen in (False, True):
        cx = _sample_plan(64, backward.default_tile(64, 64, varlen=varlen), varlen)[-1]
        assert cx["DQ_SPREAD"] is (not varlen)
    # The switch is part of the launch plan's signature, so a probe that flips it gets the other build.
    t, tile = _bwd_case(3, 128, False, False)
    sig = dict(softmax_scale=0.1, window_left=-1, window_right=0, softcap=0.0, cu_seqlens_q=None, cu_seqlens_k=None,
               seqused_k=None, max_seqlen_q=None, max_seqlen_k=None, deterministic=False)
    before = backward.plan_signature(t["dout"], t["q"], t["k"], t["v"], tile, **sig)
    saved = backward.DQ_SPREAD
    try:
        backward.DQ_SPREAD = False
        assert not backward.dq_spread_serves(backward.default_tile(128, 128), False)
        assert backward.plan_signature(t["dout"], t["q"], t["k"], t["v"], tile, **sig) != before
    finally:
        backward.DQ_SPREAD = saved
