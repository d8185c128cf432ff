"""Attention backward for Hopper (sm_90a) in Gluon at head dim D = Dv = 256 (tile width 256: D, Dv in (128, 256]).

The shipped tile for D, Dv in (128, 256] (backward.D256_TILE, `BwdTile(d256=True)`): the host wrapper in
backward.py routes a tile with d256 set to `attn_bwd_d256_kernel` below. Preprocess (Delta, lse2, sink partial
sums), the ordered dQ pass (deterministic=True) and the dQ cast are backward.py's, unchanged.

Two ways to form S and dP (tile.d256_roles, the constexpr ROLES):
- ROLES (the shipped tile since 2026-11-27): whole products, one a consumer. Consumer 0 forms S over all 256
  columns (two chained wgmma groups, Q·Kᵀ over each column half), consumer 1 dP; consumer 1 hands dP to consumer 0
  in fp32 through slot 1 of the hand-over tile (16 KiB a step), and consumer 0 forms P and dS as below. Consumer 0's
  exp2 runs while consumer 1 still computes and stores dP, and no partial sums are added. No part_free barrier: the
  slot is rewritten only by consumer 1's dQ staging after pds_ready (which consumer 0 arrives after reading dP) and
  by the next dP, whose dO load waits for consumer 0's dV product. Consumer 0 waits for dO only before dV, consumer 1
  for Q only before dK. Measured +4-5% on the causal rows (best of 5), level on the others (NOTES, session 23).
  EARLY_DV (tile.d256_early_dv, on ROLES; shipped since 2026-11-27): consumer 0 stores P and arrives p_ready as
  soon as it has P, before it waits for dP; both consumers issue their dV product then, so dV runs under dS and
  the one dO stage is released (its next load issued) a product earlier, off the step's chain. pds_ready then
  means dS. +3-7% on every D = 256 row over ROLES alone (NOTES, session 23).
  STATS_AHEAD (tile.d256_stats_ahead, on ROLES; shipped since 2026-11-27): consumer 0 loads the next step's lse2 and
  Delta into registers one step ahead; their L2 round trip had waited under S (Nsight Compute: the top stall of
  consumer 0). +3% at S = 16384, level elsewhere.
  HAND_SWZ (tile.d256_hand_swizzle, on ROLES; shipped since 2026-11-27): the dP slot is viewed with 32-byte vectors
  XORed by row mod 4 (`_dp_slot`) instead of the dQ descriptor's 128-byte swizzle, under which the fp32 accumulator
  fragment's STS.64 / LDS.64 took twice the ideal wavefronts. +2-5% on the causal rows, level on the others.
- Partial products (the table below; ROLES off): each consumer forms S and dP over its own 128 columns.

Why a kernel of its own: at D = 256 the D <= 128 kernel's split (each consumer warpgroup owns 64 keys and all D
columns) would hold dK and dV in 256 + 256 fp32 registers a thread. Here the head dim is split instead.

The math split over columns. One CTA per (64-key block, batch · kv head); consumer warpgroup w (w = 0, 1) owns the
head-dim columns c_w = [128w, 128w + 128). Per query block i (BM = 64 rows) of every query head of the GQA group:

    S_w  = Q[:, c_w]·K[:, c_w]ᵀ,  dP_w = dO[:, c_w]·V[:, c_w]ᵀ      partial products, [64 q, 64 k] fp32 each
    S = S_0 + S_1, dP = dP_0 + dP_1                                  consumer 1 hands S_1, dP_1 (fp32) to 0
    P = exp2(S·scale·log2 e − lse2),  dS = P ∘ (dP − Delta)          consumer 0 (masks, softcap as in backward.py)
    dV[:, c_w] += Pᵀ·dO[:, c_w],  dK[:, c_w] += dSᵀ·Q[:, c_w]        both consumers, P and dS from shared memory
    dQ[:, c_w] += dS·K[:, c_w]                                       both, in two [64, 64] column halves, each
                                                                     added to the fp32 accumulator by TMA
                                                                     reduce-add (skipped when deterministic)

so a consumer keeps dK[:, c_w] and dV[:, c_w] in fp32 registers (64 + 64 a thread), S_w and dP_w (32 + 32) in a
step, and one dQ half (32) at a time. Every product reads only the consumer's own 128 columns of Q, K, V and dO:
each of those tiles is kept as two [rows, 128] halves (one TMA box each, 128-byte swizzle), half w read by
consumer w only, so no wgmma operand is a column slice of a 256-wide tile, and after the loop consumer w stages
its dK, dV columns in its own K, V halves.

Shared memory (bf16 / fp16; 227 KiB a CTA):
    K, V (resident, [64, 256] each, two halves)                         64 KiB
    Q ring: STAGES = 2 stages of [64, 256]                              64 KiB
    dO: one stage of [64, 256]                                          32 KiB
    P, dS ([64, 64] 16-bit each, written by consumer 0, read by both)   16 KiB
    hand-over tile, 2 x [64, 64] fp32: S_1 in slot 0, dP_1 in slot 1;   32 KiB
      after consumer 0 has read them, slot w stages consumer w's first dQ half for the TMA reduce-add;
      the second half is staged in the consumer's own half of the step's Q slot (tile.dq_in_q, below)
                                                                       -------
                                                                       208 KiB  (+ barriers)
Two full Q / dO stages (224 KiB + barriers) do not fit beside the hand-over tile. dO has one stage: the consumers
release it as soon as their dV product completes (before dK and dQ), so the next block's dO load runs under dK,
dQ and the next S.

Barriers (all count 1 unless noted; parity from the step counter `it`, the same in every partition):
  kv_ready (1 + tx)          loader -> consumers: K and V in shared memory
  q_ready[s] (1 + tx)        loader -> consumers, Q of step it in stage s = it % 2 (phase it // 2)
  q_empty[s] (2)             consumers -> loader, once their dK product (the last reader of Q) completed; with
                             dq_in_q (the default) at the next step instead (after its hand-over), once the
                             reduce-add of the second dQ half, staged in the consumer's Q half, has read it
  do_ready (1 + tx)          loader -> consumers, dO of step it (phase it)
  do_empty (2)               consumers -> loader, once their dV product (the last reader of dO) completed
  part_ready                 consumer 1 -> 0: S_1 and dP_1 of step it are in the hand-over tile (phase it)
  part_free                  consumer 0 -> 1: the hand-over tile is free again: consumer 0 has read step it's
                             partials and its TMA reduce-add has read its dQ staging (slot 0) of step it. Arrived
                             at the start of step it + 1 (after tma.store_wait), completing phase it; consumer 1
                             waits for phase it − 1 before writing at step it (a fresh barrier passes parity 1).
                             Consumer 1 stages its own dQ in slot 1 and waits for its own TMA reads itself.
                             (With dq_in_q two reduce-adds a consumer are in flight at a step's end, the slot's
                             first: the waits for the slot are tma.store_wait(1), for the Q half store_wait(0).)
  pds_ready                  consumer 0 -> 1: P and dS of step it are in shared memory (phase it)
  pds_free                   consumer 1 -> 0: consumer 1's products reading P and dS of step it completed
                             (phase it); consumer 0 waits for phase it − 1 before writing P, dS at step it.

Why dq_in_q: with both dQ halves staged through one slot, the second waited for the first's reduce-add to drain
(under Nsight Compute ~17% of consumer 1's stall samples, on the path to its next hand-over); 227 KiB leave no
room for a second staging tile, but a consumer's Q half is free once its dK product completed.

Invariant (why no deadlock, and why a parity wait is exact): both consumers walk the same steps (the range is the
CTA's, a function of the key block, the sequence and the mask only: a query block whose rows see none of the keys
is either outside the range for both or inside it for both, its P then masked to 0), and each hand-over barrier is
arrived exactly once a step by one consumer and waited for once a step by the other. Within step it:
    consumer 1: Q, dO ready -> S_1, dP_1 -> wait part_free(it − 1) -> write, arrive part_ready(it)
                -> wait pds_ready(it) -> dV, dK, dQ -> arrive do_empty, q_empty, pds_free(it)
    consumer 0: Q, dO ready -> S_0, dP_0 -> [it > 0: arrive part_free(it − 1)] -> wait part_ready(it)
                -> P, dS -> wait pds_free(it − 1) -> write, arrive pds_ready(it) -> dV, dK, dQ
                -> arrive do_empty, q_empty
(With dq_in_q each consumer's q_empty of step it − 1 moves into step it, right after its part_ready(it) or
pds_ready(it) arrival; the Q load of step it + 1 waits for it, and needs nothing of step it + 1.)
Each wait of step it is answered by an arrival that needs only the other consumer's progress up to a point it has
already passed, plus loads the loader can issue: part_free(it − 1) comes from consumer 0 at the start of step it,
which needs consumer 1's part_ready(it − 1) and pds_free(it − 2) (both behind consumer 1) and the loads of step
it; pds_ready(it) needs part_ready(it) (consumer 1 arrives it before waiting for pds_ready) and pds_free(it − 1)
(consumer 1's step it − 1); part_ready(it) needs part_free(it − 1) (above); pds_free(it − 1) comes from consumer 1's
step it − 1. The loads of step it need Q stage it % 2 released at step it − 2 and dO released at step it − 1 by
both consumers, whose releases need nothing of step it. So the steps complete in order, by induction.
No barrier runs two phases ahead of its waiter: an arrival of phase it + 1 on part_ready / part_free / pds_ready /
pds_free needs the arriving consumer to have passed the other barrier's wait of phase it, which the waiter's
arrival of phase it precedes (e.g. consumer 1 arrives part_ready(it + 1) only after part_free(it), which consumer 0
arrives only after it passed part_ready(it)). A Python model of these barriers runs under random schedules in
tests/test_sm90_backward_aot.py (test_d256_protocol_model).

Registers and local memory (sm_90a, ptxas of Triton 3.6.0, tests/test_sm90_backward_aot.py "d256-*" cases, 2026-11-26):
consumer 0 (the default partition: the hand-over sums, exp2, dS) uses 238 of its 240 registers, consumer 1 216, the
loader 24; no local memory in the main loop of the plain, causal, varlen (causal or windowed), GQA, fp16 and
deterministic builds (6-11 spill instructions around the loop, for the epilogue's values); softcap holds tanh's
values beside S and dP in consumer 0: with a window and GQA 21 reloads a step (L1 hits; issuing dP_0 after P instead
cut them to 14 but leaves the tensor core idle under the softmax, so it was not taken).

Unsupported (the wrapper declines): the sink gradient's P·dP partials in the main kernel (tile.sink_pdp: the
preprocess's partial sums serve a sink instead), ping-pong turns, shared dQ (the dQ here is already per column
half), head dims other than tile widths (256, 256).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.language.core import _aggregate as aggregate

from . import configs
from .dq_staging import store_dq_staging
from .attention_fwd import _GL_DTYPES, _head_coord, _next_slot, _opaque
from .backward import (KEYS_PER_WG, WG_KEYS, BwdProblem, _cta_coords, _probabilities, _q_range, _RUNTIME_INTS,
                       _step_block, async_reduce_add_shared_to_global)

HALF = 128          # head-dim columns per consumer warpgroup
HALF_C = gl.constexpr(HALF)
DQ_COLS = 64        # dQ column part per wgmma / TMA reduce-add
DQ_COLS_C = gl.constexpr(DQ_COLS)


def smem_bytes(tile, elem=2):
    """Shared memory of attn_bwd_d256_kernel (see the module docstring)."""
    bm = tile.block_m
    kv = WG_KEYS * 2 * 256 * elem
    q = tile.stages * bm * 256 * elem
    do = bm * 256 * elem
    pds = 2 * bm * WG_KEYS * elem
    hand = 2 * bm * DQ_COLS * 4
    return kv + q + do + pds + hand + configs.SMEM_RESERVE


def descriptor(t, rows, varlen, cols=HALF):
    """TMA descriptor over t's shape and strides with boxes of `rows` tokens of one head and `cols` columns."""
    block = [rows, 1, cols] if varlen else [1, rows, 1, cols]
    layout = gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPES[t.dtype])
    return TensorDescriptor(t, shape=list(t.shape), strides=list(t.stride()), block_shape=block, layout=layout)


@aggregate
class D256Buffers:
    k: gl.shared_memory_descriptor          # [2, *box]: K[:, c_w] in k.index(w)
    v: gl.shared_memory_descriptor          # [2, *box]
    q: gl.shared_memory_descriptor          # [2 · STAGES, *box]: stage s, half w at index 2s + w
    do: gl.shared_memory_descriptor         # [2, *box]: the one dO stage, half w at index w
    pds: gl.shared_memory_descriptor        # [2, BM, 64] 16-bit: P in pds.index(0), dS in pds.index(1)
    hand: gl.shared_memory_descriptor       # [2, *dq box] fp32: S_1, dP_1; then dQ staging of consumer w in slot w
    kv_ready: gl.shared_memory_descriptor
    q_ready: gl.shared_memory_descriptor    # [STAGES, 1]
    q_empty: gl.shared_memory_descriptor    # [STAGES, 1]
    do_ready: gl.shared_memory_descriptor   # [1]
    do_empty: gl.shared_memory_descriptor   # [1]
    part_ready: gl.shared_memory_descriptor
    part_free: gl.shared_memory_descriptor
    pds_ready: gl.shared_memory_descriptor
    pds_free: gl.shared_memory_descriptor
    p_ready: gl.shared_memory_descriptor    # EARLY_DV: consumer 0 -> 1, P of step it is in shared memory

    @gluon.constexpr_function
    def __init__(self, k, v, q, do, pds, hand, kv_ready, q_ready, q_empty, do_ready, do_empty, part_ready,
                 part_free, pds_ready, pds_free, p_ready):
        self.k = k
        self.v = v
        self.q = q
        self.do = do
        self.pds = pds
        self.hand = hand
        self.kv_ready = kv_ready
        self.q_ready = q_ready
        self.q_empty = q_empty
        self.do_ready = do_ready
        self.do_empty = do_empty
        self.part_ready = part_ready
        self.part_free = part_free
        self.pds_ready = pds_ready
        self.pds_free = pds_free
        self.p_ready = p_ready


@gluon.jit
def _dp_slot(bufs, BM: gl.constexpr, N: gl.constexpr, HAND_SWZ: gl.constexpr):
    """Slot 1 of the hand-over tile as dP's (ROLES) or dP_1's [BM, N] fp32 tile. HAND_SWZ (ROLES only): viewed with
    32-byte vectors XORed by row mod 4 instead of the dQ descriptor's 128-byte swizzle, under which the accumulator
    fragment's STS.64 / LDS.64 (rows r and r ^ 1 on the same banks) take twice the ideal wavefronts."""
    if HAND_SWZ:
        layout: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=4, order=[1, 0])
        return bufs.hand.index(1)._reinterpret(gl.float32, [BM, N], layout)
    else:
        return bufs.hand.index(1).reshape([BM, N])


# ---------------------------------------------------------------------------------------------------------
# Loader partition: one warp issuing TMA loads.
# ---------------------------------------------------------------------------------------------------------

@gluon.jit
def _loader(p, bufs):
    nb, b, hk, seq_q, seq_k, q_start, k_start = _cta_coords(p)
    n0 = nb * KEYS_PER_WG
    if n0 < seq_k:
        mbarrier.expect(bufs.kv_ready, 2 * (p.k_desc.block_type.nbytes + p.v_desc.block_type.nbytes))
        for w in gl.static_range(2):
            tma.async_copy_global_to_shared(p.k_desc, _head_coord(p, b, hk, k_start, n0, w * HALF_C),
                                            bufs.kv_ready, bufs.k.index(w))
            tma.async_copy_global_to_shared(p.v_desc, _head_coord(p, b, hk, k_start, n0, w * HALF_C),
                                            bufs.kv_ready, bufs.v.index(w))
        m_lo, m_hi = _q_range(p, n0, seq_q, seq_k)
        idx = 0
        phase = 0
        n_m = m_hi - m_lo
        for it in range(p.group * n_m):
            g, h, row = _step_block(p, it, n_m, m_lo, hk)
            # A fresh barrier passes parity 1 at once: the first waits do not block.
            mbarrier.wait(bufs.q_empty.index(idx), phase ^ 1)
            mbarrier.expect(bufs.q_ready.index(idx), 2 * p.q_desc.block_type.nbytes)
            for w in gl.static_range(2):
                tma.async_copy_global_to_shared(p.q_desc, _head_coord(p, b, h, q_start, row, w * HALF_C),
                                                bufs.q_ready.index(idx), bufs.q.index(2 * idx + w))
            mbarrier.wait(bufs.do_empty.index(0), (it & 1) ^ 1)
            mbarrier.expect(bufs.do_ready.index(0), 2 * p.do_desc.block_type.nbytes)
            for w in gl.static_range(2):
                tma.async_copy_global_to_shared(p.do_desc, _head_coord(p, b, h, q_start, row, w * HALF_C),
                                                bufs.do_ready.index(0), bufs.do.index(w))
            idx, phase = _next_slot(idx, phase, p.STAGES)


# ---------------------------------------------------------------------------------------------------------
# Consumer partitions: one warpgroup each, head-dim columns [128·WG, 128·WG + 128).
# ---------------------------------------------------------------------------------------------------------

@gluon.jit
def _release_prev_q(p, bufs, it, idx):
    """DQ_IN_Q, after this step's hand-over: once the previous step's second dQ half has been read from this
    consumer's half of that step's Q slot (store_wait(0): every reduce-add in flight, that one among them), release
    the slot, the one before `idx` in the ring."""
    if it > 0:
        tma.store_wait(0)
        mbarrier.arrive(bufs.q_empty.index((idx + p.STAGES - 1) % p.STAGES))


@gluon.jit
def _publish_ds(p, bufs, pr, dp, delta, th, p_s, ds_s, it, idx, hp, DQ_IN_Q: gl.constexpr, STORE_P: gl.constexpr):
    """Consumer 0: dS = P ∘ (dP − Delta) (times 1 − th² under a softcap) into shared memory, with P unless it went out
    earlier (STORE_P off: EARLY_DV), once consumer 1's products of the previous step have read them (pds_free); then
    pds_ready, and with DQ_IN_Q the previous step's Q slot released."""
    dtype: gl.constexpr = p.q_desc.dtype
    ds = pr * (dp - gl.expand_dims(delta, 1))
    if p.SOFTCAP:
        ds = ds * (1.0 - th * th)
    if STORE_P:
        mbarrier.wait(bufs.pds_free, hp ^ 1)
        p_s.store(pr.to(dtype))
    ds_s.store(ds.to(dtype))
    fence_async_shared()
    mbarrier.arrive(bufs.pds_ready)
    if DQ_IN_Q and p.DQ_ATOMIC:
        _release_prev_q(p, bufs, it, idx)


@gluon.jit
def _stats(p, b, h, rows, q_start, seq_q):
    """lse2 and Delta of query rows `rows` (in the S accumulator's row layout) of head h."""
    if p.VARLEN:
        t_base = h * p.stride_th + q_start
    else:
        t_base = b * p.stride_tb + h * p.stride_th
    if p.VARLEN:
        row_ok = rows < seq_q
        lse2 = gl.load(p.lse2_ptr + t_base + rows, mask=row_ok, other=float("inf"))
        delta = gl.load(p.delta_ptr + t_base + rows, mask=row_ok, other=0.0)
    else:
        # Batched: lse2 and Delta padded to whole query blocks (+inf and 0).
        lse2 = gl.load(p.lse2_ptr + t_base + rows)
        delta = gl.load(p.delta_ptr + t_base + rows)
    return lse2, delta


@gluon.jit
def _consumer(p, bufs, WG: gl.constexpr, DQ_IN_Q: gl.constexpr, ROLES: gl.constexpr, EARLY_DV: gl.constexpr,
              STATS_AHEAD: gl.constexpr, HAND_SWZ: gl.constexpr):
    BM: gl.constexpr = p.BM
    N: gl.constexpr = KEYS_PER_WG
    W: gl.constexpr = HALF_C
    DQW: gl.constexpr = DQ_COLS_C
    dtype: gl.constexpr = p.q_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, N, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, W, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DQW, 16])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)

    nb, b, hk, seq_q, seq_k, q_start, k_start = _cta_coords(p)
    n0 = nb * N
    if n0 < seq_k:
        m_lo, m_hi = _q_range(p, n0, seq_q, seq_k)
        dk = gl.zeros([N, W], gl.float32, acc_layout)
        dv = gl.zeros([N, W], gl.float32, acc_layout)
        if WG == 0:
            row_ids = _opaque(gl.arange(0, BM, row_s))
        n_m = m_hi - m_lo
        if WG == 0 and STATS_AHEAD:
            # lse2 and Delta one step ahead in registers: their L2 round trip no longer waits under S.
            _, h_n, m0_n = _step_block(p, 0, n_m, m_lo, hk)
            lse2_n, delta_n = _stats(p, b, h_n, m0_n + row_ids, q_start, seq_q)
        mbarrier.wait(bufs.kv_ready, 0)
        idx = 0
        phase = 0
        for it in range(p.group * n_m):
            g, h, m0 = _step_block(p, it, n_m, m_lo, hk)
            q_s = bufs.q.index(2 * idx + WG).reshape([BM, W])
            # Opaque buffer indices, read afresh every step: LLVM otherwise builds the loop-invariant 64-bit wgmma
            # descriptors (K, V, dO halves, P, dS) and staging addresses before the loop and keeps them live
            # through it (spilled at 240 registers a thread).
            wi = _opaque(gl.to_tensor(WG))
            k_s = bufs.k.index(wi).reshape([N, W])
            v_s = bufs.v.index(wi).reshape([N, W])
            do_s = bufs.do.index(wi).reshape([BM, W])
            p_s = bufs.pds.index(_opaque(gl.to_tensor(0)))
            ds_s = bufs.pds.index(_opaque(gl.to_tensor(1)))
            hp = it & 1  # parity of the hand-over barriers' phase `it`
            if ROLES:
                # Whole products, one each: consumer 0 forms S over all 256 columns, consumer 1 dP; consumer 1
                # hands dP (fp32) to consumer 0, which forms P and dS. Against the partial products below: half
                # the hand-over bytes, no partial sums, and consumer 0's exp2 runs while consumer 1 still
                # computes dP and stores it.
                if WG == 0:
                    mbarrier.wait(bufs.q_ready.index(idx), phase)
                    q_o = bufs.q.index(2 * idx + 1 - wi).reshape([BM, W])
                    k_o = bufs.k.index(1 - wi).reshape([N, W])
                    s = warpgroup_mma(q_s, k_s.permute((1, 0)), gl.zeros([BM, N], gl.float32, s_layout),
                                      use_acc=False, is_async=True)
                    s = warpgroup_mma(q_o, k_o.permute((1, 0)), s, is_async=True)
                    if it > 0:
                        # Slot 0 stages this consumer's first dQ half: its last reduce-add must have read it.
                        tma.store_wait(1 if DQ_IN_Q else 0)
                    rows = m0 + row_ids
                    if STATS_AHEAD:
                        lse2 = lse2_n
                        delta = delta_n
                        _, h_n, m0_n = _step_block(p, gl.minimum(it + 1, p.group * n_m - 1), n_m, m_lo, hk)
                        lse2_n, delta_n = _stats(p, b, h_n, m0_n + row_ids, q_start, seq_q)
                    else:
                        lse2, delta = _stats(p, b, h, rows, q_start, seq_q)
                    s = warpgroup_mma_wait(0, deps=(s, ))
                    pr, th = _probabilities(p, s, rows, n0, m0, seq_q, seq_k, lse2)
                    if EARLY_DV:
                        # P goes out before dP is in: both consumers' dV products run under dS, and dO is
                        # released (the next dO load issued) a dV product earlier.
                        mbarrier.wait(bufs.pds_free, hp ^ 1)
                        p_s.store(pr.to(dtype))
                        fence_async_shared()
                        mbarrier.arrive(bufs.p_ready)
                        mbarrier.wait(bufs.do_ready.index(0), hp)
                        dv = warpgroup_mma(p_s.permute((1, 0)), do_s, dv, is_async=True)
                    mbarrier.wait(bufs.part_ready, hp)
                    dp = _dp_slot(bufs, BM, N, HAND_SWZ).load(s_layout)
                    _publish_ds(p, bufs, pr, dp, delta, th, p_s, ds_s, it, idx, hp, DQ_IN_Q, not EARLY_DV)
                    if not EARLY_DV:
                        mbarrier.wait(bufs.do_ready.index(0), hp)
                else:
                    mbarrier.wait(bufs.do_ready.index(0), hp)
                    do_o = bufs.do.index(1 - wi).reshape([BM, W])
                    v_o = bufs.v.index(1 - wi).reshape([N, W])
                    dp = warpgroup_mma(do_s, v_s.permute((1, 0)), gl.zeros([BM, N], gl.float32, s_layout),
                                       use_acc=False, is_async=True)
                    dp = warpgroup_mma(do_o, v_o.permute((1, 0)), dp, is_async=True)
                    dp = warpgroup_mma_wait(0, deps=(dp, ))
                    # Slot 1 staged this warpgroup's last dQ half: its reduce-add must have read it. Consumer 0
                    # read the previous dP before its pds_ready, which this consumer waited for: no part_free.
                    tma.store_wait(1 if DQ_IN_Q else 0)
                    _dp_slot(bufs, BM, N, HAND_SWZ).store(dp)
                    fence_async_shared()
                    mbarrier.arrive(bufs.part_ready)
                    if DQ_IN_Q and p.DQ_ATOMIC:
                        _release_prev_q(p, bufs, it, idx)
                    if EARLY_DV:
                        mbarrier.wait(bufs.p_ready, hp)
                        dv = warpgroup_mma(p_s.permute((1, 0)), do_s, dv, is_async=True)
                    mbarrier.wait(bufs.q_ready.index(idx), phase)
                    mbarrier.wait(bufs.pds_ready, hp)
            else:
                # Partial products over this warpgroup's 128 columns.
                mbarrier.wait(bufs.q_ready.index(idx), phase)
                s = warpgroup_mma(q_s, k_s.permute((1, 0)), gl.zeros([BM, N], gl.float32, s_layout), use_acc=False,
                                  is_async=True)
                mbarrier.wait(bufs.do_ready.index(0), hp)
                dp = warpgroup_mma(do_s, v_s.permute((1, 0)), gl.zeros([BM, N], gl.float32, s_layout),
                                   use_acc=False, is_async=True)
                if WG == 0:
                    if it > 0:
                        # The previous step's dQ reduce-adds have read slot 0: the hand-over tile is free. (DQ_IN_Q:
                        # the slot's reduce-add is the older of the two in flight.)
                        tma.store_wait(1 if DQ_IN_Q else 0)
                        mbarrier.arrive(bufs.part_free)
                    rows = m0 + row_ids
                    lse2, delta = _stats(p, b, h, rows, q_start, seq_q)
                    s = warpgroup_mma_wait(1, deps=(s, ))
                    mbarrier.wait(bufs.part_ready, hp)
                    s = s + bufs.hand.index(0).reshape([BM, N]).load(s_layout)
                    pr, th = _probabilities(p, s, rows, n0, m0, seq_q, seq_k, lse2)
                    dp = warpgroup_mma_wait(0, deps=(dp, ))
                    dp = dp + _dp_slot(bufs, BM, N, HAND_SWZ).load(s_layout)
                    # Consumer 1's products of the previous step have read P and dS (it arrived pds_free before
                    # part_ready: the helper's pds_free wait does not block).
                    _publish_ds(p, bufs, pr, dp, delta, th, p_s, ds_s, it, idx, hp, DQ_IN_Q, True)
                else:
                    s, dp = warpgroup_mma_wait(0, deps=(s, dp))
                    # Slot 1 staged this warpgroup's last dQ half: its reduce-add must have read it; slot 0 is
                    # consumer 0's (part_free).
                    tma.store_wait(1 if DQ_IN_Q else 0)
                    mbarrier.wait(bufs.part_free, hp ^ 1)
                    bufs.hand.index(0).reshape([BM, N]).store(s)
                    _dp_slot(bufs, BM, N, HAND_SWZ).store(dp)
                    fence_async_shared()
                    mbarrier.arrive(bufs.part_ready)
                    if DQ_IN_Q and p.DQ_ATOMIC:
                        _release_prev_q(p, bufs, it, idx)
                    mbarrier.wait(bufs.pds_ready, hp)
            # dV[:, c_w] += Pᵀ·dO[:, c_w], dK[:, c_w] += dSᵀ·Q[:, c_w]: A read transposed from shared memory.
            if EARLY_DV:
                # dV was issued once P was in; dO is free once it completed.
                dv = warpgroup_mma_wait(0, deps=(dv, ))
                mbarrier.arrive(bufs.do_empty.index(0))
            else:
                dv = warpgroup_mma(p_s.permute((1, 0)), do_s, dv, is_async=True)
            dk = warpgroup_mma(ds_s.permute((1, 0)), q_s, dk, is_async=True)
            if p.DQ_ATOMIC:
                dq = warpgroup_mma(ds_s, k_s.slice(0, DQW, dim=1), gl.zeros([BM, DQW], gl.float32, dq_layout),
                                   use_acc=False, is_async=True)
                if not EARLY_DV:
                    # dO is free once dV completed: the next dO load runs under dK and dQ.
                    dv = warpgroup_mma_wait(2, deps=(dv, ))
                    mbarrier.arrive(bufs.do_empty.index(0))
                dk, dq = warpgroup_mma_wait(0, deps=(dk, dq))
                if not DQ_IN_Q:
                    mbarrier.arrive(bufs.q_empty.index(idx))
                # The second column half, under the first one's staging.
                dq2 = warpgroup_mma(ds_s, k_s.slice(DQW, DQW, dim=1),
                                    gl.zeros([BM, DQW], gl.float32, dq_layout), use_acc=False, is_async=True)
                dq_s = bufs.hand.index(wi)
                stage = dq_s.reshape([BM, DQW])
                store_dq_staging(stage, dq * p.softmax_scale, p.DQ_SPREAD)
                fence_async_shared()
                async_reduce_add_shared_to_global(p.dq_desc, _head_coord(p, b, h, q_start, m0, WG * W), dq_s)
                dq2 = warpgroup_mma_wait(0, deps=(dq2, ))
                if WG == 1:
                    mbarrier.arrive(bufs.pds_free)
                if DQ_IN_Q:
                    # This consumer's Q half (its dK product, the last reader, completed) as the second staging
                    # tile: no wait for the first half's reduce-add. Released at the next step (q_empty).
                    dq_s2 = bufs.q.index(2 * idx + wi)._reinterpret(gl.float32, dq_s.type.shape, dq_s.type.layout)
                    store_dq_staging(dq_s2.reshape([BM, DQW]), dq2 * p.softmax_scale, p.DQ_SPREAD)
                    fence_async_shared()
                    async_reduce_add_shared_to_global(p.dq_desc, _head_coord(p, b, h, q_start, m0, WG * W + DQW),
                                                      dq_s2)
                else:
                    tma.store_wait(0)
                    store_dq_staging(stage, dq2 * p.softmax_scale, p.DQ_SPREAD)
                    fence_async_shared()
                    async_reduce_add_shared_to_global(p.dq_desc, _head_coord(p, b, h, q_start, m0, WG * W + DQW),
                                                      dq_s)
            else:
                if not EARLY_DV:
                    dv = warpgroup_mma_wait(1, deps=(dv, ))
                    mbarrier.arrive(bufs.do_empty.index(0))
                dk = warpgroup_mma_wait(0, deps=(dk, ))
                mbarrier.arrive(bufs.q_empty.index(idx))
                if WG == 1:
                    mbarrier.arrive(bufs.pds_free)
            idx, phase = _next_slot(idx, phase, p.STAGES)
        tma.store_wait(0)
        # The epilogue's indices from a fresh %ctaid read (not kept live through the loop).
        nb, b, hk, seq_q, seq_k, q_start, k_start = _cta_coords(p)
        kr0 = nb * N
        # This warpgroup's K and V halves are read only by its own (completed) products: they stage dK, dV.
        slot = _opaque(gl.to_tensor(WG))
        _store_half(p, p.dv_desc, bufs.v.index(slot), p.dv_ptr, dv.to(dtype), b, hk, k_start, kr0, seq_k, p.dv,
                    p.stride_dvb, p.stride_dvs, p.stride_dvh, WG)
        _store_half(p, p.dk_desc, bufs.k.index(slot), p.dk_ptr, (dk * p.softmax_scale).to(dtype), b, hk, k_start,
                    kr0, seq_k, p.d, p.stride_dkb, p.stride_dks, p.stride_dkh, WG)
        tma.store_wait(0)


@gluon.jit
def _store_half(p, desc, stage, ptr, val, b, hk, k_start, kr0, seq_k, width, stride_b, stride_s, stride_h,
                WG: gl.constexpr):
    """Consumer WG's 64 rows x 128 columns of dK or dV (already in the output dtype), as backward._store_rows:
    TMA (clipped at the tensor's bounds), or masked pointer stores for a varlen block past its sequence."""
    W: gl.constexpr = val.type.shape[1]
    if p.VARLEN and kr0 + KEYS_PER_WG > seq_k:
        layout: gl.constexpr = val.type.layout
        rows = kr0 + gl.arange(0, KEYS_PER_WG, gl.SliceLayout(1, layout))
        cols = WG * W + gl.arange(0, W, gl.SliceLayout(0, layout))
        tok = k_start + rows
        if p.BIG:
            tok = tok.to(gl.int64)
        offs = gl.expand_dims(tok * stride_s, 1) + hk * stride_h + gl.expand_dims(cols, 0)
        mask = gl.expand_dims(rows < seq_k, 1) & gl.expand_dims(cols < width, 0)
        gl.store(ptr + offs, val, mask=mask)
    else:
        stage.reshape([KEYS_PER_WG, W]).store(val)
        fence_async_shared()
        tma.async_copy_shared_to_global(desc, _head_coord(p, b, hk, k_start, kr0, WG * W), stage)
        tma.store_wait(0)


# ---------------------------------------------------------------------------------------------------------
# The kernel: the same parameters as backward.attn_bwd_kernel (one launch plan for both), NWG = 1 (one 64-key
# slab a CTA); DQ_SHARED, EARLY_DP, SINK_PDP and PING_PONG must be off.
# ---------------------------------------------------------------------------------------------------------

@gluon.jit(do_not_specialize=_RUNTIME_INTS)
def attn_bwd_d256_kernel(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, dq_desc, lse2_desc, delta_desc, dk_ptr,
                         dv_ptr, lse2_ptr,
                         delta_ptr, sink_ptr, dsink_ptr, dq_ctr,
                         cu_q, cu_k, seqused, stride_dkb, stride_dks, stride_dkh, stride_dvb,
                         stride_dvs, stride_dvh, stride_tb, stride_th, d, dv, seqlen_q, seqlen_k, num_kv_heads, group,
                         qk_scale, cap_scale, softmax_scale, window_left, window_right,
                         BM: gl.constexpr, NWG: gl.constexpr, STAGES: gl.constexpr, VARLEN: gl.constexpr,
                         HAS_SEQUSED: gl.constexpr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr,
                         SOFTCAP: gl.constexpr, DQ_ATOMIC: gl.constexpr, DQ_SHARED: gl.constexpr,
                         EARLY_DP: gl.constexpr, SINK_PDP: gl.constexpr, PING_PONG: gl.constexpr, BIG: gl.constexpr,
                         TRACE: gl.constexpr, ORDERED_DQ: gl.constexpr, DQ_WRITER: gl.constexpr,
                         STATS_TMA: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                         LOADER_REGS: gl.constexpr, CTA_CHUNKED: gl.constexpr = False,
                         DQ_RELEASE_LAG: gl.constexpr = False, DQ_STORE_FIRST: gl.constexpr = False,
                         DQ_SPREAD: gl.constexpr = False, DQ_CHAIN_FENCE: gl.constexpr = 0,
                         DQ_IN_Q: gl.constexpr = False, ROLES: gl.constexpr = False,
                         EARLY_DV: gl.constexpr = False, STATS_AHEAD: gl.constexpr = False,
                         HAND_SWZ: gl.constexpr = False):
    gl.static_assert(NWG == 1, "D = 256: one 64-key slab a CTA (the two consumers split the head dim)")
    gl.static_assert(not (DQ_SHARED or EARLY_DP or SINK_PDP or PING_PONG or TRACE or ORDERED_DQ != 0 or DQ_WRITER
                          or STATS_TMA),
                     "not built at D = 256")
    gl.static_assert(BM == 64, "D = 256: BM = 64")
    gl.static_assert(ROLES or not (EARLY_DV or STATS_AHEAD or HAND_SWZ), "EARLY_DV, STATS_AHEAD, HAND_SWZ need ROLES")
    dtype: gl.constexpr = q_desc.dtype
    k_smem = gl.allocate_shared_memory(dtype, [2] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2] + v_desc.block_type.shape, v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [2 * STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [2] + do_desc.block_type.shape, do_desc.layout)
    pds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, KEYS_PER_WG], dtype)
    pds_smem = gl.allocate_shared_memory(dtype, [2, BM, KEYS_PER_WG], pds_layout)
    hand = gl.allocate_shared_memory(gl.float32, [2] + dq_desc.block_type.shape, dq_desc.layout)
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    do_empty = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    part_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    part_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    pds_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    pds_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    p_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(s), count=1)
        mbarrier.init(q_empty.index(s), count=2)
    mbarrier.init(do_ready.index(0), count=1)
    mbarrier.init(do_empty.index(0), count=2)
    mbarrier.init(part_ready, count=1)
    mbarrier.init(part_free, count=1)
    mbarrier.init(pds_ready, count=1)
    mbarrier.init(pds_free, count=1)
    mbarrier.init(p_ready, count=1)

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
                   SINK_PDP, PING_PONG, BIG, TRACE, ORDERED_DQ, DQ_WRITER, False, CTA_CHUNKED, DQ_SPREAD)
    bufs = D256Buffers(k_smem, v_smem, q_smem, do_smem, pds_smem, hand, kv_ready, q_ready, q_empty, do_ready,
                       do_empty, part_ready, part_free, pds_ready, pds_free, p_ready)
    gl.warp_specialize([(_consumer, (p, bufs, gl.constexpr(0), DQ_IN_Q, ROLES, EARLY_DV, STATS_AHEAD, HAND_SWZ)),
                        (_consumer, (p, bufs, gl.constexpr(1), DQ_IN_Q, ROLES, EARLY_DV, STATS_AHEAD, HAND_SWZ)),
                        (_loader, (p, bufs))], [4, 1], [CONSUMER_REGS, LOADER_REGS])
