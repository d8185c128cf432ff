"""Attention forward for Hopper (sm_90a) in Gluon: the kernel, its partitions, and the host wrapper.

One persistent CTA per SM takes work units round robin: a unit is one query tile, or for causal/windowed
problems two tiles of one (sequence, head) whose costs add up to the same for every unit (see SCHED_PAIRED).
Inside a CTA:

  loader (1 warp, few registers)   TMA: Q tile, then K_j and V_j for the tile's key blocks, last first,
                                   into a ring of STAGES shared-memory slots guarded by mbarriers.
  consumer warpgroups (NWG x 4 warps, 64 query rows each, the registers the loader gave up)
        S_j  = Q·K_jᵀ               async wgmma, Q and K from shared memory
        O   += P_{j-1}·V_{j-1}      async wgmma, P from registers; issued together with S_j (intra-warpgroup
                                    overlap: the softmax of block j runs while P_{j-1}·V_{j-1} is in flight)
        softmax(S_j) -> P_j, alpha_j, O *= alpha_j
    With PINGPONG the consumers take turns issuing their matrix products (one mbarrier per warpgroup), so
    one warpgroup's softmax runs under the other's wgmma.
  epilogue  O / l, lse = (m + log2 l)·ln 2; O through shared memory and a TMA store.

Key blocks are walked from the last to the first, so the blocks that need masking (the sequence end, the
causal diagonal) come first and the rest run unmasked (STAGGER, a probe variant, rotates the walk per CTA).

Barrier protocol (every barrier's phase parity is tracked by a counter in each partition):
  q_ready   (1 arrival + tx)     loader -> consumers: the tile's Q is in shared memory
  q_empty   (NWG arrivals)       consumers -> loader: done with Q (after the key loop, right after the last
                                 QKᵀ with TAIL, or after the O store when O is staged in Q's buffer)
            One pair per Q buffer (QBUF, 1 or 2); tile t uses buffer t % QBUF.
  k_ready/v_ready[s] (1 + tx)    loader -> consumers
  k_empty/v_empty[s] (NWG)       consumers -> loader, after the wgmma reading the slot has completed
  turn[w]   (1 arrival)          consumer w-1 -> consumer w: "your turn to issue"; consumer 0 starts.
Every consumer walks the same tiles and key blocks (the key range is the CTA's, not the warpgroup's), so the
turn counts match and no partition waits for an arrival that never comes.
"""
import os

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.core import _aggregate as aggregate

from fa4.kernels.direct_launch import current_device

from . import configs, handout, launch, packed_order
from .handout import TileHandout
from .softmax import online_softmax, rescale_o, tanh_approx

LOG2E = 1.4426950408889634
LN2 = gl.constexpr(0.6931471805599453)
LOG2E_C = gl.constexpr(LOG2E)
WG_ROWS = 64  # one m64 wgmma slab per consumer warpgroup
ROWS_PER_WG = gl.constexpr(WG_ROWS)


@aggregate
class Problem:
    """What every partition needs to walk the same tiles: descriptors, pointers, sizes and switches."""
    q_desc: tma.tensor_descriptor
    k_desc: tma.tensor_descriptor
    v_desc: tma.tensor_descriptor
    o_desc: tma.tensor_descriptor
    o_ptr: gl.tensor
    lse_ptr: gl.tensor
    sink_ptr: gl.tensor
    cu_q: gl.tensor
    cu_k: gl.tensor
    seqused: gl.tensor
    stride_ot: gl.tensor
    stride_oh: gl.tensor
    dv: gl.tensor
    seqlen_q: gl.tensor
    seqlen_k: gl.tensor
    num_heads: gl.tensor
    group: gl.tensor
    num_m: gl.tensor
    num_units: gl.tensor
    units_per_head: gl.tensor             # SCHED_LPT: the (sequence, head) pairs of an L2 section instead
    lse_len: gl.tensor
    qk_scale: gl.tensor
    cap_scale: gl.tensor
    window_left: gl.tensor
    window_right: gl.tensor
    trace_ptr: gl.tensor
    trace_tiles: gl.tensor
    BN: gl.constexpr
    NWG: gl.constexpr
    STAGES: gl.constexpr
    VARLEN: gl.constexpr
    HAS_SEQUSED: gl.constexpr
    HAS_WL: gl.constexpr
    HAS_WR: gl.constexpr
    SOFTCAP: gl.constexpr
    HAS_SINK: gl.constexpr
    LAZY: gl.constexpr
    POLY: gl.constexpr
    PINGPONG: gl.constexpr
    O_ALIAS: gl.constexpr
    SCHED: gl.constexpr
    STAGGER: gl.constexpr
    BIG_O: gl.constexpr
    QBUF: gl.constexpr
    TAIL: gl.constexpr
    TRACE: gl.constexpr
    MASK2D: gl.constexpr
    CONVERGE: gl.constexpr
    O_HALVES: gl.constexpr
    PACK: gl.constexpr
    PAGE_SIZE: gl.constexpr
    sched: gl.tensor
    DYNAMIC: gl.constexpr

    @gluon.constexpr_function
    def __init__(self, q_desc, k_desc, v_desc, o_desc, o_ptr, lse_ptr, sink_ptr, cu_q, cu_k, seqused,
                 stride_ot, stride_oh, dv, seqlen_q, seqlen_k, num_heads, group, num_m, num_units, units_per_head,
                 lse_len, qk_scale, cap_scale, window_left, window_right, trace_ptr, trace_tiles, BN, NWG, STAGES,
                 VARLEN, HAS_SEQUSED, HAS_WL, HAS_WR, SOFTCAP, HAS_SINK, LAZY, POLY, PINGPONG, O_ALIAS, SCHED,
                 STAGGER, BIG_O, QBUF, TAIL, TRACE, MASK2D, CONVERGE, O_HALVES, PACK, PAGE_SIZE, sched,
                 DYNAMIC):
        self.q_desc = q_desc
        self.k_desc = k_desc
        self.v_desc = v_desc
        self.o_desc = o_desc
        self.o_ptr = o_ptr
        self.lse_ptr = lse_ptr
        self.sink_ptr = sink_ptr
        self.cu_q = cu_q
        self.cu_k = cu_k
        self.seqused = seqused
        self.stride_ot = stride_ot
        self.stride_oh = stride_oh
        self.dv = dv
        self.seqlen_q = seqlen_q
        self.seqlen_k = seqlen_k
        self.num_heads = num_heads
        self.group = group
        self.num_m = num_m
        self.num_units = num_units
        self.units_per_head = units_per_head
        self.lse_len = lse_len
        self.qk_scale = qk_scale
        self.cap_scale = cap_scale
        self.window_left = window_left
        self.window_right = window_right
        self.trace_ptr = trace_ptr
        self.trace_tiles = trace_tiles
        self.BN = gl.constexpr(BN)
        self.NWG = gl.constexpr(NWG)
        self.STAGES = gl.constexpr(STAGES)
        self.VARLEN = gl.constexpr(VARLEN)
        self.HAS_SEQUSED = gl.constexpr(HAS_SEQUSED)
        self.HAS_WL = gl.constexpr(HAS_WL)
        self.HAS_WR = gl.constexpr(HAS_WR)
        self.SOFTCAP = gl.constexpr(SOFTCAP)
        self.HAS_SINK = gl.constexpr(HAS_SINK)
        self.LAZY = gl.constexpr(LAZY)
        self.POLY = gl.constexpr(POLY)
        self.PINGPONG = gl.constexpr(PINGPONG)
        self.O_ALIAS = gl.constexpr(O_ALIAS)
        self.SCHED = gl.constexpr(SCHED)
        self.STAGGER = gl.constexpr(STAGGER)
        self.BIG_O = gl.constexpr(BIG_O)
        self.QBUF = gl.constexpr(QBUF)
        self.TAIL = gl.constexpr(TAIL)
        self.TRACE = gl.constexpr(TRACE)
        self.MASK2D = gl.constexpr(MASK2D)
        self.CONVERGE = gl.constexpr(CONVERGE)
        self.O_HALVES = gl.constexpr(O_HALVES)
        self.PACK = gl.constexpr(PACK)
        self.PAGE_SIZE = gl.constexpr(PAGE_SIZE)
        self.sched = sched
        self.DYNAMIC = gl.constexpr(DYNAMIC)


@aggregate
class Buffers:
    """Shared-memory tiles and the mbarriers that hand them between partitions."""
    q: gl.shared_memory_descriptor        # [QBUF * NWG, *q block]: buffer b of warpgroup w at b * NWG + w
    k: gl.shared_memory_descriptor        # [STAGES, *k block]
    v: gl.shared_memory_descriptor        # [STAGES, *v block]
    o: gl.shared_memory_descriptor        # [NWG, *o block] (Q's buffer when O_ALIAS)
    q_ready: gl.shared_memory_descriptor  # [QBUF, 1]
    q_empty: gl.shared_memory_descriptor
    k_ready: gl.shared_memory_descriptor  # [STAGES, 1]
    k_empty: gl.shared_memory_descriptor
    v_ready: gl.shared_memory_descriptor
    v_empty: gl.shared_memory_descriptor
    turn: gl.shared_memory_descriptor     # [NWG, 1]
    units: TileHandout                    # DYNAMIC: the handout ring (handout.py; else placeholders)

    @gluon.constexpr_function
    def __init__(self, q, k, v, o, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn, units):
        self.q = q
        self.k = k
        self.v = v
        self.o = o
        self.q_ready = q_ready
        self.q_empty = q_empty
        self.k_ready = k_ready
        self.k_empty = k_empty
        self.v_ready = v_ready
        self.v_empty = v_empty
        self.turn = turn
        self.units = units


# ---------------------------------------------------------------------------------------------------------
# Tile bookkeeping, computed identically by the loader and every consumer.
# ---------------------------------------------------------------------------------------------------------

# Work order (SCHED). A persistent CTA takes work units pid, pid + nprog, ... (static round robin), so the
# balance depends on every CTA's units summing to about the same number of key blocks:
#   SCHED_FLAT (0)     one unit = one query tile, (sequence, head)-major, query blocks ascending. Every tile
#                      of a non-windowed problem costs the same, and consecutive units share K/V in L2.
#   SCHED_REVERSED (1) the same with query blocks descending (the first causal schedule; kept for the probe).
#                      Causal tiles cost mb + 1 blocks: the units of a CTA land on a fixed residue of mb
#                      (nprog mod num_m), so some CTAs draw only long tiles (makespan up to 1.8x the mean).
#   SCHED_PAIRED (2)   one unit = query blocks u and n_m - 1 - u of one (sequence, head), the long one first.
#                      Causal costs (u + 1) + (n_m - u) = n_m + 1: every unit costs the same, so round robin is
#                      balanced up to the last partial round, and the CTAs that run together stay on one or two
#                      heads and walk the same key blocks within a few blocks of each other (L2 reuse).
# DYNAMIC (packed calls of unequal lengths, see dynamic_units): the units are handed out from a global counter
# (the loader draws one, the consumers read it from shared memory), packed sequences longest first (sched[1 + i]
# is the one with the i-th most keys, packed_order.py), so a CTA that drew short units takes the next one while
# another still walks a long one. For packed batches of mixed lengths, where a paired unit's cost is its
# sequence's length and the static stride hands some CTAs one more of the longest sequence's units than others
# (benchmarks/NOTES.md, sessions 19-20).
#   SCHED_LPT (3)      batched calls, with DYNAMIC: one unit = one query tile, longest first over the whole
#                      problem (longest-processing-time-first list scheduling: the last units drawn are the
#                      shortest, so no CTA starts a long tile while the others run dry), in L2 sections: the
#                      (sequence, head) pairs are cut into sections of `units_per_head` pairs whose K/V fit in
#                      L2 together, and within a section units go query block (cost) major, head minor, so
#                      the CTAs at work share a few heads' keys. Built (a probe) to remove the paired units' last
#                      partial round (3-5% at 16k causal, session 9's traces); measured 3-10% slower at S <= 4096
#                      and no consistent gain at 8k / 16k (benchmarks/NOTES.md, session 20), so never the default.
SCHED_FLAT = gl.constexpr(0)
SCHED_REVERSED = gl.constexpr(1)
SCHED_PAIRED = gl.constexpr(2)
SCHED_LPT = gl.constexpr(3)
SCHED_NAMES = {"flat": 0, "reversed": 1, "paired": 2, "lpt": 3}


@gluon.jit
def _work(p, t, sub):
    """Query block `sub` (0 or 1) of unit t -> (b, h, seq_q, seq_k, q_start, k_start, mb, count), `count`
    (0, 1 or 2) being the unit's number of query blocks. Called for sub = 0 and 1 at the unit's start
    (all but mb is common, so the second call costs only its last lines)."""
    TBM: gl.constexpr = ROWS_PER_WG * p.NWG // p.PACK  # query tokens a tile
    # Units per (sequence, head) comes from the host: arithmetic on kernel arguments here would be hoisted
    # above the partitions by LLVM and spilled around the register reallocation (see _cta_id).
    if p.SCHED == SCHED_LPT:
        # Section `sec` holds pairs [bh0, bh0 + width); within it, unit r is query block rank r // width of
        # pair bh0 + r % width (units_per_head: the section's pair count here).
        per_section = p.units_per_head * p.num_m
        sec = t // per_section
        bh0 = sec * p.units_per_head
        width = gl.minimum(p.units_per_head, p.num_units // p.num_m - bh0)
        r = t - sec * per_section
        u = r // width
        bh = bh0 + (r - u * width)
    else:
        bh = t // p.units_per_head
        u = t - bh * p.units_per_head
    b = bh // p.num_heads
    h = bh - b * p.num_heads
    if p.DYNAMIC and p.VARLEN:
        b = gl.load(p.sched + 1 + b)  # the b-th longest sequence
    if p.VARLEN:
        q_start = gl.load(p.cu_q + b)
        seq_q = gl.load(p.cu_q + b + 1) - q_start
        if p.PAGE_SIZE > 0:
            # Paged keys (a paged prefill): addressed block by block through the page table (_kv_coord), the
            # key count from seqused_k (the host requires it on this path).
            k_start = 0
            seq_k = gl.load(p.seqused + b)
        else:
            k_start = gl.load(p.cu_k + b)
            if p.HAS_SEQUSED:
                seq_k = gl.load(p.seqused + b)
            else:
                seq_k = gl.load(p.cu_k + b + 1) - k_start
        n_m = (seq_q + TBM - 1) // TBM  # this sequence's own query blocks (num_m is the longest's)
    else:
        q_start = 0
        k_start = 0
        seq_q = p.seqlen_q
        if p.HAS_SEQUSED:
            seq_k = gl.load(p.seqused + b)
        else:
            seq_k = p.seqlen_k
        n_m = p.num_m
    if p.SCHED == SCHED_PAIRED:
        mirror = n_m - 1 - u
        # Two blocks while u < mirror, the middle one alone when they meet, none past it.
        count = (u < mirror).to(gl.int32) + (u <= mirror).to(gl.int32)
        if p.HAS_WR:
            # Bounded on the right (causal): later query blocks see more keys.
            first = mirror
            second = u
        else:
            # Bounded on the left only: earlier query blocks see more keys.
            first = u
            second = mirror
    else:
        if p.SCHED == SCHED_REVERSED:
            first = n_m - 1 - u
        elif p.SCHED == SCHED_LPT:
            # Rank u in cost: bounded on the right (causal) the last query blocks see the most keys.
            if p.HAS_WR:
                first = n_m - 1 - u
            else:
                first = u
        else:
            first = u
        second = first
        count = (u < n_m).to(gl.int32)
    return b, h, seq_q, seq_k, q_start, k_start, first + (second - first) * sub, count


@gluon.jit
def _kv_range(p, m0, seq_q, seq_k):
    """Key blocks [n_lo, n_hi) visible to the query tokens [m0, m0 + BM / PACK) of a tile."""
    TBM: gl.constexpr = ROWS_PER_WG * p.NWG // p.PACK
    # Visible keys of row i: j <= i + off + wr and j >= i + off - wl (bottom-right aligned).
    off = seq_k - seq_q
    last = gl.minimum(m0 + TBM, seq_q) - 1
    hi = seq_k
    if p.HAS_WR:
        hi = gl.minimum(hi, last + off + p.window_right + 1)
    lo = 0
    if p.HAS_WL:
        lo = gl.maximum(m0 + off - p.window_left, 0)
    n_hi = (gl.maximum(hi, 0) + p.BN - 1) // p.BN
    n_lo = lo // p.BN
    return n_lo, n_hi


@gluon.jit
def _rotation(p, pid, n_lo, n_hi):
    """Where this CTA starts its walk over the tile's key blocks (STAGGER), else 0.

    Without it every CTA of a head reads the same K/V block at the same moment (all start at the last
    block); rotating the start by the CTA index spreads those reads over different blocks. Any order is
    exact: masking is decided per block, and the online softmax does not depend on the order."""
    if p.STAGGER:
        return pid % gl.maximum(n_hi - n_lo, 1)
    else:
        return 0


@gluon.jit
def _block(p, it, rot, n_lo, n_hi, sub):
    """Key block of step `it` of the walk over query block `sub` of a unit: the last block first, then
    downwards (rotated by `rot`).

    CONVERGE (under a right window only, where every block is tested for its mask, so any order is exact):
    the unit's first query block walks upwards from n_lo and its second downwards. The paired units of a
    head start together (CTA i takes unit i), so their first blocks read key block 0, 1, 2, ... in step;
    a unit's second (shorter) block starts when its first ends, at step n_m - u for unit u, and walking
    down from its own diagonal it reads key block n_m - step like every other unit in that phase. A head's
    CTAs then read one or two K/V blocks at a time, as the non-causal walk does, instead of each its own
    (the descending walk of the long block starts at a different diagonal in every CTA). On by default under
    a right window: +1-4% on every D = 128 causal row of three H100 probe runs (D = 256 -1 to +7%, D = 64 -2 to
    +8%), though the trace's cost per key block did not move, so L2 locality is not why (benchmarks/NOTES.md,
    session 9); the first block of a tile is then a visible one, not the diagonal."""
    if p.CONVERGE and p.HAS_WR:
        return gl.where(sub == 0, n_lo + it, n_hi - 1 - it)
    elif p.STAGGER:
        k = it + rot
        k = gl.where(k >= n_hi - n_lo, k - (n_hi - n_lo), k)
        return n_hi - 1 - k
    else:
        return n_hi - 1 - it


@gluon.jit
def _cta_id():
    # Read %ctaid in each partition (an opaque asm, not the shared program_id value): LLVM would hoist a
    # common read into the kernel prologue, and keeping it live across the partitions' register
    # reallocation spills it in the 24-register loader.
    return gl.inline_asm_elementwise("mov.u32 $0, %ctaid.x;", "=r,r", [gl.to_tensor(0)], dtype=gl.int32,
                                     is_pure=False, pack=1)


@gluon.jit
def _num_ctas():
    # Same reason as _cta_id: gl.num_programs would be hoisted above the partitions, and a loop step kept
    # live through a partition's whole loop was spilled (ptxas reads %nctaid from the constant bank at each
    # use instead).
    return gl.inline_asm_elementwise("mov.u32 $0, %nctaid.x;", "=r,r", [gl.to_tensor(0)], dtype=gl.int32,
                                     is_pure=False, pack=1)


@gluon.jit
def _next_slot(idx, phase, STAGES: gl.constexpr):
    nxt = idx + 1
    wrap = nxt == STAGES
    return gl.where(wrap, 0, nxt), gl.where(wrap, phase ^ 1, phase)


@gluon.jit
def _opaque(x):
    # An int32 the compiler cannot see through (a non-pure move): blocks common-subexpression elimination
    # and hoisting of what is computed from it.
    return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _slot(count, STAGES: gl.constexpr):
    """Ring slot and phase parity of the count-th K/V block (a consumer carries one counter, not four)."""
    return count % STAGES, (count // STAGES) & 1


@gluon.jit
def _q_slot(p, tcount):
    """Q buffer and phase parity of the tcount-th tile: with two buffers tile t uses buffer t % 2, whose
    k-th use (k = t // 2) completes phase k."""
    if p.QBUF == 2:
        return tcount & 1, (tcount >> 1) & 1
    else:
        return 0, tcount & 1


# Trace (TRACE, probe only): consumer warpgroup 0 of each CTA writes int64 time stamps to trace_ptr, per CTA
# TRACE_HDR + TRACE_EV * trace_tiles slots: the header (globaltimer ns at start and end, %clock64 at start and
# end), then per tile: clock at the tile start, after Q arrived, after the first S, before the epilogue,
# after the epilogue (O store issued), and the tile's number of key blocks. benchmarks/sm90_probe.py reads it.
TRACE_HDR = 4
TRACE_EV = 6
TRACE_HDR_C = gl.constexpr(TRACE_HDR)
TRACE_EV_C = gl.constexpr(TRACE_EV)


@gluon.jit
def _clock():
    return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [gl.to_tensor(0)], dtype=gl.int64,
                                     is_pure=False, pack=1)


@gluon.jit
def _gtimer():
    return gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [gl.to_tensor(0)], dtype=gl.int64,
                                     is_pure=False, pack=1)


@gluon.jit
def _trace_put(p, pid, slot, value):
    gl.store(p.trace_ptr + pid * (TRACE_HDR_C + TRACE_EV_C * p.trace_tiles) + slot, value.to(gl.int64))


@gluon.jit
def _trace_tile(p, pid, tile, event, WG: gl.constexpr):
    if p.TRACE:
        if WG == 0:
            if tile < p.trace_tiles:
                _trace_put(p, pid, TRACE_HDR_C + TRACE_EV_C * tile + event, _clock())


@gluon.jit
def _head_coord(p, b, h, start, row, col):
    """TMA coordinates of token `row` of sequence b (packed: at token offset `start`), head h, column col."""
    if p.VARLEN:
        return [start + row, h, col]
    else:
        return [b, row, h, col]


@gluon.jit
def _kv_and_q_head(p, h):
    """(kv head, first query head) of unit head index h. With PACK > 1 (GQA packing) a unit's tile holds PACK
    query heads of one kv head (PACK divides the group), interleaved row by row, and h counts those sets."""
    hq = h * p.PACK
    return hq // p.group, hq


@gluon.jit
def _q_coord(p, b, h, q_start, row):
    return _head_coord(p, b, h, q_start, row, 0)


@gluon.jit
def _kv_coord(p, b, hk, k_start, key):
    return _head_coord(p, b, hk, k_start, key, 0)


@gluon.jit
def _page_row(p, b, key, ok):
    """Paged: the pool row holding key `key` of sequence b (0 where not ok). The pool is viewed as
    (num_pages · PAGE_SIZE, Hkv, D); a key block [key, key + BN) lies in one page (BN divides PAGE_SIZE),
    page_table[b, key // PAGE_SIZE]. The page table travels in cu_k's slot and its row stride in seqlen_k's
    (both unused by packed calls with a paged cache)."""
    page = gl.load(p.cu_k + b * p.seqlen_k + key // p.PAGE_SIZE, mask=ok, other=0)
    return page * p.PAGE_SIZE + key % p.PAGE_SIZE


# ---------------------------------------------------------------------------------------------------------
# Loader partition: one warp issuing TMA loads.
# ---------------------------------------------------------------------------------------------------------

@gluon.jit
def _loader(p, bufs):
    NWG: gl.constexpr = p.NWG
    BM: gl.constexpr = ROWS_PER_WG * NWG
    pid = _cta_id()
    kv_idx = 0
    kv_phase = 0
    tcount = 0
    fcount = 0  # DYNAMIC: units drawn so far
    if p.DYNAMIC:
        t = handout.draw(p.sched, bufs.units, fcount)
    else:
        t = pid
    while t < p.num_units:
        b, h, seq_q, seq_k, q_start, k_start, mb_first, count = _work(p, t, 0)
        mb_second = _work(p, t, 1)[6]
        hk, hq = _kv_and_q_head(p, h)
        for sub in range(count):
            m0 = (mb_first + (mb_second - mb_first) * sub) * (BM // p.PACK)
            n_lo, n_hi = _kv_range(p, m0, seq_q, seq_k)
            rot = _rotation(p, pid, n_lo, n_hi)
            # Q: wait until every consumer is done with the Q this buffer held (a fresh barrier passes
            # parity 1 at once). With one buffer that is the previous tile's, so the loads of this tile
            # start only once the consumers are at the end of the previous one; with two (QBUF) it is the
            # tile before, and this tile's Q and first K/V blocks load while the previous tile runs.
            qb, q_phase = _q_slot(p, tcount)
            mbarrier.wait(bufs.q_empty.index(qb), q_phase ^ 1)
            tcount += 1
            mbarrier.expect(bufs.q_ready.index(qb), NWG * p.q_desc.block_type.nbytes)
            for w in gl.static_range(NWG):
                tma.async_copy_global_to_shared(p.q_desc, _q_coord(p, b, hq, q_start,
                                                                   m0 + w * (ROWS_PER_WG // p.PACK)),
                                                bufs.q_ready.index(qb), bufs.q.index(qb * NWG + w))
            n_blocks = n_hi - n_lo
            if p.PAGE_SIZE > 0:
                # The page of each block is read one block ahead: its load's latency then passes while the
                # loader waits for a free slot, instead of delaying the block's TMA issue.
                row_next = _page_row(p, b, _block(p, 0, rot, n_lo, n_hi, sub) * p.BN, n_blocks > 0)
            for it in range(n_blocks):
                if p.PAGE_SIZE > 0:
                    row = row_next
                    it_next = it + (it + 1 < n_blocks).to(gl.int32)
                    row_next = _page_row(p, b, _block(p, it_next, rot, n_lo, n_hi, sub) * p.BN, True)
                    coord = [row, hk, 0]
                else:
                    coord = _kv_coord(p, b, hk, k_start, _block(p, it, rot, n_lo, n_hi, sub) * p.BN)
                mbarrier.wait(bufs.k_empty.index(kv_idx), kv_phase ^ 1)
                mbarrier.expect(bufs.k_ready.index(kv_idx), p.k_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(p.k_desc, coord, bufs.k_ready.index(kv_idx), bufs.k.index(kv_idx))
                mbarrier.wait(bufs.v_empty.index(kv_idx), kv_phase ^ 1)
                mbarrier.expect(bufs.v_ready.index(kv_idx), p.v_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(p.v_desc, coord, bufs.v_ready.index(kv_idx), bufs.v.index(kv_idx))
                kv_idx, kv_phase = _next_slot(kv_idx, kv_phase, p.STAGES)
        if p.DYNAMIC:
            fcount += 1
            t = handout.draw(p.sched, bufs.units, fcount)
        else:
            t += _num_ctas()  # re-read, not kept live (see _num_ctas)


# ---------------------------------------------------------------------------------------------------------
# Consumer partitions: one warpgroup each, 64 query rows.
# ---------------------------------------------------------------------------------------------------------

@gluon.jit
def _visible(p, rows, keys, seq_k, off):
    """(rows, keys) bool: key index keys[c] visible to query row rows[r] (row i sees key j when j < seq_k and,
    with a window, i + off - window_left <= j <= i + off + window_right; off = seq_k - seq_q). Each element's
    key index is tested against every bound: the forward's per-element form and the backward's mask."""
    return _visible_pairs(p, gl.expand_dims(rows, 1), gl.expand_dims(keys, 0), seq_k, off)


@gluon.jit
def _visible_pairs(p, queries, keys, seq_k, off):
    """_visible for query and key indices already laid out as broadcastable 2-D operands, in whichever orientation
    the caller's tile has (the keys-as-rows backward puts keys on axis 0)."""
    ok = keys < seq_k
    if p.HAS_WR:
        ok = ok & (keys <= queries + (off + p.window_right))
    if p.HAS_WL:
        ok = ok & (keys >= queries + (off - p.window_left))
    return ok


@gluon.jit
def _scores(p, s, j, rows, m0, seq_q, seq_k, MASK: gl.constexpr):
    """Softcap, then (MASK) -inf where a key is not visible; blocks wholly inside the visible band skip the
    mask at run time.

    Without a window only the sequence end needs a mask, and the walk takes that block first: the loop then
    carries no mask code (and none of the per-thread column constants LLVM would keep live for it; at 160
    registers a thread they were spilled). With a window every step tests its block. (Session 9 tried the
    loop split into masked and wholly visible steps, the visible ones without mask code: 0-7% slower at
    D <= 128, within noise at D = 256; benchmarks/NOTES.md.)"""
    BN: gl.constexpr = p.BN
    BM: gl.constexpr = ROWS_PER_WG * p.NWG
    if p.SOFTCAP:
        s = tanh_approx(s * p.cap_scale)
    if MASK:
        off = seq_k - seq_q
        need = (j + 1) * BN > seq_k
        if p.HAS_WR:
            need = need | ((j + 1) * BN - 1 > m0 + off + p.window_right)
        if p.HAS_WL:
            need = need | (j * BN < m0 + BM // p.PACK - 1 + off - p.window_left)
        if need:
            if p.MASK2D or p.NWG > 2 or p.POLY > 0:
                # Each element's key index against every bound: the three-consumer tiles (160 registers a
                # thread) and the exp2-polynomial probe builds keep this form, which compiles without local
                # memory there while the per-row bounds below cost 2-40 LDL/STL; probe variant mask2d forces
                # it everywhere.
                ok = _visible(p, rows, j * BN + gl.arange(0, BN, gl.SliceLayout(0, s.type.layout)), seq_k, off)
            else:
                # Bounds per row, relative to the block: key c (0 <= c < BN) is visible when lo <= c <= hi.
                # Per element that is one compare against a per-row value (two with a left window) and the
                # select, instead of forming each key index and testing it against the sequence end and each
                # edge (ptxas keeps the separate tests: 4024 -> 3600 instructions in the D = 64 causal build).
                cols = gl.expand_dims(gl.arange(0, BN, gl.SliceLayout(0, s.type.layout)), 0)
                last = seq_k - 1 - j * BN  # the sequence end, a scalar
                if p.HAS_WR:
                    ok = cols <= gl.expand_dims(gl.minimum(rows + (off + p.window_right - j * BN), last), 1)
                else:
                    ok = cols <= last
                if p.HAS_WL:
                    ok = ok & (cols >= gl.expand_dims(rows + (off - p.window_left - j * BN), 1))
            s = gl.where(ok, s, float("-inf"))
    return s


@gluon.jit
def _key_step(p, bufs, q_s, it, sub, rot, n_lo, n_hi, rows, m0, seq_q, seq_k, qb, kv_count, turn, m_i, l_i,
              acc, pv, WG: gl.constexpr, MASK: gl.constexpr):
    """One step of a tile's key loop: S of this step's block issued with the previous block's P·V, then this
    block's softmax under that P·V. Returns the loop-carried state.

    O *= alpha comes at the end of the step, once P·V is done. (Session 9 measured FlashAttention-3's order,
    the multiply after the next step's S is issued, within noise on every row; and O stored from registers
    on every D = 256 tile, so that it needs no staging in Q's buffer, 10-30% slower. benchmarks/NOTES.md.)"""
    BN: gl.constexpr = p.BN
    D: gl.constexpr = p.q_desc.block_type.shape[-1]
    DV: gl.constexpr = p.v_desc.block_type.shape[-1]
    M: gl.constexpr = ROWS_PER_WG
    dtype: gl.constexpr = p.q_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BN, 16])
    p_layout: gl.constexpr = pv.type.layout
    # Turn parity: consumer 0 goes first, so its k-th wait needs k arrivals, the others' k + 1.
    TURN0: gl.constexpr = 1 if WG == 0 else 0
    NEXT_WG: gl.constexpr = (WG + 1) % p.NWG
    EARLY_Q: gl.constexpr = p.TAIL and not p.O_ALIAS  # as in _consumer
    jj = _block(p, it, rot, n_lo, n_hi, sub)
    kv_idx, kv_phase = _slot(kv_count, p.STAGES)
    v_idx, v_phase = _slot(kv_count - 1, p.STAGES)
    mbarrier.wait(bufs.k_ready.index(kv_idx), kv_phase)
    if p.PINGPONG:
        mbarrier.wait(bufs.turn.index(WG), (turn + TURN0) & 1)
    k_t = bufs.k.index(kv_idx).reshape([BN, D]).permute((1, 0))
    s = warpgroup_mma(q_s, k_t, gl.zeros([M, BN], gl.float32, s_layout), use_acc=False, is_async=True)
    mbarrier.wait(bufs.v_ready.index(v_idx), v_phase)
    acc = warpgroup_mma(pv, bufs.v.index(v_idx).reshape([BN, DV]), acc, is_async=True)
    if p.PINGPONG:
        mbarrier.arrive(bufs.turn.index(NEXT_WG))
        turn += 1
    # S_j is ready once at most one group (P·V) is outstanding.
    s = warpgroup_mma_wait(1, deps=(s, ))
    mbarrier.arrive(bufs.k_empty.index(kv_idx))
    if EARLY_Q:
        if it == n_hi - n_lo - 1:
            mbarrier.arrive(bufs.q_empty.index(qb))
    s = _scores(p, s, jj, rows, m0, seq_q, seq_k, MASK)
    m_i, l_i, pr, alpha = online_softmax(s, m_i, l_i, p.qk_scale, p.LAZY, p.POLY, dtype)
    acc, pv = warpgroup_mma_wait(0, deps=(acc, pv))
    mbarrier.arrive(bufs.v_empty.index(v_idx))
    acc = rescale_o(acc, alpha)
    pv = gl.convert_layout(pr.to(dtype), p_layout)
    return kv_count + 1, turn, m_i, l_i, acc, pv


@gluon.jit
def _consumer(p, bufs, WG: gl.constexpr):
    BN: gl.constexpr = p.BN
    NWG: gl.constexpr = p.NWG
    BM: gl.constexpr = ROWS_PER_WG * NWG
    D: gl.constexpr = p.q_desc.block_type.shape[-1]
    DV: gl.constexpr = p.v_desc.block_type.shape[-1]
    M: gl.constexpr = ROWS_PER_WG
    dtype: gl.constexpr = p.q_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, DV, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    # TAIL: hand Q back right after the tile's last QKᵀ has completed (not after that block's softmax), so
    # the loader's next Q load starts one softmax earlier. With O staged in Q's buffer Q is released by
    # the epilogue instead.
    EARLY_Q: gl.constexpr = p.TAIL and not p.O_ALIAS
    LATE_Q: gl.constexpr = not p.TAIL and not p.O_ALIAS

    pid = _cta_id()
    kv_count = 0  # K/V blocks taken from the ring so far
    turn = 0
    tcount = 0
    fcount = 0  # DYNAMIC: units taken so far
    if p.DYNAMIC:
        t = handout.take(bufs.units, fcount)
    else:
        t = pid
    if p.TRACE:
        if WG == 0:
            _trace_put(p, pid, 0, _gtimer())
            _trace_put(p, pid, 2, _clock())
    while t < p.num_units:
        b, h, seq_q, seq_k, q_start, k_start, mb_first, count = _work(p, t, 0)
        mb_second = _work(p, t, 1)[6]
        for sub in range(count):
            m0 = (mb_first + (mb_second - mb_first) * sub) * (BM // p.PACK)
            n_lo, n_hi = _kv_range(p, m0, seq_q, seq_k)
            rot = _rotation(p, pid, n_lo, n_hi)
            # Row r of this warpgroup's tile is query token row0 + r // PACK of head hq + r % PACK (PACK = 1:
            # token row0 + r of the unit's head).
            row0 = m0 + WG * (M // p.PACK)
            rows = row0 + gl.arange(0, M, row_s) // p.PACK
            qb, q_phase = _q_slot(p, tcount)
            _trace_tile(p, pid, tcount, 0, WG)
            mbarrier.wait(bufs.q_ready.index(qb), q_phase)
            _trace_tile(p, pid, tcount, 1, WG)
            tcount += 1
            q_s = bufs.q.index(qb * NWG + WG).reshape([M, D])
            m_i = gl.full([M], float("-inf"), gl.float32, row_s)
            l_i = gl.zeros([M], gl.float32, row_s)
            acc = gl.zeros([M, DV], gl.float32, o_layout)
            if n_hi > n_lo:
                # First key block of the walk: S only; its P·V goes out with the next block's QKᵀ.
                # Opaque: without a window this block index, hence its whole sequence-end mask, is the
                # same every tile, and LLVM hoisted the mask out of the tile loop as bit masks kept in
                # registers through the key loop (spilled at 160 registers a thread).
                j = _opaque(_block(p, 0, rot, n_lo, n_hi, sub))
                kv_idx, kv_phase = _slot(kv_count, p.STAGES)
                mbarrier.wait(bufs.k_ready.index(kv_idx), kv_phase)
                k_t = bufs.k.index(kv_idx).reshape([BN, D]).permute((1, 0))
                s = warpgroup_mma(q_s, k_t, gl.zeros([M, BN], gl.float32, s_layout), use_acc=False,
                                  is_async=True)
                s = warpgroup_mma_wait(0, deps=(s, ))
                mbarrier.arrive(bufs.k_empty.index(kv_idx))
                if EARLY_Q:
                    if n_hi - n_lo == 1:
                        mbarrier.arrive(bufs.q_empty.index(qb))
                _trace_tile(p, pid, tcount - 1, 2, WG)
                s = _scores(p, s, j, rows, m0, seq_q, seq_k, True)
                m_i, l_i, pr, alpha = online_softmax(s, m_i, l_i, p.qk_scale, p.LAZY, p.POLY, dtype)
                pv = gl.convert_layout(pr.to(dtype), p_layout)
                kv_count += 1
                n_steps = n_hi - n_lo
                for it in range(1, n_steps):
                    kv_count, turn, m_i, l_i, acc, pv = _key_step(
                        p, bufs, q_s, it, sub, rot, n_lo, n_hi, rows, m0, seq_q, seq_k, qb, kv_count, turn, m_i,
                        l_i, acc, pv, WG, p.HAS_WR or p.HAS_WL or p.STAGGER)
                if LATE_Q:
                    mbarrier.arrive(bufs.q_empty.index(qb))
                v_idx, v_phase = _slot(kv_count - 1, p.STAGES)
                mbarrier.wait(bufs.v_ready.index(v_idx), v_phase)
                acc = warpgroup_mma(pv, bufs.v.index(v_idx).reshape([BN, DV]), acc, is_async=True)
                acc, pv = warpgroup_mma_wait(0, deps=(acc, pv))
                mbarrier.arrive(bufs.v_empty.index(v_idx))
            else:
                if not p.O_ALIAS:
                    mbarrier.arrive(bufs.q_empty.index(qb))
            _trace_tile(p, pid, tcount - 1, 3, WG)
            _epilogue(p, bufs, acc, m_i, l_i, b, _kv_and_q_head(p, h)[1], row0, rows, seq_q, q_start, qb, WG)
            if p.TRACE:
                if WG == 0:
                    if tcount - 1 < p.trace_tiles:
                        _trace_tile(p, pid, tcount - 1, 4, WG)
                        _trace_put(p, pid, TRACE_HDR_C + TRACE_EV_C * (tcount - 1) + 5, n_hi - n_lo)
        if p.DYNAMIC:
            fcount += 1
            t = handout.take(bufs.units, fcount)
        else:
            t += _num_ctas()
    tma.store_wait(0)
    if p.TRACE:
        if WG == 0:
            _trace_put(p, pid, 3, _clock())
            _trace_put(p, pid, 1, _gtimer())


@gluon.jit
def _epilogue(p, bufs, acc, m_i, l_i, b, h, row0, rows, seq_q, q_start, qb, WG: gl.constexpr):
    """O / l and lse; O through shared memory and TMA (pointer stores for a ragged varlen tail).

    The proxy fence before the TMA store (fence.proxy.async, MEMBAR.ALL.CTA in SASS) waits for this thread's
    earlier memory operations, the lse store among them; TAIL stores lse after the O store is issued."""
    M: gl.constexpr = ROWS_PER_WG
    DV: gl.constexpr = p.v_desc.block_type.shape[-1]
    dtype: gl.constexpr = p.q_desc.dtype
    o_layout: gl.constexpr = acc.type.layout
    if p.PACK > 1:
        # Each row's own query head (h is the tile's first).
        heads = h + gl.arange(0, M, rows.type.layout) % p.PACK
    else:
        heads = h
    if p.HAS_SINK:
        # The sink is one more logit in the normaliser with no value row.
        sink2 = gl.load(p.sink_ptr + heads) * LOG2E_C
        m_fin = gl.maximum(m_i, sink2)
        corr = gl.exp2(m_i - m_fin)
        l_fin = l_i * corr + gl.exp2(sink2 - m_fin)
        o_scale = corr / l_fin
        lse2 = m_fin + gl.log2(l_fin)
    else:
        ok = l_i > 0.0
        o_scale = gl.where(ok, 1.0 / l_i, 0.0)
        lse2 = gl.where(ok, m_i + gl.log2(l_i), float("-inf"))
    acc = acc * gl.expand_dims(gl.convert_layout(o_scale, gl.SliceLayout(1, o_layout)), 1)
    # lse has fewer than 2^31 elements (checked by the host): 32-bit offsets.
    if p.VARLEN:
        lse_ptrs = p.lse_ptr + heads * p.lse_len + q_start + rows
    else:
        if p.PACK > 1:
            # The units count sets of PACK query heads: p.num_heads · PACK query heads (opaque, or LLVM hoists
            # the product of two kernel arguments above the partitions and spills it at 160-240 registers).
            lse_ptrs = p.lse_ptr + (b * (_opaque(p.num_heads) * p.PACK) + heads) * p.lse_len + rows
        else:
            lse_ptrs = p.lse_ptr + (b * p.num_heads + h) * p.lse_len + rows
    if not p.TAIL:
        gl.store(lse_ptrs, lse2 * LN2, mask=rows < seq_q)

    out = acc.to(dtype)
    if p.VARLEN:
        # A TMA box past the sequence end would write into the next sequence's rows.
        if row0 + M // p.PACK <= seq_q:
            _store_o_tma(p, bufs, out, b, h, q_start, row0, qb, WG)
        else:
            cols = gl.arange(0, DV, gl.SliceLayout(0, o_layout))
            rows_o = gl.convert_layout(rows, gl.SliceLayout(1, o_layout))
            tok = q_start + rows_o
            if p.BIG_O:
                tok = tok.to(gl.int64)
            if p.PACK > 1:
                head_off = gl.expand_dims(gl.convert_layout(heads, gl.SliceLayout(1, o_layout)) * p.stride_oh, 1)
            else:
                head_off = h * p.stride_oh
            offs = gl.expand_dims(tok * p.stride_ot, 1) + head_off + gl.expand_dims(cols, 0)
            mask = gl.expand_dims(rows_o < seq_q, 1) & gl.expand_dims(cols < p.dv, 0)
            gl.store(p.o_ptr + offs, out, mask=mask)
    else:
        _store_o_tma(p, bufs, out, b, h, q_start, row0, qb, WG)
    if p.TAIL:
        gl.store(lse_ptrs, lse2 * LN2, mask=rows < seq_q)
    if p.O_ALIAS:
        tma.store_wait(0)
        # Q's buffer is free again (order our generic reads/writes before the next TMA write).
        fence_async_shared()
        mbarrier.arrive(bufs.q_empty.index(qb))


@gluon.jit
def _store_o_tma(p, bufs, out, b, h, q_start, row0, qb, WG: gl.constexpr):
    M: gl.constexpr = ROWS_PER_WG
    DV: gl.constexpr = p.v_desc.block_type.shape[-1]
    if p.O_HALVES:
        # O staged half its columns at a time through a [64, Dv/2] tile (o_desc's box is that wide): the two
        # halves are register subsets of the accumulator (its highest column bit is a register index bit), so
        # splitting them moves no data. With this tile O needs no room in Q's buffer at D = 256, and Q goes
        # back to the loader before the epilogue instead of after its store.
        HALF: gl.constexpr = DV // 2
        lo, hi = out.reshape([M, 2, HALF]).permute((0, 2, 1)).split()
        o_buf = bufs.o.index(_opaque(gl.to_tensor(WG)))
        tma.store_wait(0)  # this warpgroup's previous store has left the tile
        o_buf.reshape([M, HALF]).store(lo)
        fence_async_shared()
        tma.async_copy_shared_to_global(p.o_desc, _head_coord(p, b, h, q_start, row0, 0), o_buf)
        tma.store_wait(0)
        o_buf.reshape([M, HALF]).store(hi)
        fence_async_shared()
        tma.async_copy_shared_to_global(p.o_desc, _head_coord(p, b, h, q_start, row0, HALF), o_buf)
    else:
        if p.O_ALIAS:
            o_buf = bufs.q.index(qb * p.NWG + WG)._reinterpret(p.o_desc.dtype, p.o_desc.block_type.shape,
                                                               p.o_desc.layout)
        else:
            # Opaque index: LLVM otherwise hoists this thread's swizzled staging addresses above the tile loop
            # and keeps them live through the key loop (spilled at 160 registers a thread).
            o_buf = bufs.o.index(_opaque(gl.to_tensor(WG)))
            tma.store_wait(0)  # this warpgroup's previous O store has left the buffer
        o_buf.reshape([M, DV]).store(out)
        fence_async_shared()
        tma.async_copy_shared_to_global(p.o_desc, _q_coord(p, b, h, q_start, row0), o_buf)


# ---------------------------------------------------------------------------------------------------------
# The kernel: shared memory, barriers, partitions.
# ---------------------------------------------------------------------------------------------------------

# Sizes are not specialised (no recompile per sequence length or head count; TMA needs no divisibility).
_RUNTIME_INTS = ["stride_ot", "stride_oh", "dv", "seqlen_q", "seqlen_k", "num_heads", "group", "num_m", "num_units",
                 "units_per_head", "lse_len", "window_left", "window_right", "trace_tiles"]


@gluon.jit(do_not_specialize=_RUNTIME_INTS)
def attn_fwd_kernel(q_desc, k_desc, v_desc, o_desc, o_ptr, lse_ptr, sink_ptr, cu_q, cu_k, seqused,
                    stride_ot, stride_oh, dv, seqlen_q, seqlen_k, num_heads, group, num_m, num_units,
                    units_per_head, lse_len, qk_scale, cap_scale, window_left, window_right, trace_ptr, trace_tiles,
                    sched_ptr, BN: gl.constexpr, NWG: gl.constexpr, STAGES: gl.constexpr, VARLEN: gl.constexpr,
                    HAS_SEQUSED: gl.constexpr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr,
                    SOFTCAP: gl.constexpr, HAS_SINK: gl.constexpr, LAZY: gl.constexpr, POLY: gl.constexpr,
                    PINGPONG: gl.constexpr, O_ALIAS: gl.constexpr, SCHED: gl.constexpr, STAGGER: gl.constexpr,
                    BIG_O: gl.constexpr, QBUF: gl.constexpr, TAIL: gl.constexpr, TRACE: gl.constexpr,
                    CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr, MASK2D: gl.constexpr,
                    CONVERGE: gl.constexpr, O_HALVES: gl.constexpr, PACK: gl.constexpr,
                    PAGE_SIZE: gl.constexpr = 0, DYNAMIC: gl.constexpr = False):
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [QBUF * NWG] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    if O_ALIAS:
        o_smem = q_smem
    else:
        o_smem = gl.allocate_shared_memory(dtype, [NWG] + o_desc.block_type.shape, o_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [QBUF, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [QBUF, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [NWG, 1], mbarrier.MBarrierLayout())
    for qb in gl.static_range(QBUF):
        mbarrier.init(q_ready.index(qb), count=1)
        mbarrier.init(q_empty.index(qb), count=NWG)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=NWG)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(v_empty.index(s), count=NWG)
    for w in gl.static_range(NWG):
        mbarrier.init(turn.index(w), count=1)
    if DYNAMIC:
        units = handout.new_handout(NWG)
    else:
        units = TileHandout(turn, turn, turn)  # placeholders, never touched

    p = Problem(q_desc, k_desc, v_desc, o_desc, o_ptr, lse_ptr, sink_ptr, cu_q, cu_k, seqused,
                gl.to_tensor(stride_ot), gl.to_tensor(stride_oh), gl.to_tensor(dv), gl.to_tensor(seqlen_q),
                gl.to_tensor(seqlen_k), gl.to_tensor(num_heads), gl.to_tensor(group), gl.to_tensor(num_m),
                gl.to_tensor(num_units), gl.to_tensor(units_per_head), gl.to_tensor(lse_len), gl.to_tensor(qk_scale),
                gl.to_tensor(cap_scale), gl.to_tensor(window_left), gl.to_tensor(window_right), trace_ptr,
                gl.to_tensor(trace_tiles), BN, NWG, STAGES, VARLEN, HAS_SEQUSED, HAS_WL, HAS_WR, SOFTCAP,
                HAS_SINK, LAZY, POLY, PINGPONG, O_ALIAS, SCHED, STAGGER, BIG_O, QBUF, TAIL, TRACE, MASK2D,
                CONVERGE, O_HALVES, PACK, PAGE_SIZE, sched_ptr, DYNAMIC)
    bufs = Buffers(q_smem, k_smem, v_smem, o_smem, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn,
                   units)
    if NWG == 2:
        gl.warp_specialize([(_consumer, (p, bufs, gl.constexpr(0))),
                            (_consumer, (p, bufs, gl.constexpr(1))),
                            (_loader, (p, bufs))], [4, 1], [CONSUMER_REGS, LOADER_REGS])
    else:
        gl.warp_specialize([(_consumer, (p, bufs, gl.constexpr(0))),
                            (_consumer, (p, bufs, gl.constexpr(1))),
                            (_consumer, (p, bufs, gl.constexpr(2))),
                            (_loader, (p, bufs))], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, LOADER_REGS])


# ---------------------------------------------------------------------------------------------------------
# Host side: descriptors, launch arguments, launch.
# ---------------------------------------------------------------------------------------------------------

_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}

# Kernel switches; the defaults are what ships (the tile, ping-pong included, comes from configs.py).
# benchmarks/sm90_probe.py times the alternatives. SCHED None: paired units where a window (causal) makes
# tile costs differ and the flat units outnumber the grid, flat otherwise. TAIL: the tile-end hand-offs of r2
# (Q released after the last QKᵀ, lse stored after the O store is issued). TRACE: time stamps per tile into
# LAST_TRACE (probe only). FAST: the host launch path of launch.py (None: the FA4_SM90_FAST environment variable,
# "1" = on). DYNAMIC: units from a global counter, packed sequences longest first (see SCHED_FLAT); None: for
# packed calls whose sequences differ in length (dynamic_units). SCHED "lpt" (probe, batched calls; DYNAMIC with
# it): single tiles longest first in L2 sections of SECTION (sequence, head) pairs (None: lpt_section). TAIL None:
# per problem (configs.tail_for); True / False force it (tests, probe variants).
DEFAULT_VARIANT = dict(LAZY=False, POLY=0, SCHED=None, STAGGER=False, TAIL=None, TRACE=False, FAST=None,
                       MASK2D=False, CONVERGE=None,
                       O_HALVES=False, PACK=None, DYNAMIC=None, SECTION=None)
# Variant keys that override fields of configs.TileConfig (PINGPONG is the probe's historical name).
_TILE_KEYS = {"block_n": "block_n", "num_wg": "num_wg", "stages": "stages", "consumer_regs": "consumer_regs",
              "loader_regs": "loader_regs", "pingpong": "pingpong", "PINGPONG": "pingpong",
              "q_buffers": "q_buffers"}
# The trace buffer of the last TRACE launch: int64 (grid, TRACE_HDR + TRACE_EV * tiles), see _trace_put.
LAST_TRACE = None


def _descriptor(t, rows, varlen, cols=None, heads=1):
    """TMA descriptor over t's own shape and strides: boxes of `rows` tokens of `heads` consecutive heads.

    Batched tensors are rank 4 (B, S, H, D), varlen ones rank 3 (T, H, D); the box is (1, rows, 1, Dt) or
    (rows, 1, Dt) with Dt the power-of-two tile width (or `cols`), which the kernel views as a (rows, Dt) tile.
    Out-of-range elements (rows past a sequence end, columns past D) read as zero and are never written.
    With heads > 1 (GQA packing) the box is (1, rows, heads, Dt), a (rows · heads, Dt) tile whose row
    t · heads + g is token t of head g.
    """
    d = cols or configs.tile_dim(t.shape[-1])
    block = [rows, heads, d] if varlen else [1, rows, heads, d]
    layout = gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPES[t.dtype])
    return TensorDescriptor(t, shape=list(t.shape), strides=list(t.stride()), block_shape=block, layout=layout)


# SCHED_LPT's L2 sections: the K and V of one section's (sequence, head) pairs together take at most this many
# bytes (the H100's L2 is 50 MB in two halves; a section's working set should stay in the near one).
L2_SECTION_BYTES = 24 << 20


def lpt_section(seqlen_k, d, dv, elem_bytes, unit_heads, kv_heads):
    """(sequence, head) pairs per SCHED_LPT section: as many as have their K / V within L2_SECTION_BYTES (the
    unit heads of one kv head share its K / V), at least one."""
    per_kv_head = seqlen_k * (d + dv) * elem_bytes
    share = max(1, unit_heads // kv_heads)
    return max(1, (L2_SECTION_BYTES // max(per_kv_head, 1)) * share)


def unit_counter(device, batch, cu_seqlens_q, cu_seqlens_k, seqused_k):
    """DYNAMIC's sched buffer, fresh every call: [0] the zeroed unit counter; a packed call's sequences, most keys
    first, after it (packed_order.longest_first)."""
    if cu_seqlens_q is not None:
        return packed_order.longest_first(batch, cu_seqlens_k, seqused_k, device)
    return torch.zeros(1, dtype=torch.int32, device=device)


def mixed_lengths(q, cu_seqlens_q, max_seqlen_q, seqused_k):
    """Whether a packed call's sequences may differ in length, judged from what the host knows without reading
    the lengths: several sequences and fewer query rows than batch · max_seqlen_q, or key counts from seqused_k
    (a paged or chunked prefill). Part of the launch plan's signature (launch.signature), so a cached plan agrees."""
    if cu_seqlens_q is None or cu_seqlens_q.numel() <= 2:
        return False
    batch = cu_seqlens_q.numel() - 1
    return seqused_k is not None or q.shape[0] != batch * int(max_seqlen_q)


def dynamic_units(q, cu_seqlens_q, max_seqlen_q, seqused_k):
    """DYNAMIC's default: packed calls whose sequences may differ in length (mixed_lengths). There the static
    stride leaves CTAs idle behind the longest sequences' units (mixed lengths: 528 -> 637 TFLOP/s,
    benchmarks/NOTES.md session 20), while on equal lengths the handout costs
    0-3% and the order launch a few µs, so those keep the static stride. Decided from the launch plan's
    signature alone (launch.signature), so a cached plan always agrees with it. FA4_SM90_DYNAMIC=0 / 1 (a probe
    switch for A/B runs in separate processes, read when a plan is made): never / every packed call of several
    sequences."""
    if cu_seqlens_q is None or cu_seqlens_q.numel() <= 2:
        return False
    forced = os.environ.get("FA4_SM90_DYNAMIC")
    if forced in ("0", "1"):
        return forced == "1"
    return mixed_lengths(q, cu_seqlens_q, max_seqlen_q, seqused_k)


_DUMMIES = {}


def _dummy_i32(device):
    """An empty int32 tensor standing in for absent optional pointers (one per device, not one per call)."""
    key = (device.type, device.index)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.empty(0, dtype=torch.int32, device=device)
    return _DUMMIES[key]


def launch_plan(q, k, v, out, lse, *, softmax_scale, window_left, window_right, softcap, sink,
                cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, max_seqlen_q=None, variant=None,
                num_ctas=132, page_table=None):
    """(number of work units, kernel arguments by name, constexprs by name) for one forward call.
    num_ctas: the persistent grid's size (min(units, num_ctas)); it decides the schedule and sizes the TRACE
    buffer. page_table: k and v are a paged cache (num_pages, page_size, Hkv, D) of a packed call with
    seqused_k; the page size must be a multiple of the tile's key block."""
    variant = dict(DEFAULT_VARIANT, **(variant or {}))
    tile_overrides = {_TILE_KEYS[key]: variant.pop(key) for key in list(variant) if key in _TILE_KEYS}
    unknown = set(variant) - set(DEFAULT_VARIANT)
    if unknown:
        raise ValueError(f"unknown sm90 variant keys {sorted(unknown)}")
    varlen = cu_seqlens_q is not None
    hq, hkv = q.shape[-2], k.shape[-2]
    if varlen:
        batch = cu_seqlens_q.numel() - 1
        seqlen_q, seqlen_k = int(max_seqlen_q), 0
        lse_len = q.shape[0]
        # The tile choice may depend only on what the launch plan's signature holds (max_seqlen_q, not
        # max_seqlen_k): packed training batches have equal query and key lengths.
        longest_k = seqlen_q
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
        lse_len = seqlen_q
        longest_k = seqlen_k
    d, dv = configs.tile_dim(q.shape[-1]), configs.tile_dim(v.shape[-1])
    cfg = configs.problem_config(d, dv, window_left=window_left, window_right=window_right, max_seqlen_q=seqlen_q,
                                 max_seqlen_k=longest_k,
                                 mixed_lengths=mixed_lengths(q, cu_seqlens_q, max_seqlen_q, seqused_k),
                                 **tile_overrides)
    if cfg is None:
        raise ValueError(f"no sm90 tile for head dims ({d}, {dv}) with {tile_overrides}")
    tail = configs.tail_for(seqlen_q) if variant["TAIL"] is None else bool(variant["TAIL"])
    # GQA packing: PACK query heads of one kv head share a tile (None: configs.gqa_pack decides).
    group = hq // hkv
    if variant["PACK"] is None:
        pack = 1 if variant["O_HALVES"] else configs.gqa_pack(group, seqlen_q)
    else:
        pack = int(variant["PACK"])
    if pack < 1 or group % pack or WG_ROWS % pack or (pack > 1 and variant["O_HALVES"]):
        raise ValueError(f"PACK={pack}: must divide the GQA group ({group}) and {WG_ROWS}, without O_HALVES")
    num_m = triton.cdiv(seqlen_q, cfg.block_m // pack)
    windowed = window_left >= 0 or window_right >= 0
    sched = variant["SCHED"]
    if sched is None:
        # Paired units even out causal tile costs, but a unit is two tiles: where the flat units would not
        # fill the grid, pairing only halves the CTAs at work (a 128-token causal chunk against a long cache:
        # every tile costs the same, and the paired grid ran it at 0.57x, benchmarks/NOTES.md session 11).
        flat_units = num_m * (hq // pack) * batch
        sched = "paired" if windowed and flat_units > num_ctas else "flat"
    sched = SCHED_NAMES[sched] if isinstance(sched, str) else int(sched)
    if sched == SCHED_LPT.value and varlen:
        raise ValueError("SCHED lpt serves batched calls (packed ones order their sequences with DYNAMIC)")
    per_head = triton.cdiv(num_m, 2) if sched == SCHED_PAIRED.value else num_m
    num_units = per_head * (hq // pack) * batch
    units_arg = per_head
    if sched == SCHED_LPT.value:
        units_arg = variant["SECTION"] or lpt_section(k.shape[1], d, dv, q.element_size(), hq // pack, hkv)
    soft = softcap > 0
    dummy_i32 = _dummy_i32(q.device)
    page_size = 0
    if page_table is not None:
        page_size = k.shape[1]
        if not varlen or seqused_k is None or page_size % cfg.block_n:
            raise ValueError(f"paged KV on sm90 needs a packed call with seqused_k and a page size that is a "
                             f"multiple of {cfg.block_n} (got {page_size})")
        # The pool as one run of key rows: page p's row r is row p · page_size + r.
        k, v = k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])
    trace_tiles = 0
    trace = dummy_i32
    sched_buf = dummy_i32
    dynamic = variant["DYNAMIC"]
    if dynamic is None:
        dynamic = dynamic_units(q, cu_seqlens_q, max_seqlen_q, seqused_k)
    if sched == SCHED_LPT.value:
        dynamic = True  # a static stride over a longest-first order would hand CTA 0 the longest of every round
    if dynamic:
        sched_buf = unit_counter(q.device, batch, cu_seqlens_q, cu_seqlens_k if page_table is None else None,
                                 seqused_k)
    if variant["TRACE"]:
        grid = max(1, min(num_units, num_ctas))
        trace_tiles = triton.cdiv(num_units, grid) * (2 if sched == SCHED_PAIRED.value else 1)
        trace = torch.zeros(grid, TRACE_HDR + TRACE_EV * trace_tiles, dtype=torch.int64, device=q.device)
    args = dict(
        q_desc=_descriptor(q, WG_ROWS // pack, varlen, heads=pack), k_desc=_descriptor(k, cfg.block_n, varlen),
        v_desc=_descriptor(v, cfg.block_n, varlen),
        o_desc=_descriptor(out, WG_ROWS // pack, varlen, cols=dv // 2 if variant["O_HALVES"] else None,
                           heads=pack),
        o_ptr=out, lse_ptr=lse, sink_ptr=sink if sink is not None else lse,
        cu_q=cu_seqlens_q if varlen else dummy_i32,
        cu_k=page_table if page_table is not None else cu_seqlens_k if varlen else dummy_i32,
        seqused=seqused_k if seqused_k is not None else dummy_i32,
        stride_ot=out.stride(-3), stride_oh=out.stride(-2), dv=v.shape[-1], seqlen_q=seqlen_q,
        seqlen_k=page_table.stride(0) if page_table is not None else seqlen_k,
        num_heads=hq // pack, group=group, num_m=num_m, num_units=num_units,
        units_per_head=units_arg, lse_len=lse_len,
        # With softcap the exponent is softcap·tanh(scale·qk/softcap)·log2(e): tanh's argument is
        # scaled by cap_scale, its result by qk_scale.
        qk_scale=(softcap if soft else softmax_scale) * LOG2E,
        cap_scale=softmax_scale / softcap if soft else 1.0,
        window_left=window_left, window_right=window_right, trace_ptr=trace, trace_tiles=trace_tiles,
        sched_ptr=sched_buf)
    constexprs = dict(
        BN=cfg.block_n, NWG=cfg.num_wg, STAGES=cfg.stages, VARLEN=varlen, HAS_SEQUSED=seqused_k is not None,
        HAS_WL=window_left >= 0, HAS_WR=window_right >= 0, SOFTCAP=soft, HAS_SINK=sink is not None,
        LAZY=bool(variant["LAZY"]), POLY=int(variant["POLY"]), PINGPONG=bool(cfg.pingpong),
        O_ALIAS=configs.needs_o_alias(cfg, d, dv), SCHED=int(sched), STAGGER=bool(variant["STAGGER"]),
        # 64-bit row offsets for the pointer-stored O tail only when O is that large (the sign extension
        # of a kernel argument otherwise costs registers in every partition).
        BIG_O=out.numel() >= 2**31, QBUF=cfg.q_buffers, TAIL=tail, TRACE=bool(variant["TRACE"]),
        CONSUMER_REGS=cfg.consumer_regs, LOADER_REGS=cfg.loader_regs, PACK=pack, PAGE_SIZE=page_size,
        DYNAMIC=bool(dynamic))
    constexprs["MASK2D"] = bool(variant["MASK2D"])  # probe only: the per-element mask on every tile
    # CONVERGE None: the converging walk wherever it applies (a right window, no STAGGER); see _block.
    converge = variant["CONVERGE"]
    if converge is None:
        converge = window_right >= 0 and not variant["STAGGER"]
    constexprs["CONVERGE"] = bool(converge)
    # O_HALVES (probe): O staged half its columns at a time, so at D = 256 it needs no room in Q's buffer.
    constexprs["O_HALVES"] = bool(variant["O_HALVES"])
    if constexprs["O_HALVES"]:
        constexprs["O_ALIAS"] = False
        half = cfg.num_wg * WG_ROWS * (dv // 2) * q.element_size()
        if configs.smem_bytes(cfg, d, dv, q.element_size(), o_alias_q=True) + half > configs.SMEM_LIMIT:
            raise ValueError(f"O_HALVES: the half-width O tile does not fit beside Q and the K/V ring at {d}/{dv}")
    return num_units, args, constexprs


_NUM_SMS = {}


def _num_sms(device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def _new_outputs(q, v, varlen):
    """out (q's shape with Dv last, q's dtype) and lse fp32: (Hq, Tq) packed, (B, Hq, Sq) batched."""
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    if varlen:
        return out, torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    return out, torch.empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, device=q.device)


def planned_forward(q, k, v, *, softmax_scale, window_left, window_right, softcap, sink, cu_seqlens_q=None,
                    cu_seqlens_k=None, seqused_k=None, max_seqlen_q=None, max_seqlen_k=None):
    """(out, lse) through the FAST plan an earlier call with this exact signature left, or None (no plan).

    A plan exists only for a signature that unsupported_reason accepted and that launched; what the signature
    does not fix, the 16-byte alignment of q, k and v (TMA), is checked here. This lets backend=None skip the
    dispatch checks on repeated calls (fa4.dispatch.planned_sm90_forward)."""
    if not (launch.enabled(None) and launch.usable()) or (q.data_ptr() | k.data_ptr() | v.data_ptr()) % 16:
        return None
    key = launch.signature(q, k, v, softmax_scale=softmax_scale, window_left=window_left, window_right=window_right,
                           softcap=softcap, sink=sink, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                           seqused_k=seqused_k, max_seqlen_q=max_seqlen_q, variant=None)
    return _from_plan(key, q, k, v, sink, cu_seqlens_q, cu_seqlens_k, seqused_k, cu_seqlens_k)


def _from_plan(key, q, k, v, sink, cu_seqlens_q, cu_k_arg, seqused_k, cu_seqlens_k):
    """(out, lse) launched from the plan stored under `key`, or None when there is none (or another device is
    current: the plan's launcher runs on the current one). cu_k_arg: what the kernel's cu_k takes (a paged call's
    page table, else cu_seqlens_k); cu_seqlens_k: the key offsets themselves (None for a paged call)."""
    plan = launch.lookup(key)
    if plan is None or q.device.index != current_device():
        return None
    out, lse = _new_outputs(q, v, cu_seqlens_q is not None)
    sched = None
    if plan.dynamic:
        batch = cu_seqlens_q.numel() - 1 if cu_seqlens_q is not None else q.shape[0]
        sched = unit_counter(q.device, batch, cu_seqlens_q, cu_seqlens_k, seqused_k)
    plan.launch_tensors(q.device.index, plan.sources(q, k, v, out, lse, sink, cu_seqlens_q, cu_k_arg, seqused_k,
                                                     _dummy_i32(q.device), sched))
    return out, lse


def attention_forward(q, k, v, *, softmax_scale, window_left, window_right, softcap, sink,
                      cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, max_seqlen_q=None,
                      max_seqlen_k=None, variant=None, page_table=None):
    """The backend `forward` (docs/INTERNALS.md) on the Gluon kernel; the caller has checked support.
    A paged call's page table takes cu_k's place in a plan's arguments (see _page_row)."""
    variant = variant or {}
    fast = launch.enabled(variant.get("FAST")) and not variant.get("TRACE") and launch.usable()
    if fast:
        key = launch.signature(q, k, v, softmax_scale=softmax_scale, window_left=window_left,
                               window_right=window_right, softcap=softcap, sink=sink, cu_seqlens_q=cu_seqlens_q,
                               cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k, max_seqlen_q=max_seqlen_q,
                               variant=variant, page_table=page_table)
        planned = _from_plan(key, q, k, v, sink, cu_seqlens_q,
                             page_table if page_table is not None else cu_seqlens_k, seqused_k,
                             None if page_table is not None else cu_seqlens_k)
        if planned is not None:
            return planned
    out, lse = _new_outputs(q, v, cu_seqlens_q is not None)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    num_ctas = _num_sms(q.device)
    num_units, args, constexprs = launch_plan(
        q, k, v, out, lse, softmax_scale=softmax_scale, window_left=window_left, window_right=window_right,
        softcap=softcap, sink=sink, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k,
        max_seqlen_q=max_seqlen_q, variant=variant, num_ctas=num_ctas, page_table=page_table)
    if num_units > 0:
        grid = (min(num_units, num_ctas), )
        with torch.cuda.device(q.device):  # Triton launches on the current device
            compiled = attn_fwd_kernel[grid](**args, **constexprs, num_warps=4)
        if variant.get("TRACE"):
            global LAST_TRACE
            LAST_TRACE = args["trace_ptr"]
        if fast and compiled is not None and hasattr(compiled, "packed_metadata"):
            launch.store(key, launch.Plan(attn_fwd_kernel.arg_names, args, constexprs, grid[0], compiled))
    return out, lse
