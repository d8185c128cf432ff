"""Tile table of the Hopper forward: one entry per (head dim, value head dim).

Each consumer warpgroup owns 64 query rows (one m64 wgmma slab), so a CTA's query tile is 64 · num_wg rows;
every consumer reads the same K/V stage, which is released once all of them have arrived. The numbers are
limited by two budgets of the SM:

  shared memory (227 KiB per CTA): Q tile + stages · (K block + V block) [+ O staging tile]
  registers (64 Ki per SM):        per consumer thread the fp32 S block (BN/2), the fp32 O tile (Dv/2) and
                                   P in bf16 (BN/4), plus the next S while the current one is in softmax.

Where O staging does not fit beside Q, O is written through Q's buffer (`o_alias_q`): the next tile's Q then
waits for the store. The entries are the winners of `benchmarks/sm90_probe.py` on an H100 (run r1,
2026-11-25, see benchmarks/NOTES.md "Hopper forward (Gluon)"); the probe times the runners-up beside them.
"""
from dataclasses import dataclass, replace

SMEM_LIMIT = 232448  # bytes of dynamic shared memory one CTA may use on sm_90
SMEM_RESERVE = 1024  # barriers and the compiler's own scratch
TILE_DIMS = (64, 128, 256)  # Triton tiles are powers of two; other head dims are zero-padded by TMA


def tile_dim(d):
    """The power-of-two tile width serving head dim d (TMA reads the columns past d as zeros)."""
    for t in TILE_DIMS:
        if d <= t:
            return t
    return None


@dataclass(frozen=True)
class TileConfig:
    block_n: int          # keys per K/V stage
    num_wg: int           # consumer warpgroups (64 query rows each)
    stages: int           # depth of the K/V ring
    consumer_regs: int    # setmaxnreg of the worker consumer warpgroups
    loader_regs: int = 24  # the TMA warp needs only addresses, coordinates and phases
    # Consumer warpgroups take turns issuing their products (softmax of one under the other's wgmma).
    # Off, they issue as soon as their operands are ready and the tensor core interleaves them.
    pingpong: bool = True
    # Query-tile buffers. 2: the loader fetches the next tile's Q (and then its K/V) while the consumers
    # still work on the current tile, so a tile starts without waiting for a load (r2 analysis,
    # benchmarks/NOTES.md; a probe variant, needs Q twice beside K/V and O: D <= 128).
    q_buffers: int = 1

    @property
    def block_m(self):
        return 64 * self.num_wg


# Keyed by tile widths (D, Dv). r1 (H100, bf16, TFLOP/s at S = 4096 / 16384, non-causal):
#   D = 64:  three consumer warpgroups (192 query rows, 160 registers a thread; 3 x 128 x 160 + the loader
#            warpgroup's 128 x 24 fill the 64 Ki register file) 532 / 530 against two 465 / 469: more warps
#            to hide the softmax latency where the exponentials weigh most. (Causal r1 numbers of this tile
#            were hit by the old schedule: with 22 query blocks and 132 CTAs every CTA drew one block index.)
#   D = 128: no ping-pong 642 / 627 against 601 / 549 (causal 535 / 443 against 526 / 415).
#   D = 256: ping-pong or not within noise (629 / 679 against 616 / 675); the key block halves to stay in
#            shared memory (FA3's 80 is not a power of two).
_TABLE = {
    (64, 64): TileConfig(block_n=128, num_wg=3, stages=2, consumer_regs=160),
    (128, 128): TileConfig(block_n=128, num_wg=2, stages=2, consumer_regs=240, pingpong=False),
    (256, 128): TileConfig(block_n=64, num_wg=2, stages=2, consumer_regs=240),
    (256, 256): TileConfig(block_n=64, num_wg=2, stages=2, consumer_regs=240),
}


def smem_bytes(cfg, d, dv, elem=2, o_alias_q=False):
    q = cfg.q_buffers * cfg.block_m * d * elem
    kv = cfg.stages * cfg.block_n * (d + dv) * elem
    o = 0 if o_alias_q else cfg.block_m * dv * elem
    return q + kv + o + SMEM_RESERVE


def needs_o_alias(cfg, d, dv, elem=2):
    """O staging through Q's buffer when a separate O tile would not fit (needs Dv <= D)."""
    return smem_bytes(cfg, d, dv, elem) > SMEM_LIMIT


def fits(cfg, d, dv, elem=2):
    if smem_bytes(cfg, d, dv, elem) <= SMEM_LIMIT:
        return True
    # O through Q's buffer: only with one Q buffer (the next tile's Q would overwrite a staged O).
    return cfg.q_buffers == 1 and dv <= d and smem_bytes(cfg, d, dv, elem, o_alias_q=True) <= SMEM_LIMIT


def get_config(d, dv, **overrides):
    """The tile for tile widths (d, dv) (see tile_dim), or None. overrides: fields of TileConfig."""
    cfg = _TABLE.get((d, dv))
    if cfg is None and d in TILE_DIMS and dv in TILE_DIMS:
        # Any other pair: two warpgroups and the largest key block that fits.
        for bn in (128, 64):
            cand = TileConfig(block_n=bn, num_wg=2, stages=2, consumer_regs=240)
            if fits(cand, d, dv):
                cfg = cand
                break
    if cfg is None:
        return None
    cfg = replace(cfg, **overrides) if overrides else cfg
    return cfg if fits(cfg, d, dv) else None


# Masked D = 64 problems with short visible spans take two warpgroups (128 query rows, 240 registers a thread)
# instead of the table's three. H100, 2026-11-25 (sm90_probe --dims 64 --variants base,wg2, CUDA-graph replay,
# TFLOP/s three / two warpgroups): causal S = 1024 179 / 291, S = 4096 401 / 400, S = 16384 474 / 431; non-causal
# 408 / 412, 490 / 451, 490 / 435. The trace says why: a 192-row tile on the causal diagonal has 2-3 masked key
# blocks of its ~5 (128 rows: 1, the walk's first block), and a masked block cost the three-warpgroup tile
# 2.6x an unmasked one inside the key loop (4.3 vs 1.7 µs). The switch point is the visible key span per query
# row: up to 4096 keys the masked blocks weigh enough, past it the third warpgroup's latency hiding wins (batched
# causal, H100 card 1654223010953, session 20: three -> two warpgroups 495 -> 454 at S = 6144, level at 8192,
# 517 -> 465 at 12288).
MASKED_SPAN_WG2 = 4096
# Packed calls whose sequences may differ in length (attention_fwd.mixed_lengths): the shorter sequences of the mix
# are where two warpgroups win most (three ran an 8 x 2048 causal batch at 0.65x), so two serve up to 8192 keys.
# Session 20, packed causal, 16,384 tokens, 32 heads (H100 card 1752624021011, kernel time by torch.profiler,
# 3 -> 2 warpgroups, TFLOP/s): 4096 + 4096 + 8192 415 -> 450, 6000 + 2000 + 8384 431 -> 450, 2048 + 1024 + 512 +
# 4608 + 8192 417 -> 448, 1000 + 3000 + 500 + 6000 + 5884 388 -> 439; past 8192 three stay ahead: 12288 + 8 x 512
# 448 / 431.
MASKED_SPAN_WG2_MIXED = 8192


# TAIL (Q handed back right after a tile's last QKᵀ, so the loader fetches the next tile's Q under that block's
# softmax and P·V) pays where tiles are short: per tile it hides one Q load. CUDA-graph replay, base → TAIL,
# TFLOP/s (sm90_probe --variants base,tail): H200 2026-11-25 (raw h200-...-sm90-probe-tail.log) D = 128 S = 1024
# 552 → 581, causal 407 → 429, S = 4096 602 → 609, causal 554 → 560, but S = 16384 636 → 594; D = 64 S ≤ 4096
# -1% to +5%; D = 256 S ≤ 4096 0 to +3%. The H100 r3 probe had D = 128 S ≤ 4096 +4–6% and ±3% elsewhere.
TAIL_MAX_SEQLEN_Q = 4096


def tail_for(max_seqlen_q):
    """Whether a forward over query rows of at most max_seqlen_q takes the early Q release (TAIL)."""
    return max_seqlen_q <= TAIL_MAX_SEQLEN_Q


# GQA packing (attention_fwd PACK): the query heads of one kv head share a query tile, row t · group + g being
# token t of head g, so a tile holds BM / group tokens and K/V is read once for the whole group. It fills the
# tiles of short query sequences (chunked prefill, speculative decoding: a 16-token chunk of a group of 8 is
# one full 128-row tile instead of 8 tiles with 16 rows each) and reads K/V a group fewer times. Groups that are
# powers of two up to 64 (a warpgroup's 64 rows hold whole tokens); up to PACK_MAX_SEQLEN_Q query tokens.
PACK_MAX_SEQLEN_Q = 1024


def gqa_pack(group, max_seqlen_q):
    """Query heads a tile packs (1: none) for a GQA group and the longest query sequence."""
    if group < 2 or group & (group - 1) or group > 64 or max_seqlen_q > PACK_MAX_SEQLEN_Q:
        return 1
    return group


def problem_config(d, dv, *, window_left, window_right, max_seqlen_q, max_seqlen_k, mixed_lengths=False,
                   **overrides):
    """get_config for one problem: tile widths (d, dv), the window (-1 = unbounded), the longest sequences and
    whether a packed call's sequences may differ in length. Explicit overrides (a probe variant) win over the
    per-problem choice."""
    if (d, dv) == (64, 64) and "num_wg" not in overrides and (window_left >= 0 or window_right >= 0):
        span = max(max_seqlen_k, max_seqlen_q)
        if window_left >= 0:
            span = min(span, window_left + 1 + max(window_right, 0))
        if span <= (MASKED_SPAN_WG2_MIXED if mixed_lengths else MASKED_SPAN_WG2):
            overrides = dict(overrides, num_wg=2, consumer_regs=240)
    return get_config(d, dv, **overrides)


def shipped_configs():
    """(d, dv) pairs of the table: what the ahead-of-time test compiles."""
    return sorted(_TABLE)
