"""The sm90 backward's host path for a call whose signature it has served before: a training loop's steps.

backward_checked decides, per call, the backend (dispatch's checks), the tile, where dQ comes from, the buffers'
shapes and both kernels' arguments, then launches the preprocess and the main kernel through their cached launches.
On the H100 machine's host that took ~420 µs from the autograd Function's backward to the main kernel's launch at
D = 128 S = 1024 causal, against ~550 µs of GPU work: the eager backward was host-bound there
(benchmarks/bwd_host_probe.py, NOTES session 25). Every one of those decisions is a function of the tensors'
metadata, the call's options and the module's switches. A Replay keeps what one call on the plain route decided
(no sink; batched or packed, with or without seqused_k; dQ by the main kernel: its unordered reduce-add, or
deterministic=True's ordered chain) with its two compiled launches, under a key of exactly those inputs; a later call with the same key only
allocates and launches. Calls whose dQ comes from the ordered pass (deterministic elsewhere, D = 256 without a
window, sinks) keep the full path. A call split over virtual kv heads (backward.gqa_split) replays as the split
does: K and V repeated, the inner call's Replay, dK / dV summed (SplitReplay).

The key also holds the identity of the functions a test or probe may replace (backward_checked, dispatch's
resolve_auto_backward, default_tile, dq_route): a replaced one is called again instead of being skipped.
"""
import os

import torch

from fa4 import dispatch
from fa4.kernels.direct_launch import current_device, hooks_idle, raw_stream

from . import backward as bwd, launch

_REPLAYS = {}
_MAX_REPLAYS = 64


def _switches():
    """The environment and module switches backward_checked's decisions read."""
    env = os.environ
    return (env.get("FA4_SM90"), env.get("FA4_SM90_BWD"), env.get("FA4_KT_PERSISTENT"), env.get("FA4_BWD_CHUNK_VARLEN"),
            bwd.KT_PERSISTENT, bwd.CTA_CHUNK, bwd.CTA_CHUNK_BYTES, bwd.DQ_CHAIN, bwd.KT_DQ_CHAIN,
            bwd.KT_ASC_CHAIN_MIN_ROWS, bwd.D256_PASS_FULL, bwd.DQ_RELEASE_LAG, bwd.DQ_STORE_FIRST, bwd.DQ_SPREAD,
            bwd.KT_PERSIST_CHAIN, bwd.KT_PERSIST_CHAIN_MIN_ROWS, bwd.KT_PERSIST_CHAIN_MIN_ROWS_MASKED, bwd.KT_PERSIST_CHAIN_FULL, bwd.D64_PERSIST_DET,
            bwd.D64_PERSIST_CAUSAL, bwd.CHAIN_BY_DEFAULT, bwd.CHAIN_BY_DEFAULT_MAX_ROWS_MASKED,
            bwd.CHAIN_BY_DEFAULT_D64, bwd.CHAIN_BY_DEFAULT_D64_MAX_ROWS, bwd.CHAIN_BY_DEFAULT_D64_MAX_ROWS_GQA,
            bwd.D64_CAUSAL_CHAIN, bwd.D64_CAUSAL_CHAIN_MAX_ROWS, bwd.D64_CAUSAL_CHAIN_MAX_ROWS_DET,
            bwd.GQA_SPLIT, bwd.GQA_SPLIT_MIN_GROUP, tuple(bwd.GQA_SPLIT_HEADS.items()), bwd.STATS_TMA,
            bwd.KEYS_AS_ROWS_D128, bwd.KEYS_AS_ROWS_D128_PACKED, bwd.STATS_EXT, bwd.DQ_CAST, bwd.CHAIN_FENCE,
            bwd.DQ_FIRST_STORE,
            id(bwd.D128_CAUSAL_TILE), id(bwd.D64_NARROW_TILE), id(bwd._TABLE),
            id(bwd.backward_checked), id(bwd.default_tile), id(bwd.dq_route), id(dispatch.resolve_auto_backward))


def _meta(t):
    return None if t is None else (t.dtype, t.shape, t.stride(), t.data_ptr() % 16 == 0)


def signature(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
              softmax_scale, window_left, window_right, softcap, deterministic):
    """Everything a plain-route call's decisions and launches depend on besides the tensors' addresses (their
    16-byte alignment included; a packed call's offsets and seqused_k are read by the kernels, their values are
    not decided on)."""
    return (q.device.index, q.dtype, k.dtype, v.dtype, dout.dtype, out.dtype, lse.dtype,
            q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), dout.shape, dout.stride(),
            out.shape, out.stride(), lse.shape, lse.stride(), _meta(dlse),
            q.data_ptr() % 16 == 0, k.data_ptr() % 16 == 0, v.data_ptr() % 16 == 0, dout.data_ptr() % 16 == 0,
            out.data_ptr() % 16 == 0, lse.data_ptr() % 16 == 0,
            None if cu_seqlens_q is None else (_meta(cu_seqlens_q), _meta(cu_seqlens_k), int(max_seqlen_q),
                                               int(max_seqlen_k)),
            _meta(seqused_k), float(softmax_scale), int(window_left), int(window_right), float(softcap),
            bool(deterministic), _switches())


class Replay:
    """One plain-route signature's buffers and launches (backward_checked's plain route, replayed).

    Batched calls whose main kernel's plan launches through launch.RawLaunch (which takes raw addresses for its
    descriptors) and whose query length needs no padding rows keep Delta, lse2 and the tile counter in one workspace
    allocation, passed to both kernels as addresses: two allocations a call fewer than backward_checked's buffers."""
    __slots__ = ("tile", "batch", "seqlen_q", "pad_to", "persistent", "prep", "plan", "chain_shape", "varlen",
                 "zero_dkdv", "stats_al_shape", "workspace", "stats_tma", "stats_ext_shape", "dq_cast")

    def __init__(self, tile, batch, seqlen_q, persistent, prep, plan, chain_shape=None, *, varlen=False,
                 zero_dkdv=False, stats_al_shape=None, stats_ext_shape=None, dq_cast=False):
        self.tile, self.batch, self.seqlen_q, self.persistent = tile, batch, seqlen_q, persistent
        self.prep, self.plan, self.chain_shape = prep, plan, chain_shape
        self.varlen, self.zero_dkdv, self.stats_al_shape = varlen, zero_dkdv, stats_al_shape
        self.pad_to = None if varlen else tile.block_m
        self.workspace = not varlen and plan.raw is not None and seqlen_q % tile.block_m == 0
        self.stats_tma = bwd.stats_tma_serves(tile, varlen)
        self.stats_ext_shape = stats_ext_shape  # the statistics' K extensions (bwd.stats_ext_buffers)
        self.dq_cast = dq_cast  # the main kernel writes dQ itself (bwd.dq_cast_serves)

    def __call__(self, dout, q, k, v, out, lse, dlse, cu_q=None, cu_k=None, seqused=None):
        device, index = q.device, q.device.index
        # dK / dV rows outside every packed sequence, or past seqused_k, are never visited: zeros there.
        alloc = torch.zeros if self.zero_dkdv else torch.empty
        dk = alloc(k.shape, dtype=k.dtype, device=device)
        dv = alloc(v.shape, dtype=v.dtype, device=device)
        if self.workspace:
            dq_acc, _ = bwd.dq_accumulator(q, False, False)
            # [Delta | lse2 | 4 int32 of tile counter]; each (B, Hq, Sq) part a multiple of 64 rows: aligned.
            n = self.batch * q.shape[-2] * self.seqlen_q
            keep = torch.empty(2 * n + 4, dtype=torch.float32, device=device)
            dp = keep.data_ptr()
            l2p, cp = dp + 4 * n, dp + 8 * n
            delta, lse2 = dp, l2p  # both kernels take them as addresses
        else:
            dq_acc, keep = bwd.dq_accumulator(q, self.varlen, self.persistent)
            delta, lse2 = bwd.stats_buffers(lse, self.batch, q.shape[-2], self.seqlen_q, self.pad_to)
            dp, l2p = delta.data_ptr(), lse2.data_ptr()
            cp = keep.data_ptr() if keep is not None else dp
        stats_al = None
        if self.stats_al_shape is not None:  # packed: (lse2, delta) copies at each sequence's aligned start
            stats_al = tuple(torch.empty(self.stats_al_shape, dtype=torch.float32, device=device) for _ in range(2))
        ext = None
        if self.stats_ext_shape is not None:  # filled by the preprocess (its STATS_EXT slot; stats_ext_buffers)
            ext = torch.empty(self.stats_ext_shape, dtype=q.dtype, device=device)
        # Batched calls have the preprocess zero the accumulator and the counter (its ZERO_DQ slots; packed: unused).
        zero_acc = dp if self.varlen else dq_acc.data_ptr()
        zero_ctr = cp if self.persistent and not self.varlen else dp
        # The preprocess's 14 tensor slots in prep_arguments' order (no sink: unused slots hold lse / delta).
        lp = lse.data_ptr()
        self.prep.fast([out.data_ptr(), dout.data_ptr(), lp, dlse.data_ptr() if dlse is not None else lp, lp,
                        dp, l2p, dp, cu_q.data_ptr() if self.varlen else lp,
                        stats_al[1].data_ptr() if stats_al is not None else dp,
                        stats_al[0].data_ptr() if stats_al is not None else l2p, zero_acc, zero_ctr,
                        ext.data_ptr() if ext is not None else l2p],
                       raw_stream(index))
        dummy = bwd._dummy_i32(device)
        ctr = cp if self.persistent else dummy
        if self.chain_shape is not None:  # deterministic=True through the main kernel's ordered dQ chain
            ctr = torch.zeros(self.chain_shape, dtype=torch.int32, device=device)
        if ext is not None:  # both boxes from the one tensor
            lse2_src = delta_src = ext
        elif self.stats_tma:
            lse2_src, delta_src = stats_al if self.varlen else (lse2, delta)
        else:
            lse2_src = delta_src = bwd._stats_placeholder(device, self.tile.block_m, self.varlen)
        dq = torch.empty(q.shape, dtype=q.dtype, device=device) if self.dq_cast else None
        self.plan.launch_tensors(index, dict(
            q=q, k=k, v=v, dout=dout, dk=dk, dv=dv, dq=dq_acc, lse2=lse2, delta=delta, lse2_stats=lse2_src,
            delta_stats=delta_src, sink=lse2, dsink=lse2, dq_chain=ctr,
            cu_q=cu_q if cu_q is not None else dummy, cu_k=cu_k if cu_k is not None else dummy,
            seqused=seqused if seqused is not None else dummy,
            dq_out=bwd._dq_out_tensor(dq, self.tile, q, self.varlen)))
        del keep  # freed now: the caching allocator gives the block only to work queued after these kernels
        return (dq if dq is not None else dq_acc.to(q.dtype)), dk, dv


class SplitReplay:
    """The Replay of a call that backward_checked splits over virtual kv heads (backward.gqa_split): the same three
    steps, K and V repeated, the inner signature's Replay on them, each kv head's dK / dV summed in fp32."""
    __slots__ = ("split", "inner")

    def __init__(self, split, inner):
        self.split, self.inner = split, inner

    def __call__(self, dout, q, k, v, out, lse, dlse, cu_q=None, cu_k=None, seqused=None):
        kr, vr = bwd.repeat_kv_heads(k, self.split), bwd.repeat_kv_heads(v, self.split)
        dq, dk, dv = self.inner(dout, q, kr, vr, out, lse, dlse, cu_q, cu_k, seqused)
        return dq, bwd.sum_virtual_heads(dk, k), bwd.sum_virtual_heads(dv, v)


def remember_split(split, dout, q, k, v, kr, vr, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                   max_seqlen_k, softmax_scale, window_left, window_right, softcap, deterministic):
    """After a split call (K / V repeated into kr / vr): a SplitReplay under the call's own signature, where the inner
    call on kr / vr left a Replay (the same arguments otherwise, so the same decisions on every later call)."""
    common = (out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, softmax_scale,
              window_left, window_right, softcap, deterministic)
    inner = _REPLAYS.get(signature(dout, q, kr, vr, *common))
    if isinstance(inner, Replay):
        remember(signature(dout, q, k, v, *common), SplitReplay(split, inner))


def remember(key, replay):
    if len(_REPLAYS) >= _MAX_REPLAYS:
        _REPLAYS.clear()
    _REPLAYS[key] = replay


def replay(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
           softmax_scale, window_left, window_right, softcap, deterministic):
    """(dq, dk, dv) of a backend="auto" call through the Replay of its signature, or None (no Replay, or the fast
    launches are off: FA4_SM90_FAST=0, a launch hook, another current device)."""
    found = _REPLAYS.get(signature(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                   max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap,
                                   deterministic))
    if found is None or not (launch.enabled(None) and hooks_idle() and q.device.index == current_device()):
        return None
    return found(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_k)
