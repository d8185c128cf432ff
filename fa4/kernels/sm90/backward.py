"""Attention backward for Hopper (sm_90a) in Gluon: the main kernel, its partitions, and the host wrapper.

Dispatched for D, Dv <= 128 (this file's kernel; at D = 64, and for causal calls at D = 128, the keys-as-rows
kernel of backward_kt.py, tiles with keys_as_rows) and D = Dv in (128, 256] (backward_d256.py's, tile D256_TILE)
by dispatch.resolve_auto_backward; tests: tests/gpu/test_sm90_backward.py (GPU),
tests/test_sm90_backward_aot.py (sm_90a compile, register and spill checks); speed: benchmarks/sm90_bwd_probe.py.

The math (docs/INTERNALS.md), per query block i (rows) and resident key block j, in base 2:

    S = Q·Kᵀ,    P = exp2(S·scale·log2 e − lse2)        recomputed from the forward's lse, never stored
    dP = dO·Vᵀ,  dS = P ∘ (dP − Delta)   [∘ (1 − tanh²) under softcap]
    dV += Pᵀ·dO,  dK += dSᵀ·Q,  dQ += dS·K   (dK and dQ times softmax_scale)

Launches, in order:
1. preprocess: Delta = rowsum(dO ∘ O) − dlse, lse2 = lse·log2 e (+inf for empty rows, so their P is 0) and
   the sink-gradient partial sums. Memory-bound; the portable Triton kernel (kernels/triton/backward.py)
   is used as is.
2. `attn_bwd_kernel` (this file): one CTA per (key block of BN = 64·NWG keys, batch · kv head).
     loader (1 warp; with three consumers the 4-warp default partition, see attn_bwd_kernel)
                             TMA: the CTA's K and V once (resident), then Q_i and dO_i of every query block
                             that can see the keys, for every query head of the GQA group, into a ring of
                             STAGES slots; the block's lse2 and Delta come with Q_i (packed calls from the
                             preprocess's aligned copies; STATS_TMA), so no consumer waits on a global load.
     consumers (NWG x 4 warps, 64 keys each; see _consumer)
                             S and dP by async wgmma from shared memory (EARLY_DP: dP issued right behind S,
                             under the softmax); P, dS in registers, then in shared memory as the
                             (transposed) A operand of dV += Pᵀ·dO and dK += dSᵀ·Q, and of the dQ product,
                             which is added to an fp32 accumulator by a TMA reduce-add
                             (cp.reduce.async.bulk.tensor, done at L2), or skipped (the ordered pass). The dQ
                             product is this warpgroup's keys times all D columns, or with DQ_SHARED (the
                             D = 128 tile) the CTA's keys (both consumers' dS, handed over through shared
                             memory with the ds_ready / ds_free barriers) times this warpgroup's D / 2
                             columns: half the reduce-add traffic.
                             PING_PONG (tile.ping_pong, opt-in): the consumers take turns issuing their
                             wgmmas, two product groups a step (S with dP; then dV, dK, dQ), so that one
                             warpgroup's exp2 and dS run while the tensor core works on the other's group.
     dQ writer (DQ_WRITER: 1 warp, the D = 128 tile's non-causal calls and the ordered chain; see dq_writer)
                             the consumers stage their dQ shares and hand them over (dq_staged / dq_free);
                             the writer issues the reduce-adds, so no consumer waits on the TMA unit, and
                             with ORDERED_DQ it issues them in a fixed order of key blocks per (query block,
                             head, column slice), waiting on a counter in global memory for its turn;
                             without a window the default's writers wait only for key block 0's stores
                             (ORDERED_DQ_FIRST, DQ_FIRST_STORE), so that nothing zeroes the accumulator.
   dK and dV stay in registers, summed over the query heads of the GQA group, and are stored once.
3. deterministic=True: dK and dV are deterministic by construction (each CTA owns its keys and walks the query
   blocks in a fixed order). dQ: at D = 128 without a left window or sink, the main kernel's ordered chain
   (ORDERED_DQ: every add into a dQ tile in a fixed key-block order, ascending, or descending under a right
   window with the CTAs dispatched last block first, so that a CTA only ever waits on one dispatched before
   it); otherwise the portable Triton dQ kernel (one program per query block, fixed key order).
4. dQ: the fp32 accumulator (already scaled) cast to the input dtype.

D = 256 runs its own kernel, backward_d256.py (tile D256_TILE in _TABLE; the probe's `--tiles d256`), built on
the plan below (shared-memory budget of 227 KiB worked out in session 3; 1.30-1.34x the Triton backward on an
H200, 0.89-0.94x cuDNN):
  - a CTA keeps 64 keys; consumer w owns head-dim columns c_w = [128w, 128w + 128): dK[:, c_w] and dV[:, c_w]
    (64 + 64 fp32 registers a thread), and dQ[:, c_w] in two [64, 64] parts (32 each, one at a time);
  - per query block (BM = 64) each consumer computes the partial products over its columns,
    S_w = Q[:, c_w]·K[:, c_w]ᵀ and dP_w = dO[:, c_w]·V[:, c_w]ᵀ; consumer 1 hands S_1 and dP_1 (fp32,
    32 KiB) to consumer 0 through shared memory; consumer 0 forms P and dS and writes them (16-bit, 16 KiB)
    for both; then each: dV[:, c_w] += Pᵀ·dO[:, c_w], dK[:, c_w] += dSᵀ·Q[:, c_w], dQ[:, c_w] = dS·K[:, c_w]
    by TMA reduce-add. Five products of 1 MFLOP per consumer and step; consumer 0 also does the 64 x 64
    elementwise work;
  - shared memory: K, V 64 KiB; P, dS 16 KiB; the fp32 hand-over tile doubles as the dQ staging (consumer 0
    has read the partials before either stages dQ: the hand-over barriers order it) 32 KiB; that leaves room
    for two Q stages and one dO stage (96 KiB): 208 KiB. Two full Q/dO stages (128 KiB) do not fit.
  - barriers beyond the D = 128 kernel's: part_ready (1 -> 0), pds_ready (0 -> 1), and their "free" pairs
    for reuse, in the style of ds_ready / ds_free.

Barrier protocol (parity tracked by counters in each partition):
  kv_ready (1 arrival + tx)        loader -> consumers: K and V of the CTA are in shared memory
  q_ready/do_ready[s] (1 + tx)     loader -> consumers
  q_empty/do_empty[s] (NWG)        consumers -> loader, once the wgmma reading the slot has completed
  ds_ready[w] (1, DQ_SHARED)       consumer w -> the other: its dS of step `it` is in ds[w] (phase it)
  ds_free[w] (1, DQ_SHARED)        the other consumer -> w: its dQ wgmma reading ds[w] has completed; w waits
                                   for it before writing ds[w] again (a fresh barrier passes parity 1)
  loop_done[w] (1, DQ_SHARED)      consumer w -> the other: w left its loop, its last dQ product (which read the
                                   other's K too) completed; the other waits for it (parity 0, once a CTA) before
                                   staging dK in its K slot
  turn[w] (1, PING_PONG)           consumer w-1 -> w (cyclically): "your turn to issue"; consumer 0 starts.
Every consumer walks the same query blocks (the range is the CTA's, from the key block's first key n0, not the
warpgroup's 64-key slice: under a causal or window mask a slice that sees none of a query block still takes that
step, its P masked to 0), so the arrival counts match.

PING_PONG. Why: both warpgroups' wgmmas run on the same four tensor cores of the SM (a warpgroup's wgmma
occupies all four sub-partitions). Issued freely they interleave, both finish late, and both warpgroups then do
their exp2 / dS with the tensor core idle; at D = 64 that elementwise work is comparable to the products.
Turns order them: consumer w issues group 1 (S, dP), hands the turn on, does exp2 and dS while the others'
groups run, and issues group 2 (dV, dK, dQ) at its next turn.
Invariant: every consumer takes exactly two turns per step (no mask, sequence end or flag skips one; the flags
only change what a turn issues), over the same number of steps (above), and nothing else in the kernel is
persistent. So consumer w's k-th turn wait (from 0) is answered by consumer w-1's k-th arrival (consumer 0's by
the last consumer's (k-1)-th; its 0-th passes on the fresh barrier), and the strict rotation keeps a turn
barrier at most one phase ahead of its waiter: a parity wait is exact (two turns a step, so the parity of each
is the same every step).
Deadlock-free: a consumer waits for Q / dO before taking its turn (the loader refills a slot once the
consumers released it STAGES steps earlier, which needs no later turn), and while holding a turn it waits only
for the other consumer's dS of the same step (DQ_SHARED), which that consumer writes before its own second
turn, needing only its first turn (already passed) and ds_free of the previous step. The last arrival (on
turn[0]) is never waited for; the grid is not persistent, so no later walk sees it. A Python model of these
barriers runs under random schedules in tests/test_sm90_backward_aot.py (update it with any change of order).
"""
from dataclasses import dataclass, replace
import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton._C.libtriton import ir
from triton.experimental.gluon.language._core import builtin
from triton.language.core import _aggregate as aggregate

from fa4.kernels.direct_launch import Launch, current_device, hooks_idle, raw_stream

from . import configs, launch
from .attention_fwd import (_descriptor, _dummy_i32, _head_coord, _kv_coord, _next_slot, _opaque, _q_coord,
                            _visible)
from .dq_staging import store_dq_staging
from .softmax import tanh_approx

LOG2E = 1.4426950408889634
# deterministic=True with dQ accumulated inside the main kernel (ORDERED_DQ, issued by the writer warp): the TMA
# reduce-adds into each (query block, head, column slice) of dQ happen in a fixed order of key blocks, a chain
# kept by a counter in global memory (_dq_chain_wait / _dq_chain_release). ASC: key blocks in ascending order (no
# window: every key block sees every query block at the same step of its walk). DESC: descending, for a right
# window (causal): the key block on the diagonal adds first and, with the CTAs dispatched last block first
# (_cta_block), each CTA's predecessor reaches a query block two steps before it does.
ORDERED_DQ_ASC = gl.constexpr(1)
ORDERED_DQ_DESC = gl.constexpr(2)
# FIRST: only the first link is ordered (the default's unordered reduce-add without a zeroed accumulator,
# DQ_FIRST_STORE): key block 0 stores its shares and releases each once stored; every other key block waits for that
# release, then adds in any order.
ORDERED_DQ_FIRST = gl.constexpr(3)
LOG2E_C = gl.constexpr(LOG2E)
WG_KEYS = 64  # one m64 wgmma slab of keys per consumer warpgroup
KEYS_PER_WG = gl.constexpr(WG_KEYS)


@builtin
def async_reduce_add_shared_to_global(tensor_desc, coord, src, _semantic=None):
    """TMA reduce-add (cp.reduce.async.bulk.tensor .add) of a shared-memory tile into global memory.

    Gluon 3.6 builds the operation (GluonOpBuilder.create_async_tma_reduce) but exposes no function for it.
    The TMA unit adds at L2, element-wise atomic with respect to other reductions, clipped at the
    descriptor's bounds like a store; completion is tracked like a store (`tma.store_wait` before the
    source tile is overwritten)."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@aggregate
class BwdProblem:
    """What every partition needs to walk the same blocks."""
    q_desc: tma.tensor_descriptor
    k_desc: tma.tensor_descriptor
    v_desc: tma.tensor_descriptor
    do_desc: tma.tensor_descriptor
    dk_desc: tma.tensor_descriptor
    dv_desc: tma.tensor_descriptor
    dq_desc: tma.tensor_descriptor
    lse2_desc: tma.tensor_descriptor
    delta_desc: tma.tensor_descriptor
    dk_ptr: gl.tensor
    dv_ptr: gl.tensor
    lse2_ptr: gl.tensor
    delta_ptr: gl.tensor
    sink_ptr: gl.tensor
    dsink_ptr: gl.tensor
    dq_ctr: gl.tensor
    cu_q: gl.tensor
    cu_k: gl.tensor
    seqused: gl.tensor
    stride_dkb: gl.tensor
    stride_dks: gl.tensor
    stride_dkh: gl.tensor
    stride_dvb: gl.tensor
    stride_dvs: gl.tensor
    stride_dvh: gl.tensor
    stride_tb: gl.tensor
    stride_th: gl.tensor
    d: gl.tensor
    dv: gl.tensor
    seqlen_q: gl.tensor
    seqlen_k: gl.tensor
    num_kv_heads: gl.tensor
    group: gl.tensor
    qk_scale: gl.tensor
    cap_scale: gl.tensor
    softmax_scale: gl.tensor
    window_left: gl.tensor
    window_right: gl.tensor
    BM: gl.constexpr
    NWG: gl.constexpr
    STAGES: gl.constexpr
    VARLEN: gl.constexpr
    HAS_SEQUSED: gl.constexpr
    HAS_WL: gl.constexpr
    HAS_WR: gl.constexpr
    SOFTCAP: gl.constexpr
    DQ_ATOMIC: gl.constexpr
    DQ_SHARED: gl.constexpr
    EARLY_DP: gl.constexpr
    SINK_PDP: gl.constexpr
    PING_PONG: gl.constexpr
    BIG: gl.constexpr
    TRACE: gl.constexpr
    ORDERED_DQ: gl.constexpr
    DQ_WRITER: gl.constexpr
    STATS_TMA: gl.constexpr
    CTA_CHUNKED: gl.constexpr
    DQ_SPREAD: gl.constexpr
    STATS_EXT: gl.constexpr

    @gluon.constexpr_function
    def __init__(self, q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, dq_desc, lse2_desc, delta_desc, dk_ptr,
                 dv_ptr, lse2_ptr,
                 delta_ptr, sink_ptr, dsink_ptr, dq_ctr, cu_q, cu_k, seqused, stride_dkb, stride_dks, stride_dkh, stride_dvb,
                 stride_dvs, stride_dvh, stride_tb, stride_th, d, dv, seqlen_q, seqlen_k, num_kv_heads, group,
                 qk_scale, cap_scale, softmax_scale, window_left, window_right, BM, NWG, STAGES, VARLEN,
                 HAS_SEQUSED, HAS_WL, HAS_WR, SOFTCAP, DQ_ATOMIC, DQ_SHARED, EARLY_DP, SINK_PDP, PING_PONG, BIG,
                 TRACE, ORDERED_DQ=0, DQ_WRITER=False, STATS_TMA=False, CTA_CHUNKED=False, DQ_SPREAD=False,
                 STATS_EXT=False):
        self.q_desc = q_desc
        self.k_desc = k_desc
        self.v_desc = v_desc
        self.do_desc = do_desc
        self.dk_desc = dk_desc
        self.dv_desc = dv_desc
        self.dq_desc = dq_desc
        self.lse2_desc = lse2_desc
        self.delta_desc = delta_desc
        self.dk_ptr = dk_ptr
        self.dv_ptr = dv_ptr
        self.lse2_ptr = lse2_ptr
        self.delta_ptr = delta_ptr
        self.sink_ptr = sink_ptr
        self.dsink_ptr = dsink_ptr
        self.dq_ctr = dq_ctr
        self.cu_q = cu_q
        self.cu_k = cu_k
        self.seqused = seqused
        self.stride_dkb = stride_dkb
        self.stride_dks = stride_dks
        self.stride_dkh = stride_dkh
        self.stride_dvb = stride_dvb
        self.stride_dvs = stride_dvs
        self.stride_dvh = stride_dvh
        self.stride_tb = stride_tb
        self.stride_th = stride_th
        self.d = d
        self.dv = dv
        self.seqlen_q = seqlen_q
        self.seqlen_k = seqlen_k
        self.num_kv_heads = num_kv_heads
        self.group = group
        self.qk_scale = qk_scale
        self.cap_scale = cap_scale
        self.softmax_scale = softmax_scale
        self.window_left = window_left
        self.window_right = window_right
        self.BM = gl.constexpr(BM)
        self.NWG = gl.constexpr(NWG)
        self.STAGES = gl.constexpr(STAGES)
        self.VARLEN = gl.constexpr(VARLEN)
        self.HAS_SEQUSED = gl.constexpr(HAS_SEQUSED)
        self.HAS_WL = gl.constexpr(HAS_WL)
        self.HAS_WR = gl.constexpr(HAS_WR)
        self.SOFTCAP = gl.constexpr(SOFTCAP)
        self.DQ_ATOMIC = gl.constexpr(DQ_ATOMIC)
        self.DQ_SHARED = gl.constexpr(DQ_SHARED)
        self.EARLY_DP = gl.constexpr(EARLY_DP)
        self.SINK_PDP = gl.constexpr(SINK_PDP)
        self.PING_PONG = gl.constexpr(PING_PONG)
        self.BIG = gl.constexpr(BIG)
        self.TRACE = gl.constexpr(TRACE)
        self.ORDERED_DQ = gl.constexpr(ORDERED_DQ)
        self.DQ_WRITER = gl.constexpr(DQ_WRITER)
        self.CTA_CHUNKED = gl.constexpr(CTA_CHUNKED)
        self.DQ_SPREAD = gl.constexpr(DQ_SPREAD)
        self.STATS_TMA = gl.constexpr(STATS_TMA)
        self.STATS_EXT = gl.constexpr(STATS_EXT)


@aggregate
class BwdBuffers:
    k: gl.shared_memory_descriptor         # [NWG, *k box]: 64 resident keys per consumer
    v: gl.shared_memory_descriptor         # [NWG, *v box]
    q: gl.shared_memory_descriptor         # [STAGES, *q box]
    do: gl.shared_memory_descriptor        # [STAGES, *do box]
    p: gl.shared_memory_descriptor         # [NWG, BM, 64]: P of each consumer (16-bit), read transposed
    ds: gl.shared_memory_descriptor        # [NWG, BM, 64]: dS of each consumer, read transposed
    dq: gl.shared_memory_descriptor        # [NWG, *dq box] fp32: each consumer's dQ share for the TMA add
    ds_ready: gl.shared_memory_descriptor  # [NWG, 1] (DQ_SHARED): consumer w's dS of this step is in ds[w]
    ds_free: gl.shared_memory_descriptor   # [NWG, 1] (DQ_SHARED): the other consumer is done reading ds[w]
    kv_ready: gl.shared_memory_descriptor
    q_ready: gl.shared_memory_descriptor   # [STAGES, 1]
    q_empty: gl.shared_memory_descriptor
    do_ready: gl.shared_memory_descriptor
    do_empty: gl.shared_memory_descriptor
    turn: gl.shared_memory_descriptor      # [NWG, 1] (PING_PONG): consumer w may issue its next product group
    dq_staged: gl.shared_memory_descriptor  # [NWG, 1] (DQ_WRITER): consumer w's dQ share is in dq[w]
    dq_free: gl.shared_memory_descriptor    # [NWG, 1] (DQ_WRITER): the TMA unit has read dq[w]
    loop_done: gl.shared_memory_descriptor  # [NWG, 1] (DQ_SHARED): consumer w's loop and its products are done
    lse2: gl.shared_memory_descriptor       # [STAGES, 1, 1, BM] fp32 (STATS_TMA): lse2 of the Q slot's rows
    delta: gl.shared_memory_descriptor      # [STAGES, 1, 1, BM] fp32 (STATS_TMA): Delta of the Q slot's rows

    @gluon.constexpr_function
    def __init__(self, k, v, q, do, p, ds, dq, ds_ready, ds_free, kv_ready, q_ready, q_empty, do_ready, do_empty,
                 turn, dq_staged, dq_free, lse2, delta, loop_done):
        self.k = k
        self.v = v
        self.q = q
        self.do = do
        self.p = p
        self.ds = ds
        self.dq = dq
        self.ds_ready = ds_ready
        self.ds_free = ds_free
        self.kv_ready = kv_ready
        self.q_ready = q_ready
        self.q_empty = q_empty
        self.do_ready = do_ready
        self.do_empty = do_empty
        self.turn = turn
        self.dq_staged = dq_staged
        self.dq_free = dq_free
        self.lse2 = lse2
        self.delta = delta
        self.loop_done = loop_done


# ---------------------------------------------------------------------------------------------------------
# Block bookkeeping, computed identically by the loader and every consumer.
# ---------------------------------------------------------------------------------------------------------

@gluon.jit
def _cta_block(p):
    """(key block, batch · kv head) of this CTA. Two grid layouts (launch_plan, cta_chunk C):
      (key blocks, b · kv heads): the key blocks of one head dispatched after another's;
      CTA_CHUNKED, (C, key blocks, b · kv heads / C): key block after key block across C consecutive heads (the
             member fastest), so that for causal calls the long walks of C heads go first instead of one head's
             long walk starting behind another's short ones.
    With the in-kernel ordered dQ in its descending chain (ORDERED_DQ_DESC, never chunked) the key blocks are
    dispatched last first, so that every CTA's predecessor in the chain was dispatched before it (see
    _dq_chain_wait)."""
    x = gl.inline_asm_elementwise("mov.u32 $0, %ctaid.x;", "=r,r", [gl.to_tensor(0)], dtype=gl.int32,
                                  is_pure=False, pack=1)
    y = gl.inline_asm_elementwise("mov.u32 $0, %ctaid.y;", "=r,r", [gl.to_tensor(0)], dtype=gl.int32,
                                  is_pure=False, pack=1)
    if p.CTA_CHUNKED:
        z = gl.inline_asm_elementwise("mov.u32 $0, %ctaid.z;", "=r,r", [gl.to_tensor(0)], dtype=gl.int32,
                                      is_pure=False, pack=1)
        nb = y
        bh = z * gl.num_programs(0) + x
    else:
        nb = x
        bh = y
    if p.ORDERED_DQ == ORDERED_DQ_DESC:
        nb = gl.num_programs(0) - 1 - nb
    return nb, bh


@gluon.jit
def _sequence(p, b):
    """(seq_q, seq_k, q_start, k_start) of sequence b (seq_k counts only the visible keys)."""
    if p.VARLEN:
        q_start = gl.load(p.cu_q + b)
        seq_q = gl.load(p.cu_q + b + 1) - q_start
        k_start = gl.load(p.cu_k + b)
        seq_k = gl.load(p.cu_k + b + 1) - k_start
    else:
        q_start = 0
        k_start = 0
        # Opaque: arithmetic on kernel arguments (the mask's seq_k - seq_q ± window) is otherwise hoisted
        # above the partitions and spilled around the register reallocation.
        seq_q = _opaque(p.seqlen_q)
        seq_k = _opaque(p.seqlen_k)
    if p.HAS_SEQUSED:
        seq_k = gl.minimum(gl.load(p.seqused + b), seq_k)
    return seq_q, seq_k, q_start, k_start


@gluon.jit
def _cta_coords(p):
    """This CTA's key block, batch, kv head and sequence bounds (nb, b, hk, seq_q, seq_k, q_start, k_start), from
    a fresh %ctaid read: each partition (and an epilogue) calls it where it needs them, so nothing stays live
    through a loop."""
    nb, bhk = _cta_block(p)
    b = bhk // p.num_kv_heads
    hk = bhk - b * p.num_kv_heads
    seq_q, seq_k, q_start, k_start = _sequence(p, b)
    return nb, b, hk, seq_q, seq_k, q_start, k_start


@gluon.jit
def _q_range(p, n0, seq_q, seq_k):
    """Query blocks [m_lo, m_hi) that see any key of [n0, n0 + BN): the transpose of the forward's key range.
    Row i sees key j when j <= i + off + window_right and j >= i + off - window_left, off = seq_k - seq_q."""
    BN: gl.constexpr = KEYS_PER_WG * p.NWG
    off = seq_k - seq_q
    n_last = gl.minimum(n0 + BN, seq_k) - 1
    lo = 0
    hi = seq_q
    if p.HAS_WR:  # the first row that sees key n0
        lo = gl.maximum(n0 - off - p.window_right, 0)
    if p.HAS_WL:  # one past the last row that sees the block's last key
        hi = gl.minimum(n_last - off + p.window_left + 1, seq_q)
    hi = gl.where(n0 < seq_k, hi, 0)
    m_lo = lo // p.BM
    m_hi = gl.maximum((hi + p.BM - 1) // p.BM, m_lo)
    return m_lo, m_hi


@gluon.jit
def _step_block(p, it, n_m, m_lo, hk):
    """(g, h, m0) of loop step `it` of a CTA's walk over (query head of the GQA group, query block): the group
    member g, its query head h and the block's first row m0. The loader and every consumer walk the same steps:
    head after head, each from the key block's first query block up.

    The ascending chain under a right window (the persistent keys-as-rows grid's, KT_PERSIST_CHAIN) walks query
    block after query block from the last one down, the group's heads at each: key blocks nb − 1 and nb then reach
    every (query block, head) at the same step of their walks (both start at the last block; nb's walk only ends
    earlier), so nb waits for its predecessor's add of the same step, which was handed out first, instead of for
    one that comes 2·(BN / BM) steps later in the walk (bottom up, the diagonal key block would wait for its
    predecessor's walk to get there)."""
    if p.ORDERED_DQ == ORDERED_DQ_ASC and p.HAS_WR:
        g = it % p.group
        r = it // p.group
        m0 = (m_lo + n_m - 1 - r) * p.BM
    else:
        g = it // n_m
        m0 = (m_lo + it - g * n_m) * p.BM
    h = hk * p.group + g
    return g, h, m0


@gluon.jit
def _probabilities(p, s, rows, kr0, m0, seq_q, seq_k, lse2):
    """(P, th) of a step's raw scores s (queries as rows, keys from kr0): P = exp2(s·scale·log2 e − lse2) under the
    call's softcap and mask; th = tanh(s / softcap) under a softcap (dS needs 1 − th²), else s itself (unused)."""
    if p.SOFTCAP:
        th = tanh_approx(s * p.cap_scale)
        s = th * p.qk_scale
    else:
        th = s
        s = s * p.qk_scale
    s = _mask(p, s, rows, kr0, m0, seq_q, seq_k)
    return gl.exp2(s - gl.expand_dims(lse2, 1)), th


@gluon.jit
def _dq_counter(p, b, h, m0, WG: gl.constexpr):
    """The chain counter of dQ[query block m0 / BM, head h of sequence b, column slice WG] (ORDERED_DQ): int32,
    [batch, query heads, query blocks of the longest sequence, NWG], zeroed by the host before the launch."""
    n_m_all = (p.seqlen_q + p.BM - 1) // p.BM
    return p.dq_ctr + ((b * (p.num_kv_heads * p.group) + h) * n_m_all + m0 // p.BM) * p.NWG + WG


@gluon.jit
def last_key_block(p, m0, seq_q, seq_k):
    """The last key block that sees any row of query block m0 (no left window): key block j sees it iff its first key
    j·BN is below X = m0 + BM + (seq_k − seq_q) + window_right (the transpose of _q_range's lower bound) and below
    seq_k. The descending chain starts there (_dq_chain_wait); the ascending chain closes there (DQ_CAST)."""
    BN: gl.constexpr = KEYS_PER_WG * p.NWG
    last = (seq_k - 1) // BN
    if p.HAS_WR:
        x = m0 + p.BM + (seq_k - seq_q) + p.window_right
        last = gl.minimum((x - 1) // BN, last)
    return last


@gluon.jit
def _dq_chain_wait(p, ctr, nb, m0, seq_q, seq_k, FENCE: gl.constexpr = 0):
    """Spin until every key block before this one in the chain of query block m0 has released its reduce-add, then
    a proxy fence (the counter is read through the generic proxy, the reduce-add that follows goes through the
    async proxy).

    Relaxed loads, not ld.acquire: an acquire load also invalidates the SM's L1 (CCTL.IVALL) on every spin, which
    the consumers' L1-resident reloads pay for (the acquire / release build measured 5-15% slower on an H200,
    benchmarks/NOTES.md, session 8). The order of the adds rests on completion, not on the memory model's
    release-acquire: the previous add completed at L2 (wait_group 0) before its release was issued, and this add
    is issued only after the release was observed; both adds are performed at L2. That argument failed where the
    predecessor's write is a TMA store (DQ_STORE_FIRST: an add was lost in 3-8 of 150 repeated calls, session 34);
    the store link's release is fenced for it (CHAIN_FENCE = 3, release_step).

    ASC: the key blocks before nb all see this query block (no window). DESC: those after nb up to the last that
    sees it (last_key_block; the descending chain runs under a right window only).

    FENCE (CHAIN_FENCE) 2, a probe: once the spin has seen the release, an acquire fence (fence.acq_rel.gpu), pairing
    with _dq_chain_release's release fence, so that the predecessor's writes are ordered before this CTA's by the memory
    model and not only by completion (the store-first race, DQ_STORE_FIRST)."""
    if p.ORDERED_DQ == ORDERED_DQ_ASC:
        before = nb
    elif p.ORDERED_DQ == ORDERED_DQ_FIRST:
        before = gl.minimum(nb, 1)
    else:
        before = last_key_block(p, m0, seq_q, seq_k) - nb
    gl.inline_asm_elementwise(_wait_asm(FENCE), "=r,l,r", [ctr, before], dtype=gl.int32, is_pure=False, pack=1)


@gluon.constexpr_function
def _wait_asm(fence):
    """_dq_chain_wait's PTX: the relaxed spin, with fence == 2 an acquire fence after it, then the proxy fence."""
    return ("{ .reg .pred wait; .reg .u32 seen; "
            "DQ_CHAIN_SPIN: ld.relaxed.gpu.global.u32 seen, [$1]; setp.lt.s32 wait, seen, $2; "
            "@wait bra DQ_CHAIN_SPIN; " + ("fence.acq_rel.gpu; " if fence == 2 else "")
            + "fence.proxy.async.global; mov.u32 $0, seen; }")


@gluon.constexpr_function
def _release_asm(pending, fence=0):
    """_dq_chain_release's PTX for `pending` bulk groups left in flight; fence >= 1: a release fence
    (fence.acq_rel.gpu) before the relaxed add, so that the add releases the warp's completed writes (CHAIN_FENCE)."""
    return ("{ .reg .pred leader; .reg .u32 lane; cp.async.bulk.wait_group " + str(pending) + "; "
            "fence.proxy.async.global; bar.warp.sync -1; " + ("fence.acq_rel.gpu; " if fence >= 1 else "")
            + "mov.u32 lane, %laneid; setp.eq.u32 leader, lane, 0; "
            "@leader red.relaxed.gpu.global.add.u32 [$1], 1; mov.u32 $0, 0; }")


@gluon.jit
def _dq_chain_release(ctr, PENDING: gl.constexpr = 0, FENCE: gl.constexpr = 0):
    """The writer warp's bulk async groups completed (the full wait: the adds performed at L2, not only their
    shared-memory source read, which is all tma.store_wait waits for), then +1 on the chain counter (relaxed, see
    _dq_chain_wait) by lane 0 once every lane of the warp has waited (whichever lane the TMA lowering elected to
    issue the adds). PENDING: that many of the newest groups may still be in flight (DQ_RELEASE_LAG releases the
    previous step's chains behind this step's adds)."""
    gl.inline_asm_elementwise(_release_asm(PENDING, FENCE), "=r,l", [ctr], dtype=gl.int32, is_pure=False, pack=1)


# ---------------------------------------------------------------------------------------------------------
# Loader partition: one warp issuing TMA loads (four, idle but one, when it is the default partition).
# ---------------------------------------------------------------------------------------------------------

@gluon.jit
def _loader(p, bufs):
    NWG: gl.constexpr = p.NWG
    BN: gl.constexpr = KEYS_PER_WG * NWG
    nb, b, hk, seq_q, seq_k, q_start, k_start = _cta_coords(p)
    n0 = nb * BN
    if n0 < seq_k:
        # K and V of the CTA, once: one 64-key box per consumer.
        mbarrier.expect(bufs.kv_ready, NWG * (p.k_desc.block_type.nbytes + p.v_desc.block_type.nbytes))
        for w in gl.static_range(NWG):
            tma.async_copy_global_to_shared(p.k_desc, _kv_coord(p, b, hk, k_start, n0 + w * KEYS_PER_WG),
                                            bufs.kv_ready, bufs.k.index(w))
            tma.async_copy_global_to_shared(p.v_desc, _kv_coord(p, b, hk, k_start, n0 + w * KEYS_PER_WG),
                                            bufs.kv_ready, bufs.v.index(w))
        m_lo, m_hi = _q_range(p, n0, seq_q, seq_k)
        idx = 0
        phase = 0
        n_m = m_hi - m_lo
        for it in range(p.group * n_m):
            idx, phase = _load_step(p, bufs, idx, phase, it, n_m, m_lo, b, hk, q_start)


@gluon.jit
def _load_step(p, bufs, idx, phase, it, n_m, m_lo, b, hk, q_start):
    """Q (with the block's lse2 and Delta) and dO of step `it` into ring slot idx; returns the next slot."""
    g, h, row = _step_block(p, it, n_m, m_lo, hk)
    # A fresh barrier passes parity 1 at once: the first STAGES waits do not block.
    mbarrier.wait(bufs.q_empty.index(idx), phase ^ 1)
    if p.STATS_TMA:
        # lse2 and Delta of the block's rows ride on Q's barrier: the consumers read them from shared memory instead
        # of waiting on a global load at every step (an L2 round trip the S product does not cover; Nsight Compute,
        # benchmarks/NOTES.md session 12).
        mbarrier.expect(bufs.q_ready.index(idx), p.q_desc.block_type.nbytes + p.lse2_desc.block_type.nbytes
                        + p.delta_desc.block_type.nbytes)
        if p.STATS_EXT:
            # The (B, Hq, padded Sq, 16) 16-bit K extension of the statistics (keys-as-rows, batched: stats_ext):
            # lse2's parts in columns 0-2, Delta's box from column STATS_EXT_DELTA_COL on.
            stats_coord = [b, h, row, 0]
        elif p.VARLEN:
            # The aligned copies (Hq, aligned length): sequence b starts at a multiple of 4 floats (triton
            # backward.aligned_start); rows past the sequence are masked by the consumers.
            stats_coord = [h, (q_start + 3 * b + 3) // 4 * 4 + row]
        else:
            stats_coord = [b, h, row]
        tma.async_copy_global_to_shared(p.lse2_desc, stats_coord, bufs.q_ready.index(idx), bufs.lse2.index(idx))
        if p.STATS_EXT:
            # Delta's box: its columns past the tensor's last arrive as zeros.
            stats_coord = [b, h, row, STATS_EXT_DELTA_COL_C]
        tma.async_copy_global_to_shared(p.delta_desc, stats_coord, bufs.q_ready.index(idx), bufs.delta.index(idx))
    else:
        mbarrier.expect(bufs.q_ready.index(idx), p.q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(p.q_desc, _q_coord(p, b, h, q_start, row), bufs.q_ready.index(idx),
                                    bufs.q.index(idx))
    mbarrier.wait(bufs.do_empty.index(idx), phase ^ 1)
    mbarrier.expect(bufs.do_ready.index(idx), p.do_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(p.do_desc, _q_coord(p, b, h, q_start, row), bufs.do_ready.index(idx),
                                    bufs.do.index(idx))
    return _next_slot(idx, phase, p.STAGES)


@gluon.jit
def writer_barriers(NWG: gl.constexpr, DQ_WRITER: gl.constexpr, placeholder):
    """(dq_staged, dq_free): the hand-over of each consumer's staged dQ share to the writer warp and back, one
    arrival a step each (count 1); without a writer both are `placeholder`, never touched."""
    if DQ_WRITER:
        dq_staged = gl.allocate_shared_memory(gl.int64, [NWG, 1], mbarrier.MBarrierLayout())
        dq_free = gl.allocate_shared_memory(gl.int64, [NWG, 1], mbarrier.MBarrierLayout())
        for w in gl.static_range(NWG):
            mbarrier.init(dq_staged.index(w), count=1)
            mbarrier.init(dq_free.index(w), count=1)
    else:
        dq_staged = placeholder
        dq_free = placeholder
    return dq_staged, dq_free


# ---------------------------------------------------------------------------------------------------------
# dQ writer partition (DQ_WRITER): one warp issuing the consumers' dQ reduce-adds, so that no consumer waits for
# the TMA unit, nor, with ORDERED_DQ, for another CTA's add, unless its staging tile is still unread.
# ---------------------------------------------------------------------------------------------------------

@gluon.jit
def dq_share_coord(p, b, h, q_start, m0, w: gl.constexpr, KEYS_AS_ROWS: gl.constexpr):
    """TMA coordinates of consumer w's dQ share of query block m0, head h. This kernel: with DQ_SHARED its D / NWG
    columns of the block (all the CTA's keys), else the whole block (its 64 keys). The keys-as-rows kernel
    (backward_kt): with BM = 128 its BM / NWG query rows, all D columns; with BM = 64 all rows, its D / NWG
    columns."""
    D: gl.constexpr = p.q_desc.block_type.shape[-1]
    if KEYS_AS_ROWS:
        if p.BM == p.NWG * KEYS_PER_WG:
            coord = _q_coord(p, b, h, q_start, m0 + w * (p.BM // p.NWG))
        else:
            coord = _head_coord(p, b, h, q_start, m0, w * (D // p.NWG))
    elif p.DQ_SHARED:
        coord = _head_coord(p, b, h, q_start, m0, w * (D // p.NWG))
    else:
        coord = _q_coord(p, b, h, q_start, m0)
    return coord


@gluon.jit
def dq_writer(p, bufs, KEYS_AS_ROWS: gl.constexpr, RELEASE_LAG: gl.constexpr = False,
              STORE_FIRST: gl.constexpr = False, FENCE: gl.constexpr = 0):
    """Per step, for each consumer w: wait until its dQ share is staged (dq_staged[w]); with ORDERED_DQ wait for
    this key block's turn in the chain of (query block, head, w); issue the TMA reduce-add (dq_share_coord). Then,
    once the TMA unit has read every consumer's tile, free them (dq_free); with ORDERED_DQ, once the adds have
    completed, release them to the next key block of each chain. One tile a CTA; the consumers stage their shares
    in the order of the walk (the keys-as-rows kernel's a step late under DQ_LAG, the same order), so this loop
    pairs with theirs step for step.

    RELEASE_LAG (DQ_RELEASE_LAG, the chain with two consumers): a step's chains are released only once the next
    step's adds are issued, and then only for the adds already complete (release_step's PENDING), so that the
    writer does not wait for its own adds to land at L2 before it can take the next step's shares. The successor
    key block of a chain waits a step longer; with the chain's total order of key blocks no wait can close a
    cycle (a predecessor never waits for its successor), and the last step's chains are released after the loop."""
    NWG: gl.constexpr = p.NWG
    gl.static_assert(not RELEASE_LAG or NWG == 2, "the lagged release waits for all but two bulk groups")
    BN: gl.constexpr = KEYS_PER_WG * NWG
    nb, b, hk, seq_q, seq_k, q_start, k_start = _cta_coords(p)
    n0 = nb * BN
    if n0 < seq_k:
        m_lo, m_hi = _q_range(p, n0, seq_q, seq_k)
        n_m = m_hi - m_lo
        h_prev = 0
        m0_prev = 0
        for it in range(p.group * n_m):
            _, h, m0 = _step_block(p, it, n_m, m_lo, hk)
            write_step(p, bufs, nb, b, h, q_start, m0, seq_q, seq_k, it, 0, KEYS_AS_ROWS, STORE_FIRST, FENCE)
            if p.ORDERED_DQ == ORDERED_DQ_FIRST:
                if nb == 0:  # the stores released (fenced: CHAIN_FENCE); the other key blocks' adds release nothing
                    release_step(p, b, h, m0, 0, 0, FENCE, nb)
            elif p.ORDERED_DQ != 0:
                if RELEASE_LAG:
                    if it > 0:  # every group but this step's NWG adds completed
                        release_step(p, b, h_prev, m0_prev, 0, NWG, FENCE, nb)
                    h_prev = h
                    m0_prev = m0
                else:
                    release_step(p, b, h, m0, 0, 0, FENCE, nb)
        if p.ORDERED_DQ != 0 and RELEASE_LAG:
            if p.group * n_m > 0:
                release_step(p, b, h_prev, m0_prev, 0, 0, FENCE, nb)
        tma.store_wait(0)


@gluon.jit
def write_step(p, bufs, nb, b, h, q_start, m0, seq_q, seq_k, s, ctr_off, KEYS_AS_ROWS: gl.constexpr,
               STORE_FIRST: gl.constexpr = False, FENCE: gl.constexpr = 0):
    """The writer's step s (the CTA's count): for each consumer w, once its share is staged (dq_staged[w], s's
    parity) and, with ORDERED_DQ, key block nb's turn has come in the chain of (m0, h, w) (counters from
    dq_ctr + ctr_off), the TMA reduce-add; then, once the TMA unit has read every tile, they are freed (dq_free).
    STORE_FIRST (the ascending chain over an accumulator nobody zeroed, dq_store_first): key block 0, the first
    link of every chain, stores its share instead of adding it."""
    NWG: gl.constexpr = p.NWG
    gl.static_assert(not STORE_FIRST or p.ORDERED_DQ == ORDERED_DQ_ASC or p.ORDERED_DQ == ORDERED_DQ_FIRST,
                     "store first: the ascending chain or its first link")
    gl.static_assert(p.ORDERED_DQ != ORDERED_DQ_FIRST or (STORE_FIRST and not KEYS_AS_ROWS),
                     "the first link alone: its stores, on the queries-as-rows kernel")
    for w in gl.static_range(NWG):
        mbarrier.wait(bufs.dq_staged.index(w), s & 1)
        if p.ORDERED_DQ == ORDERED_DQ_FIRST:
            if nb > 0:
                _dq_chain_wait(p, _dq_counter(p, b, h, m0, w) + ctr_off, nb, m0, seq_q, seq_k, FENCE)
        elif p.ORDERED_DQ != 0:
            _dq_chain_wait(p, _dq_counter(p, b, h, m0, w) + ctr_off, nb, m0, seq_q, seq_k, FENCE)
        coord = dq_share_coord(p, b, h, q_start, m0, w, KEYS_AS_ROWS)
        if STORE_FIRST and nb == 0:
            tma.async_copy_shared_to_global(p.dq_desc, coord, bufs.dq.index(w))
        else:
            async_reduce_add_shared_to_global(p.dq_desc, coord, bufs.dq.index(w))
    tma.store_wait(0)
    for w in gl.static_range(NWG):
        mbarrier.arrive(bufs.dq_free.index(w))


@gluon.jit
def release_step(p, b, h, m0, ctr_off, PENDING: gl.constexpr = 0, FENCE: gl.constexpr = 0, nb=0):
    """The ordered chain: every consumer's add of (m0, h) completed (all but the PENDING newest bulk groups), then
    released to the next key block. FENCE (CHAIN_FENCE) 1 / 2: the first release of the step is fenced (its
    wait_group covers every consumer's write, so one fence orders them all before every counter add); 3: only where
    key block nb is 0, the link whose write is a TMA store (DQ_STORE_FIRST; adds that follow adds commute)."""
    for w in gl.static_range(p.NWG):
        ctr = _dq_counter(p, b, h, m0, w) + ctr_off
        if w > 0 or FENCE == 0:
            _dq_chain_release(ctr, PENDING, 0)
        elif FENCE == 3:
            if nb == 0:
                _dq_chain_release(ctr, PENDING, 1)
            else:
                _dq_chain_release(ctr, PENDING, 0)
        else:
            _dq_chain_release(ctr, PENDING, 1)


# ---------------------------------------------------------------------------------------------------------
# Consumer partitions: one warpgroup each, 64 resident keys.
# ---------------------------------------------------------------------------------------------------------

@gluon.jit
def _mask(p, s, rows, kr0, m0, seq_q, seq_k):
    """-inf where a key (column) is not visible to a query (row); only in blocks that need it.

    Query rows past the sequence need no mask: their lse2 is +inf, so their P is exactly 0."""
    if _mask_needed(p, kr0, m0, seq_q, seq_k):
        # Opaque key offsets: LLVM would otherwise hoist this thread's 16 column indices out of the loop
        # and keep them live through it (spilled at 240 registers a thread).
        keys = kr0 + _opaque(gl.arange(0, KEYS_PER_WG, gl.SliceLayout(0, s.type.layout)))
        s = gl.where(_visible(p, rows, keys, seq_k, seq_k - seq_q), s, float("-inf"))
    return s


@gluon.jit
def _mask_needed(p, kr0, m0, seq_q, seq_k):
    """Whether some key of the 64-key slab at kr0 is hidden from some query of the block at m0 (past the sequence's
    keys, or outside a window): only then is a step's score tile masked."""
    off = seq_k - seq_q
    need = kr0 + KEYS_PER_WG > seq_k
    if p.HAS_WR:
        need = need | (kr0 + KEYS_PER_WG - 1 > m0 + off + p.window_right)
    if p.HAS_WL:
        need = need | (kr0 < m0 + p.BM - 1 + off - p.window_left)
    return need


# Trace build (tile.trace): per consumer and step (the first TRACE_STEPS), %clock64 at TRACE_EVENTS points:
# 0 step start, 1 Q (and dO) arrived, 2 S done, 3 P stored, 4 dP done, 5 dS stored (fenced), 6 dV, dK, dQ
# products done, 7 Q / dO slots released, 8 the previous dQ tile read by TMA (store_wait), 9 this step's dQ tile
# staged and fenced, 10 its reduce-add issued (step end; 7-10 coincide without a dQ product). Only the CTAs of
# the first (batch, kv head) write.
TRACE_STEPS = 48
TRACE_EVENTS = 11
TRACE_STEPS_C = gl.constexpr(TRACE_STEPS)
TRACE_EVENTS_C = gl.constexpr(TRACE_EVENTS)
LAST_TRACE = None
# ... and of every CTA, consumer 0's %globaltimer (ns) at CTA_EVENTS points and its SM (_cta_event), into
# LAST_CTA_TRACE (grid CTAs, CTA_EVENTS + 1): 0 consumer start, 1 K and V arrived, 2 the first Q / dO arrived, 3 the
# last step done, 4 dK and dV stored (the CTA's end); the last column is %smid.
CTA_EVENTS = 5
CTA_EVENTS_C = gl.constexpr(CTA_EVENTS)
LAST_CTA_TRACE = None


@gluon.jit
def _trace_step(p, WG: gl.constexpr, step, event: gl.constexpr):
    if p.TRACE:
        nb, bh = _cta_block(p)
        if bh == 0:
            if step < TRACE_STEPS_C:
                t = gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [gl.to_tensor(0)], dtype=gl.int64,
                                              is_pure=False, pack=1)
                gl.store(p.dsink_ptr + ((nb * p.NWG + WG) * TRACE_STEPS_C + step) * TRACE_EVENTS_C + event, t)


@gluon.jit
def _cta_event(p, WG: gl.constexpr, event: gl.constexpr):
    """Trace build: consumer 0's %globaltimer at CTA event `event` (and at event 0 the SM) into LAST_CTA_TRACE."""
    if p.TRACE:
        if WG == 0:
            t = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [gl.to_tensor(0)], dtype=gl.int64,
                                          is_pure=False, pack=1)
            cta = gl.program_id(0) + gl.num_programs(0) * (gl.program_id(1) + gl.num_programs(1) * gl.program_id(2))
            row = p.sink_ptr + cta.to(gl.int64) * (CTA_EVENTS_C + 1)
            gl.store(row + event, t)
            if event == 0:
                sm = gl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [gl.to_tensor(0)], dtype=gl.int32,
                                               is_pure=False, pack=1)
                gl.store(row + CTA_EVENTS_C, sm.to(gl.int64))


@gluon.jit
def _consumer(p, bufs, WG: gl.constexpr):
    """64 resident keys; per query block (queries as rows, so lse2 and Delta are two values a thread):

        S = Q·K_wgᵀ, then dP = dO·V_wgᵀ     async wgmma, both operands in shared memory
        P, dS                                registers; both go to shared memory (16-bit) because dV and dK
                                             need them transposed as the A operand
        dV += Pᵀ·dO, dK += dSᵀ·Q             A read transposed from shared memory
        dQ share = dS·K_wg                   A from shared memory too (no registers held by an operand);
                                             added to the fp32 accumulator by TMA reduce-add

    PING_PONG: two product groups a step, each issued in this warpgroup's turn (module docstring):
        turn 2·it:     S and dP (dP always right behind S, as EARLY_DP)
        turn 2·it + 1: dV, dK and dQ (the first dQ column slice when there are two), dV held back until
                       dS is in shared memory, so that all of P·dO, dS·Q and dS·K go out together
    and between the two, this warpgroup's exp2 and dS run under the other warpgroup's products.
    """
    NWG: gl.constexpr = p.NWG
    BN: gl.constexpr = KEYS_PER_WG * NWG
    BM: gl.constexpr = p.BM
    N: gl.constexpr = KEYS_PER_WG
    D: gl.constexpr = p.q_desc.block_type.shape[-1]
    DV: gl.constexpr = p.v_desc.block_type.shape[-1]
    dtype: gl.constexpr = p.q_desc.dtype
    # S, dP: [BM queries, 64 keys]; dK: [64, D]; dV: [64, DV]; dQ share: [BM, D].
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, N, 16])
    dk_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, D, 16])
    dv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DV, 16])
    # dQ share: without DQ_SHARED this warpgroup's keys times all D columns, in DQ_PARTS column slices; with
    # it the CTA's keys (both warpgroups' dS) times this warpgroup's D / NWG columns, in one slice.
    DQ_PARTS: gl.constexpr = 1 if (p.DQ_SHARED or D <= 64) else 2
    DQW: gl.constexpr = D // NWG if p.DQ_SHARED else D // DQ_PARTS
    OTHER: gl.constexpr = (WG + 1) % NWG
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DQW, 16])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    # dP issued in the same group as S (EARLY_DP; always with PING_PONG, whose first turn is S and dP).
    DP_FIRST: gl.constexpr = p.EARLY_DP or p.PING_PONG
    # Turn parity (PING_PONG): consumer 0 goes first, so its k-th turn wait needs k arrivals, the others' k + 1.
    # Every step takes exactly two turns, so the parity of turn 2·it is TURN0 and that of turn 2·it + 1 its
    # complement, the same every step: no counter.
    TURN0: gl.constexpr = 1 if WG == 0 else 0
    NEXT_WG: gl.constexpr = (WG + 1) % NWG

    nb, b, hk, seq_q, seq_k, q_start, k_start = _cta_coords(p)
    n0 = nb * BN
    kr0 = n0 + WG * N
    if n0 < seq_k:
        m_lo, m_hi = _q_range(p, n0, seq_q, seq_k)
        # Opaque: the per-thread row offsets are the same in every partition, and LLVM hoisted
        # lse2_ptr + rows above the partitions, to be spilled around the register reallocation.
        row_ids = _opaque(gl.arange(0, BM, row_s))
        k_s = bufs.k.index(WG).reshape([N, D])
        v_s = bufs.v.index(WG).reshape([N, DV])
        p_s = bufs.p.index(WG)
        ds_s = bufs.ds.index(WG)
        dq_s = bufs.dq.index(WG)
        dk = gl.zeros([N, D], gl.float32, dk_layout)
        dv = gl.zeros([N, DV], gl.float32, dv_layout)
        _cta_event(p, WG, 0)
        mbarrier.wait(bufs.kv_ready, 0)
        _cta_event(p, WG, 1)
        idx = 0
        phase = 0
        if p.SINK_PDP:
            # Σ over this head's steps of exp2(sink2 − lse2_i)·Σ_{j in this warpgroup's keys} P_ij dP_ij, per row.
            sink_rows = gl.zeros([BM], gl.float32, row_s)
        # One flat loop over (query head of the group, query block): fewer values live across it than
        # two nested loops (at 240 registers a thread every scalar counts).
        n_m = m_hi - m_lo
        for it in range(p.group * n_m):
            g, h, m0 = _step_block(p, it, n_m, m_lo, hk)
            if p.VARLEN:
                t_base = h * p.stride_th + q_start
            else:
                t_base = b * p.stride_tb + h * p.stride_th
            q_s = bufs.q.index(idx).reshape([BM, D])
            do_s = bufs.do.index(idx).reshape([BM, DV])
            _trace_step(p, WG, it, 0)
            # S in flight while lse2 and Delta arrive.
            mbarrier.wait(bufs.q_ready.index(idx), phase)
            _trace_step(p, WG, it, 1)
            if it == 0:
                _cta_event(p, WG, 2)
            if p.PING_PONG:
                # Operands first, then the turn: a turn is never held over a TMA wait (the other consumer
                # waits for the same slot anyway, and its turn would wait behind ours).
                mbarrier.wait(bufs.do_ready.index(idx), phase)
                mbarrier.wait(bufs.turn.index(WG), TURN0)
            s = warpgroup_mma(q_s, k_s.permute((1, 0)), gl.zeros([BM, N], gl.float32, s_layout),
                              use_acc=False, is_async=True)
            if DP_FIRST:
                # dP = dO·V_wgᵀ right behind S: it runs under the softmax instead of after it (its 32 fp32
                # registers a thread are held through the softmax).
                if not p.PING_PONG:
                    mbarrier.wait(bufs.do_ready.index(idx), phase)
                dp = warpgroup_mma(do_s, v_s.permute((1, 0)), gl.zeros([BM, N], gl.float32, s_layout),
                                   use_acc=False, is_async=True)
            if p.PING_PONG:
                mbarrier.arrive(bufs.turn.index(NEXT_WG))
            rows = m0 + row_ids
            if p.VARLEN:
                # Rows past the sequence are the next sequence's queries: lse2 = +inf makes their P
                # and dS exactly 0, so they add nothing to dK, dV and only zeros to dQ.
                row_ok = rows < seq_q
                if p.STATS_TMA:
                    lse2 = gl.where(row_ok, bufs.lse2.index(idx).reshape([BM]).load(row_s), float("inf"))
                else:
                    lse2 = gl.load(p.lse2_ptr + t_base + rows, mask=row_ok, other=float("inf"))
                    delta = gl.load(p.delta_ptr + t_base + rows, mask=row_ok, other=0.0)
            elif p.STATS_TMA:
                # Batched: lse2 and Delta are padded to whole query blocks (+inf and 0) and Q, dO rows past the
                # sequence read as zeros: no mask. In shared memory with Q (q_ready, waited above).
                lse2 = bufs.lse2.index(idx).reshape([BM]).load(row_s)
            else:
                lse2 = gl.load(p.lse2_ptr + t_base + rows)
                delta = gl.load(p.delta_ptr + t_base + rows)
            if DP_FIRST:
                s = warpgroup_mma_wait(1, deps=(s, ))  # S done, dP may still run
            else:
                s = warpgroup_mma_wait(0, deps=(s, ))
            _trace_step(p, WG, it, 2)
            # P = exp2(s·log2 e − lse2): one FFMA and one MUFU.EX2 per score.
            pr, th = _probabilities(p, s, rows, kr0, m0, seq_q, seq_k, lse2)
            if p.SINK_PDP:
                # The sink's weight exp2(sink2 − lse2_i) per row, formed here while lse2 is live anyway (and its
                # global load under the softmax, not on the dP -> dS chain).
                w_sink = gl.exp2(gl.load(p.sink_ptr + h) * LOG2E_C - lse2)
            # Without EARLY_DP, dP = dO·V_wgᵀ is issued only now (its registers are not held through the
            # softmax). Then dV += Pᵀ·dO, P rounded to the input dtype as the forward's P·V rounds it.
            if not DP_FIRST:
                mbarrier.wait(bufs.do_ready.index(idx), phase)
                dp = warpgroup_mma(do_s, v_s.permute((1, 0)), gl.zeros([BM, N], gl.float32, s_layout),
                                   use_acc=False, is_async=True)
            p_s.store(pr.to(dtype))
            _trace_step(p, WG, it, 3)
            if p.PING_PONG:
                # dV waits for this warpgroup's second turn (P's fence is dS's, below).
                dp = warpgroup_mma_wait(0, deps=(dp, ))
            else:
                fence_async_shared()
                dv = warpgroup_mma(p_s.permute((1, 0)), do_s, dv, is_async=True)
                dp = warpgroup_mma_wait(1, deps=(dp, ))
            _trace_step(p, WG, it, 4)
            if p.SINK_PDP:
                # rowsum(dO·O)_i = Σ_j P_ij dP_ij: the sink gradient's sum without O's rounding (rows past the
                # sequence have lse2 = +inf: weight 0). Written once per head, at the head's last step.
                sink_rows += w_sink * gl.sum(pr * dp, axis=1)
                if it - g * n_m == n_m - 1:
                    # Slot (batch · kv head · group + g, key block, warpgroup); the CTA indices read afresh
                    # (not kept live through the loop).
                    kb, bh_kv = _cta_block(p)
                    gl.store(p.dsink_ptr + ((bh_kv * p.group + g) * gl.num_programs(0) + kb) * NWG + WG,
                             gl.sum(sink_rows, axis=0))
                    sink_rows = gl.zeros([BM], gl.float32, row_s)
            if p.STATS_TMA:
                delta = bufs.delta.index(idx).reshape([BM]).load(row_s)
                if p.VARLEN:
                    # Rows past the sequence read whatever the aligned copy holds there (uninitialised gaps, the
                    # next sequence): P is 0 for them, and Delta must be finite for 0·(dP − Delta) to be 0.
                    delta = gl.where(row_ok, delta, 0.0)
            ds = pr * (dp - gl.expand_dims(delta, 1))
            if p.SOFTCAP:
                # d(c·tanh(x/c))/dx = 1 − tanh².
                ds = ds * (1.0 - th * th)
            ds16 = ds.to(dtype)
            if p.DQ_SHARED:
                # The other warpgroup's dQ product of the previous step read ds[WG]: wait until it completed
                # (a fresh barrier passes parity 1 at once). Step `it` completes each hand-over barrier's
                # it-th phase.
                mbarrier.wait(bufs.ds_free.index(WG), (it & 1) ^ 1)
            # dK += dSᵀ·Q.
            ds_s.store(ds16)
            fence_async_shared()
            _trace_step(p, WG, it, 5)
            if p.DQ_SHARED:
                # Every thread's dS is written and fenced (the arrive starts with a warpgroup barrier).
                mbarrier.arrive(bufs.ds_ready.index(WG))
            if p.PING_PONG:
                # Second turn, after ds_ready: the other consumer's dQ needs this dS whatever the turn order.
                mbarrier.wait(bufs.turn.index(WG), TURN0 ^ 1)
                dv = warpgroup_mma(p_s.permute((1, 0)), do_s, dv, is_async=True)
            dk = warpgroup_mma(ds_s.permute((1, 0)), q_s, dk, is_async=True)
            if p.DQ_SHARED:
                # dQ[:, WG's columns] = dS_0·K_0[:, cols] + dS_1·K_1[:, cols]: the CTA's whole key block in
                # one share, so one TMA reduce-add of [BM, D / NWG] per warpgroup and step instead of
                # [BM, D]: half the fp32 traffic into L2 and half the staging stores.
                mbarrier.wait(bufs.ds_ready.index(OTHER), it & 1)
                # Opaque buffer indices: LLVM otherwise builds the four 64-bit wgmma descriptors before the loop
                # and keeps them live through it (spilled at 240 registers a thread).
                dq = gl.zeros([BM, DQW], gl.float32, dq_layout)
                for w in gl.static_range(NWG):
                    wi = _opaque(gl.to_tensor(w))
                    dq = warpgroup_mma(bufs.ds.index(wi), bufs.k.index(wi).reshape([N, D]).slice(WG * DQW, DQW, dim=1),
                                       dq, use_acc=w > 0, is_async=True)
                if p.PING_PONG:
                    mbarrier.arrive(bufs.turn.index(NEXT_WG))
                dv, dk, dq = warpgroup_mma_wait(0, deps=(dv, dk, dq))
                _trace_step(p, WG, it, 6)
                mbarrier.arrive(bufs.ds_free.index(OTHER))
                mbarrier.arrive(bufs.q_empty.index(idx))
                mbarrier.arrive(bufs.do_empty.index(idx))
                _trace_step(p, WG, it, 7)
                if p.DQ_WRITER:
                    # The writer warp issues the reduce-add (in the chain's order with ORDERED_DQ): hand it the
                    # staged share once it has freed the previous one (a fresh barrier passes parity 1).
                    mbarrier.wait(bufs.dq_free.index(WG), (it & 1) ^ 1)
                    _trace_step(p, WG, it, 8)
                    store_dq_staging(dq_s.reshape([BM, DQW]), dq * p.softmax_scale, p.DQ_SPREAD)
                    fence_async_shared()
                    _trace_step(p, WG, it, 9)
                    mbarrier.arrive(bufs.dq_staged.index(WG))
                else:
                    tma.store_wait(0)
                    _trace_step(p, WG, it, 8)
                    store_dq_staging(dq_s.reshape([BM, DQW]), dq * p.softmax_scale, p.DQ_SPREAD)
                    fence_async_shared()
                    _trace_step(p, WG, it, 9)
                    async_reduce_add_shared_to_global(p.dq_desc, _head_coord(p, b, h, q_start, m0, WG * DQW), dq_s)
                _trace_step(p, WG, it, 10)
            elif p.DQ_ATOMIC:
                # dQ share = dS·K_wg in DQ_PARTS column slices (one slice's fp32 accumulator live at a
                # time: at D = 128 the whole [64, 128] one beside dK and dV would spill), then
                # dQ += scale · share by TMA reduce-add (element-wise atomic at L2, clipped at the
                # tensor's bounds). The previous step's add has had a whole step to read its tile.
                for part in gl.static_range(DQ_PARTS):
                    dq = warpgroup_mma(ds_s, k_s.slice(part * DQW, DQW, dim=1),
                                       gl.zeros([BM, DQW], gl.float32, dq_layout), use_acc=False,
                                       is_async=True)
                    if part == 0:
                        if p.PING_PONG:
                            # The turn passes here: holding it over the waits below would idle the tensor
                            # core; the second column slice (D = 128) is issued outside any turn.
                            mbarrier.arrive(bufs.turn.index(NEXT_WG))
                        dv, dk, dq = warpgroup_mma_wait(0, deps=(dv, dk, dq))
                        _trace_step(p, WG, it, 6)
                        mbarrier.arrive(bufs.q_empty.index(idx))
                        mbarrier.arrive(bufs.do_empty.index(idx))
                        _trace_step(p, WG, it, 7)
                        if p.DQ_WRITER:
                            # The writer has read the previous share (a fresh barrier passes parity 1).
                            mbarrier.wait(bufs.dq_free.index(WG), (it & 1) ^ 1)
                        else:
                            tma.store_wait(0)
                        _trace_step(p, WG, it, 8)
                    else:
                        dq = warpgroup_mma_wait(0, deps=(dq, ))
                    dq_s.reshape([BM, D]).slice(part * DQW, DQW, dim=1).store(dq * p.softmax_scale)
                fence_async_shared()
                _trace_step(p, WG, it, 9)
                if p.DQ_WRITER:
                    mbarrier.arrive(bufs.dq_staged.index(WG))
                else:
                    async_reduce_add_shared_to_global(p.dq_desc, _q_coord(p, b, h, q_start, m0), dq_s)
                _trace_step(p, WG, it, 10)
            else:
                if p.PING_PONG:
                    mbarrier.arrive(bufs.turn.index(NEXT_WG))
                dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
                _trace_step(p, WG, it, 6)
                mbarrier.arrive(bufs.q_empty.index(idx))
                mbarrier.arrive(bufs.do_empty.index(idx))
                _trace_step(p, WG, it, 7)
                _trace_step(p, WG, it, 8)
                _trace_step(p, WG, it, 9)
                _trace_step(p, WG, it, 10)
            idx, phase = _next_slot(idx, phase, p.STAGES)
        if p.DQ_SHARED:
            # Every product of this warpgroup completed (each step ends with warpgroup_mma_wait(0)): the other may
            # overwrite its K with dK.
            mbarrier.arrive(bufs.loop_done.index(_opaque(gl.to_tensor(WG))))
        _cta_event(p, WG, 3)
        # The epilogue's indices are derived again (from a fresh %ctaid read) rather than kept live
        # through the loop, where they were spilled.
        nb, b, hk, seq_q, seq_k, q_start, k_start = _cta_coords(p)
        kr0 = nb * BN + WG * N
        # This warpgroup's K and V slots stage dV and dK for the TMA stores. V is read only by this warpgroup's
        # own, completed, wgmmas. K, with DQ_SHARED, also by the other warpgroup's dQ products (dS_w·K_w for every
        # w): before dK overwrites it, wait until the other has left its loop, all its products completed
        # (loop_done, one phase a CTA: no parity to keep through the loop, where a step count kept for
        # ds_free's parity cost 4-14 reloads a step in some builds). Opaque slot index: LLVM otherwise computes
        # this thread's swizzled staging addresses before the loop and keeps them (spilled) through it.
        slot = _opaque(gl.to_tensor(WG))
        _store_rows(p, p.dv_desc, bufs.v.index(slot), p.dv_ptr, dv.to(dtype), b, hk, k_start, kr0, seq_k, p.dv,
                    p.stride_dvb, p.stride_dvs, p.stride_dvh)
        if p.DQ_SHARED:
            mbarrier.wait(bufs.loop_done.index(_opaque(gl.to_tensor(OTHER))), 0)
        _store_rows(p, p.dk_desc, bufs.k.index(slot), p.dk_ptr, (dk * p.softmax_scale).to(dtype), b, hk, k_start,
                    kr0, seq_k, p.d, p.stride_dkb, p.stride_dks, p.stride_dkh)
        tma.store_wait(0)
        _cta_event(p, WG, 4)


@gluon.jit
def _store_rows(p, desc, stage, ptr, val, b, hk, k_start, kr0, seq_k, width, stride_b, stride_s, stride_h):
    """One consumer's 64 rows of dK or dV (already in the output dtype).

    TMA from shared memory; the batched descriptor clips rows past the tensor. A varlen block that runs
    past its sequence would write the next sequence's rows: those few blocks use masked pointer stores."""
    W: gl.constexpr = val.type.shape[1]
    if p.VARLEN and kr0 + KEYS_PER_WG > seq_k:
        # Straight from the accumulator layout: a layout conversion would need a scratch tile of shared
        # memory that D = 128 does not have left.
        layout: gl.constexpr = val.type.layout
        rows = kr0 + gl.arange(0, KEYS_PER_WG, gl.SliceLayout(1, layout))
        cols = gl.arange(0, W, gl.SliceLayout(0, layout))
        tok = k_start + rows
        if p.BIG:
            tok = tok.to(gl.int64)
        offs = gl.expand_dims(tok * stride_s, 1) + hk * stride_h + gl.expand_dims(cols, 0)
        mask = gl.expand_dims(rows < seq_k, 1) & gl.expand_dims(cols < width, 0)
        gl.store(ptr + offs, val, mask=mask)
    else:
        stage.reshape([KEYS_PER_WG, W]).store(val)
        fence_async_shared()
        tma.async_copy_shared_to_global(desc, _kv_coord(p, b, hk, k_start, kr0), stage)
        tma.store_wait(0)


# ---------------------------------------------------------------------------------------------------------
# The kernel: shared memory, barriers, partitions.
# ---------------------------------------------------------------------------------------------------------

_RUNTIME_INTS = ["stride_dkb", "stride_dks", "stride_dkh", "stride_dvb",
                 "stride_dvs", "stride_dvh", "stride_tb", "stride_th", "d", "dv", "seqlen_q", "seqlen_k",
                 "num_kv_heads", "group", "window_left", "window_right"]


@gluon.jit(do_not_specialize=_RUNTIME_INTS)
def attn_bwd_kernel(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, dq_desc, lse2_desc, delta_desc, dk_ptr, dv_ptr,
                    lse2_ptr, delta_ptr,
                    sink_ptr, dsink_ptr, dq_ctr,
                    cu_q, cu_k, seqused, stride_dkb, stride_dks, stride_dkh, stride_dvb,
                    stride_dvs, stride_dvh, stride_tb, stride_th, d, dv, seqlen_q, seqlen_k, num_kv_heads, group,
                    qk_scale, cap_scale, softmax_scale, window_left, window_right,
                    BM: gl.constexpr, NWG: gl.constexpr, STAGES: gl.constexpr, VARLEN: gl.constexpr,
                    HAS_SEQUSED: gl.constexpr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr,
                    SOFTCAP: gl.constexpr, DQ_ATOMIC: gl.constexpr, DQ_SHARED: gl.constexpr,
                    EARLY_DP: gl.constexpr, SINK_PDP: gl.constexpr, PING_PONG: gl.constexpr, BIG: gl.constexpr,
                    TRACE: gl.constexpr,
                    ORDERED_DQ: gl.constexpr, DQ_WRITER: gl.constexpr, STATS_TMA: gl.constexpr,
                    CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr, CTA_CHUNKED: gl.constexpr = False,
                    DQ_RELEASE_LAG: gl.constexpr = False, DQ_STORE_FIRST: gl.constexpr = False,
                    DQ_SPREAD: gl.constexpr = False, DQ_CHAIN_FENCE: gl.constexpr = 0):
    dtype: gl.constexpr = q_desc.dtype
    k_smem = gl.allocate_shared_memory(dtype, [NWG] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NWG] + v_desc.block_type.shape, v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, KEYS_PER_WG], dtype)
    p_smem = gl.allocate_shared_memory(dtype, [NWG, BM, KEYS_PER_WG], ds_layout)
    ds_smem = gl.allocate_shared_memory(dtype, [NWG, BM, KEYS_PER_WG], ds_layout)
    if DQ_ATOMIC:
        dq_smem = gl.allocate_shared_memory(gl.float32, [NWG] + dq_desc.block_type.shape, dq_desc.layout)
    else:
        dq_smem = ds_smem
    if STATS_TMA:
        lse2_smem = gl.allocate_shared_memory(gl.float32, [STAGES] + lse2_desc.block_type.shape, lse2_desc.layout)
        delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES] + delta_desc.block_type.shape, delta_desc.layout)
    else:
        lse2_smem = q_smem  # placeholders, never touched
        delta_smem = q_smem
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [NWG, 1], mbarrier.MBarrierLayout())
    ds_free = gl.allocate_shared_memory(gl.int64, [NWG, 1], mbarrier.MBarrierLayout())
    for w in gl.static_range(NWG):
        mbarrier.init(ds_ready.index(w), count=1)
        mbarrier.init(ds_free.index(w), count=1)
    if DQ_SHARED:
        loop_done = gl.allocate_shared_memory(gl.int64, [NWG, 1], mbarrier.MBarrierLayout())
        for w in gl.static_range(NWG):
            mbarrier.init(loop_done.index(w), count=1)
    else:
        loop_done = ds_ready  # a placeholder, never touched
    if PING_PONG:
        turn = gl.allocate_shared_memory(gl.int64, [NWG, 1], mbarrier.MBarrierLayout())
        for w in gl.static_range(NWG):
            mbarrier.init(turn.index(w), count=1)
    else:
        turn = ds_ready  # a placeholder, never touched: the default kernel allocates no turn barriers
    dq_staged, dq_free = writer_barriers(NWG, DQ_WRITER, ds_ready)
    mbarrier.init(kv_ready, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(s), count=1)
        mbarrier.init(q_empty.index(s), count=NWG)
        mbarrier.init(do_ready.index(s), count=1)
        mbarrier.init(do_empty.index(s), count=NWG)

    p = BwdProblem(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, dq_desc, lse2_desc, delta_desc, dk_ptr, dv_ptr,
                   lse2_ptr, delta_ptr,
                   sink_ptr, dsink_ptr, dq_ctr,
                   cu_q, cu_k, seqused, gl.to_tensor(stride_dkb), gl.to_tensor(stride_dks), gl.to_tensor(stride_dkh),
                   gl.to_tensor(stride_dvb), gl.to_tensor(stride_dvs), gl.to_tensor(stride_dvh),
                   gl.to_tensor(stride_tb), gl.to_tensor(stride_th), gl.to_tensor(d), gl.to_tensor(dv),
                   gl.to_tensor(seqlen_q), gl.to_tensor(seqlen_k), gl.to_tensor(num_kv_heads), gl.to_tensor(group),
                   gl.to_tensor(qk_scale), gl.to_tensor(cap_scale), gl.to_tensor(softmax_scale),
                   gl.to_tensor(window_left), gl.to_tensor(window_right),
                   BM, NWG, STAGES, VARLEN, HAS_SEQUSED, HAS_WL, HAS_WR, SOFTCAP, DQ_ATOMIC, DQ_SHARED, EARLY_DP,
                   SINK_PDP, PING_PONG, BIG, TRACE, ORDERED_DQ, DQ_WRITER, STATS_TMA, CTA_CHUNKED, DQ_SPREAD)
    bufs = BwdBuffers(k_smem, v_smem, q_smem, do_smem, p_smem, ds_smem, dq_smem, ds_ready, ds_free, kv_ready, q_ready,
                      q_empty, do_ready, do_empty, turn, dq_staged, dq_free, lse2_smem, delta_smem, loop_done)
    gl.static_assert(ORDERED_DQ == 0 or DQ_WRITER, "the in-kernel ordered dQ is issued by the writer warp")
    if DQ_WRITER:
        gl.static_assert(DQ_ATOMIC and NWG >= 2, "the dQ writer serves the in-kernel reduce-add of 2 or 3 consumers")
        gl.static_assert(ORDERED_DQ == 0 or DQ_SHARED, "the ordered chain is built for the shared-dQ tile")
        if NWG == 2:
            gl.warp_specialize([(_consumer, (p, bufs, gl.constexpr(0))),
                                (_consumer, (p, bufs, gl.constexpr(1))),
                                (_loader, (p, bufs)),
                                (dq_writer, (p, bufs, gl.constexpr(False), DQ_RELEASE_LAG, DQ_STORE_FIRST,
                                             DQ_CHAIN_FENCE))],
                               [4, 1, 1],
                               [CONSUMER_REGS, LOADER_REGS, LOADER_REGS])
        else:
            gl.warp_specialize([(_loader, (p, bufs)),
                                (_consumer, (p, bufs, gl.constexpr(0))),
                                (_consumer, (p, bufs, gl.constexpr(1))),
                                (_consumer, (p, bufs, gl.constexpr(2))),
                                (dq_writer, (p, bufs, gl.constexpr(False), DQ_RELEASE_LAG, DQ_STORE_FIRST,
                                             DQ_CHAIN_FENCE))],
                               [4, 4, 4, 1],
                               [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS, LOADER_REGS])
    elif NWG == 1:
        gl.warp_specialize([(_consumer, (p, bufs, gl.constexpr(0))),
                            (_loader, (p, bufs))], [1], [LOADER_REGS])
    elif NWG == 2:
        gl.warp_specialize([(_consumer, (p, bufs, gl.constexpr(0))),
                            (_consumer, (p, bufs, gl.constexpr(1))),
                            (_loader, (p, bufs))], [4, 1], [CONSUMER_REGS, LOADER_REGS])
    else:
        # Three consumers, each a worker with CONSUMER_REGS, and the loader as the 4-warp default partition (ptxas
        # leaves it 32 registers a thread). With consumer 0 as the default partition instead, ptxas gives it the
        # remainder (168) and the causal D = 64 build reloads 6 values a step from local memory instead of 4
        # (offline SASS only; this layout is the one measured on the GPU).
        gl.warp_specialize([(_loader, (p, bufs)),
                            (_consumer, (p, bufs, gl.constexpr(0))),
                            (_consumer, (p, bufs, gl.constexpr(1))),
                            (_consumer, (p, bufs, gl.constexpr(2)))], [4, 4, 4],
                           [CONSUMER_REGS, CONSUMER_REGS, CONSUMER_REGS])


# ---------------------------------------------------------------------------------------------------------
# Tiles: one entry per (D, Dv) tile width.
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BwdTile:
    block_m: int          # query rows per streamed Q / dO block (N of Sᵀ, K of the dK/dV products)
    num_wg: int           # consumer warpgroups, 64 resident keys each (key block = 64 · num_wg)
    stages: int           # depth of the Q / dO ring
    consumer_regs: int    # setmaxnreg of the worker consumers
    loader_regs: int = 24
    # dQ by the separate ordered pass (the deterministic one) even when not asked to be deterministic: where
    # it measured faster than the main kernel's TMA reduce-add.
    separate_dq: bool = False
    # dQ of the CTA's whole key block, its columns split over the warpgroups (dS handed over in shared memory):
    # half the reduce-add traffic of one share per warpgroup. Two warpgroups, D >= 128 (a column slice must
    # stay a whole 128-byte swizzle row for wgmma).
    shared_dq: bool = False
    # dP issued right behind S (under the softmax) rather than after it.
    early_dp: bool = False
    # With a sink (and dQ by reduce-add): its gradient from Σ_j P·dP in the main kernel instead of from the
    # preprocess's rowsum(dO·O) with the rounded O (see backward_checked).
    sink_pdp: bool = False
    # The consumers take turns issuing their products (S with dP, then dV, dK, dQ), so that one warpgroup's
    # exp2 and dS run under the other's wgmmas (attn_bwd_kernel, "PING_PONG"). Implies dP issued with S.
    # Two or more consumers (with one it is off).
    ping_pong: bool = False
    # The consumers hand their dQ shares to a writer warp that issues the reduce-adds (dQ in the main kernel, two
    # or three consumers): for calls without a right window, where it measured faster; the in-kernel ordered dQ
    # of deterministic=True uses it whatever this says (launch_plan). On a keys-as-rows tile: its writer issues the
    # unordered adds under any mask (a probe, built by hand: get_tile refuses it on the persistent grid; measured
    # 3-7% slower on the one-CTA and the persistent D = 128 grids, sessions 25-26).
    dq_writer: bool = False
    # Probe only (benchmarks/bwd_trace.py): %clock64 stamps of each consumer's steps (see _trace_step), written
    # to backward.LAST_TRACE by the CTAs of the first (batch, kv head).
    trace: bool = False
    # Tile widths (256, 256) on backward_d256.attn_bwd_d256_kernel: one 64-key slab a CTA (num_wg = 1), its two
    # consumer warpgroups splitting the head dim (opt-in: D256_TILE).
    d256: bool = False
    # Tile widths (64, 64) on backward_kt.attn_bwd_kt_kernel: keys as the rows of every product (Sᵀ = K·Qᵀ), so P
    # and dS are the A operands of dV and dK from registers; 128 keys and 128 query rows a step; dQ in the kernel
    # (each consumer 64 query rows over the CTA's keys).
    keys_as_rows: bool = False
    # keys_as_rows: dV += Pᵀ·dO issued before dPᵀ is waited for (False: after dS is formed).
    dv_early: bool = True
    # keys_as_rows: each step's dQ share issued one step late (two dSᵀ buffers a consumer), so that the consumers need
    # not meet at every step's dS hand-over.
    dq_lag: bool = False
    # keys_as_rows with dq_lag: the previous step's dQ share issued before the step's dV and dK, and staged and added
    # while they run (DQ_LAG = 2 in the kernel).
    dq_first: bool = False
    # keys_as_rows: this many of every 4 exponentials of P by polynomial on the FMA pipe (softmax.exp2_mixed).
    poly: int = 0
    # d256: the second dQ column half of a step staged in the consumer's own half of the step's Q buffer (free once
    # its dK product completed) instead of behind the first half's reduce-add in the hand-over slot, so no consumer
    # waits for a reduce-add to drain within a step; the Q slot is released one step later, once that reduce-add has
    # read it.
    dq_in_q: bool = False
    # d256: whole products instead of partial ones (backward_d256, ROLES): consumer 0 forms S over all 256 columns
    # and consumer 1 dP, which it hands to consumer 0 in fp32 (16 KiB a step instead of S_1 and dP_1's 32 KiB).
    d256_roles: bool = False
    # d256_roles: consumer 0 stores P (and arrives p_ready) before it waits for dP, and both consumers issue their dV
    # product then, so that dV runs under dS and dO is released (the next dO load issued) a product earlier.
    d256_early_dv: bool = False
    # d256_roles: consumer 0 loads lse2 and Delta one step ahead into registers (their L2 round trip had waited
    # under S: ~15% of consumer 0's stall samples in Nsight Compute, session 23).
    d256_stats_ahead: bool = False
    # d256_roles: the dP hand-over slot viewed with a bank-conflict-free swizzle (backward_d256._dp_slot).
    d256_hand_swizzle: bool = False
    # keys_as_rows: a persistent grid (one CTA an SM walking the tiles in the chunked order), each tile's first Q / dO
    # blocks loaded while the previous tile's dK and dV are stored (backward_kt._loader_persistent).
    persistent: bool = False
    # The fp32 dQ staging stores without shared-memory bank conflicts (dq_staging.store_dq_staging: odd rows write
    # their columns XOR 16 in each instruction, through a permuted view of the same tile). On by default at D <= 128
    # (H100 cards 1752624012160, 1651326129666, session 29, bwd_flag_ab.py --tile-field dq_spread, off -> on: batched
    # D = 64 1.02-1.07x, the shared-dQ D = 128 tile 1.00-1.03x, the persistent causal D = 128 tile 0.94-1.01x;
    # benchmarks/NOTES.md); not on D256_TILE. The launch decides with dq_spread_serves (packed D = 64 calls keep the
    # plain store).
    dq_spread: bool = True
    # keys_as_rows, batched 16-bit calls: lse2 and Delta enter Sᵀ and dPᵀ as a 16-wide extension of the contraction
    # (stats_ext_parts) instead of seeding the accumulators from shared memory: no per-column statistics loads (32
    # values a thread each; ~17% of the D = 64 step's shared-memory wavefronts), one more m64nBMk16 wgmma for each
    # of the two products. A probe (stats_ext_serves).
    stats_ext: bool = False

    @property
    def block_n(self):
        return WG_KEYS * self.num_wg


# Registers per consumer thread at D = Dv = 128, BM = 64: dK and dV (64 + 64 fp32), S then dP (32 + 32),
# P kept in fp32 for dS (32), then the dQ share (32: [64, 64] fp32, shared or in two column halves). Shared
# memory at D = 128: resident K, V 64 KiB, three Q + dO stages 96 KiB, P and dS 32 KiB, two fp32 [64, 64] dQ
# staging tiles 32 KiB (224 KiB of the 227; one share per consumer would need 64 KiB of staging and two stages).
# D = 256 has no tile here: dK and dV alone would take 256 fp32 registers a thread (the plan is in the module
# docstring; built, opt-in, as D256_TILE on backward_d256.py).
_TABLE = {
    # D = 64: the separate dQ pass beat the in-kernel reduce-add on every measured row (H100, 2026-11-25,
    # sm90_bwd_probe, TFLOP/s ordered / reduce-add: S = 4096 313 / 310, causal 294 / 266; S = 16384 355 / 327,
    # causal 351 / 308): at D = 64 the dQ product and its 64 x 64 fp32 staging stall the consumers for a
    # larger share of a key block's work than the second kernel's extra reads cost.
    # Then three consumers (192 keys a CTA, 160 registers each, the loader as the default partition): a D = 64
    # step is one consumer's serial chain of ~2,500 cycles with neither the tensor core, the MUFU unit nor the
    # issue slots saturated (benchmarks/bwd_trace.py), so a third chain in flight raises the CTA's throughput.
    # H100, 2026-11-26 (sm90_bwd_probe --dims 64 --tiles wg3, same run, two -> three consumers): S = 4096 317 ->
    # 340, causal 300 -> 306; S = 16384 353 -> 384, causal 358 -> 361 TFLOP/s.
    # Then keys as rows (backward_kt.py, session 13): Sᵀ = K·Qᵀ so that Pᵀ and dSᵀ are the register A operands of dV
    # and dK, 128 keys and 128 query rows a step, dQ back in the main kernel (five products instead of seven).
    # H100, 2026-11-26 (sm90_bwd_probe --dims 64 --tiles kt,ktlate,kt3, same run, TFLOP/s three consumers / keys
    # as rows, dV issued after dS): S = 4096 377 -> 457, causal 356 -> 384; S = 16384 395 -> 473, causal 403 -> 458.
    # Three Q / dO stages (ktlate3 against ktlate, the same run on another card): 443 -> 458, 388 -> 396, 486 -> 495,
    # 461 -> 476. Then each step's dQ share issued a step late (dq_lag: two dSᵀ buffers a consumer, which leaves room
    # for two stages only), so the consumers need not meet at every step; two runs, two cards, TFLOP/s three stages
    # -> lag: 464 -> 456, 399 -> 415, 488 -> 504, 469 -> 494; 461 -> 462, 399 -> 433, 492 -> 503, 473 -> 505.
    # Then lse2 and Delta as a K extension of Sᵀ and dPᵀ (stats_ext: no per-column statistics loads, one more k16
    # wgmma a product; H100 card 1752624020562, bwd_flag_ab.py --tile-field stats_ext with the extensions made by
    # torch ops, off -> on, best of 3: S = 4096 1.018x, causal 1.031x; S = 16384 1.057x, causal 1.037x).
    (64, 64): BwdTile(block_m=128, num_wg=2, stages=2, consumer_regs=240, keys_as_rows=True, dv_early=False,
                      dq_lag=True, stats_ext=True),
    # D = 128: dQ shared over the consumers and a third Q / dO stage in the staging memory that frees. H100,
    # 2026-11-25 (sm90_bwd_probe --tiles shared,shared3, TFLOP/s one share per consumer / shared / shared + 3
    # stages): S = 1024 327 / 348 / 349, causal 233 / 269 / 268; S = 4096 415 / 454 / 461, causal 377 / 419 /
    # 429; S = 16384 446 / 465 / 482, causal 439 / 508 / 505. Then dP issued under the softmax (early_dp; a few
    # L1-hit reloads in the loop, see tests/test_sm90_backward_aot.py): +1-6% (sm90_bwd_probe --tiles early:
    # 350 -> 366, causal 272 -> 275; 455 -> 476, 429 -> 448; 485 -> 513, 502 -> 509). At D = 64 it measured
    # -2% to +0% (321 -> 313, 349 -> 342): not taken there.
    # Then the writer warp issuing the reduce-adds (dq_writer; 2026-11-26, benchmarks/dq_chain_ab.py, consumers ->
    # writer): H200 S = 1024 393 -> 408, 4096 481 -> 498, 16384 504 -> 526; H100 368 -> 382, 470 -> 478, 515 ->
    # 533. Causal moved -3% to +4% over six runs on both cards, so causal calls keep the consumers issuing them.
    (128, 128): BwdTile(block_m=64, num_wg=2, stages=3, consumer_regs=240, shared_dq=True, early_dp=True,
                        dq_writer=True),
}


# The D = 256 tile (backward_d256.py): 64 keys a CTA, two consumers over the head-dim halves, Q in two stages
# and dO in one. H200, 2026-11-25 (sm90_bwd_probe --dims 256 --tiles d256, same run, TFLOP/s Triton backward /
# this tile / its deterministic build / cuDNN): S = 4096 245 / 325 / 307 / 365, causal 229 / 306 / 305 / 344;
# S = 16384 256 / 337 / 308 / 361, causal 261 / 349 / 331 / 374.
# Then each step's second dQ half staged in the consumer's Q half (dq_in_q): the consumers no longer wait within a
# step for the first half's reduce-add to drain (Nsight Compute, S = 16384: that wait was ~17% of consumer 1's stall
# samples, on the path to its next hand-over). H100, 2026-11-26 (sm90_bwd_probe --dims 256 --tiles d256q, card
# 1652824023757, TFLOP/s d256 -> d256q): S = 4096 326.5 -> 366.3, causal 304.5 -> 321.4; S = 16384 342.4 -> 381.9,
# causal 352.6 -> 381.2 (cuDNN 368.7, 348.9, 359.9, 376.8).
# Then whole products, one a consumer (d256_roles: consumer 0 forms S over all 256 columns, consumer 1 dP and hands it
# over in fp32, 16 KiB a step instead of the two partials' 32 KiB; consumer 0's exp2 runs while consumer 1 computes
# dP). H100, 2026-11-27 (bwd_flag_ab.py --tile-field d256_roles --rows 256:4096,256:16384 --rounds 5, card
# 1653923015894, µs best round off -> on): S = 4096 3757 -> 3739, causal 2040 -> 1948 (+4.7%, median +2.0%);
# S = 16384 14511 -> 14525, causal 7227 -> 6949 (+4.0%, median +2.6%).
# Then P handed over before dS (d256_early_dv): both dV products run under dS and dO is released a product earlier,
# so the next dO load (one stage) leaves the step's chain sooner. H100, 2026-11-27 (--tile-field d256_early_dv, card
# 1653024106248, best round off -> on): S = 4096 3726 -> 3491 (+6.7%), causal 1947 -> 1887 (+3.2%); S = 16384
# 14434 -> 13471 (+7.1%), causal 6852 -> 6483 (+5.7%); medians +3.1 to +5.5%.
# Then lse2 and Delta loaded a step ahead (d256_stats_ahead; card 1753024032910, best of 4 off -> on): S = 4096
# 3510 -> 3447, causal 1865 -> 1838; S = 16384 13528 -> 13120 (+3.1%, median +3.4%), causal 6515 -> 6474 (medians of
# the other rows 0.99-1.00).
# Then the dP hand-over viewed with a bank-conflict-free swizzle (d256_hand_swizzle; card 1652524109889, best of 4
# off -> on, median ratio): S = 4096 3423 -> 3388 (1.004), causal 1842 -> 1784 (1.048); S = 16384 12963 -> 12907
# (1.012), causal 6407 -> 6259 (1.022).
D256_TILE = BwdTile(block_m=64, num_wg=1, stages=2, consumer_regs=240, d256=True, dq_in_q=True, d256_roles=True,
                    d256_early_dv=True, d256_stats_ahead=True, d256_hand_swizzle=True,
                    # Level with the conflict-free dQ staging (0.995-0.998x under a window, where its main kernel
                    # stages dQ; H100 card 1752624012160, session 29): the plain store stays.
                    dq_spread=False)
_TABLE[(256, 256)] = D256_TILE


def smem_bytes(tile, d, dv, elem=2):
    """Shared memory of the main kernel with the dQ reduce-add (the deterministic build has no dQ staging)."""
    if tile.d256:
        from .backward_d256 import smem_bytes as d256_bytes
        return d256_bytes(tile, elem)
    if tile.keys_as_rows:
        from .backward_kt import smem_bytes as kt_bytes
        return kt_bytes(tile, d, dv, elem)
    kv = tile.block_n * (d + dv) * elem
    # Q / dO stages, each with its rows' lse2 and Delta (fp32, STATS_TMA).
    qdo = tile.stages * tile.block_m * ((d + dv) * elem + 2 * 4)
    pds = 2 * tile.num_wg * WG_KEYS * tile.block_m * elem
    dq = tile.block_m * d * 4 * (1 if tile.shared_dq else tile.num_wg)  # fp32 staging, one tile per consumer
    return kv + qdo + pds + dq + configs.SMEM_RESERVE


def get_tile(d, dv, **overrides):
    """The tile for tile widths (d, dv), or None; overrides: fields of BwdTile."""
    tile = D256_TILE if overrides.get("d256") else _TABLE.get((d, dv))
    if tile is None:
        return None
    tile = replace(tile, **overrides) if overrides else tile
    if tile.dq_writer and (tile.separate_dq or tile.num_wg < 2 or tile.d256):
        tile = replace(tile, dq_writer=False)  # the writer issues the in-kernel reduce-adds of 2 or 3 consumers
    if tile.ping_pong and tile.dq_spread:
        # A probe variant measured (and left off) before the spread store: kept as measured (with the spread store its
        # packed causal build reloads 19 values a step in the loop instead of 14).
        tile = replace(tile, dq_spread=False)
    role_switches = tile.d256_early_dv or tile.d256_stats_ahead or tile.d256_hand_swizzle  # built on d256_roles
    if tile.d256:
        # The D = 256 kernel: tile widths (256, 256) only, without the D <= 128 kernel's variants.
        if role_switches and not tile.d256_roles:
            return None
        if (d, dv) != (256, 256) or (tile.num_wg != 1 or tile.block_m != 64 or tile.shared_dq or tile.early_dp
                                     or tile.sink_pdp or tile.ping_pong or tile.separate_dq):
            return None
    elif tile.dq_in_q or tile.d256_roles or role_switches:
        return None  # a D = 256 build only
    elif tile.keys_as_rows:
        # The keys-as-rows kernel: tile widths (64, 64) with 128 query rows a step or (128, 128) with 64, two
        # consumers, none of the queries-as-rows kernel's variants.
        rows = {64: 2 * WG_KEYS, 128: WG_KEYS}.get(d)
        if (dv != d or rows is None or tile.num_wg != 2 or tile.block_m != rows or tile.shared_dq or tile.early_dp
                or tile.sink_pdp or tile.ping_pong or tile.separate_dq or (tile.dq_writer and tile.persistent)):
            return None
    elif tile.shared_dq and (tile.num_wg != 2 or d < 128):
        return None
    return tile if smem_bytes(tile, d, dv) <= configs.SMEM_LIMIT else None


# The D = 64 tile for calls with a softcap (and softmax_scale = 0), which the keys-as-rows kernel does not build: two
# queries-as-rows consumers at 240 registers (three at 160 reloaded ~140 values a step with a softcap and a window;
# tests/test_sm90_backward_aot.py), dQ by the ordered pass.
D64_NARROW_TILE = BwdTile(block_m=64, num_wg=2, stages=2, consumer_regs=240, separate_dq=True)


# D = 128 with a right window (causal), not deterministic, no softcap, no sink: the keys-as-rows kernel at 64 query
# rows a step with its dQ share a step late. H100, 2026-11-26 (sm90_bwd_probe --dims 128 --tiles kt128lag, one run,
# card 1651324025577), TFLOP/s shipped -> this tile: causal S = 1024 281 -> 291, 4096 438 -> 459, 16384 532 -> 550;
# non-causal 414 -> 410, 533 -> 515, 563 -> 544 (so non-causal calls keep the shared-dQ tile). Deterministic calls
# keep the shared-dQ tile's in-kernel ordered chain. Packed causal calls take it too (KEYS_AS_ROWS_D128_PACKED).
# On the persistent grid (session 17; bwd_cta_overhead.py --kt: a tile's fixed cost 6.4 -> 4.8 µs, the main kernel
# at 16 steps a tile 657 -> 618 µs; bwd_flag_ab.py --tile-field persistent --causal-only, 7 rounds, H100 card
# 1752824029436): the causal call at S = 1024 594 -> 579 µs (+2.6%, every round), 4096 1453 -> 1415 (+2.6%), 16384
# -0.3%.
# Then lse2 and Delta as K extensions (stats_ext, session 30; the ones operand in shared memory at BM = 64): Nsight
# Compute, the main kernel causal S = 16384 7.54M -> 7.25M cycles, S = 4096 2.07M -> 2.00M (H100 card 1752624013931).
D128_CAUSAL_TILE = BwdTile(block_m=64, num_wg=2, stages=2, consumer_regs=240, keys_as_rows=True, dv_early=False,
                           dq_lag=True, persistent=True, stats_ext=True, dq_first=True)


def default_tile(d, dv, window_left=-1, softcap=0.0, *, window_right=-1, deterministic=False, varlen=False,
                 sink=False, softmax_scale=None, seqlen_q=None):
    """The shipped tile for tile widths (d, dv) and this call's features (None if there is none). At D = 64 a
    softcap takes the two-consumer tile: the keys-as-rows kernel does not build it (tanh's 64 values a thread beside
    Sᵀ and dPᵀ). At D = 128 causal calls without a sink take D128_CAUSAL_TILE (a sink would send its dQ to the
    ordered pass, see backward_checked); deterministic ones, causal or not, where its persistent grid orders dQ
    (_persistent_chain_call).
    softmax_scale = 0 (uniform attention) keeps off the keys-as-rows kernel, which seeds its score accumulator with
    −lse2 / scale. A sink on a queries-as-rows tile with dQ in the kernel
    takes its P·dP partials (sink_pdp)."""
    tile = get_tile(d, dv)
    if tile is None:
        return None
    if (d, dv) == (64, 64) and (softcap > 0 or softmax_scale == 0):
        tile = D64_NARROW_TILE
    elif (d, dv) == (64, 64) and _d64_persistent_call(window_left, window_right, deterministic, varlen, sink,
                                                      seqlen_q):
        tile = replace(tile, persistent=True)
    elif ((d, dv) == (128, 128) and softmax_scale != 0 and softcap == 0 and not sink and KEYS_AS_ROWS_D128
          and (KEYS_AS_ROWS_D128_PACKED or not varlen)
          and (_persistent_chain_call(window_left, window_right, varlen, seqlen_q) if deterministic
               else window_right >= 0)):
        # Packed calls stay off the persistent grid: there ptxas reloads 28 values a step instead of 16 (the
        # sequence bounds of each tile beside the tile loop's state), and it was not timed.
        tile = replace(D128_CAUSAL_TILE, persistent=False) if varlen else D128_CAUSAL_TILE
    if sink and not deterministic and not tile.separate_dq and builds_sink_partials(tile):
        # The sink gradient from Σ_j P·dP in the main kernel, not from rowsum(dO·O) with the rounded O: the O-based
        # sum's error is the lowp reference's size, so the rule's max over a few heads fails now and then
        # (benchmarks/NOTES.md, "dsink and few heads"). It costs D = 128 sink calls 5-10% (H100, session 14). The
        # other tiles' sink calls take the ordered pass, which gives the same sum (dq_route).
        tile = replace(tile, sink_pdp=True)
    return tile


# D = 64 calls on the persistent keys-as-rows grid (the (64, 64) tile with persistent=True). Off it, deterministic=True
# without a window below KT_ASC_CHAIN_MIN_ROWS query rows took the ordered pass, whose cost grew as the default got
# faster (+15.8% at S = 4096 on H100 card 1752624017822, over the 15% the issue allows). The persistent grid's
# ascending chain (its predecessors handed out first; its first link stores, so nothing is zeroed) instead, H100
# card 1753024033427, two runs (det_cost.py --flip KT_PERSISTENT, best of 3, deterministic over the default):
# S = 1024 / 2048 / 4096 / 8192: ordered pass +3.4 / +6.6 / +10.4 (+18.0) / +1.4% (the ascending chain off the grid
# at 8192), persistent chain -7.4 / -3.7 / +1.1 (+4.9) / -1.3%. At 16384 the ascending chain off the grid stays
# (-3.3% against -0.2%), and causal calls keep their descending chain (S = 4096 +1.4 / +2.2%, 16384 +6.7 / +13.1%).
D64_PERSIST_DET = True
# ... and the default's causal calls (batched, no left window, no sink): bwd_flag_ab.py --flag KT_PERSISTENT
# --rounds 5 (H100 card 1753024033427), best round off -> on: S = 2048 / 4096 / 8192 / 16384 1.021 / 1.020 / 1.033 /
# 1.015x (medians 1.038 / 1.027 / 1.025 / 1.007x); non-causal 0.941 / 0.960 / 0.991 / 1.007x stays off. Card
# 1752624024775 (bwd_flag_ab.py --flag D64_PERSIST_CAUSAL --causal-only --rounds 5): 1.018 / 1.005 / 0.990 / 1.015x
# (medians 1.031 / 1.031 / 1.019 / 1.017x).
D64_PERSIST_CAUSAL = True
# ... and causal ones (batched, no left window, no sink) through that grid's ascending chain: deterministic calls up
# to D64_CAUSAL_CHAIN_MAX_ROWS_DET query rows (instead of the descending chain off the grid), default ones up to
# D64_CAUSAL_CHAIN_MAX_ROWS (chain_by_default; the chain's first link stores, so the preprocess zeroes no
# accumulator). H100 card 1753024033491 (bwd_flag_ab.py --flag D64_CAUSAL_CHAIN --causal-only, raw
# benchmarks/results/raw/h100-2026-11-27-s32-d64-causal-chain*.log), best round off -> on (median): default S = 512
# / 1024 / 2048 / 4096 1.103 / 1.016 / 0.968 / 0.935x (1.103 / 1.016 / 0.976 / 0.961x); --deterministic S = 1024 /
# 2048 / 4096 1.132 / 1.044 / 1.018x (1.126 / 1.047 / 1.022x). False: the default's reduce-add, and the descending
# chain for deterministic calls.
D64_CAUSAL_CHAIN = True
D64_CAUSAL_CHAIN_MAX_ROWS = 1024
D64_CAUSAL_CHAIN_MAX_ROWS_DET = 4096


def _d64_persistent_call(window_left, window_right, deterministic, varlen, sink, seqlen_q):
    """Whether a D = 64 call on the keys-as-rows tile runs on the persistent grid (D64_PERSIST_DET,
    D64_PERSIST_CAUSAL, D64_CAUSAL_CHAIN): batched, no left window, no sink; deterministic ones without a right
    window below KT_ASC_CHAIN_MIN_ROWS query rows and under one up to D64_CAUSAL_CHAIN_MAX_ROWS_DET (seqlen_q None:
    neither), default ones under a right window."""
    if varlen or window_left >= 0 or sink:
        return False
    if deterministic and window_right >= 0:
        return (D64_CAUSAL_CHAIN and D64_PERSIST_CAUSAL and KT_PERSIST_CHAIN and seqlen_q is not None
                and seqlen_q <= D64_CAUSAL_CHAIN_MAX_ROWS_DET)
    if deterministic:
        return (D64_PERSIST_DET and KT_PERSIST_CHAIN and KT_PERSIST_CHAIN_FULL and window_right < 0
                and seqlen_q is not None and seqlen_q < KT_ASC_CHAIN_MIN_ROWS)
    return D64_PERSIST_CAUSAL and window_right >= 0


def _persistent_chain_call(window_left, window_right, varlen, seqlen_q):
    """Whether a deterministic D = 128 call takes the persistent grid's ascending chain (KT_PERSIST_CHAIN): batched,
    no left window, a right window or KT_PERSIST_CHAIN_FULL, and KT_PERSIST_CHAIN_MIN_ROWS query rows
    (KT_PERSIST_CHAIN_MIN_ROWS_MASKED under a right window; None: any)."""
    min_rows = KT_PERSIST_CHAIN_MIN_ROWS_MASKED if window_right >= 0 else KT_PERSIST_CHAIN_MIN_ROWS
    return (KT_PERSIST_CHAIN and not varlen and window_left < 0 and (window_right >= 0 or KT_PERSIST_CHAIN_FULL)
            and (seqlen_q is None or seqlen_q >= min_rows))


def builds_sink_partials(tile):
    """Whether the tile's kernel can sum the sink gradient's P·dP partials (sink_pdp): the queries-as-rows kernel;
    the keys-as-rows and D = 256 kernels do not build them."""
    return not (tile.keys_as_rows or tile.d256)


# tile.dq_spread as the tiles set it; False: off on every tile (probes flip it for A/B: det_cost.py --flip).
DQ_SPREAD = True


def dq_first_serves(tile, chain, window_right):
    """Whether the keys-as-rows kernel issues each step's (lagged) dQ share before the step's dV and dK and stages it
    while they run (tile.dq_first, set on D128_CAUSAL_TILE; DQ_LAG = 2): in the ordered chain's builds without a
    right window only (the non-causal deterministic calls, and the default's from KT_PERSIST_CHAIN_MIN_ROWS rows by
    chain_by_default), where staging a share waits for the writer warp's release of the previous one.
    bwd_flag_ab.py --tile-field dq_first --deterministic, 5 rounds, best (median) round, off -> on: H100 card
    1793026095118, S = 4096 / 16384 1.059 / 1.019x (1.059 / 1.016x); card 1752824023442, S = 2048 / 4096 / 8192 /
    16384 1.023 / 1.054 / 1.020 / 1.006x (1.006 / 1.039 / 1.012 / 1.024x). Level on the causal chain (0.99-1.04x,
    medians 0.99-1.00x); slower without the chain (D = 128 causal 0.99x) and on the D = 64 tile (0.90-0.99x)
    (benchmarks/NOTES.md, session 32)."""
    return bool(tile.keys_as_rows and tile.dq_lag and tile.dq_first and chain and window_right < 0)


def dq_spread_serves(tile, varlen):
    """Whether the launch stages dQ with dq_staging's conflict-free store: the tile asks for it (DQ_SPREAD on), except
    packed calls on the D = 64 keys-as-rows tile (128 query rows a step), the one form measured slower with it:
    1.5-2.3% on two H100 cards (1753024037357, 1651326129666; the same cards' batched D = 64 calls 1.9-3.1% faster;
    bwd_flag_ab.py --tile-field dq_spread [--varlen], session 29). Packed D = 128 calls gain (1.9-4.8%)."""
    return bool(tile.dq_spread and DQ_SPREAD and not (varlen and tile.keys_as_rows and tile.block_m == 2 * WG_KEYS))


# D128_CAUSAL_TILE for causal D = 128 calls (default_tile); False: the shared-dQ tile (probes flip it for A/B).
KEYS_AS_ROWS_D128 = True
# ... and for packed causal D = 128 calls too. H100, 2026-11-26 (bwd_flag_ab.py --flag KEYS_AS_ROWS_D128_PACKED
# --varlen, card 1652824006792, best of 3 rounds, µs shared-dQ -> keys as rows): S = 1024 571 -> 568, 4096 1573 ->
# 1517, 16384 5254 -> 5083 (+0.5 / +3.6 / +3.3%).
KEYS_AS_ROWS_D128_PACKED = True


def shipped_tiles():
    return sorted(_TABLE)


# ---------------------------------------------------------------------------------------------------------
# Host side.
# ---------------------------------------------------------------------------------------------------------

def unsupported_reason(q, k, v, *, window_left=-1, window_right=-1, softcap=0.0, sink=None, cu_seqlens_q=None,
                       page_table=None, seqused_k=None, dout=None, tile=None, softmax_scale=None, **_):
    """None if this backward serves the request, else a short reason (dispatch.resolve_auto_backward).
    tile: an explicit BwdTile (probe, tests); the default (None) is the table's tile for the head dims."""
    from . import common_reason
    reason = common_reason(q, k, v, sink=sink, cu_seqlens_q=cu_seqlens_q, page_table=page_table)
    if reason is not None:
        return reason
    d, dv = q.shape[-1], v.shape[-1]
    td, tdv = configs.tile_dim(d), configs.tile_dim(dv)
    if tile is not None and tile.d256:
        if (td, tdv) != (256, 256):
            return f"the D = 256 backward tile serves head dims in (128, 256] only, not ({d}, {dv})"
        if get_tile(256, 256, **{f: getattr(tile, f) for f in tile.__dataclass_fields__}) != tile:
            return "the D = 256 backward tile supports none of the D <= 128 kernel's variants"
    elif td is None or tdv is None or get_tile(td, tdv) is None:
        return f"no sm90 backward tile for head dims ({d}, {dv})"
    if tile is not None and tile.keys_as_rows and softcap > 0:
        return "the keys-as-rows tile does not build softcap (the default D = 64 tile for softcap is two consumers)"
    if tile is not None and tile.keys_as_rows and softmax_scale == 0:
        return "the keys-as-rows tile needs a nonzero softmax_scale (it seeds its scores with -lse2 / scale)"
    if max(q.numel(), k.numel(), v.numel()) >= 2**31:
        # The pointer-stored dK/dV tail rows use 32-bit offsets and this size was never run on the GPU; the
        # Triton backward is tested past 2^31 elements.
        return "a tensor of 2^31 elements or more (served by the Triton backward)"
    return None


def _tma_ready(t):
    """t itself if TMA can read it (unit last stride, 16-byte strides and base), else a contiguous copy."""
    elem = t.element_size()
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((s * elem) % 16 == 0 for s in t.stride()[:-1])
    return t if ok else t.contiguous()


def _dq_descriptor(acc, rows, varlen, parts=1):
    """TMA descriptor of the fp32 dQ accumulator (q's shape; or of dQ itself, DQ_CAST): boxes of `rows` tokens of
    one head and 1 / parts of the (tile) head dim; the reduce-add is clipped at the tensor's bounds like a store.
    (A 32-byte swizzle of the staging tiles removes their stores' bank conflicts but needs 2-4x the reduce-add boxes:
    measured 3-9% slower at D <= 128 and 34% at D = 256, session 24.)"""
    d = configs.tile_dim(acc.shape[-1]) // parts
    block = [rows, 1, d] if varlen else [1, rows, 1, d]
    layout = gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPES[acc.dtype])
    return TensorDescriptor(acc, shape=list(acc.shape), strides=list(acc.stride()), block_shape=block,
                            layout=layout)


_GL_DTYPES = {torch.float32: gl.float32, torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def _kt_dq_descriptor(acc, tile, varlen):
    """The keys-as-rows kernel's dQ boxes: [64 rows, D] with BM = 128 (a consumer's query rows), else [BM, D / 2];
    over the fp32 accumulator, or over dQ itself (DQ_CAST's dqo_desc: the same boxes in q's dtype)."""
    if tile.block_m == 2 * WG_KEYS:
        return _dq_descriptor(acc, WG_KEYS, varlen, 1)
    return _dq_descriptor(acc, tile.block_m, varlen, tile.num_wg)


def _dq_out_placeholder(tile, d, dtype, varlen, device):
    """A keys-as-rows launch without DQ_CAST: some tensor of q's dtype for its dQ descriptor (never touched)."""
    key = (device.type, device.index, tile.block_m, d, dtype, varlen)
    if key not in _DQ_OUT_PLACEHOLDERS:
        rows = tile.block_m
        _DQ_OUT_PLACEHOLDERS[key] = torch.zeros((rows, 1, d) if varlen else (1, rows, 1, d), dtype=dtype,
                                                device=device)
    return _DQ_OUT_PLACEHOLDERS[key]


_DQ_OUT_PLACEHOLDERS = {}

# The persistent chain's last link of each query block writes dQ in the input dtype from the completed fp32 sum
# (backward_kt._cast_share), instead of a cast of the whole accumulator after the kernel (~68 µs a call at the
# training suite's sizes, 201 MB of traffic); False: the cast after the kernel (probes flip it for A/B). It needs the
# first link's stores (dq_cast_serves' store_first: DQ_STORE_FIRST, whose race the store link's fence closes since
# session 35, CHAIN_FENCE).
DQ_CAST = True


def dq_cast_serves(tile, store_first, d, window_right):
    """Whether the main kernel writes dQ itself (DQ_CAST; d: the tile's head-dim width): the keys-as-rows tiles on the
    persistent grid's ascending chain whose first link stores (dq_store_first_serves: batched, every query row
    visited, so every row has a last link), under a right window (causal), where the writer's 16 KiB read-back tile
    fits beside the kernel's shared memory. Under a right window each tile closes the chains of a few query blocks;
    without one the last key block's tile closes all of its head's, at every step, and those tiles come last in the
    handout: H100 card 1752824021230, bwd_flag_ab.py --flag DQ_CAST (5 rounds, best (median)): causal D = 128 S =
    1024 / 2048 1.038 / 1.020x (1.034 / 1.028x), D = 64 S = 1024 1.072x (1.067x); non-causal D = 128 S = 2048 / 4096
    / 16384 0.905 / 0.900 / 0.944x, and 0.95-1.00x even with the final chunk's casts left out (benchmarks/NOTES.md,
    session 33)."""
    if not (DQ_CAST and store_first and window_right >= 0 and tile.keys_as_rows and persistent_tiles(tile)):
        return False
    from .backward_kt import cast_bytes, smem_bytes as kt_bytes
    return kt_bytes(tile, d, d) + cast_bytes(tile, d) <= configs.SMEM_LIMIT


# lse2 and Delta by TMA into shared memory beside Q (STATS_TMA: the D <= 128 kernel; see stats_tma_serves); False:
# loaded by the consumers from global memory (probes flip it for A/B: benchmarks/bwd_flag_ab.py).
STATS_TMA = True


def stats_tma_serves(tile, varlen):
    """Whether the main kernel takes lse2 and Delta by TMA (STATS_TMA): calls on the D <= 128 kernel. Batched, from
    the (B, Hq, padded Sq) buffers; packed, from the preprocess's aligned copies (each sequence's rows start at a
    multiple of 4 floats: a TMA box's innermost start must be 16-byte aligned, benchmarks/tma_inner_offset_probe.py)."""
    return STATS_TMA and not tile.d256


# tile.stats_ext as the tiles set it; False: off on every tile (probes flip it for A/B: det_cost.py --flip).
STATS_EXT = True


def stats_ext_serves(tile, varlen, dtype):
    """Whether the keys-as-rows kernel takes lse2 and Delta as K extensions of Sᵀ and dPᵀ (tile.stats_ext): batched
    bf16 calls with the statistics by TMA. (fp16's narrower exponent range would not hold every −lse2 / scale2
    part; packed calls mask columns past each sequence, which the extension cannot express.)"""
    return bool(STATS_EXT and tile.stats_ext and tile.keys_as_rows and not varlen and stats_tma_serves(tile, varlen)
                and dtype == torch.bfloat16)


def qk_scale2(softmax_scale, softcap):
    """The kernels' base-2 logit scale: s2 = qk·scale·log2 e, or with softcap c the factor c·log2 e of
    c·log2 e·tanh(qk·scale / c) (the kernel argument qk_scale)."""
    return (softcap if softcap > 0 else softmax_scale) * LOG2E


def stats_ext_buffers(q, tile, varlen, batch, seqlen_q, softmax_scale, softcap):
    """(extension, −1 / scale2) for the preprocess to fill when the call takes the statistics as K extensions
    (stats_ext_serves), else None: lse2's and Delta's extensions in one (B, Hq, Sq padded to the tile's rows, 16)
    tensor (stats_ext_combined's layout); the loader reads Delta's box from column STATS_EXT_DELTA_COL on."""
    if not stats_ext_serves(tile, varlen, q.dtype):
        return None
    rows = triton.cdiv(seqlen_q, tile.block_m) * tile.block_m
    ext = torch.empty((batch, q.shape[-2], rows, STATS_EXT_WIDTH), dtype=q.dtype, device=q.device)
    return ext, -1.0 / qk_scale2(softmax_scale, softcap)


STATS_EXT_WIDTH = 16  # the extension's columns: one wgmma K step of a 16-bit product
STATS_EXT_PARTS = 3  # a statistic's 16-bit parts (hi, mid, lo: stats_ext_parts), so the ones operand's 1-columns
STATS_EXT_WIDTH_C = gl.constexpr(STATS_EXT_WIDTH)  # the kernels' forms
STATS_EXT_PARTS_C = gl.constexpr(STATS_EXT_PARTS)
# Where Delta's parts start in the one extension tensor (lse2's take columns 0-2). The loader's Delta box starts at
# this column, so the box holds [Delta's parts, zeros ...] (columns past 15 come zero-filled by TMA) and both
# extension products use the same ones operand (ones in columns 0-2). A box's start in the innermost dimension must
# be 16-byte aligned (benchmarks/tma_inner_offset_probe.py): column 3 faulted (illegal instruction, H100, session
# 31), so column 8. One tensor of 32 bytes a query row instead of two halves the extensions' memory: the D = 64 suite
# rows' backward took 160 MiB beyond its inputs and outputs with two, 144 with one (cuDNN: 130).
STATS_EXT_DELTA_COL = 8
STATS_EXT_DELTA_COL_C = gl.constexpr(STATS_EXT_DELTA_COL)  # the loader's (kernel) form


def stats_ext_parts(x, dtype, col=0):
    """x (fp32, any shape) as (..., 16) `dtype` columns, [hi, mid, lo] in columns col to col + 2 and zeros elsewhere,
    with hi + mid + lo = x to fp32 precision (three 8-bit mantissas: 24 bits), so that ones · parts = x inside a
    16-bit wgmma's fp32 accumulation. A non-finite x is carried whole by hi (mid = lo = 0)."""
    finite = torch.isfinite(x)
    hi = x.to(dtype)
    rest = torch.where(finite, x - hi.float(), 0.0)
    mid = rest.to(dtype)
    lo = (rest - mid.float()).to(dtype)
    parts = torch.zeros(*x.shape, STATS_EXT_WIDTH, dtype=dtype, device=x.device)
    parts[..., col] = hi
    parts[..., col + 1] = mid
    parts[..., col + 2] = lo
    return parts


def stats_ext_combined(lse2, delta, ext_scale, dtype):
    """The one K extension tensor the preprocess writes (torch form, for ahead-of-time compiles and tests): the parts
    of lse2 · ext_scale (= −lse2 / scale2) in columns 0-2 and of −Delta from STATS_EXT_DELTA_COL."""
    return stats_ext_parts(lse2 * ext_scale, dtype) + stats_ext_parts(-delta, dtype, STATS_EXT_DELTA_COL)


def _stats_ext_descriptor(t, rows):
    """TMA descriptor of a (B, Hq, padded Sq, 16) extension: boxes of `rows` query rows, all 16 columns."""
    block = [1, 1, rows, STATS_EXT_WIDTH]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16)
    return TensorDescriptor(t, shape=list(t.shape), strides=list(t.stride()), block_shape=block, layout=layout)


def _stats_descriptor(t, rows):
    """TMA descriptor of lse2 or Delta ((B, Hq, padded Sq), or packed (Hq, aligned length), fp32): boxes of `rows`
    consecutive query rows."""
    block = [1] * (t.dim() - 1) + [rows]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.float32)
    return TensorDescriptor(t, shape=list(t.shape), strides=list(t.stride()), block_shape=block, layout=layout)


_STATS_PLACEHOLDERS = {}


def _stats_placeholder(device, rows, varlen=False):
    """A (1, 1, rows) (packed: (1, rows)) fp32 tensor for the stats descriptors of calls that load lse2 and Delta
    from global memory (the descriptor's rank is part of the kernel's signature)."""
    key = (device.type, device.index, rows, varlen)
    if key not in _STATS_PLACEHOLDERS:
        _STATS_PLACEHOLDERS[key] = torch.zeros((1, rows) if varlen else (1, 1, rows), dtype=torch.float32,
                                               device=device)
    return _STATS_PLACEHOLDERS[key]


def _stats_sources(tile, varlen, lse2, delta, stats_al, device):
    """(STATS_TMA on, tensor under the lse2 descriptor, tensor under the Delta descriptor): batched, lse2 and delta;
    packed, their aligned copies stats_al = (lse2, delta); without TMA (or without the copies), a placeholder."""
    if stats_tma_serves(tile, varlen) and (not varlen or stats_al is not None):
        return (True, *(stats_al if varlen else (lse2, delta)))
    placeholder = _stats_placeholder(device, tile.block_m, varlen)
    return False, placeholder, placeholder


def launch_plan(dout, q, k, v, dq_acc, dk, dv, lse2, delta, *, softmax_scale, window_left, window_right, softcap,
                cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, max_seqlen_q=None, max_seqlen_k=None,
                deterministic=False, tile=None, sink=None, dsink_part=None, dq_chain=None, stats_al=None,
                tile_ctr=None, dq_store_first=False, stats_ext=None, dq_out=None, dq_first_only=False):
    """(grid, kernel arguments by name, constexprs by name) of the main kernel. dq_first_only: dq_chain orders only
    the first link (ORDERED_DQ_FIRST, dq_first_store_serves), whose stores the unordered adds wait for. dq_out: dQ in
    q's dtype, written by
    the keys-as-rows kernel itself (DQ_CAST, dq_cast_serves), or None. tile_ctr: the zeroed int32 tile
    counter of the persistent keys-as-rows grid (persistent_tiles); dq_store_first: the ordered chain's first link
    stores into an accumulator left unzeroed (dq_store_first_serves). dq_acc: fp32, q's shape
    (ignored when deterministic); lse2, delta: the preprocess outputs in lse's layout; dq_chain: the zeroed
    int32 counters of the in-kernel ordered dQ (dq_chain_counters), None for the unordered reduce-add.
    stats_ext: the preprocess's K extension tensor of lse2 and Delta (stats_ext_buffers); None where the call takes it
    (stats_ext_serves) makes them here with torch (ahead-of-time compiles, tests)."""
    varlen = cu_seqlens_q is not None
    d, dvw = configs.tile_dim(q.shape[-1]), configs.tile_dim(v.shape[-1])
    tile = tile or default_tile(d, dvw, window_left, softcap, window_right=window_right, deterministic=deterministic,
                                varlen=varlen, sink=sink is not None, softmax_scale=softmax_scale)
    hq, hkv = q.shape[-2], k.shape[-2]
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        seqlen_q, seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
        stride_t = (0, delta.stride(0))
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        stride_t = (delta.stride(0), delta.stride(1))

    def bsh(t):
        return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))

    soft = softcap > 0
    dummy_i32 = _dummy_i32(q.device)
    if dq_acc is None:  # deterministic: dQ comes from another kernel; a placeholder for the descriptor
        dq_acc = _dq_placeholder(tile, d, varlen, q.device)
    shared = tile.shared_dq and not deterministic
    if tile.d256:
        # Head-dim halves (one per consumer) of Q, K, V, dO, dK, dV; dQ in [BM, 64] quarters.
        from .backward_d256 import descriptor as half_desc
        descs = dict(q_desc=half_desc(q, tile.block_m, varlen), k_desc=half_desc(k, WG_KEYS, varlen),
                     v_desc=half_desc(v, WG_KEYS, varlen), do_desc=half_desc(dout, tile.block_m, varlen),
                     dk_desc=half_desc(dk, WG_KEYS, varlen), dv_desc=half_desc(dv, WG_KEYS, varlen),
                     dq_desc=_dq_descriptor(dq_acc, tile.block_m, varlen, 4))
    else:
        descs = dict(
            q_desc=_descriptor(q, tile.block_m, varlen), k_desc=_descriptor(k, WG_KEYS, varlen),
            v_desc=_descriptor(v, WG_KEYS, varlen), do_desc=_descriptor(dout, tile.block_m, varlen),
            dk_desc=_descriptor(dk, WG_KEYS, varlen), dv_desc=_descriptor(dv, WG_KEYS, varlen),
            # keys_as_rows: each consumer adds 64 query rows of dQ (D = 64, BM = 128), or all rows of D / 2 columns.
            dq_desc=_kt_dq_descriptor(dq_acc, tile, varlen) if tile.keys_as_rows else
            _dq_descriptor(dq_acc, tile.block_m, varlen, tile.num_wg if shared else 1))
    stats, lse2_src, delta_src = _stats_sources(tile, varlen, lse2, delta, stats_al, q.device)
    ext_on = stats and stats_ext_serves(tile, varlen, q.dtype)
    if ext_on:
        # Sᵀ acc = K·Qᵀ + ones·parts(−lse2 / scale2) and dPᵀ acc = V·dOᵀ + ones·parts(−Delta): the seeds the kernel
        # otherwise loads per column (backward_kt), carried by the contraction.
        if stats_ext is None:
            stats_ext = stats_ext_combined(lse2, delta, -1.0 / qk_scale2(softmax_scale, softcap), q.dtype)
        # Both boxes come from the one tensor (Delta's from column STATS_EXT_DELTA_COL, the loader's coordinate).
        descs["lse2_desc"] = descs["delta_desc"] = _stats_ext_descriptor(stats_ext, tile.block_m)
    else:
        descs["lse2_desc"] = _stats_descriptor(lse2_src, tile.block_m)
        descs["delta_desc"] = _stats_descriptor(delta_src, tile.block_m)
    args = dict(
        **descs,
        dk_ptr=dk, dv_ptr=dv, lse2_ptr=lse2, delta_ptr=delta,
        sink_ptr=sink if dsink_part is not None else lse2, dsink_ptr=dsink_part if dsink_part is not None else lse2,
        dq_ctr=dq_chain if dq_chain is not None else dummy_i32,
        cu_q=cu_seqlens_q if varlen else dummy_i32, cu_k=cu_seqlens_k if varlen else dummy_i32,
        seqused=seqused_k if seqused_k is not None else dummy_i32,
        stride_dkb=bsh(dk)[0], stride_dks=bsh(dk)[1], stride_dkh=bsh(dk)[2],
        stride_dvb=bsh(dv)[0], stride_dvs=bsh(dv)[1], stride_dvh=bsh(dv)[2],
        stride_tb=stride_t[0], stride_th=stride_t[1], d=q.shape[-1], dv=v.shape[-1],
        seqlen_q=seqlen_q, seqlen_k=seqlen_k, num_kv_heads=hkv, group=hq // hkv,
        # Base-2 logits: s2 = qk·scale·log2 e, or with softcap c: (c·log2 e)·tanh(qk·scale / c).
        qk_scale=qk_scale2(softmax_scale, softcap),
        cap_scale=softmax_scale / softcap if soft else 1.0,
        softmax_scale=softmax_scale, window_left=window_left, window_right=window_right)
    big = max(t.numel() for t in (q, k, v, dk, dv, dq_acc)) >= 2**31
    if tile.trace:
        # The trace buffer takes the sink-partials slot (no SINK_PDP in a trace build).
        global LAST_TRACE
        n_kb = triton.cdiv(seqlen_k, tile.block_n)
        LAST_TRACE = torch.zeros(n_kb, tile.num_wg, TRACE_STEPS, TRACE_EVENTS, dtype=torch.int64, device=q.device)
        args["dsink_ptr"] = LAST_TRACE
        # The CTA timeline takes the sink's slot (no sink in a trace build), one row for every CTA of the grid.
        global LAST_CTA_TRACE
        LAST_CTA_TRACE = torch.zeros(n_kb * batch * hkv, CTA_EVENTS + 1, dtype=torch.int64, device=q.device)
        args["sink_ptr"] = LAST_CTA_TRACE
        dsink_part = None
    constexprs = dict(
        BM=tile.block_m, NWG=tile.num_wg, STAGES=tile.stages, VARLEN=varlen, HAS_SEQUSED=seqused_k is not None,
        HAS_WL=window_left >= 0, HAS_WR=window_right >= 0, SOFTCAP=soft, DQ_ATOMIC=not deterministic, DQ_SHARED=shared,
        # Not with varlen: its sequence bounds push the loop's reloads from local memory from 2 to 20 (a
        # configuration the probe has not timed). PING_PONG issues dP with S also with varlen (its in-loop
        # reloads are in tests/test_sm90_backward_aot.py's allowances).
        EARLY_DP=tile.early_dp and not varlen, SINK_PDP=dsink_part is not None,
        PING_PONG=tile.ping_pong and tile.num_wg > 1, BIG=big, TRACE=tile.trace,
        # The persistent grid's chain is ascending under any right window (its walks top-down, _step_block).
        ORDERED_DQ=0 if dq_chain is None else (3 if dq_first_only else 2 if window_right >= 0
                                               and not persistent_tiles(tile) else 1),
        # The writer warp: always for the ordered chain; for the unordered reduce-add where tile.dq_writer asks for
        # it: on the queries-as-rows tiles for calls without a right window (where it measured faster), on the
        # keys-as-rows ones (a probe: +3-7% slower on the one-CTA and the persistent D = 128 grids) under any mask.
        DQ_WRITER=not deterministic and (dq_chain is not None or (tile.dq_writer and (
            tile.keys_as_rows or window_right < 0))),
        STATS_TMA=stats,
        CONSUMER_REGS=tile.consumer_regs, LOADER_REGS=tile.loader_regs)
    # The chain's lagged release and its first link's store (dq_writer; the D = 256 kernel takes the parameters and
    # builds no chain).
    constexprs["DQ_RELEASE_LAG"] = dq_chain is not None and chain_release_lag(tile, window_right)
    constexprs["DQ_STORE_FIRST"] = dq_chain is not None and dq_store_first
    constexprs["DQ_SPREAD"] = dq_spread_serves(tile, varlen)
    # (The D = 256 kernel takes it with the other parameters and builds no chain.) Level 3 fences the store link
    # only: a chain whose first link adds builds none.
    constexprs["DQ_CHAIN_FENCE"] = (int(CHAIN_FENCE) if dq_chain is not None and (CHAIN_FENCE != 3 or dq_store_first)
                                    else 0)
    if tile.keys_as_rows:
        constexprs["STATS_EXT"] = ext_on
        constexprs["DV_EARLY"] = tile.dv_early
        dq_first = dq_first_serves(tile, dq_chain is not None, window_right)
        constexprs["DQ_LAG"] = (2 if dq_first else 1) if tile.dq_lag else 0
        constexprs["POLY"] = tile.poly
    if tile.d256:
        constexprs["DQ_IN_Q"] = tile.dq_in_q
        constexprs["ROLES"] = tile.d256_roles
        constexprs["EARLY_DV"] = tile.d256_early_dv
        constexprs["STATS_AHEAD"] = tile.d256_stats_ahead
        constexprs["HAND_SWZ"] = tile.d256_hand_swizzle
    n_kb = triton.cdiv(seqlen_k, tile.block_n)
    chunk = cta_chunk(tile, batch * hkv, seqlen_q * (hq // hkv), d, window_left, window_right, varlen,
                      deterministic or dq_chain is not None or dsink_part is not None)
    constexprs["CTA_CHUNKED"] = chunk > 1 and 2 <= n_kb <= 65535  # gridDim.y holds the key blocks
    grid = (chunk, n_kb, batch * hkv // chunk) if constexprs["CTA_CHUNKED"] else (n_kb, batch * hkv)
    if tile.keys_as_rows:
        args["n_bh"] = batch * hkv
        args["chunk"] = chunk
        args["dqo_desc"] = _kt_dq_descriptor(
            dq_out if dq_out is not None else _dq_out_placeholder(tile, d, q.dtype, varlen, q.device), tile, varlen)
        constexprs["DQ_CAST"] = dq_out is not None
        constexprs["PERSIST"] = False
        if persistent_tiles(tile):
            constexprs["PERSIST"] = True
            constexprs["CTA_CHUNKED"] = False
            grid = (min(n_kb * batch * hkv, _sm_count(q.device)), )
            if CTA_CHUNK and (dq_chain is not None or (window_left < 0 and window_right < 0)):
                # The tiles in chunks of heads, key block after key block over a chunk, also without a window (where
                # cta_chunk keeps one chunk: every walk is as long). The ascending chain's tile then finds its
                # predecessor `chunk` tiles ahead of it in the handout (KT_PERSIST_CHAIN).
                args["chunk"] = l2_chunk(batch * hkv, seqlen_q * (hq // hkv), d)
            # The tiles are handed out by this counter; with the ordered chain, the first slot of the chain's
            # counters (dq_chain_counters).
            if dq_chain is None:
                args["dq_ctr"] = tile_ctr if tile_ctr is not None else dummy_i32
    return grid, args, constexprs


def _sm_count(device):
    """Streaming multiprocessors of a CUDA device (132 for an ahead-of-time compile on the CPU)."""
    if device.type != "cuda":
        return 132
    if device.index not in _SM_COUNTS:
        _SM_COUNTS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNTS[device.index]


_SM_COUNTS = {}
# Probe switch (bwd_flag_ab.py --flag KT_PERSISTENT, FA4_KT_PERSISTENT=1): every keys-as-rows tile on the persistent
# grid, the D = 64 one included (there: the fixed cost a tile 4.7 -> 3.7 µs, but the call within ±1.5% at S = 4096,
# so it stays off; benchmarks/NOTES.md, session 17).
KT_PERSISTENT = os.environ.get("FA4_KT_PERSISTENT") == "1"


def persistent_tiles(tile):
    """Whether the tile's main kernel runs on the persistent grid (keys-as-rows tiles; not in a trace build).
    FA4_KT_PERSISTENT=0 keeps every tile off it (a probe switch, read per call)."""
    if os.environ.get("FA4_KT_PERSISTENT") == "0":
        return False
    return tile.keys_as_rows and (tile.persistent or KT_PERSISTENT) and not tile.trace


# cta_chunk: interleave the heads of windowed (causal) calls in chunks (False: one head after another; probes flip
# it for A/B: benchmarks/bwd_flag_ab.py --flag CTA_CHUNK), and the L2 budget of a chunk's fp32 dQ accumulators.
CTA_CHUNK = True
CTA_CHUNK_BYTES = 16 << 20


def cta_chunk(tile, units, q_rows_per_unit, d, window_left, window_right, varlen, ordered):
    """How many consecutive (batch, kv head) pairs the grid interleaves (_cta_block): 1 (key blocks of one head
    after another) unless a window makes the CTAs' walks unequal (causal: key block nb walks the query blocks from
    its diagonal on). Then the head-after-head order ends with one head's longest walk starting late, while C heads
    at a time run their long walks first. A list-scheduling model of 132 SMs predicted +5-6% on D = 128 / 256 causal
    calls at S = 4096 and +3% at D = 64; measured (H100, bwd_flag_ab.py --flag CTA_CHUNK, session 15): D = 64 +2.1%,
    D = 256 +1.5%, D = 128 0. C is the largest power of two whose C heads' fp32 dQ
    accumulators fit CTA_CHUNK_BYTES (so that the CTAs in flight still add into L2-resident rows: interleaving every
    head measured 0.55x, session 13), at most 32, and a divisor of `units`. Calls without an ordered dQ chain or the
    sink partials only (whose layouts assume C = 1). Packed calls too since session 20 (their pairs are sized by
    the longest sequence, an upper bound; +2-3% forward + backward at D = 128 causal, +0.4-1% at D = 64 / 256;
    FA4_BWD_CHUNK_VARLEN=0 turns it off for A/B)."""
    if not CTA_CHUNK or ordered or tile.trace or (window_left < 0 and window_right < 0):
        return 1
    if varlen and os.environ.get("FA4_BWD_CHUNK_VARLEN") == "0":  # probe switch (session 20), read per call
        return 1
    return l2_chunk(units, q_rows_per_unit, d)


def l2_chunk(units, q_rows_per_unit, d):
    """The largest power of two, at most 32 and dividing `units`, whose units' fp32 dQ rows fit CTA_CHUNK_BYTES
    (cta_chunk's rule; the persistent grid's ordered chain takes it under any mask)."""
    per_unit = q_rows_per_unit * configs.tile_dim(d) * 4
    chunk = 1
    while chunk < 32 and units % (2 * chunk) == 0 and 2 * chunk * per_unit <= CTA_CHUNK_BYTES:
        chunk *= 2
    return chunk


# The ordered dQ pass on a side stream beside the main kernel (backward_checked); False: after it, on the
# caller's stream (probes flip it for A/B).
CONCURRENT_DQ = True
# deterministic=True through the main kernel's dQ chain where dq_chain_serves; False: always the ordered pass
# (probes flip it for A/B).
DQ_CHAIN = True
# The same chain in the keys-as-rows kernel (D = 64; the same writer warp, dq_writer); False: those
# deterministic calls take the ordered pass (probes flip it for A/B).
KT_DQ_CHAIN = True
# The chain on the persistent keys-as-rows grid (deterministic=True for batched D = 128 calls under a right window,
# causal included, from KT_PERSIST_CHAIN_MIN_ROWS query rows; default_tile): ascending key blocks, each walk top-down
# and query block by query block (backward._step_block), so that every tile waits only on tiles handed out before it,
# the tiles in chunks of heads (l2_chunk, the default's rule). H100, session 26 (det_chain_shapes.py,
# benchmarks/NOTES.md): with one head's key blocks after another the chain's tiles of a head start together and each waits for its
# predecessor's add of the same step, a delay that grows along the chain while the SM idles (+86-99% over the default
# at S = 1024 / 4096); in chunks of 8 heads at S = 4096 (the chunk rule's) +4.2 / +5.5% against the shared-dQ
# tile's chain +11.4 / +12.8%; at S = 1024 (chunk 32) +9.5% against +8.3%, hence the rows threshold. False: always the
# shared-dQ tile's descending chain (probes flip it for A/B).
KT_PERSIST_CHAIN = True
KT_PERSIST_CHAIN_MIN_ROWS = 2048
# ... under a right window (causal) from 512 rows since session 31: with the statistics' K extension the chain (which
# CHAIN_BY_DEFAULT also gives the default's masked calls up to CHAIN_BY_DEFAULT_MAX_ROWS_MASKED rows; its first link
# stores, so the accumulator is not zeroed) measured faster there than the causal tile's reduce-add. bwd_flag_ab.py
# --flag CHAIN_BY_DEFAULT with this lowered, best round (median): H100 card 1753024019723, 7 rounds, causal S = 1024
# 1.066x (1.066x), non-causal 0.945x (so that stays at 2048); card 1654723009368, 5 rounds, causal S = 512 / 1024 /
# 1536 / 2048 1.221 / 1.062 / 1.035 / 1.043x (1.217 / 1.066 / 1.058 / 1.012x). From 128 rows since session 32: card
# 1753024033491, 5 rounds, causal S = 128 / 256 / 512 1.287 / 1.292 / 1.218x (medians 1.290 / 1.290 / 1.217x; raw
# benchmarks/results/raw/h100-2026-11-27-s32-d128-causal-chain-short.log). Shorter calls were not measured.
KT_PERSIST_CHAIN_MIN_ROWS_MASKED = 128
# ... and deterministic D = 128 calls without a window too (their default is the shared-dQ tile): H100 card
# 1753024034002, det_cost.py --flip KT_PERSIST_CHAIN_FULL, deterministic over the default at S = 4096 / 16384
# −2.8 / −2.1% against the shared-dQ tile's ascending chain +9.8 / +2.2%. (The same grid without the chain for the
# default's non-causal calls, with or without the writer warp: 0.88 / 0.93-0.96 / 1.01-1.025x of the shared-dQ
# tile at S = 1024 / 4096 / 16384: not taken.)
KT_PERSIST_CHAIN_FULL = True
# ... and, without a right window (the ascending chain), only from this many query rows on: at D = 64 the ascending
# chain cost +16% over the default at S = 4096 (the ordered pass +8%) and +4.0 / +2.6% at 8192 / 16384 (the pass
# +9.9 / +11.7%); the descending chain +3-4% (H100, session 24, benchmarks/det_cost.py --flip KT_DQ_CHAIN).
KT_ASC_CHAIN_MIN_ROWS = 8192


# The default (deterministic=False) D = 128 calls that the persistent grid's chain (KT_PERSIST_CHAIN) serves faster
# than their own tiles take it (chain_by_default): batched, no left window, no sink or softcap, from KT_PERSIST_CHAIN_MIN_ROWS query rows,
# under a right window only up to CHAIN_BY_DEFAULT_MAX_ROWS_MASKED. H100 card 1654723038739 (det_cost.py, best of
# 4-5 rounds, deterministic over the default; B·S = 16384, H·D = 2048): no window S = 2048 / 4096 / 8192 / 16384
# -1.4 / -2.7 / -2.5 / -0.8% (MHA), -3.0 / -0.6 / +0.4% at S = 2048 / 4096 / 16384 with 4 query heads a kv head,
# -5.3 / +0.5 / -4.5% with 16; causal S = 2048 / 4096 / 8192 / 16384 -4.4 / -1.6 / +3.9 / +3.8% (MHA), 2048 / 4096
# -4.2 / +0.8% (4 a kv head), -16.3 / -13.2% (16). On card 1752624008455 (bwd_flag_ab.py --flag CHAIN_BY_DEFAULT,
# best of 3, rows of 2048 masked rows at most then): no window S = 4096 / 16384 1.020 / 1.020x, causal S = 4096
# 0.982x (median 0.993x), within that card's ±4% between identical builds at S = 1024: masked calls take it up to
# 2048 rows only. The chain's first link stores (no zeroed accumulator) and a writer warp issues the adds; its
# results are then also bitwise repeatable. False: the default's own tiles.
# With DQ_CAST (session 33: the chain's last links write dQ, no cast after the kernel) up to 4096 masked rows:
# bwd_flag_ab.py --flag CHAIN_BY_DEFAULT --causal-only with the limit patched, best (median) round, S = 4096 / 8192:
# card 1652824192950 1.014 / 1.022x (1.031 / 1.012x), card 1652624817003 (7 rounds) 1.007 / 0.993x (1.027 /
# 0.996x); session 32 without the cast, card 1753024036434, S = 4096 1.014x (1.009x). 8192 and up stay level.
# Those ran with the first link's store unfenced (its race, DQ_STORE_FIRST). With the store link's fence (session 35,
# CHAIN_FENCE = 3), H100 card 1753024036285, --flag CHAIN_BY_DEFAULT --causal-only, 5 rounds, best (median): S = 1024
# / 2048 / 4096 1.069 / 0.995 / 0.988x (1.065 / 1.018 / 0.984x); the 8192 row, which takes neither, 0.987 / 0.991x
# (the run's noise). So masked calls take it up to 2048 rows (level there, and bitwise repeatable).
CHAIN_BY_DEFAULT = True
CHAIN_BY_DEFAULT_MAX_ROWS_MASKED = 2048
# The same at D = 64 (the persistent grid's chain of D64_PERSIST_DET) for calls without a window: deterministic over
# the default, H100 cards 1753024033427 / 1752624024775 (det_cost.py, best of 3): S = 1024 -7.4 / -9.6%, 2048
# -3.7 / -3.9%, 4096 +1.1 / -0.4% (level: not taken). Then on card 1653823054563 (bwd_flag_ab.py --flag
# CHAIN_BY_DEFAULT_D64 --rounds 5, off -> on): S = 512 / 1024 / 2048 1.149 / 1.085 / 0.949x (medians 1.148 / 1.049 /
# 0.948x), so up to 1024 rows without GQA. With 4 query heads a kv head (det_cost.py --group 4, chain over the
# default's own tile) S = 512 / 1024 / 2048 1.10 / 1.11 / 1.07x on that card; on card 1652724068364 (raw
# ...-s31-chain-by-default-d64-gqa.log) S = 1024 / 2048 / 4096: MHA 1.12 / 1.04 / 1.02x, 4 a kv head 1.07 / 1.06 /
# 0.99x, 8 a kv head 1.05 / 1.05 / 1.00x. So GQA calls up to 2048 rows. Session 35 with the store link's fence
# (card 1753024036285, --flag CHAIN_BY_DEFAULT_D64, 5 rounds, best (median)): no window S = 512 / 1024 / 2048 1.148 /
# 1.065 / 0.997x (1.149 / 1.037 / 0.967x); causal 1.050 / 1.061 / 0.995x (0.957 / 1.060 / 1.001x): limits kept.
CHAIN_BY_DEFAULT_D64 = True
CHAIN_BY_DEFAULT_D64_MAX_ROWS = 1024
CHAIN_BY_DEFAULT_D64_MAX_ROWS_GQA = 2048


def chain_by_default(d, dv, window_left, window_right, softcap, sink, varlen, seqlen_q, softmax_scale, group=1):
    """Whether a deterministic=False call takes deterministic=True's persistent chain (CHAIN_BY_DEFAULT): tile widths
    (128, 128), what _persistent_chain_call serves, no sink (its gradient would take the ordered pass), no softcap
    and a nonzero scale (the keys-as-rows tile's), and under a right window at most
    CHAIN_BY_DEFAULT_MAX_ROWS_MASKED query rows; tile widths (64, 64) (CHAIN_BY_DEFAULT_D64): the same, without a
    window, up to CHAIN_BY_DEFAULT_D64_MAX_ROWS query rows (with group >= 2 query heads a kv head, GQA, up to
    CHAIN_BY_DEFAULT_D64_MAX_ROWS_GQA), and causal ones up to D64_CAUSAL_CHAIN_MAX_ROWS, where _d64_persistent_call
    puts deterministic calls on the persistent grid."""
    widths = (configs.tile_dim(d), configs.tile_dim(dv))
    if widths == (64, 64):
        # _d64_persistent_call (as for deterministic=True) rules out left windows, sinks and packed calls.
        if window_right >= 0:
            max_rows = D64_CAUSAL_CHAIN_MAX_ROWS
        else:
            max_rows = CHAIN_BY_DEFAULT_D64_MAX_ROWS_GQA if group > 1 else CHAIN_BY_DEFAULT_D64_MAX_ROWS
        return (CHAIN_BY_DEFAULT_D64 and softcap == 0 and softmax_scale != 0 and seqlen_q <= max_rows
                and _d64_persistent_call(window_left, window_right, True, varlen, sink, seqlen_q))
    return (CHAIN_BY_DEFAULT and widths == (128, 128) and not sink
            and softcap == 0 and softmax_scale != 0 and KEYS_AS_ROWS_D128
            and _persistent_chain_call(window_left, window_right, varlen, seqlen_q)
            and (window_right < 0 or seqlen_q <= CHAIN_BY_DEFAULT_MAX_ROWS_MASKED))


# A causal (right-window) call's GQA group split over virtual kv heads (gqa_split). The keys-as-rows tiles walk
# every query head of their kv head's group, and causal tiles differ in length, so with large groups a grid has few,
# long tiles and its longest sets the call's time: the default causal D = 128 call with 16 query heads a kv head
# took 1.58-1.91x the time of the same FLOPs with one (S = 1024 / 8192 / 16384; 8 a kv head: 1.17-1.45x; D = 64 S =
# 4096: 1.44x), no window none (H100 card 1752624021168, det_cost.py --group). Emulated by repeating K and V over
# `split` virtual heads and summing their dK / dV in fp32 (H100 card 1753024032449,
# benchmarks/results/raw/h100-2026-11-27-s27-gqa-split-probe.log, µs, no split -> best split): D = 128 G = 16 S =
# 1024 897 -> 600 (8 virtual heads), 8192 4686 -> 2603 (8), 16384 8683 -> 4903 (8); G = 8 S = 8192 3615 -> 2651
# (4), 16384 5716 -> 4985 (4); D = 64 G = 16 S = 4096 2290 -> 1565 (4). The partial sums stay within the numerics
# rule with the margin the unsplit kernel has (err / bound 0.25-0.57, unsplit 0.20-0.39; ...-gqa-split-numerics.log).
# Built here, H100 card 1793026049547 (det_cost.py --group G --flip GQA_SPLIT, raw ...-gqa-split-ab.log), default
# µs unsplit -> split: G = 16 S = 1024 / 8192 / 16384 905 -> 674, 4631 -> 2508, 8869 -> 4944, D = 64 S = 4096
# 2287 -> 1550; G = 8 820 -> 691, 3634 -> 2584, 5792 -> 5089, D = 64 1745 -> 1588.
# Extended (session 28, H200 card 1653724064821, emulated as above, raw ...-s28-gqa-split-probe2.log, µs, no split
# -> 2 query heads a virtual kv head at D >= 128, 4 at D = 64) to packed calls: D = 128 G = 8 16 x 1024 / 2 x 8192 /
# mixed lengths (512..7168) 679 -> 590, 3615 -> 2616, 2224 -> 1851; G = 16 780 -> 575, 4693 -> 2606, 4164 -> 1807;
# D = 64 G = 16 4 x 4096 2442 -> 1684; and to the D = 256 tile: G = 8 S = 4096 2407 -> 1676, 16384 6767 -> 6213
# (G = 4: 1874 -> 1707 but 6138 -> 6188, so the minimum group stays 8). Built, H200 card 1653824016532
# (det_cost.py --flip GQA_SPLIT [--packed] --group G, raw ...-s28-gqa-split-ab.log), µs unsplit -> split: packed
# G = 16 D = 128 S = 1024 / 8192 774 -> 649, 4725 -> 2702, D = 64 S = 4096 2474 -> 1727; G = 8 672 -> 662,
# 3703 -> 2753; D = 256 G = 8 batched S = 4096 / 16384 2376 -> 1723, 6783 -> 6117. deterministic=True at D = 256
# is the exception, 1716 -> 1881 and 6774 -> 6810: its dQ comes from the ordered pass, which reads every virtual
# head's K / V copy (4x the footprint in L2), so such calls are not split.
# GQA_SPLIT_HEADS: the query heads a virtual kv head keeps, by tile width; False: no split.
GQA_SPLIT = True
GQA_SPLIT_HEADS = {64: 4, 128: 2, 256: 2}
GQA_SPLIT_MIN_GROUP = 8


def gqa_split(q, k, v, window_left, window_right, tile, deterministic=False):
    """How many virtual kv heads each kv head's query-head group is split over (1: none): causal or right-window
    calls (batched or packed) without a left window on the shipped tiles (deterministic ones not at D = 256), with
    at least GQA_SPLIT_MIN_GROUP query heads a kv head, down to GQA_SPLIT_HEADS of them (when that divides the
    group), and repeated K / V that stay below the 2^31 elements the kernels' offsets take (unsupported_reason
    checked only the caller's tensors)."""
    group = q.shape[-2] // k.shape[-2]
    width = configs.tile_dim(q.shape[-1])
    if (not GQA_SPLIT or tile is not None or window_left >= 0 or window_right < 0
            or group < GQA_SPLIT_MIN_GROUP or width != configs.tile_dim(v.shape[-1]) or width not in GQA_SPLIT_HEADS
            or (deterministic and width == 256)):
        return 1
    keep = GQA_SPLIT_HEADS[width]
    split = group // keep if group % keep == 0 else 1
    return split if max(k.numel(), v.numel()) * split < 2**31 else 1


def repeat_kv_heads(t, split):
    """K or V with each kv head repeated `split` times along the heads (virtual head hk·split + j holds kv head hk)."""
    return t.repeat_interleave(split, dim=-2)


def sum_virtual_heads(grad, t):
    """dK or dV of t's kv heads: each one's virtual heads of grad (grad's heads / t's heads of them, consecutive)
    summed in fp32, cast to t's dtype."""
    return grad.unflatten(-2, (t.shape[-2], grad.shape[-2] // t.shape[-2])).sum(-2, dtype=torch.float32).to(t.dtype)


# The chain's writer releases a step's chains after issuing the next step's adds (dq_writer's RELEASE_LAG) where
# chain_release_lag allows it; False: always at once, after waiting for its own adds to land (probes flip it).
DQ_RELEASE_LAG = True


def chain_release_lag(tile, window_right):
    """Whether the ordered chain's writer releases each step a step late (dq_writer's RELEASE_LAG): only where every
    predecessor in a chain reaches the query block at least two steps before its successor, so that the successor
    still finds the release done. That is the descending chain (a right window) on a tile of BN >= 2·BM keys: the
    shared-dQ D = 128 tile (BM = 64, BN = 128), where key block nb + 1's walk starts BN / BM query blocks after
    nb's. Measured (H100, det_cost.py --flip DQ_RELEASE_LAG, session 26): deterministic causal D = 128 +9.4 / +12.7%
    over the default at S = 4096 / 16384 against +11.1 / +15.6% releasing at once; where the predecessor is at
    the same step (the ascending chain: every key block walks every query block from the first) or one step ahead
    (the keys-as-rows D = 64 tile, BM = BN = 128) the lag made the chain 10-30% slower."""
    return (DQ_RELEASE_LAG and window_right >= 0 and tile.num_wg == 2 and not tile.keys_as_rows
            and tile.block_n >= 2 * tile.block_m)


def dq_chain_serves(tile, window_left, sink, window_right=-1, seqlen_q=None):
    """Whether a deterministic call takes the in-kernel ordered dQ (ORDERED_DQ) instead of the ordered pass: the
    shared-dQ tile (D = 128), a keys-as-rows tile off the persistent grid (the chain's deadlock freedom rests on the
    CTAs' dispatch order, _cta_block; without a right window from KT_ASC_CHAIN_MIN_ROWS query rows, seqlen_q None:
    any), or on it under a right window or, with KT_PERSIST_CHAIN_FULL, none (KT_PERSIST_CHAIN: the ascending chain,
    whose predecessors are handed out first), no left window (the chain's bounds assume every key block's walk ends
    at the same query block), and no sink (the pass computes its gradient from Σ P·dP, far inside the numerics
    rule)."""
    if not DQ_CHAIN or tile.separate_dq or window_left >= 0 or sink is not None:
        return False
    if tile.keys_as_rows:
        if persistent_tiles(tile):
            return KT_PERSIST_CHAIN and (window_right >= 0 or KT_PERSIST_CHAIN_FULL)
        long_enough = window_right >= 0 or seqlen_q is None or seqlen_q >= KT_ASC_CHAIN_MIN_ROWS
        return KT_DQ_CHAIN and long_enough
    return tile.shared_dq


# D = 256 calls without a window take dQ from the ordered pass beside the main kernel (built without its dQ
# products) even when not deterministic. With the pass's 3-deep K / V ring (session 24) that measured faster than
# the in-kernel reduce-add: S = 4096 3355 -> 3176 us, 16384 12870 -> 12512 (H100 card 1652524085928,
# benchmarks/det_cost.py --flip D256_PASS_FULL); causal calls keep the reduce-add (the pass's staircase: +1-3%).
# Such calls are then bitwise repeatable too. False: the in-kernel reduce-add (probes flip it for A/B).
D256_PASS_FULL = True


def dq_route(tile, deterministic, window_left, sink, window_right=-1, seqlen_q=None):
    """(chain, ordered_dq, sink_in_main) of a call on `tile` (sink: the tensor or None): where dQ and the sink
    gradient come from.

    deterministic=True: dQ in a fixed order inside the main kernel (its chain, ORDERED_DQ) where it serves, else by
    the ordered pass. dQ from the ordered pass (deterministic, or the tile's choice) also gives the sink gradient,
    from Σ_j P·dP rather than from the rounded O. The keys-as-rows and D = 256 kernels have no P·dP partials for a
    sink (sink_pdp), and the preprocess's rowsum(dO·O) with the rounded O measured outside the numerics rule for
    both (keys as rows: D = 40 / 24, 8 heads, bf16; D = 256: test_short_queries_take_splitkv, Sq = 7, Sk = 5000,
    8 heads, fp16, error ratio 2.46 to the lowp reference, 2026-11-26): their sink calls take the ordered pass.
    sink_in_main: the main kernel sums Σ_j P·dP for the sink gradient itself (tile.sink_pdp, which default_tile
    sets for a sink on the queries-as-rows tiles); otherwise the preprocess's O-based partial sums give it."""
    has_sink = sink is not None
    chain = deterministic and dq_chain_serves(tile, window_left, sink, window_right, seqlen_q)
    separate = tile.separate_dq or (D256_PASS_FULL and tile.d256 and window_left < 0 and window_right < 0)
    ordered_dq = (deterministic and not chain) or separate or (has_sink and not builds_sink_partials(tile))
    sink_in_main = has_sink and not ordered_dq and tile.sink_pdp
    return chain, ordered_dq, sink_in_main


# The ascending chain's first link (key block 0) stores its dQ shares, so that the preprocess need not zero the
# accumulator (dq_store_first_serves); False: zeroed and added (probes flip it for A/B).
# The store-first race (session 34, benchmarks/NOTES.md): repeated deterministic calls (causal D = 128 S = 1024, B 16,
# H 16) gave results differing from the first call in 3 of 120 (up to 0.40 absolute in dQ: a lost add). A
# successor's reduce-add landed before the first link's TMA store and was overwritten: the store's bulk group had
# completed (cp.async.bulk.wait_group) and a *relaxed* red.add released the counter, and nothing in the memory model
# orders the store's writes before that red.add as another SM sees them (adds after adds commute, so the chains'
# ordering had only been checked for repeatability). Off in session 34; back on in session 35 behind CHAIN_FENCE's
# release fence on the store link (level 3): benchmarks/repeat_stress.py on H100 card 1652624019849, store on without
# the fence 5 / 150 eager and 8 / 150 graph-replayed calls differing at D = 128 (2 / 150 at D = 64), with it 0 of 900
# on card 1652624019849 (level 1) and 0 of 900 on card 1752624012173 (level 3; raw
# benchmarks/results/raw/h100-2026-11-27-s35-chain-fence-stress.log, ...-s35-fence-level3-ab.log).
DQ_STORE_FIRST = True
# The chains' releases (1), releases and waits (2), or the store link's releases only (3) fenced (fence.acq_rel.gpu
# after the release's proxy fence, once a step, and after the wait's spin: release_step, _release_asm, _wait_asm).
# The release side is the one the race needs: the successor only issues a reduce-add at L2, it reads nothing of its
# predecessor's (level 2 pairs the release with an acquire, the memory model's full recipe); and only the store needs
# it (adds after adds commute: 0 of 120 differing with the store off). H100 card 1752624012173, bwd_flag_ab.py best
# of 5, the fence's cost over the racy store-first chain: level 1 (every link) causal D = 128 S = 1024 / 2048 0.926 /
# 0.911x, D = 64 S = 1024 0.919x; level 3 0.955 / 0.922 / 0.978x (level 1 with a fence per consumer's release,
# card 1652624019849: 0.85x). Level 3 with the store over the zeroed accumulator (the session-34 state), --on
# DQ_STORE_FIRST=1 --on CHAIN_FENCE=3: causal D = 128 S = 1024 / 2048 / 4096 1.148 / 1.052 / 1.007x, D = 64 S = 1024
# 1.204x; deterministic non-causal D = 128 S = 1024 / 4096 1.019 / 1.006x, D = 64 S = 1024 1.077x.
CHAIN_FENCE = 3


def dq_store_first_serves(tile, window_left, window_right, varlen, seqused_k, seqlen_q, seqlen_k):
    """Whether a call on the ordered chain can leave the fp32 dQ accumulator unzeroed: its chain ascends (no right
    window, or the persistent grid's) and key block 0, whose add comes first in every query block's chain, visits
    every query row: batched (a packed accumulator has rows outside every sequence), no seqused_k (a sequence of no
    keys has no key block 0), no left window (dq_chain_serves' rule too), and under a right window every row sees
    key 0 (seqlen_q <= seqlen_k + window_right: the first row that sees key 0 is row 0)."""
    ascending = window_right < 0 or persistent_tiles(tile)
    covered = window_right < 0 or seqlen_q <= seqlen_k + window_right
    return (DQ_STORE_FIRST and ascending and covered and not varlen and seqused_k is None and window_left < 0
            and seqlen_k > 0)


# The default's unordered reduce-add on the shared-dQ tile without a zeroed accumulator: key block 0 stores its shares
# and the other key blocks wait for them (ORDERED_DQ_FIRST); False: the preprocess zeroes the accumulator (probes flip
# it for A/B). Its store link's release is fenced like the chains' (CHAIN_FENCE = 3): session 34 measured it unfenced
# (H100 card 1753024030425, non-causal D = 128 S = 512 / 1024 1.061 / 1.029x) and reverted it for the same race.
# Session 35, H100 card 1752624013057: benchmarks/repeat_stress.py --default, non-causal D = 128 S = 1024 / 512,
# fenced 0 of 480 calls off by more than 0.06 (rounding noise 1e-3), unfenced 6 + 8 / 17 + 24 of 240 (up to 0.27);
# bwd_flag_ab.py --flag DQ_FIRST_STORE --full-only, 5 rounds, best (median): S = 512 1.049x (1.050x), S = 1024 0.974x
# (1.007x) on a noisy card (rounds 787-844 off, 808-881 on). Calls from 2048 rows take the chain by default
# (chain_by_default).
DQ_FIRST_STORE = True


def dq_first_store_serves(tile, window_left, window_right, varlen, seqused_k, seqlen_q, seqlen_k):
    """Whether a call whose dQ the main kernel reduce-adds in no order (not deterministic, not on a chain) leaves the
    fp32 accumulator unzeroed, key block 0 storing its shares first (ORDERED_DQ_FIRST): the shared-dQ tile with its
    writer warp, without a window (key block 0 visits every query block, and its CTA is dispatched before the other
    key blocks of its head, so a wait on it cannot close a cycle), and what dq_store_first_serves asks of the first
    link (batched, no seqused_k). Saves the preprocess's zero fill of the accumulator (a write of its whole size)."""
    return (DQ_FIRST_STORE and tile.shared_dq and tile.dq_writer and not tile.keys_as_rows and not tile.separate_dq
            and window_left < 0 and window_right < 0
            and dq_store_first_serves(tile, window_left, window_right, varlen, seqused_k, seqlen_q, seqlen_k))


def dq_store_routes(tile, chain, ordered_dq, window_left, window_right, varlen, seqused_k, seqlen_q, seqlen_k):
    """(first_only, store_first) of a call (backward_checked, and backward_aot.compile_config as it would launch):
    first_only, the unordered reduce-add whose key block 0 stores first (dq_first_store_serves; not on a chain nor
    through the ordered pass); store_first, whether any first link stores (that, or the chain's,
    dq_store_first_serves), so that nothing zeroes the accumulator."""
    where = (tile, window_left, window_right, varlen, seqused_k, seqlen_q, seqlen_k)
    first_only = bool(not chain and not ordered_dq and dq_first_store_serves(*where))
    # (first_only already asked dq_store_first_serves.)
    return first_only, bool(first_only or (chain and dq_store_first_serves(*where)))


def dq_chain_counters(tile, batch, n_heads, seqlen_q, device):
    """Zeroed chain counters of the in-kernel ordered dQ: one per (sequence, query head, query block, consumer); on
    the persistent grid (flat) behind the 4 slots of its tile counter (CHAIN_CTR_OFFSET), which they share."""
    n = (batch, n_heads, triton.cdiv(seqlen_q, tile.block_m), tile.num_wg)
    if persistent_tiles(tile):
        return torch.zeros(CHAIN_CTR_OFFSET + n[0] * n[1] * n[2] * n[3], dtype=torch.int32, device=device)
    return torch.zeros(n, dtype=torch.int32, device=device)


# Where the persistent grid's chain counters start in their buffer (the tile counter takes slot 0).
CHAIN_CTR_OFFSET = 4


def backward(dout, q, k, v, out, lse, dlse, *, softmax_scale, window_left=-1, window_right=-1, softcap=0.0,
             sink=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, max_seqlen_q=None,
             max_seqlen_k=None, page_table=None, deterministic=False, tile=None):
    """(dq, dk, dv, dsink) per docs/INTERNALS.md on the Gluon kernel. tile: a BwdTile override (probe)."""
    reason = unsupported_reason(q, k, v, window_left=window_left, window_right=window_right, softcap=softcap,
                                sink=sink, cu_seqlens_q=cu_seqlens_q, page_table=page_table, seqused_k=seqused_k,
                                tile=tile, softmax_scale=softmax_scale)
    if reason is not None:
        raise ValueError(f"the sm90 backward cannot serve this call: {reason}")
    return backward_checked(dout, q, k, v, out, lse, dlse, softmax_scale=softmax_scale, window_left=window_left,
                            window_right=window_right, softcap=softcap, sink=sink, cu_seqlens_q=cu_seqlens_q,
                            cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k, max_seqlen_q=max_seqlen_q,
                            max_seqlen_k=max_seqlen_k, deterministic=deterministic, tile=tile)


def backward_checked(dout, q, k, v, out, lse, dlse, *, softmax_scale, window_left=-1, window_right=-1,
                     softcap=0.0, sink=None, cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None,
                     max_seqlen_q=None, max_seqlen_k=None, page_table=None, deterministic=False, tile=None):
    """`backward` for a caller that has just had unsupported_reason return None (dispatch.resolve_auto_backward)."""
    varlen = cu_seqlens_q is not None
    device = q.device
    split = gqa_split(q, k, v, window_left, window_right, tile, deterministic)
    if split > 1:
        # Each kv head's group split over `split` virtual kv heads (K and V repeated), their dK / dV summed in fp32.
        kr, vr = repeat_kv_heads(k, split), repeat_kv_heads(v, split)
        dq, dk, dv, dsink = backward_checked(
            dout, q, kr, vr, out, lse, dlse, softmax_scale=softmax_scale, window_left=window_left,
            window_right=window_right, softcap=softcap, sink=sink, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
            page_table=page_table, deterministic=deterministic, tile=tile)
        if tile is None and sink is None:  # the inner call's Replay, if it left one, serves this signature too
            from . import backward_fast
            backward_fast.remember_split(split, dout, q, k, v, kr, vr, out, lse, dlse, cu_seqlens_q, cu_seqlens_k,
                                         seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
                                         window_right, softcap, deterministic)
        return dq, sum_virtual_heads(dk, k), sum_virtual_heads(dv, v), dsink
    ready = _tma_ready(dout)
    # A call on the default tile whose dout and out the kernels take as they are can be replayed (backward_fast).
    replayable = tile is None and sink is None and ready is dout and out.stride(-1) == 1
    dout = ready
    out = out if out.stride(-1) == 1 else out.contiguous()
    d, dvh = q.shape[-1], v.shape[-1]
    if varlen:
        batch, seqlen_q = cu_seqlens_q.numel() - 1, int(max_seqlen_q)
        seqlen_k = int(max_seqlen_k)
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    # The calls whose fastest route is deterministic=True's chain take it (chain_by_default); `deterministic` itself
    # stays the caller's (the Replay's key).
    ordered = deterministic or (tile is None and chain_by_default(d, dvh, window_left, window_right, softcap,
                                                                  sink is not None, varlen, seqlen_q, softmax_scale,
                                                                  q.shape[-2] // k.shape[-2]))
    tile = tile or default_tile(configs.tile_dim(d), configs.tile_dim(dvh), window_left, softcap,
                                window_right=window_right, deterministic=ordered, varlen=varlen,
                                sink=sink is not None, softmax_scale=softmax_scale, seqlen_q=seqlen_q)
    # dK/dV rows outside every packed sequence, or past seqused_k, are never visited.
    alloc = torch.zeros if varlen or seqused_k is not None else torch.empty
    dk = alloc(k.shape, dtype=k.dtype, device=device)
    dv = alloc(v.shape, dtype=v.dtype, device=device)

    chain, ordered_dq, sink_in_main = dq_route(tile, ordered, window_left, sink, window_right, seqlen_q)

    # 1. Preprocess (portable kernel): Delta, lse2, sink partial sums.
    prep_sink = None if ordered_dq or sink_in_main else sink
    # Packed calls whose main kernel takes lse2 / Delta by TMA: the preprocess also writes aligned copies.
    stats_al = None
    if varlen and stats_tma_serves(tile, varlen):
        from ..triton.backward import aligned_length
        al = aligned_length(q.shape[0], batch)
        stats_al = tuple(torch.empty(q.shape[-2], al, dtype=torch.float32, device=device) for _ in range(2))
    # The main kernel's fp32 dQ accumulator (unless dQ comes from the ordered pass) and the persistent grid's tile
    # counter, zeroed: batched, by the preprocess kernel as it goes (no fill launches); packed, by fills. Where the
    # ascending chain's first link stores its shares nothing needs zeroing (the persistent grid's tile counter is
    # then the chain counters' first slot, zeroed with them).
    # Or, off the chain, key block 0 stores and the other key blocks' unordered adds wait for it (DQ_FIRST_STORE).
    first_only, store_first = dq_store_routes(tile, chain, ordered_dq, window_left, window_right, varlen, seqused_k,
                                              seqlen_q, seqlen_k)
    # The chain's last links write dQ itself (no cast after the kernel).
    dq_out = None
    if dq_cast_serves(tile, store_first, configs.tile_dim(d), window_right):
        dq_out = torch.empty(q.shape, dtype=q.dtype, device=device)
    tile_ctr = None
    persistent = persistent_tiles(tile)
    zero = None
    if ordered_dq:
        dq_acc = None
        if persistent:
            tile_ctr = torch.zeros(1, dtype=torch.int32, device=device)
    else:
        dq_acc, tile_ctr = dq_accumulator(q, varlen, persistent)
        zero = None if varlen or store_first else (dq_acc, tile_ctr)
    # The keys-as-rows kernel's statistics as K extensions (stats_ext_serves), filled by the preprocess too.
    ext = stats_ext_buffers(q, tile, varlen, batch, seqlen_q, softmax_scale, softcap)
    delta, lse2, dsink_part = preprocess(dout, out, lse, dlse, prep_sink, cu_seqlens_q, batch, seqlen_q,
                                         None if varlen else tile.block_m, aligned=stats_al, zero=zero, ext=ext)
    main_parts = None
    if sink_in_main:
        main_parts = torch.zeros(batch * q.shape[-2], triton.cdiv(seqlen_k, tile.block_n), tile.num_wg,
                                 dtype=torch.float32, device=device)

    # 2. Main kernel: dK, dV, and unless dQ comes from the ordered pass, dQ accumulated in fp32 by TMA
    # reduce-add (clipped at the tensor's bounds: no padding needed).
    opts = dict(softmax_scale=softmax_scale, window_left=window_left, window_right=window_right, softcap=softcap,
                cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k, tile_ctr=tile_ctr,
                max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, deterministic=ordered_dq,
                sink=sink if sink_in_main else None, dsink_part=main_parts, stats_al=stats_al,
                dq_store_first=store_first, stats_ext=None if ext is None else ext[0], dq_out=dq_out,
                dq_first_only=first_only,
                dq_chain=(dq_chain_counters(tile, batch, q.shape[-2], seqlen_q, device) if chain or first_only
                          else None))
    # The ordered dQ pass reads what the preprocess wrote and nothing the main kernel writes. Its buffers are
    # allocated and zeroed first; then a side stream forked here runs it beside the main kernel, filling the SMs
    # the main kernel's tail leaves idle. The caller's stream waits for it before anything reads dQ.
    side = None
    if ordered_dq:
        dq_pass, dq_finish = ordered_dq_pass(dout, q, k, v, lse2, delta, softmax_scale=softmax_scale,
                                             window_left=window_left, window_right=window_right, softcap=softcap,
                                             cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                             seqused_k=seqused_k, seqlen_q=seqlen_q, seqlen_k=seqlen_k, sink=sink,
                                             dlse=dlse)
        if CONCURRENT_DQ and device.type == "cuda":
            from ..triton import backward as tb
            side = tb.side_stream(device)  # None during a capture that would create it: in order
            if side is not None:
                side.wait_stream(torch.cuda.current_stream(device))
    launched = _launch_main(dout, q, k, v, dq_acc, dk, dv, lse2, delta, tile, **opts)
    if not launched:
        if not varlen:
            dk.zero_()
            dv.zero_()

    # 3. dQ: the fp32 accumulator cast (already scaled), or the portable dQ kernel's fixed key order.
    if ordered_dq:
        if side is None:
            dq_pass()
        else:
            caller = torch.cuda.current_stream(device)
            with torch.cuda.stream(side):
                dq_pass()
            caller.wait_stream(side)
        dq, dsink = dq_finish()
        return dq, dk, dv, dsink
    if sink_in_main:
        return dq_acc.to(q.dtype), dk, dv, sink_gradient_from_pdp(main_parts, sink, lse, dlse, batch)
    if replayable and isinstance(launched, launch.Plan):
        _remember_replay(dout, q, k, v, out, lse, dlse, delta, lse2, zero, stats_al, ext, tile, launched, batch,
                         seqlen_q,
                         None if opts["dq_chain"] is None else opts["dq_chain"].shape,
                         cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k,
                         max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale,
                         window_left=window_left, window_right=window_right, softcap=softcap,
                         deterministic=deterministic, dq_cast=dq_out is not None)
    dq = dq_out if dq_out is not None else dq_acc.to(q.dtype)
    return dq, dk, dv, sink_gradient(dsink_part, sink)


def _remember_replay(dout, q, k, v, out, lse, dlse, delta, lse2, zero, stats_al, ext, tile, plan, batch, seqlen_q,
                     chain_shape, *, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                     window_left, window_right, softcap, deterministic, dq_cast=False):
    """Keep a plain-route call's decisions and launches for the next call of its signature (backward_fast)."""
    from . import backward_fast
    varlen = cu_seqlens_q is not None
    head, tail, constexprs, grid = prep_arguments(dout, out, lse, dlse, None, cu_seqlens_q, batch, seqlen_q, delta,
                                                  lse2, aligned=stats_al, zero=zero, ext=ext)
    prep = launch.lookup(prep_key(q.device.index, head, tail, constexprs, grid))
    if prep is None or prep.compiled is None:
        return
    key = backward_fast.signature(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                                  max_seqlen_k, softmax_scale, window_left, window_right, softcap, deterministic)
    backward_fast.remember(key, backward_fast.Replay(
        tile, batch, seqlen_q, persistent_tiles(tile), prep, plan, chain_shape, varlen=varlen,
        zero_dkdv=varlen or seqused_k is not None, stats_al_shape=None if stats_al is None else stats_al[0].shape,
        stats_ext_shape=None if ext is None else ext[0].shape, dq_cast=dq_cast))


def dq_accumulator(q, varlen, persistent):
    """The main kernel's fp32 dQ accumulator and the persistent grid's int32 tile counter (None off that grid):
    batched, left for the preprocess to zero (preprocess's `zero`); packed, zeroed by fills (ZERO_DQ addresses rows
    as b·Sq + i, and rows outside every sequence must read 0 too)."""
    alloc = torch.zeros if varlen else torch.empty
    acc = alloc(q.shape, dtype=torch.float32, device=q.device)
    return acc, (alloc(4, dtype=torch.int32, device=q.device) if persistent else None)


# The main kernel's parameters filled per call, for its cached launch plans (launch.Plan).
BWD_DESCS = (("q_desc", "q"), ("k_desc", "k"), ("v_desc", "v"), ("do_desc", "dout"), ("dk_desc", "dk"),
             ("dv_desc", "dv"), ("dq_desc", "dq"), ("lse2_desc", "lse2_stats"), ("delta_desc", "delta_stats"))
# The keys-as-rows kernel's also: dQ itself (DQ_CAST; a placeholder otherwise).
BWD_KT_DESCS = BWD_DESCS + (("dqo_desc", "dq_out"), )
BWD_TENSORS = (("dk_ptr", "dk"), ("dv_ptr", "dv"), ("lse2_ptr", "lse2"), ("delta_ptr", "delta"),
               ("sink_ptr", "sink"), ("dsink_ptr", "dsink"), ("dq_ctr", "dq_chain"), ("cu_q", "cu_q"),
               ("cu_k", "cu_k"), ("seqused", "seqused"))


def plan_signature(dout, q, k, v, tile, *, softmax_scale, window_left, window_right, softcap, cu_seqlens_q,
                   cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, deterministic, sink=None, dsink_part=None,
                   dq_chain=None, stats_al=None, tile_ctr=None, dq_store_first=False, stats_ext=None, dq_out=None,
                   dq_first_only=False):
    """Everything besides the tensors' addresses that decides the main kernel's arguments and specialisation.
    dK, dV, the dQ accumulator, lse2 and Delta are allocated by backward_checked: their shapes and strides follow
    from q, k, v; q, k, v and dout are 16-byte aligned (unsupported_reason, _tma_ready)."""
    return ("bwd", q.device.index, q.dtype, tuple(q.shape), q.stride(), tuple(k.shape), k.stride(), tuple(v.shape),
            v.stride(), tuple(dout.shape), dout.stride(), float(softmax_scale), int(window_left),
            int(window_right), float(softcap),
            None if cu_seqlens_q is None else (cu_seqlens_q.numel(), int(max_seqlen_q), int(max_seqlen_k)),
            launch._aligned(cu_seqlens_q), launch._aligned(cu_seqlens_k), launch._aligned(seqused_k),
            bool(deterministic), tile, None if dsink_part is None else launch._aligned(sink),
            dq_chain is not None, stats_tma_serves(tile, cu_seqlens_q is not None),
            None if stats_al is None else stats_al[0].shape, CTA_CHUNK, CTA_CHUNK_BYTES, persistent_tiles(tile),
            DQ_RELEASE_LAG, bool(dq_store_first), DQ_SPREAD, stats_ext is not None, STATS_EXT, dq_out is not None,
            CHAIN_FENCE, bool(dq_first_only))


def _dq_placeholder(tile, d, varlen, device):
    """Deterministic mode: dQ comes from another kernel; the main kernel's dQ descriptor needs some tensor."""
    return torch.empty((tile.block_m, 1, d) if varlen else (1, tile.block_m, 1, d), dtype=torch.float32,
                       device=device)


def kernel_for(tile):
    """The main kernel a tile runs on: attn_bwd_kernel, or backward_d256.attn_bwd_d256_kernel (same parameters)."""
    if tile.d256:
        from .backward_d256 import attn_bwd_d256_kernel
        return attn_bwd_d256_kernel
    if tile.keys_as_rows:
        from .backward_kt import attn_bwd_kt_kernel
        return attn_bwd_kt_kernel
    return attn_bwd_kernel


def _dq_out_tensor(dq_out, tile, q, varlen):
    """The tensor behind a keys-as-rows launch's dQ descriptor: dQ itself (DQ_CAST), else the placeholder."""
    if dq_out is not None or not tile.keys_as_rows:
        return dq_out
    return _dq_out_placeholder(tile, configs.tile_dim(q.shape[-1]), q.dtype, varlen, q.device)


def _launch_main(dout, q, k, v, dq_acc, dk, dv, lse2, delta, tile, **opts):
    """Launch the main kernel: False when its grid is empty, else the launch.Plan it went through or kept (True when
    none). Through the cached plan of an earlier call with the same signature (the tile is part of it), else
    through JITFunction, keeping a plan."""
    varlen = opts["cu_seqlens_q"] is not None
    fast = launch.enabled(None) and launch.usable() and q.device.index == current_device() and not tile.trace
    key = None
    if fast:
        key = plan_signature(dout, q, k, v, tile, **opts)
        plan = launch.lookup(key)
        if plan is not None:
            dummy = _dummy_i32(q.device)
            dq = dq_acc if dq_acc is not None else _dq_placeholder(tile, configs.tile_dim(q.shape[-1]), varlen,
                                                                  q.device)
            cu_q, cu_k, used = opts["cu_seqlens_q"], opts["cu_seqlens_k"], opts["seqused_k"]
            # Without the sink partials both sink slots hold lse2 (as launch_plan puts them).
            parts = opts["dsink_part"]
            _, lse2_src, delta_src = _stats_sources(tile, varlen, lse2, delta, opts["stats_al"], q.device)
            if opts.get("stats_ext") is not None:
                lse2_src = delta_src = opts["stats_ext"]
            plan.launch_tensors(q.device.index, dict(
                q=q, k=k, v=v, dout=dout, dk=dk, dv=dv, dq=dq, lse2=lse2, delta=delta,
                lse2_stats=lse2_src, delta_stats=delta_src,
                sink=opts["sink"] if parts is not None else lse2, dsink=parts if parts is not None else lse2,
                dq_chain=next(c for c in (opts["dq_chain"], opts.get("tile_ctr"), dummy) if c is not None),
                cu_q=cu_q if cu_q is not None else dummy, cu_k=cu_k if cu_k is not None else dummy,
                seqused=used if used is not None else dummy, dq_out=_dq_out_tensor(opts.get("dq_out"), tile, q,
                                                                                   varlen)))
            return plan
    grid, args, constexprs = launch_plan(dout, q, k, v, dq_acc, dk, dv, lse2, delta, tile=tile, **opts)
    if not all(g > 0 for g in grid):
        return False
    kernel = kernel_for(tile)
    with torch.cuda.device(q.device):  # Triton launches on the current device
        compiled = kernel[grid](**args, **constexprs, num_warps=4)
    if fast and compiled is not None and hasattr(compiled, "packed_metadata"):
        plan = launch.Plan(kernel.arg_names, args, constexprs, grid, compiled,
                           descs=BWD_KT_DESCS if tile.keys_as_rows else BWD_DESCS, tensors=BWD_TENSORS)
        launch.store(key, plan)
        return plan
    return True


def preprocess(dout, out, lse, dlse, sink, cu_seqlens_q, batch, seqlen_q, pad_to, aligned=None, zero=None,
               ext=None):
    """(Delta, lse2, sink partial sums) by the portable preprocess kernel, in lse's layout.

    pad_to (batched only): the query length is padded to a multiple of it, with lse2 = +inf and Delta = 0,
    so that P and dS of the padding are exactly 0 and the main kernel loads both without masks.
    aligned (packed only): (lse2, delta) buffers (Hq, aligned_length), which also receive the rows at each
    sequence's aligned start (the main kernel's TMA loads, STATS_TMA).
    zero (batched): (dQ accumulator, tile counter or None) zeroed by the same kernel (prep_arguments).
    ext (batched): the statistics' K extensions to fill as well (prep_arguments)."""
    device, hq = out.device, out.shape[-2]
    delta, lse2 = stats_buffers(lse, batch, hq, seqlen_q, pad_to)
    head, tail, constexprs, grid = prep_arguments(dout, out, lse, dlse, sink, cu_seqlens_q, batch, seqlen_q, delta,
                                                  lse2, aligned, zero, ext)
    dsink_part = head[7]
    index = device.index
    if not (device.type == "cuda" and launch.enabled(None) and hooks_idle() and index == current_device()):
        from ..triton import backward as tb
        tb._bwd_preprocess[grid](*head, *tail, **constexprs, num_warps=4, num_stages=1)
        return delta, lse2, dsink_part
    # A direct launch once this signature has compiled: everything Triton specialises on is in the key (the
    # tail's values, the pointers' dtypes and 16-byte alignment); JITFunction's binding would cost more host
    # time than the kernel takes.
    key = prep_key(index, head, tail, constexprs, grid)
    prep = launch.lookup(key)  # a direct_launch.Launch, kept beside the main kernel's plans
    if prep is None or prep.compiled is None:
        from ..triton import backward as tb
        prep = Launch(tb._bwd_preprocess, len(head), grid, tail, constexprs, 4, 1)
        with torch.cuda.device(device):
            prep.jit(head, keep=True)
        launch.store(key, prep)
    else:
        prep.fast([x.data_ptr() for x in head], raw_stream(index))
    return delta, lse2, dsink_part


def prep_key(index, head, tail, constexprs, grid):
    """The preprocess's cached Launch's key: everything Triton specialises on (the tail's values, the pointers' dtypes
    and 16-byte alignment) and the grid."""
    return ("prep", index, grid, tail, tuple(constexprs.values()), tuple(x.dtype for x in head),
            tuple(x.data_ptr() % 16 == 0 for x in head))


def stats_buffers(lse, batch, hq, seqlen_q, pad_to):
    """(Delta, lse2) for the preprocess to fill: lse's shape, or batched (B, Hq, Sq padded to pad_to) with the
    padding rows at Delta = 0, lse2 = +inf."""
    device = lse.device
    if pad_to is None:
        return (torch.empty(lse.shape, dtype=torch.float32, device=device),
                torch.empty(lse.shape, dtype=torch.float32, device=device))
    if seqlen_q % pad_to == 0:  # no padding rows: the kernel writes every row (two fill launches saved)
        return (torch.empty((batch, hq, seqlen_q), dtype=torch.float32, device=device),
                torch.empty((batch, hq, seqlen_q), dtype=torch.float32, device=device))
    padded = (batch, hq, triton.cdiv(seqlen_q, pad_to) * pad_to)
    return (torch.zeros(padded, dtype=torch.float32, device=device),
            torch.full(padded, float("inf"), dtype=torch.float32, device=device))


def prep_arguments(dout, out, lse, dlse, sink, cu_seqlens_q, batch, seqlen_q, delta, lse2, aligned=None, zero=None,
                   ext=None):
    """(head, tail, constexprs, grid) of the preprocess kernel: head its 14 tensor arguments (unused slots hold
    lse or delta; head[7] is the sink partials' buffer, allocated here when there is a sink), tail its ints.
    zero (batched): (fp32 dQ accumulator, the persistent grid's int32 tile counter or None) for the kernel to zero.
    ext (batched): (extension, −1 / scale2) as stats_ext_buffers makes it, the (B, Hq, padded Sq, 16) 16-bit K
    extension of lse2 and Delta for the keys-as-rows kernel (stats_ext_serves), written by the same kernel over every
    padded row."""
    from ..triton import backward as tb
    varlen = cu_seqlens_q is not None
    device, hq, dvh = out.device, out.shape[-2], out.shape[-1]
    dv_pad = max(triton.next_power_of_2(dvh), 16)
    prep_m = 64 if dv_pad <= 128 else 32
    ext_rows = ext[0].shape[-2] if ext is not None else 0
    n_prep = triton.cdiv(max(seqlen_q, ext_rows), prep_m)
    dsink_part = (torch.zeros(batch, hq, n_prep, dtype=torch.float32, device=device) if sink is not None
                  else delta)
    lse2_al, delta_al = aligned if aligned is not None else (lse2, delta)
    dq_acc, counter = zero if zero is not None else (None, None)
    head = (out, dout, lse, dlse if dlse is not None else lse, sink if sink is not None else lse,
            delta, lse2, dsink_part, cu_seqlens_q if varlen else lse, delta_al, lse2_al,
            dq_acc if dq_acc is not None else delta, counter if counter is not None else delta,
            ext[0] if ext is not None else lse2)
    dq_width = dq_acc.shape[-1] if dq_acc is not None else 0
    tail = (*tb._bsh_strides(out, varlen), *tb._bsh_strides(dout, varlen), *tb._lse_strides(lse, varlen),
            *(tb._lse_strides(dlse, varlen) if dlse is not None else (0, 0, 0)),
            *tb._lse_strides(delta, varlen)[:2], delta_al.stride(0) if aligned is not None else 0, seqlen_q, hq, dvh,
            dq_width, ext_rows, float(ext[1]) if ext is not None else 1.0)
    constexprs = dict(VARLEN_Q=varlen, HAS_DLSE=dlse is not None, HAS_SINK=sink is not None, BLOCK_M=prep_m,
                      BLOCK_DV=dv_pad, ALIGNED_COPY=aligned is not None, ZERO_DQ=dq_acc is not None,
                      BLOCK_DQ=max(triton.next_power_of_2(dq_width), 16), ZERO_COUNTER=counter is not None,
                      STATS_EXT=ext is not None, EXT_DELTA_COL=STATS_EXT_DELTA_COL)
    return head, tail, constexprs, (batch * hq, n_prep)


def sink_gradient_from_pdp(parts, sink, lse, dlse, batch):
    """dsink from the main kernel's partials (tile.sink_pdp): parts (batch · Hq, key blocks, consumers) hold
    Σ_i exp(sink_h − lse_i)·Σ_j P_ij dP_ij, and −dsink_h = that − Σ_i exp(sink_h − lse_i)·dlse_i (with a sink
    every row's lse is finite). fp64 for the last reductions."""
    dsink = parts.view(batch, sink.numel(), -1).double().sum(dim=(0, 2))
    if dlse is not None:
        heads_first = lse.dim() == 2  # varlen lse: (Hq, tokens); batched: (B, Hq, Sq)
        s = sink.double().view(-1, 1) if heads_first else sink.double().view(1, -1, 1)
        dsink = dsink - (torch.exp(s - lse.double()) * dlse.double()).sum(dim=1 if heads_first else (0, 2))
    return (-dsink).float()


def sink_gradient(dsink_part, sink):
    """dsink_h = −Σ_{b,i} exp(sink_h − lse_i) Delta_i from the preprocess's per-block partial sums (fp64 for
    the last reduction: the partials may cancel)."""
    if sink is None:
        return None
    return -dsink_part.double().sum(dim=(0, 2)).float()


def deterministic_dq(dout, q, k, v, lse2, delta, *, softmax_scale, window_left, window_right, softcap,
                     cu_seqlens_q, cu_seqlens_k, seqused_k, seqlen_q, seqlen_k, sink=None, dlse=None):
    """dQ by the portable kernel: one program per query block, keys in a fixed order (bitwise repeatable).
    Returns (dq, dsink): with a sink the same kernel gives its gradient (from Σ_j P·dP, not from O)."""
    dq_pass, finish = ordered_dq_pass(dout, q, k, v, lse2, delta, softmax_scale=softmax_scale,
                                      window_left=window_left, window_right=window_right, softcap=softcap,
                                      cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k,
                                      seqlen_q=seqlen_q, seqlen_k=seqlen_k, sink=sink, dlse=dlse)
    dq_pass()
    return finish()


def ordered_dq_pass(dout, q, k, v, lse2, delta, *, softmax_scale, window_left, window_right, softcap,
                    cu_seqlens_q, cu_seqlens_k, seqused_k, seqlen_q, seqlen_k, sink=None, dlse=None):
    """deterministic_dq in two steps: its outputs allocated (and zeroed where needed) now, on the current stream;
    returns (launch, finish), where launch() runs the kernel on whatever stream is current then, and finish()
    gives (dq, dsink) once that work is ordered before the caller's next (backward_checked runs the launch on a
    side stream forked after this call, so the side stream sees the zeroed buffers)."""
    from ..triton import backward as tb
    d_pad = max(triton.next_power_of_2(q.shape[-1]), 16)
    dv_pad = max(triton.next_power_of_2(v.shape[-1]), 16)
    cfg = tb.default_config(q, max(d_pad, dv_pad))
    dq = (torch.zeros if cu_seqlens_q is not None else torch.empty)(q.shape, dtype=q.dtype, device=q.device)
    batch, hq = (cu_seqlens_q.numel() - 1 if cu_seqlens_q is not None else q.shape[0]), q.shape[-2]
    parts = (torch.zeros(batch * hq, triton.cdiv(seqlen_q, cfg.block_m2), dtype=torch.float32, device=q.device)
             if sink is not None else None)
    dq_pass = tb.dq_launch(dout, q, k, v, dq, lse2, delta, cfg, softmax_scale=softmax_scale,
                           window_left=window_left, window_right=window_right, softcap=softcap,
                           cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k,
                           seqlen_q=seqlen_q, seqlen_k=seqlen_k, sink=sink, dlse=dlse, dsink_part=parts)

    def finish():
        dsink = None if parts is None else -parts.double().sum(dim=1).view(batch, hq).sum(dim=0).float()
        return dq, dsink
    return dq_pass, finish
