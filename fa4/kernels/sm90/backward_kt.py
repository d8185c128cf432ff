"""Attention backward for Hopper (sm_90a) in Gluon with keys as the rows of every product ("keys as rows", tile
field `keys_as_rows`; the launch plan and host wrapper are backward.py's): the default at D = Dv = 64 (BM = 128) and
for causal calls at D = Dv = 128 (BM = 64; backward.default_tile).

Why a kernel of its own. At D = 64 every product of backward.py's step is a 64 x 64 x 64 wgmma with both operands
in shared memory: 4 KiB read per 131 kFLOP, 32 FLOP a byte, exactly the tensor core's rate (4,096 FLOP a clock)
over shared memory's (128 B a clock). Add the P and dS stores and shared memory, not the tensor core, bounds the
step; and the dQ product (a third such product plus its fp32 staging) did not fit beside three consumers, so dQ
came from a second kernel (7 products where the peers run 5; benchmarks/NOTES.md, sessions 4-13).

Here a CTA keeps 128 keys (two consumer warpgroups of 64) and streams query blocks of BM rows. Consumer w computes
the transposed scores of its keys, so P and dS come out of the accumulator with keys as rows, which is the A operand
of dV and dK straight from registers (D = 64, BM = 128):

    Sᵀ  = K_w·Qᵀ      [64 keys, 128 queries]   A = K_w (shared), B = Qᵀ (shared), 42.7 FLOP a byte
    dPᵀ = V_w·dOᵀ     [64, 128]                 the same
    Pᵀ = exp2(Sᵀ·scale·log2 e − lse2ᵀ),  dSᵀ = Pᵀ ∘ (dPᵀ − Deltaᵀ)     lse2, Delta per column (query)
    dV_w += Pᵀ·dO     [64, 64], K = 128         A = Pᵀ in registers, B = dO (shared): 64 FLOP a byte
    dK_w += dSᵀ·Q     [64, 64], K = 128         A = dSᵀ in registers
    dQ[64w : 64w + 64] = dS[64w :, keys of consumer 0]·K_0 + dS[64w :, keys of consumer 1]·K_1
                      [64 queries, 64], K = 128 keys: both consumers' dSᵀ (16-bit, [64 keys, 128 queries] each)
                      handed over in shared memory, read transposed; added to the fp32 accumulator by one TMA
                      reduce-add of [64, 64] per consumer and step
    (D = 128, BM = 64: consumer w's dQ share is all 64 query rows of its D / 2 columns, K_0 and K_1 sliced.)

Five products of 1 MFLOP per consumer and step, the same five the peers run, and P never goes to shared memory.
Shared memory read per consumer step: 24 + 24 (Sᵀ, dPᵀ) + 16 + 16 (dV, dK) + 32 (dQ) KiB, written 16 (dSᵀ) + 16
(dQ staging) and read again by TMA 16: ~1,250 clocks at 128 B a clock against 1,280 clocks of tensor work, where
backward.py's D = 64 step needs ~1,875 against 1,536 without its dQ.

Registers per consumer thread (240): Sᵀ then Pᵀ (64 fp32), dPᵀ (64, issued right behind Sᵀ), dV and dK (32 + 32),
then Pᵀ and dSᵀ in 16 bits (32 + 32) as the A operands, and the dQ share (32) once Sᵀ and dPᵀ are dead. lse2 and
Delta are 32 values a thread each (32 query columns): the accumulators start at −lse2 / scale2 and −Delta instead,
so neither is live at the register peak (see the loop).

The statistics as a K extension (STATS_EXT, tile.stats_ext: batched bf16 calls, the default on both tiles). Loading
those seeds cost each warp 64 shared-memory wavefronts a step (one per value a lane needs: no layout of the
accumulator lets lanes share them), ~17% of the D = 64 step's. Instead the preprocess writes, per query row, the
[hi, mid, lo] bf16 parts of −lse2 / scale2 and of −Delta (backward.stats_ext_parts: they sum to the fp32 value) in
one 16-column row (lse2's in columns 0-2, Delta's in 8-10: backward.STATS_EXT_DELTA_COL); the loader brings in two
16-column boxes of it by TMA where the fp32 statistics went, lse2's from column 0 and Delta's from column 8 (its
last 8 columns lie past the tensor and arrive as zeros), so each box has its parts in columns 0-2, and

    Sᵀ acc = ones·parts(−lse2 / scale2)ᵀ + K·Qᵀ,    dPᵀ acc = ones·parts(−Delta)ᵀ + V·dOᵀ

with ones [64 keys, 16] = 1 in columns 0-2: one more m64nBMk16 wgmma a product, and no statistics in registers at
all. The ones operand comes from registers at BM = 128 and from a shared tile at BM = 64 (the D = 128 loop is short
of registers). Nsight Compute (H100): 4-5% fewer main-kernel cycles at D = 64, 3.5-4.3% on the D = 128 causal and
chain rows at S = 16384 (benchmarks/NOTES.md, session 30).

Barriers: backward.py's loader protocol (kv_ready, q_ready / q_empty, do_ready / do_empty, lse2 and Delta on Q's
barrier), and the dS hand-over of its DQ_SHARED tile (ds_ready[b]: buffer b holds its owner's dSᵀ; ds_free[b]: the
other consumer's dQ product reading buffer b completed). Without DQ_LAG each consumer has one buffer and both use the
other's dSᵀ of the same step; with DQ_LAG (tile.dq_lag, the default) two a consumer by step parity, and each step's
dQ share is issued at the next step (the last one after the loop), so either consumer may run up to a step ahead
instead of both meeting at every step. Each hand-over barrier is arrived once per use by one consumer and waited for
once per use by the other, and a consumer rewrites a buffer only after ds_free of its previous use, so a parity wait
is exact and the steps complete in order (the argument of backward.py's module docstring, without turns; a Python
model of the lagged protocol runs under random schedules in tests/test_sm90_backward_aot.py). Before dK is staged in
a consumer's K slot it waits for the other consumer's last dQ product, which reads that K. DQ_FIRST (DQ_LAG = 2,
tile.dq_first where backward.dq_first_serves: the chain's builds without a right window) issues the lagged share
before the step's dV and dK instead of after them, waits for it alone and stages it while they run, so the staging's
wait for the writer warp overlaps this consumer's own products (the same waits, in another order within a step).

Persistent grid (PERSIST, tile.persistent: batched causal D = 128 by default): min(tiles, SMs) CTAs; the loader draws
tiles from a global counter (dq_ctr, zeroed with the dQ accumulator) and hands each index to the consumers through a
two-slot ring (handout.py); each tile is _kt_tile's walk, with the Q / dO ring and the dSᵀ buffers' parities carried
across tiles by the CTA's global step count. The loader requests a tile's first Q / dO blocks before its K and V, whose
slots the consumers hand back separately after storing dK (k_free) and then dV (v_free); V arrives on its own barrier
(KvHandback.v_ready), waited for before the tile's first dPᵀ and before dV is staged. A Python model of this protocol
runs under random schedules in tests/test_sm90_backward_aot.py. DQ_CAST (backward.dq_cast_serves: the ascending
chain whose first link stores, under a right window): the writer of each chain's last link
(backward.last_key_block) reads the completed fp32 share back once its add has landed and stores dQ itself in the
input dtype (_cast_share).

Served: causal and window masks, GQA, varlen, seqused_k, deterministic=True (the ordered chain through the writer
warp, backward.dq_writer; on the persistent grid the ascending chain, _writer_persistent, walks top-down) and a sink
(this kernel without dQ; the ordered pass gives dQ and the sink gradient, backward_checked). Not built: softcap
(tanh's values beside Sᵀ and dPᵀ), the sink's P·dP partials, ping-pong. The trace build (tile.trace,
benchmarks/bwd_trace.py) stamps backward.py's events; with DQ_LAG events 6-10 of step `it` close the dQ share of step
it − 1 (the last share, after the loop, is stamped as one step past the last).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)
from triton.language.core import _aggregate as aggregate

from . import configs, handout
from .dq_staging import store_dq_staging
from .attention_fwd import _kv_coord, _next_slot, _opaque, _visible_pairs
from .softmax import exp2_mixed
from .backward import (CHAIN_CTR_OFFSET, KEYS_PER_WG, STATS_EXT_PARTS_C, STATS_EXT_WIDTH, STATS_EXT_WIDTH_C, WG_KEYS,
                       BwdBuffers, BwdProblem, _cta_coords, _cta_event,
                       _loader, _mask_needed, _load_step, _q_range, _RUNTIME_INTS, _sequence, _step_block, _store_rows,
                       _trace_step, async_reduce_add_shared_to_global, dq_share_coord, dq_writer, last_key_block,
                       release_step, write_step, writer_barriers)

CHAIN_CTR = gl.constexpr(CHAIN_CTR_OFFSET)


def smem_bytes(tile, d, dv, elem=2):
    """Shared memory of attn_bwd_kt_kernel: resident K, V; the Q / dO ring with each block's lse2 and Delta (or their
    K extensions); both consumers' dSᵀ; their fp32 dQ staging tiles ([64 rows, D] or [BM, D / 2] each: BM·D / 2 either
    way); at BM = 64 with the extensions, each consumer's ones tile."""
    kv = tile.block_n * (d + dv) * elem
    # Per query row: Q and dO, and lse2 and Delta (fp32), or their 16-wide 16-bit K extensions (tile.stats_ext).
    stats = 2 * STATS_EXT_WIDTH * elem if tile.stats_ext else 2 * 4
    qdo = tile.stages * tile.block_m * ((d + dv) * elem + stats)
    ones = tile.num_wg * WG_KEYS * STATS_EXT_WIDTH * elem if tile.stats_ext and tile.block_m == WG_KEYS else 0
    ds = (2 if tile.dq_lag else 1) * tile.num_wg * WG_KEYS * tile.block_m * elem
    dq = tile.block_m * d * 4
    return kv + qdo + ds + dq + ones + configs.SMEM_RESERVE


def cast_bytes(tile, d):
    """DQ_CAST's shared memory beside smem_bytes: the writer's fp32 read-back of one consumer's dQ share (the box of
    the accumulator's descriptor, BM·D / 2 floats either way) and its barrier."""
    return tile.block_m * d // tile.num_wg * 4 + 8


@gluon.jit
def _mask_t(p, s, kr0, m0, seq_q, seq_k):
    """-inf where key (row) kr0 + r is not visible to query (column) m0 + c; only in blocks that need it.
    Query columns past the sequence need no mask: their lse2 is +inf, so their P is exactly 0."""
    if _mask_needed(p, kr0, m0, seq_q, seq_k):
        # Opaque offsets: not hoisted out of the loop and kept live through it (the query columns are 32 values a
        # thread).
        keys = kr0 + _opaque(gl.arange(0, KEYS_PER_WG, gl.SliceLayout(1, s.type.layout)))
        queries = m0 + _opaque(gl.arange(0, p.BM, gl.SliceLayout(0, s.type.layout)))
        ok = _visible_pairs(p, gl.expand_dims(queries, 0), gl.expand_dims(keys, 1), seq_k, seq_k - seq_q)
        s = gl.where(ok, s, float("-inf"))
    return s


@gluon.jit
def _distinct(x):
    """x with every element in a register of its own, defined here (a non-pure move per element: not merged with an
    equal value, not sunk below the next asynchronous wgmma)."""
    return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=False, pack=1)


@gluon.jit
def _column_stats(p, bufs, idx, t_base, cols, col_ok, which: gl.constexpr, layout: gl.constexpr):
    """lse2 (which = 0) or Delta (which = 1) of the step's query columns, per column of the Sᵀ layout. Columns past a
    packed sequence: lse2 = +inf (P = 0) and Delta = 0 (finite, so 0·(dPᵀ − Delta) = 0)."""
    BM: gl.constexpr = p.BM
    fill: gl.constexpr = float("inf") if which == 0 else 0.0
    if p.STATS_TMA:
        if which == 0:
            x = bufs.lse2.index(idx).reshape([BM]).load(layout)
        else:
            x = bufs.delta.index(idx).reshape([BM]).load(layout)
        if p.VARLEN:
            x = gl.where(col_ok, x, fill)
    else:
        ptr = p.lse2_ptr if which == 0 else p.delta_ptr
        if p.VARLEN:
            x = gl.load(ptr + t_base + cols, mask=col_ok, other=fill)
        else:
            x = gl.load(ptr + t_base + cols)
    return x


@gluon.jit
def _dq_issue(p, bufs, base, WG: gl.constexpr, QW: gl.constexpr, DQW: gl.constexpr, DQ_ROWS: gl.constexpr,
              dq_layout: gl.constexpr):
    """Issue this consumer's dQ share over the CTA's 128 keys (asynchronous): both consumers' dSᵀ, in ds.index(base)
    and ds.index(base + 1), read transposed. DQ_ROWS: this consumer's 64 query columns of each dSᵀ (a 64-column
    slice of a 128-column tile: one whole 128-byte swizzle span) times all of K; else all of each dSᵀ times this
    consumer's D / 2 columns of K. Opaque buffer indices: the wgmma descriptors are not built before the loop and
    kept live through it."""
    NWG: gl.constexpr = p.NWG
    N: gl.constexpr = KEYS_PER_WG
    D: gl.constexpr = p.q_desc.block_type.shape[-1]
    dq = gl.zeros([QW, DQW], gl.float32, dq_layout)
    for w in gl.static_range(NWG):
        wi = _opaque(gl.to_tensor(w))
        if DQ_ROWS:
            dq = warpgroup_mma(bufs.ds.index(base + wi).slice(WG * QW, QW, dim=1).permute((1, 0)),
                               bufs.k.index(wi).reshape([N, D]), dq, use_acc=w > 0, is_async=True)
        else:
            dq = warpgroup_mma(bufs.ds.index(base + wi).permute((1, 0)),
                               bufs.k.index(wi).reshape([N, D]).slice(WG * DQW, DQW, dim=1), dq,
                               use_acc=w > 0, is_async=True)
    return dq


@gluon.jit
def _dq_add(p, bufs, dq, b, h, q_start, m0, WG: gl.constexpr, QW: gl.constexpr, DQW: gl.constexpr,
            DQ_ROWS: gl.constexpr, it, j):
    """Stage this consumer's completed dQ share (scaled) and add it to the fp32 accumulator by TMA reduce-add, once
    the previous add has read the staging tile. `it`: the step the trace build stamps (events 8-10); j: the step
    whose share this is, counted over the CTA's tiles (the persistent grid's writer pairs with it by parity). With
    the writer warp (DQ_WRITER, the ordered chain) the consumer only stages the share and hands it over
    (dq_staged); the writer issues the add in the chain's order and frees the tile (dq_free, arrived once per step:
    the wait for share j is the writer's release of share j - 1, and a fresh barrier passes parity 1 for j = 0)."""
    if p.DQ_WRITER:
        mbarrier.wait(bufs.dq_free.index(WG), (j & 1) ^ 1)
    else:
        tma.store_wait(0)
    _trace_step(p, WG, it, 8)
    dq_s = bufs.dq.index(WG)
    store_dq_staging(dq_s.reshape([QW, DQW]), dq * p.softmax_scale, p.DQ_SPREAD)
    fence_async_shared()
    _trace_step(p, WG, it, 9)
    if p.DQ_WRITER:
        mbarrier.arrive(bufs.dq_staged.index(WG))
    else:
        async_reduce_add_shared_to_global(p.dq_desc, dq_share_coord(p, b, h, q_start, m0, WG, True), dq_s)
    _trace_step(p, WG, it, 10)


@gluon.jit
def _share_and_release(p, bufs, dv, dk, idx, base, parity, b, h, q_start, m0, it, j, WG: gl.constexpr,
                       QW: gl.constexpr, DQW: gl.constexpr, DQ_ROWS: gl.constexpr, dq_layout: gl.constexpr):
    """The end of a step with dQ in the kernel: once the other consumer's dSᵀ is in ds.index(base + OTHER) (parity:
    that buffer's phase), issue this consumer's dQ share from ds.index(base) and ds.index(base + 1) behind the step's
    in-flight dV and dK, wait for all three, free the other's buffer and the Q / dO slot, and add the share to dQ
    rows (h, m0) (the share of step j; `it`: the step the trace build stamps). Returns dV and dK."""
    OTHER: gl.constexpr = (WG + 1) % p.NWG
    mbarrier.wait(bufs.ds_ready.index(base + OTHER), parity)
    dq = _dq_issue(p, bufs, base, WG, QW, DQW, DQ_ROWS, dq_layout)
    dv, dk, dq = warpgroup_mma_wait(0, deps=(dv, dk, dq))
    _trace_step(p, WG, it, 6)
    mbarrier.arrive(bufs.ds_free.index(base + OTHER))
    mbarrier.arrive(bufs.q_empty.index(idx))
    mbarrier.arrive(bufs.do_empty.index(idx))
    _trace_step(p, WG, it, 7)
    _dq_add(p, bufs, dq, b, h, q_start, m0, WG, QW, DQW, DQ_ROWS, it, j)
    return dv, dk


@gluon.jit
def _dv_ds_dk(p, bufs, dv, dk, pt16, ds16, do_s, q_s, gstep, it, WG: gl.constexpr, DV_EARLY: gl.constexpr,
              DQ_LAG: gl.constexpr, dsa_layout: gl.constexpr):
    """The middle of a step: dV += Pᵀ·dO issued (unless DV_EARLY issued it); with dQ in the kernel this consumer's
    dSᵀ handed over in its buffer of global step s = gstep + it (DQ_LAG: two a consumer, by step parity), once the
    other consumer's dQ product that read it last completed (a fresh barrier passes parity 1); dK += dSᵀ·Q issued.
    Returns dV and dK in flight."""
    NWG: gl.constexpr = p.NWG
    if not DV_EARLY:
        dv = warpgroup_mma(pt16, do_s, dv, is_async=True)
    if p.DQ_ATOMIC:
        s = gstep + it
        if DQ_LAG:
            own = (s & 1) * NWG + WG
            mbarrier.wait(bufs.ds_free.index(own), ((s >> 1) & 1) ^ 1)
        else:
            own = WG
            mbarrier.wait(bufs.ds_free.index(own), (s & 1) ^ 1)
        bufs.ds.index(own).store(ds16)
        fence_async_shared()
        mbarrier.arrive(bufs.ds_ready.index(own))
    _trace_step(p, WG, it, 5)
    dk = warpgroup_mma(gl.convert_layout(ds16, dsa_layout), q_s, dk, is_async=True)
    return dv, dk


@gluon.jit
def _kt_tile(p, bufs, kv_free, nb, b, hk, seq_q, seq_k, q_start, k_start, idx, phase, gstep, tcount, t, n_bh, chunk,
             WG: gl.constexpr, DV_EARLY: gl.constexpr, DQ_LAG: gl.constexpr, POLY: gl.constexpr,
             PERSIST: gl.constexpr):
    """One consumer's work on one CTA tile (key block nb of kv head hk of sequence b): the walk over its query
    blocks, the last dQ share, dV and dK stored. idx, phase: the Q / dO ring's next slot; gstep: the steps this
    consumer took in earlier tiles (the dSᵀ hand-over buffers and their parities follow the CTA's global step
    count s = gstep + it); tcount: the earlier tiles with keys (K / V arrival parity). Returns them updated.
    PERSIST: after the stores, K and V are handed back to the loader (kv_free) for the next tile."""
    NWG: gl.constexpr = p.NWG
    BN: gl.constexpr = KEYS_PER_WG * NWG
    BM: gl.constexpr = p.BM
    N: gl.constexpr = KEYS_PER_WG
    D: gl.constexpr = p.q_desc.block_type.shape[-1]
    DV: gl.constexpr = p.v_desc.block_type.shape[-1]
    # This consumer's dQ share over the CTA's 128 keys: with BM = 128 its 64 query rows, all D columns (DQ_ROWS);
    # with BM = 64 (D = 128) all query rows, its D / 2 columns.
    DQ_ROWS: gl.constexpr = BM == NWG * KEYS_PER_WG
    QW: gl.constexpr = BM // NWG if DQ_ROWS else BM
    DQW: gl.constexpr = D if DQ_ROWS else D // NWG
    dtype: gl.constexpr = p.q_desc.dtype
    OTHER: gl.constexpr = (WG + 1) % NWG
    # Sᵀ, dPᵀ: [64 keys, BM queries]; dK: [64, D]; dV: [64, DV]; dQ share: [QW queries, DQW].
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BM, 16])
    dk_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, D, 16])
    dv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DV, 16])
    # The A operands from registers: for 16-bit inputs the accumulator's element-to-thread map is the A fragment's
    # (k_width 2), so these conversions move no data.
    pa_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dv_layout, k_width=2)
    dsa_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=dk_layout, k_width=2)
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DQW, 16])
    col_s: gl.constexpr = gl.SliceLayout(0, st_layout)
    # STATS_EXT: the A operand [64 keys, 16] of the extension products, ones in columns 0-2 (hi, mid, lo), from
    # registers (4 a thread, set once).
    # STATS_EXT: the A operand [64 keys, 16] of the extension products, ones in columns 0-2 (hi, mid, lo). BM = 128
    # (D = 64): from registers (4 a thread, set once); BM = 64 (D = 128), whose loop is short of registers: this
    # consumer's tile in shared memory (_consumer). Nsight Compute, H100 card 1752624013931, main-kernel cycles
    # registers / shared: D = 64 S = 4096 causal 2.279M / 2.321M, S = 16384 15.86M / 16.00M; D = 128 S = 16384 causal
    # 7.40M / 7.25M (7.54M without the extension).
    EXT: gl.constexpr = STATS_EXT_WIDTH_C
    if p.STATS_EXT and BM != N:
        ext_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=st_layout, k_width=2)
        ext_cols = gl.arange(0, EXT, gl.SliceLayout(0, ext_layout))
        ones = (gl.where(gl.expand_dims(ext_cols, 0) < STATS_EXT_PARTS_C, 1.0, 0.0)
                + gl.zeros([N, EXT], gl.float32, ext_layout)).to(dtype)
    else:
        ones = bufs.p.index(WG)

    n0 = nb * BN
    kr0 = n0 + WG * N
    if n0 < seq_k:
        m_lo, m_hi = _q_range(p, n0, seq_q, seq_k)
        k_s = bufs.k.index(WG).reshape([N, D])
        v_s = bufs.v.index(WG).reshape([N, DV])
        dk = gl.zeros([N, D], gl.float32, dk_layout)
        dv = gl.zeros([N, DV], gl.float32, dv_layout)
        inv_scale2 = 1.0 / p.qk_scale
        _cta_event(p, WG, 0)
        mbarrier.wait(bufs.kv_ready, tcount & 1)
        _cta_event(p, WG, 1)
        n_m = m_hi - m_lo
        h_prev = 0
        m0_prev = 0
        for it in range(p.group * n_m):
            g, h, m0 = _step_block(p, it, n_m, m_lo, hk)
            if p.VARLEN:
                t_base = h * p.stride_th + q_start
            else:
                t_base = b * p.stride_tb + h * p.stride_th
            q_s = bufs.q.index(idx).reshape([BM, D])
            do_s = bufs.do.index(idx).reshape([BM, DV])
            if not p.STATS_EXT:
                # The step's query columns (32 a thread), needed only by packed calls and the global-load path: made
                # afresh each step (opaque) rather than kept live through the loop. The statistics' K extensions
                # need none (the opaque moves would stay, dead, and hold registers: D = 128 causal 71 -> 44 local
                # memory instructions, 18 -> 10 in the loop, sm_90a offline).
                cols = m0 + _opaque(gl.arange(0, BM, col_s))
                col_ok = cols < seq_q
            _trace_step(p, WG, it, 0)
            mbarrier.wait(bufs.q_ready.index(idx), phase)
            mbarrier.wait(bufs.do_ready.index(idx), phase)
            _trace_step(p, WG, it, 1)
            if it == 0:
                _cta_event(p, WG, 2)
            # Both accumulators start at their column's statistic, so that lse2 and Delta (32 values a thread each)
            # are never live beside Sᵀ, dPᵀ, dV and dK (without this the softmax and dS spill ~12 values a step):
            #   Sᵀ acc = K·Qᵀ − lse2 / scale2, so acc·scale2 = Sᵀ·scale2 − lse2 (scale2 = softmax scale · log2 e;
            #   the same magnitudes as forming the difference after the product: no precision lost);
            #   dPᵀ acc = V·dOᵀ − Delta.
            # Both are set before either product is issued: a register written between asynchronous wgmmas of one
            # warpgroup makes ptxas serialise them.
            if p.STATS_EXT:
                # The seeds as a 16-wide extension of the contraction (backward.stats_ext_parts): ones[:, :3] times
                # the block's [hi, mid, lo] parts of −lse2 / scale2 (and of −Delta) add them in the wgmma.
                ext_l = bufs.lse2.index(idx).reshape([BM, EXT]).permute((1, 0))
                ext_d = bufs.delta.index(idx).reshape([BM, EXT]).permute((1, 0))
                st = warpgroup_mma(ones, ext_l, gl.zeros([N, BM], gl.float32, st_layout), use_acc=False,
                                   is_async=True)
                st = warpgroup_mma(k_s, q_s.permute((1, 0)), st, is_async=True)
                dpt = warpgroup_mma(ones, ext_d, gl.zeros([N, BM], gl.float32, st_layout), use_acc=False,
                                    is_async=True)
            else:
                lse2 = _column_stats(p, bufs, idx, t_base, cols, col_ok, 0, col_s)
                delta = _column_stats(p, bufs, idx, t_base, cols, col_ok, 1, col_s)
                # Each accumulator register gets its own definition here (_distinct): the two rows of a column
                # share one value, and LLVM would otherwise copy it into the second register right before the
                # wgmma.
                st = _distinct(gl.zeros([N, BM], gl.float32, st_layout) - gl.expand_dims(lse2 * inv_scale2, 0))
                dpt = _distinct(gl.zeros([N, BM], gl.float32, st_layout) - gl.expand_dims(delta, 0))
                st = warpgroup_mma(k_s, q_s.permute((1, 0)), st, is_async=True)
            if PERSIST:
                # The tile's V comes behind its K (kv_ready): the first Sᵀ is issued before V is waited for.
                if it == 0:
                    mbarrier.wait(kv_free.v_ready, tcount & 1)
            # dPᵀ right behind Sᵀ: it runs under the softmax.
            dpt = warpgroup_mma(v_s, do_s.permute((1, 0)), dpt, is_async=True)
            st = warpgroup_mma_wait(1, deps=(st, ))
            _trace_step(p, WG, it, 2)
            # POLY of every 4 exponentials on the FMA pipe (softmax.exp2_mixed; arguments <= 0 or -inf here): two
            # consumers' exp2 (8,192 each a step) keep the MUFU unit busy 40% as long as the step's products.
            pt = exp2_mixed(_mask_t(p, st * p.qk_scale, kr0, m0, seq_q, seq_k), POLY)
            # P and dS rounded to the input dtype, as the forward's P·V rounds P.
            pt16 = gl.convert_layout(pt.to(dtype), pa_layout)
            _trace_step(p, WG, it, 3)
            if DV_EARLY:
                # dV += Pᵀ·dO issued before dPᵀ is waited for: the tensor core works on it while dS is formed.
                dv = warpgroup_mma(pt16, do_s, dv, is_async=True)
                dpt = warpgroup_mma_wait(1, deps=(dpt, ))
            else:
                dpt = warpgroup_mma_wait(0, deps=(dpt, ))
            _trace_step(p, WG, it, 4)
            dst = pt * dpt
            ds16 = dst.to(dtype)
            if p.DQ_ATOMIC and DQ_LAG == 2:
                # DQ_FIRST (tile.dq_first): the previous step's dQ share is issued before this step's dV and dK, so
                # it completes first and is staged and added while they run, instead of after all three with no
                # product of this consumer in flight (the trace's dq_stage + dq_issue, ~600 of ~4,150 cycles a
                # D = 128 step).
                if it > 0:
                    s_prev = gstep + it - 1
                    prev = (s_prev & 1) * NWG
                    mbarrier.wait(bufs.ds_ready.index(prev + OTHER), (s_prev >> 1) & 1)
                    dq = _dq_issue(p, bufs, prev, WG, QW, DQW, DQ_ROWS, dq_layout)
                    dv_f, dk_f = _dv_ds_dk(p, bufs, dv, dk, pt16, ds16, do_s, q_s, gstep, it, WG, DV_EARLY,
                                           DQ_LAG, dsa_layout)
                    # Groups complete in order: all but this step's dK (and dV unless it went first) done.
                    dq = warpgroup_mma_wait(1 if DV_EARLY else 2, deps=(dq, ))
                    _trace_step(p, WG, it, 6)
                    mbarrier.arrive(bufs.ds_free.index(prev + OTHER))
                    _trace_step(p, WG, it, 7)
                    _dq_add(p, bufs, dq, b, h_prev, q_start, m0_prev, WG, QW, DQW, DQ_ROWS, it, s_prev)
                    dv_done, dk_done = warpgroup_mma_wait(0, deps=(dv_f, dk_f))
                else:
                    dv_f, dk_f = _dv_ds_dk(p, bufs, dv, dk, pt16, ds16, do_s, q_s, gstep, it, WG, DV_EARLY,
                                           DQ_LAG, dsa_layout)
                    dv_done, dk_done = warpgroup_mma_wait(0, deps=(dv_f, dk_f))
                mbarrier.arrive(bufs.q_empty.index(idx))
                mbarrier.arrive(bufs.do_empty.index(idx))
                dv = dv_done
                dk = dk_done
                h_prev = h
                m0_prev = m0
            else:
                dv, dk = _dv_ds_dk(p, bufs, dv, dk, pt16, ds16, do_s, q_s, gstep, it, WG, DV_EARLY, DQ_LAG,
                                   dsa_layout)
                if p.DQ_ATOMIC and DQ_LAG:
                    # The previous step's dQ share: the consumers need each other's dSᵀ one step late only, so either
                    # may run up to a step ahead of the other instead of meeting at every step's hand-over.
                    # (New names in the branches: an if may not turn the in-flight accumulators into tensors.)
                    if it > 0:
                        s_prev = gstep + it - 1
                        dv_done, dk_done = _share_and_release(p, bufs, dv, dk, idx, (s_prev & 1) * NWG,
                                                              (s_prev >> 1) & 1, b, h_prev, q_start, m0_prev, it,
                                                              s_prev, WG, QW, DQW, DQ_ROWS, dq_layout)
                    else:
                        dv_done, dk_done = warpgroup_mma_wait(0, deps=(dv, dk))
                        mbarrier.arrive(bufs.q_empty.index(idx))
                        mbarrier.arrive(bufs.do_empty.index(idx))
                    dv = dv_done
                    dk = dk_done
                    h_prev = h
                    m0_prev = m0
                elif p.DQ_ATOMIC:
                    dv, dk = _share_and_release(p, bufs, dv, dk, idx, 0, (gstep + it) & 1, b, h, q_start, m0, it,
                                                gstep + it, WG, QW, DQW, DQ_ROWS, dq_layout)
                else:
                    dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
                    mbarrier.arrive(bufs.q_empty.index(idx))
                    mbarrier.arrive(bufs.do_empty.index(idx))
            idx, phase = _next_slot(idx, phase, p.STAGES)
        _cta_event(p, WG, 3)
        last = p.group * n_m - 1
        # The CTA's global index of this tile's last step (with no step, the previous tile's: its buffers' phases are
        # complete, so the waits below pass at once, as on fresh barriers in a first tile).
        s_last = gstep + last
        if p.DQ_ATOMIC and DQ_LAG:
            # The last step's dQ share (DQ_LAG issues each step's share one step late).
            if last >= 0:
                prev = (s_last & 1) * NWG
                mbarrier.wait(bufs.ds_ready.index(prev + OTHER), (s_last >> 1) & 1)
                dq = _dq_issue(p, bufs, prev, WG, QW, DQW, DQ_ROWS, dq_layout)
                dq = warpgroup_mma_wait(0, deps=(dq, ))
                mbarrier.arrive(bufs.ds_free.index(prev + OTHER))
                _dq_add(p, bufs, dq, b, h_prev, q_start, m0_prev, WG, QW, DQW, DQ_ROWS, last + 1, s_last)
        tma.store_wait(0)
        # Indices derived again (from a fresh %ctaid read, or the tile index) rather than kept live through the loop.
        if PERSIST:
            nb, b, hk, seq_q, seq_k, q_start, k_start = _tile_coords(p, t, n_bh, chunk)
        else:
            nb, b, hk, seq_q, seq_k, q_start, k_start = _cta_coords(p)
        kr0 = nb * BN + WG * N
        # This consumer's K and V slots are free (only its own, completed, wgmmas and the other consumer's dQ
        # product, which completed before the last ds_free, read K): they stage dV and dK for the TMA stores.
        slot = _opaque(gl.to_tensor(WG))
        if PERSIST:
            # dK first: the next tile needs its K first (Sᵀ), so K is handed back (k_free) while dV is still being
            # staged, and the next K load overlaps that.
            _wait_k_read(p, bufs, s_last, WG, DQ_LAG)
            _store_rows(p, p.dk_desc, bufs.k.index(slot), p.dk_ptr, (dk * p.softmax_scale).to(dtype), b, hk,
                        k_start, kr0, seq_k, p.d, p.stride_dkb, p.stride_dks, p.stride_dkh)
            tma.store_wait(0)
            mbarrier.arrive(kv_free.k_free)
            # V must have landed before dV overwrites its slot: a tile without steps never waited for it. (Waited
            # for already, the same parity passes again: the loader refills V only after v_free.)
            mbarrier.wait(kv_free.v_ready, tcount & 1)
            _store_rows(p, p.dv_desc, bufs.v.index(slot), p.dv_ptr, dv.to(dtype), b, hk, k_start, kr0, seq_k, p.dv,
                        p.stride_dvb, p.stride_dvs, p.stride_dvh)
            tma.store_wait(0)
            mbarrier.arrive(kv_free.v_free)
            gstep += p.group * n_m
            tcount += 1
        else:
            _store_rows(p, p.dv_desc, bufs.v.index(slot), p.dv_ptr, dv.to(dtype), b, hk, k_start, kr0, seq_k, p.dv,
                        p.stride_dvb, p.stride_dvs, p.stride_dvh)
            _wait_k_read(p, bufs, s_last, WG, DQ_LAG)
            _store_rows(p, p.dk_desc, bufs.k.index(slot), p.dk_ptr, (dk * p.softmax_scale).to(dtype), b, hk,
                        k_start, kr0, seq_k, p.d, p.stride_dkb, p.stride_dks, p.stride_dkh)
            tma.store_wait(0)
        _cta_event(p, WG, 4)
    return idx, phase, gstep, tcount


@gluon.jit
def _wait_k_read(p, bufs, s_last, WG: gl.constexpr, DQ_LAG: gl.constexpr):
    """Before dK is staged in this consumer's K slot: the other consumer's last dQ product, which reads that K, has
    completed (its release of this consumer's dSᵀ buffer of step s_last; with no step at all, parity 1 of a fresh
    barrier passes at once)."""
    NWG: gl.constexpr = p.NWG
    if p.DQ_ATOMIC:
        if DQ_LAG:
            mbarrier.wait(bufs.ds_free.index((s_last & 1) * NWG + WG), (s_last >> 1) & 1)
        else:
            mbarrier.wait(bufs.ds_free.index(WG), s_last & 1)


@gluon.jit
def _tile_count(p, n_bh):
    """Tiles of the persistent grid: every (key block, batch · kv head)."""
    BN: gl.constexpr = KEYS_PER_WG * p.NWG
    return (p.seqlen_k + BN - 1) // BN * n_bh


@gluon.jit
def _tile_coords(p, t, n_bh, chunk):
    """(nb, b, hk, seq_q, seq_k, q_start, k_start) of tile t of the persistent grid. Tiles are ordered as the
    chunked grid orders CTAs (backward._cta_block with CTA_CHUNKED): chunk after chunk of `chunk` consecutive
    (batch, kv head) pairs, key block after key block within a chunk, the pair fastest, so that causal calls start
    the long walks (low key blocks) of a chunk's heads first and a chunk's fp32 dQ rows stay in L2."""
    BN: gl.constexpr = KEYS_PER_WG * p.NWG
    n_kb = (p.seqlen_k + BN - 1) // BN
    per_chunk = n_kb * chunk
    c = t // per_chunk
    r = t - c * per_chunk
    nb = r // chunk
    bhk = c * chunk + (r - nb * chunk)
    b = bhk // p.num_kv_heads
    hk = bhk - b * p.num_kv_heads
    seq_q, seq_k, q_start, k_start = _sequence(p, b)
    return nb, b, hk, seq_q, seq_k, q_start, k_start


@gluon.jit
def _consumer(p, bufs, kv_free, tiles, n_bh, chunk, WG: gl.constexpr, DV_EARLY: gl.constexpr,
              DQ_LAG: gl.constexpr, POLY: gl.constexpr, PERSIST: gl.constexpr):
    if p.STATS_EXT and p.BM == KEYS_PER_WG:
        # The A operand of the statistics' extension products at BM = 64 (_kt_tile): [64 keys, 16], ones in
        # columns 0-2 (hi, mid, lo), written once into this consumer's slot of the P buffer (otherwise unused).
        fill: gl.constexpr = gl.BlockedLayout([1, 8], [16, 2], [4, 1], [1, 0])
        cols = gl.arange(0, STATS_EXT_WIDTH_C, gl.SliceLayout(0, fill))
        ones = (gl.where(gl.expand_dims(cols, 0) < STATS_EXT_PARTS_C, 1.0, 0.0)
                + gl.zeros([KEYS_PER_WG, STATS_EXT_WIDTH_C], gl.float32, fill))
        bufs.p.index(WG).store(ones.to(p.q_desc.dtype))
        fence_async_shared()
    if PERSIST:
        # The tiles the loader draws from the global counter, until one past the last.
        n_tiles = _tile_count(p, n_bh)
        idx = gl.to_tensor(0)
        phase = gl.to_tensor(0)
        gstep = gl.to_tensor(0)
        tcount = gl.to_tensor(0)
        fcount = gl.to_tensor(0)
        t = handout.take(tiles, fcount)
        while t < n_tiles:
            nb, b, hk, seq_q, seq_k, q_start, k_start = _tile_coords(p, t, n_bh, chunk)
            idx, phase, gstep, tcount = _kt_tile(p, bufs, kv_free, nb, b, hk, seq_q, seq_k, q_start, k_start, idx,
                                                 phase, gstep, tcount, t, n_bh, chunk, WG, DV_EARLY, DQ_LAG, POLY,
                                                 PERSIST)
            fcount += 1
            t = handout.take(tiles, fcount)
    else:
        nb, b, hk, seq_q, seq_k, q_start, k_start = _cta_coords(p)
        # One tile: the ring starts at slot 0 (as tensors: they change in the loop), no earlier steps or tiles.
        _kt_tile(p, bufs, kv_free, nb, b, hk, seq_q, seq_k, q_start, k_start, gl.to_tensor(0), gl.to_tensor(0), 0, 0,
                 0, n_bh, chunk, WG, DV_EARLY, DQ_LAG, POLY, PERSIST)


@gluon.jit
def _loader_persistent(p, bufs, kv_free, tiles, n_bh, chunk):
    """backward._loader over the persistent grid's tiles (see _consumer). Each tile's first Q / dO blocks (up to the
    ring's depth) are requested before its K and V, whose slots the consumers free (kv_free) only after storing the
    previous tile's dK and dV there: the first blocks arrive while they do."""
    BN: gl.constexpr = KEYS_PER_WG * p.NWG
    n_tiles = _tile_count(p, n_bh)
    idx = gl.to_tensor(0)
    phase = gl.to_tensor(0)
    tcount = gl.to_tensor(0)
    fcount = gl.to_tensor(0)
    t = handout.draw(p.dq_ctr, tiles, fcount)
    while t < n_tiles:
        nb, b, hk, seq_q, seq_k, q_start, k_start = _tile_coords(p, t, n_bh, chunk)
        n0 = nb * BN
        if n0 < seq_k:
            m_lo, m_hi = _q_range(p, n0, seq_q, seq_k)
            n_m = m_hi - m_lo
            n_steps = p.group * n_m
            ahead = gl.minimum(n_steps, p.STAGES)
            for it in range(n_steps):
                if it == ahead:
                    _load_kv(p, bufs, kv_free, tcount, b, hk, k_start, n0)
                idx, phase = _load_step(p, bufs, idx, phase, it, n_m, m_lo, b, hk, q_start)
            if ahead == n_steps:
                _load_kv(p, bufs, kv_free, tcount, b, hk, k_start, n0)
            tcount += 1
        fcount += 1
        t = handout.draw(p.dq_ctr, tiles, fcount)


@gluon.jit
def _cast_share(p, dqo_desc, cast_s, cast_ready, n_cast, b, h, q_start, m0, w: gl.constexpr):
    """DQ_CAST: the fp32 sum of consumer w's share of query block m0, complete once this (last) link's add has
    completed (release_step waited for it), read back by TMA, converted to the input dtype in place and stored into
    dQ itself. The 16-bit tile ([R, C], 128-byte rows, swizzled) occupies the bytes of the fp32 tile's first 32
    columns ([R, 32], 128-byte rows, the same swizzle), row for row; each chunk of 8 rows (a whole swizzle period)
    is loaded before it is overwritten, and no later chunk reads those bytes. n_cast: the casts before (cast_ready's
    parity). Returns n_cast + 1."""
    R: gl.constexpr = p.dq_desc.block_type.shape[-3]
    C: gl.constexpr = p.dq_desc.block_type.shape[-1]
    CH: gl.constexpr = 8
    dtype: gl.constexpr = dqo_desc.dtype
    coord = dq_share_coord(p, b, h, q_start, m0, w, True)
    # The previous cast's conversion read this tile through the generic proxy; the TMA load writes it.
    fence_async_shared()
    mbarrier.expect(cast_ready, p.dq_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(p.dq_desc, coord, cast_ready, cast_s)
    mbarrier.wait(cast_ready, n_cast & 1)
    acc = cast_s.reshape([R, C])
    out = cast_s._reinterpret(dtype, dqo_desc.block_type.shape, dqo_desc.layout)
    out2 = out.reshape([R, C])
    # One warp: 8 rows x C columns a chunk, 8 consecutive values a lane (16 at C = 64).
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [1, 1], [1, 0])
    for r in gl.static_range(0, R, CH):
        x = acc.slice(r, CH, dim=0).load(layout)
        out2.slice(r, CH, dim=0).store(x.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dqo_desc, coord, out)
    # The next cast's load rewrites the tile: its bytes read first.
    tma.store_wait(0)
    return n_cast + 1


@gluon.jit
def _writer_persistent(p, bufs, tiles, n_bh, chunk, STORE_FIRST: gl.constexpr, dqo_desc, cast_s, cast_ready,
                       DQ_CAST: gl.constexpr, FENCE: gl.constexpr = 0):
    """backward.dq_writer over the persistent grid's tiles (deterministic=True: the ascending chain, ORDERED_DQ = 1):
    each tile from the handout like the consumers, its steps in their order (_step_block: top-down under a right
    window), the staged shares paired by the CTA's step count s. A tile's chains wait only on lower key blocks of
    the same (sequence, kv head), whose tiles have lower indices (_tile_coords runs a chunk's key blocks in order)
    and were handed out earlier to CTAs that work their tiles in order, so the lowest unfinished tile never waits:
    no deadlock. Chain counters behind the tile counter (CHAIN_CTR). STORE_FIRST: write_step's. DQ_CAST: the last
    link of each chain (backward.last_key_block) also writes dQ itself from the completed sum (_cast_share), so that
    no pass over the fp32 accumulator follows the kernel."""
    BN: gl.constexpr = KEYS_PER_WG * p.NWG
    n_tiles = _tile_count(p, n_bh)
    gstep = gl.to_tensor(0)
    fcount = gl.to_tensor(0)
    n_cast = gl.to_tensor(0)
    t = handout.take(tiles, fcount, 1)
    while t < n_tiles:
        nb, b, hk, seq_q, seq_k, q_start, k_start = _tile_coords(p, t, n_bh, chunk)
        n0 = nb * BN
        if n0 < seq_k:
            m_lo, m_hi = _q_range(p, n0, seq_q, seq_k)
            n_m = m_hi - m_lo
            for it in range(p.group * n_m):
                _, h, m0 = _step_block(p, it, n_m, m_lo, hk)
                write_step(p, bufs, nb, b, h, q_start, m0, seq_q, seq_k, gstep + it, CHAIN_CTR, True, STORE_FIRST,
                           FENCE)
                if p.ORDERED_DQ != 0:
                    release_step(p, b, h, m0, CHAIN_CTR, 0, FENCE, nb)
                if DQ_CAST:
                    if nb == last_key_block(p, m0, seq_q, seq_k):
                        for w in gl.static_range(p.NWG):
                            n_cast = _cast_share(p, dqo_desc, cast_s, cast_ready, n_cast, b, h, q_start, m0, w)
            gstep += p.group * n_m
        fcount += 1
        t = handout.take(tiles, fcount, 1)
    tma.store_wait(0)


@aggregate
class KvHandback:
    """The persistent grid's K / V hand-back: k_free, v_free (one arrival a consumer: its dK, dV staged there and
    stored) and v_ready (the loader's V, behind K on kv_ready)."""
    k_free: gl.shared_memory_descriptor
    v_free: gl.shared_memory_descriptor
    v_ready: gl.shared_memory_descriptor

    @gluon.constexpr_function
    def __init__(self, k_free, v_free, v_ready):
        self.k_free = k_free
        self.v_free = v_free
        self.v_ready = v_ready


@gluon.jit
def _load_kv(p, bufs, kv_free, tcount, b, hk, k_start, n0):
    """K, then V, of a tile (one 64-key box per consumer), each once the consumers freed its slots (tcount: the
    tiles loaded before; a fresh barrier passes parity 1)."""
    NWG: gl.constexpr = p.NWG
    mbarrier.wait(kv_free.k_free, (tcount & 1) ^ 1)
    mbarrier.expect(bufs.kv_ready, NWG * p.k_desc.block_type.nbytes)
    for w in gl.static_range(NWG):
        tma.async_copy_global_to_shared(p.k_desc, _kv_coord(p, b, hk, k_start, n0 + w * KEYS_PER_WG),
                                        bufs.kv_ready, bufs.k.index(w))
    mbarrier.wait(kv_free.v_free, (tcount & 1) ^ 1)
    mbarrier.expect(kv_free.v_ready, NWG * p.v_desc.block_type.nbytes)
    for w in gl.static_range(NWG):
        tma.async_copy_global_to_shared(p.v_desc, _kv_coord(p, b, hk, k_start, n0 + w * KEYS_PER_WG),
                                        kv_free.v_ready, bufs.v.index(w))



# ---------------------------------------------------------------------------------------------------------
# The kernel: the same parameters as backward.attn_bwd_kernel (one launch plan for both); NWG = 2, BM = 128.
# ---------------------------------------------------------------------------------------------------------

@gluon.jit(do_not_specialize=_RUNTIME_INTS + ["n_bh", "chunk"])
def attn_bwd_kt_kernel(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, dq_desc, lse2_desc, delta_desc, dk_ptr,
                       dv_ptr, lse2_ptr, delta_ptr, sink_ptr, dsink_ptr, dq_ctr,
                       cu_q, cu_k, seqused, stride_dkb, stride_dks, stride_dkh, stride_dvb,
                       stride_dvs, stride_dvh, stride_tb, stride_th, d, dv, seqlen_q, seqlen_k, num_kv_heads, group,
                       qk_scale, cap_scale, softmax_scale, window_left, window_right,
                       BM: gl.constexpr, NWG: gl.constexpr, STAGES: gl.constexpr, VARLEN: gl.constexpr,
                       HAS_SEQUSED: gl.constexpr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr,
                       SOFTCAP: gl.constexpr, DQ_ATOMIC: gl.constexpr, DQ_SHARED: gl.constexpr,
                       EARLY_DP: gl.constexpr, SINK_PDP: gl.constexpr, PING_PONG: gl.constexpr, BIG: gl.constexpr,
                       TRACE: gl.constexpr, ORDERED_DQ: gl.constexpr, DQ_WRITER: gl.constexpr,
                       STATS_TMA: gl.constexpr, CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
                       CTA_CHUNKED: gl.constexpr = False, DQ_RELEASE_LAG: gl.constexpr = False,
                       DQ_STORE_FIRST: gl.constexpr = False, DQ_SPREAD: gl.constexpr = False,
                       DQ_CHAIN_FENCE: gl.constexpr = 0,
                       DV_EARLY: gl.constexpr = True, DQ_LAG: gl.constexpr = False,
                       POLY: gl.constexpr = 0, PERSIST: gl.constexpr = False, STATS_EXT: gl.constexpr = False,
                       DQ_CAST: gl.constexpr = False, n_bh=1, chunk=1, dqo_desc=None):
    gl.static_assert(NWG == 2, "keys as rows: two consumers of 64 keys")
    gl.static_assert(BM == 2 * KEYS_PER_WG or BM == KEYS_PER_WG, "keys as rows: BM = 128 or 64")
    gl.static_assert(not (SOFTCAP or SINK_PDP or PING_PONG or DQ_SHARED), "not built in the keys-as-rows kernel")
    # The writer warp issues the ordered chain (deterministic=True with dQ in this kernel) or, as a probe
    # (tile.dq_writer), the unordered adds. One tile a CTA, the chain's deadlock freedom rests on the CTAs' dispatch
    # order (backward._cta_block); on the persistent grid, on the handout's index order (_writer_persistent).
    gl.static_assert(ORDERED_DQ == 0 or DQ_WRITER, "keys as rows: the ordered chain is issued by the writer warp")
    gl.static_assert(DQ_ATOMIC or not DQ_WRITER, "the writer warp issues the kernel's dQ adds")
    # On the persistent grid only the ascending chain: each tile waits on tiles handed out before it.
    gl.static_assert(not (DQ_WRITER and PERSIST and ORDERED_DQ == 2), "the persistent grid's writer: ascending chain")
    # (Without ORDERED_DQ the persistent writer issues the unordered adds: tile.dq_writer, a probe.)
    gl.static_assert(not (ORDERED_DQ != 0 and CTA_CHUNKED), "the ordered chain's CTAs in _cta_block's plain order")
    gl.static_assert(not (PERSIST and (TRACE or CTA_CHUNKED)), "the persistent grid orders its own tiles, untraced")
    # The cast needs the complete sum of a query block: the persistent grid's ascending chain, whose last link knows
    # it is last, over an accumulator the first link stored (every row visited).
    gl.static_assert(not DQ_CAST or (PERSIST and DQ_WRITER and ORDERED_DQ == 1 and DQ_STORE_FIRST),
                     "dQ cast in the kernel: the persistent ascending chain with its first link storing")
    dtype: gl.constexpr = q_desc.dtype
    k_smem = gl.allocate_shared_memory(dtype, [NWG] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NWG] + v_desc.block_type.shape, v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([KEYS_PER_WG, BM], dtype)
    # dSᵀ of each consumer, one buffer a consumer, or two (by step parity) when each step's dQ share is issued a step
    # late (DQ_LAG).
    DS_BUFS: gl.constexpr = 2 * NWG if DQ_LAG else NWG
    ds_smem = gl.allocate_shared_memory(dtype, [DS_BUFS, KEYS_PER_WG, BM], ds_layout)
    if STATS_EXT and BM == KEYS_PER_WG:
        # Each consumer's ones tile, the A operand of its statistics' extension products at BM = 64 (in BwdBuffers'
        # P slot; _kt_tile).
        ones_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([KEYS_PER_WG, STATS_EXT_WIDTH_C], dtype)
        ones_smem = gl.allocate_shared_memory(dtype, [NWG, KEYS_PER_WG, STATS_EXT_WIDTH_C], ones_layout)
    else:
        ones_smem = ds_smem  # a placeholder, never touched
    if DQ_ATOMIC:
        dq_smem = gl.allocate_shared_memory(gl.float32, [NWG] + dq_desc.block_type.shape, dq_desc.layout)
    else:
        dq_smem = ds_smem  # a placeholder, never touched
    if STATS_TMA:
        # fp32 statistics, or with STATS_EXT their 16-bit K extensions ([1, 1, BM, 16] boxes).
        lse2_smem = gl.allocate_shared_memory(lse2_desc.dtype, [STAGES] + lse2_desc.block_type.shape,
                                              lse2_desc.layout)
        delta_smem = gl.allocate_shared_memory(delta_desc.dtype, [STAGES] + delta_desc.block_type.shape,
                                               delta_desc.layout)
    else:
        lse2_smem = q_smem  # placeholders, never touched
        delta_smem = q_smem
    if DQ_CAST:
        # The writer's read-back of a completed fp32 share, converted there in place (_cast_share).
        cast_smem = gl.allocate_shared_memory(gl.float32, dq_desc.block_type.shape, dq_desc.layout)
        cast_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(cast_ready, count=1)
    else:
        cast_smem = dq_smem  # placeholders, never touched
        cast_ready = dq_smem
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [DS_BUFS, 1], mbarrier.MBarrierLayout())
    ds_free = gl.allocate_shared_memory(gl.int64, [DS_BUFS, 1], mbarrier.MBarrierLayout())
    for w in gl.static_range(DS_BUFS):
        mbarrier.init(ds_ready.index(w), count=1)
        mbarrier.init(ds_free.index(w), count=1)
    mbarrier.init(kv_ready, count=1)
    # The staged dQ shares handed to the writer warp and back (_dq_add, backward.dq_writer).
    dq_staged, dq_free = writer_barriers(NWG, DQ_WRITER, ds_ready)
    if PERSIST:
        # Both consumers' dK and dV stored from the K and V slots: the next tile's K and V may come.
        k_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        v_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(k_free, count=NWG)
        mbarrier.init(v_free, count=NWG)
        mbarrier.init(v_ready, count=1)
        kv_free = KvHandback(k_free, v_free, v_ready)
        tiles = handout.new_handout(NWG + (1 if DQ_WRITER else 0))
    else:
        kv_free = KvHandback(kv_ready, kv_ready, kv_ready)  # placeholders, never touched
        tiles = handout.TileHandout(kv_ready, kv_ready, kv_ready)
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
                   SINK_PDP, PING_PONG, BIG, TRACE, ORDERED_DQ, DQ_WRITER, STATS_TMA, CTA_CHUNKED, DQ_SPREAD,
                   STATS_EXT)
    # backward.py's buffer set, so that its loader serves this kernel unchanged: ds holds the consumers' dSᵀ; the
    # P buffer and the turn / loop_done barriers are placeholders this kernel never touches.
    bufs = BwdBuffers(k_smem, v_smem, q_smem, do_smem, ones_smem, ds_smem, dq_smem, ds_ready, ds_free, kv_ready, q_ready,
                      q_empty, do_ready, do_empty, ds_ready, dq_staged, dq_free, lse2_smem, delta_smem, ds_ready)
    # Only the loader and the writer differ (Gluon 3.6 keeps no partition function in a variable, hence the calls).
    if PERSIST and DQ_WRITER:
        gl.warp_specialize([(_consumer, (p, bufs, kv_free, tiles, n_bh, chunk, gl.constexpr(0), DV_EARLY, DQ_LAG,
                                         POLY, PERSIST)),
                            (_consumer, (p, bufs, kv_free, tiles, n_bh, chunk, gl.constexpr(1), DV_EARLY, DQ_LAG,
                                         POLY, PERSIST)),
                            (_loader_persistent, (p, bufs, kv_free, tiles, n_bh, chunk)),
                            (_writer_persistent, (p, bufs, tiles, n_bh, chunk, DQ_STORE_FIRST, dqo_desc, cast_smem,
                                                  cast_ready, DQ_CAST, DQ_CHAIN_FENCE))], [4, 1, 1],
                           [CONSUMER_REGS, LOADER_REGS, LOADER_REGS])
    elif PERSIST:
        gl.warp_specialize([(_consumer, (p, bufs, kv_free, tiles, n_bh, chunk, gl.constexpr(0), DV_EARLY, DQ_LAG,
                                         POLY, PERSIST)),
                            (_consumer, (p, bufs, kv_free, tiles, n_bh, chunk, gl.constexpr(1), DV_EARLY, DQ_LAG,
                                         POLY, PERSIST)),
                            (_loader_persistent, (p, bufs, kv_free, tiles, n_bh, chunk))], [4, 1],
                           [CONSUMER_REGS, LOADER_REGS])
    elif DQ_WRITER:
        gl.warp_specialize([(_consumer, (p, bufs, kv_free, tiles, n_bh, chunk, gl.constexpr(0), DV_EARLY, DQ_LAG,
                                         POLY, PERSIST)),
                            (_consumer, (p, bufs, kv_free, tiles, n_bh, chunk, gl.constexpr(1), DV_EARLY, DQ_LAG,
                                         POLY, PERSIST)),
                            (_loader, (p, bufs)),
                            (dq_writer, (p, bufs, gl.constexpr(True), DQ_RELEASE_LAG, DQ_STORE_FIRST,
                                         DQ_CHAIN_FENCE))],
                           [4, 1, 1], [CONSUMER_REGS, LOADER_REGS, LOADER_REGS])
    else:
        gl.warp_specialize([(_consumer, (p, bufs, kv_free, tiles, n_bh, chunk, gl.constexpr(0), DV_EARLY, DQ_LAG,
                                         POLY, PERSIST)),
                            (_consumer, (p, bufs, kv_free, tiles, n_bh, chunk, gl.constexpr(1), DV_EARLY, DQ_LAG,
                                         POLY, PERSIST)),
                            (_loader, (p, bufs))], [4, 1], [CONSUMER_REGS, LOADER_REGS])
