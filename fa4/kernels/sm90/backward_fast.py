"""The sm90 backward's host path for a call whose signature it has served before: a training loop's steps.

backward_checked decides, per call, the backend (dispatch's checks), the tile, where dQ comes from, the buffers'
shapes and both kernels' arguments, then launches the preprocess and the main kernel through their cached launches.
On the H100 machine's host that took ~420 µs from the autograd Function's backward to the main kernel's launch at
D = 128 S = 1024 causal, against ~550 µs of GPU work: the eager backward was host-bound there
(benchmarks/bwd_host_probe.py, NOTES session 25). Every one of those decisions is a function of the tensors'
metadata, the call's options and the module's switches. A Replay keeps what one call on the plain route decided
(batched, no sink, no seqused_k, dQ by the main kernel: its unordered reduce-add, or deterministic=True's ordered
chain) with its two compiled launches, under a key of exactly those inputs; a later call with the same key only
allocates and launches. Calls whose dQ comes from the ordered pass (deterministic elsewhere, D = 256 without a
window, sinks) keep the full path.

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
    return (env.get("FA4_SM90"), env.get("FA4_SM90_BWD"), env.get("FA4_KT_PERSISTENT"), bwd.KT_PERSISTENT,
            bwd.CTA_CHUNK, bwd.CTA_CHUNK_BYTES, bwd.DQ_CHAIN, bwd.KT_DQ_CHAIN, bwd.KT_ASC_CHAIN_MIN_ROWS,
            bwd.D256_PASS_FULL, bwd.STATS_TMA, bwd.KEYS_AS_ROWS_D128, bwd.KEYS_AS_ROWS_D128_PACKED,
            id(bwd.D128_CAUSAL_TILE), id(bwd.D64_NARROW_TILE), id(bwd._TABLE), id(bwd.backward_checked),
            id(bwd.default_tile), id(bwd.dq_route), id(dispatch.resolve_auto_backward))


def signature(dout, q, k, v, out, lse, dlse, softmax_scale, window_left, window_right, softcap, deterministic):
    """Everything a plain-route call's decisions and launches depend on besides the tensors' addresses (their
    16-byte alignment included)."""
    return (q.device.index, q.dtype, k.dtype, v.dtype, dout.dtype, out.dtype, lse.dtype,
            q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), dout.shape, dout.stride(),
            out.shape, out.stride(), lse.shape, lse.stride(),
            None if dlse is None else (dlse.dtype, dlse.shape, dlse.stride(), dlse.data_ptr() % 16 == 0),
            q.data_ptr() % 16 == 0, k.data_ptr() % 16 == 0, v.data_ptr() % 16 == 0, dout.data_ptr() % 16 == 0,
            out.data_ptr() % 16 == 0, lse.data_ptr() % 16 == 0,
            float(softmax_scale), int(window_left), int(window_right), float(softcap), bool(deterministic),
            _switches())


class Replay:
    """One plain-route signature's buffers and launches (backward_checked's plain route, replayed).

    Where the main kernel's plan launches through launch.RawLaunch (which takes raw addresses for its descriptors)
    and the query length needs no padding rows, Delta, lse2 and the tile counter share one workspace allocation and
    go to both kernels as addresses: two allocations a call fewer than backward_checked's buffers."""
    __slots__ = ("tile", "batch", "seqlen_q", "pad_to", "persistent", "prep", "plan", "chain_shape", "workspace",
                 "stats_tma")

    def __init__(self, tile, batch, seqlen_q, pad_to, persistent, prep, plan, chain_shape=None):
        self.tile, self.batch, self.seqlen_q, self.pad_to = tile, batch, seqlen_q, pad_to
        self.persistent, self.prep, self.plan, self.chain_shape = persistent, prep, plan, chain_shape
        self.workspace = plan.raw is not None and seqlen_q % pad_to == 0
        self.stats_tma = bwd.stats_tma_serves(tile, False)

    def __call__(self, dout, q, k, v, out, lse, dlse):
        device, index = q.device, q.device.index
        dk = torch.empty(k.shape, dtype=k.dtype, device=device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=device)
        # The fp32 dQ accumulator; it and the persistent grid's tile counter are zeroed by the preprocess.
        dq_acc = torch.empty(q.shape, dtype=torch.float32, device=device)
        if self.workspace:
            # [Delta | lse2 | 4 int32 of tile counter], each (B, Hq, Sq) part a multiple of 64 rows: 16-byte aligned.
            n = self.batch * q.shape[-2] * self.seqlen_q
            ws = torch.empty(2 * n + 4, dtype=torch.float32, device=device)
            keep = ws
            dp = ws.data_ptr()
            l2p, cp = dp + 4 * n, dp + 8 * n
            delta = lse2 = None
        else:
            delta, lse2 = bwd.stats_buffers(lse, self.batch, q.shape[-2], self.seqlen_q, self.pad_to)
            keep = torch.empty(4, dtype=torch.int32, device=device) if self.persistent else None
            dp, l2p = delta.data_ptr(), lse2.data_ptr()
            cp = keep.data_ptr() if keep is not None else dp
        # The preprocess's 13 tensor slots in prep_arguments' order (no sink, batched: unused slots hold lse / delta).
        lp = lse.data_ptr()
        self.prep.fast([out.data_ptr(), dout.data_ptr(), lp, dlse.data_ptr() if dlse is not None else lp, lp,
                        dp, l2p, dp, lp, dp, l2p, dq_acc.data_ptr(), cp if self.persistent else dp],
                       raw_stream(index))
        dummy = bwd._dummy_i32(device)
        ctr = cp if self.persistent else dummy
        if self.chain_shape is not None:  # deterministic=True through the main kernel's ordered dQ chain
            ctr = torch.zeros(self.chain_shape, dtype=torch.int32, device=device)
        if self.workspace:
            lse2, delta = l2p, dp
        if self.stats_tma:
            lse2_src, delta_src = lse2, delta
        else:
            lse2_src = delta_src = bwd._stats_placeholder(device, self.tile.block_m)
        self.plan.launch_tensors(index, dict(
            q=q, k=k, v=v, dout=dout, dk=dk, dv=dv, dq=dq_acc, lse2=lse2, delta=delta, lse2_stats=lse2_src,
            delta_stats=delta_src, sink=lse2, dsink=lse2, dq_chain=ctr, cu_q=dummy, cu_k=dummy, seqused=dummy))
        del keep  # freed now: the caching allocator gives the block only to work queued after these kernels
        return dq_acc.to(q.dtype), dk, dv


def remember(key, replay):
    if len(_REPLAYS) >= _MAX_REPLAYS:
        _REPLAYS.clear()
    _REPLAYS[key] = replay


def replay(dout, q, k, v, out, lse, dlse, softmax_scale, window_left, window_right, softcap, deterministic):
    """(dq, dk, dv) of a backend="auto" call through the Replay of its signature, or None (no Replay, or the fast
    launches are off: FA4_SM90_FAST=0, a launch hook, another current device)."""
    found = _REPLAYS.get(signature(dout, q, k, v, out, lse, dlse, softmax_scale, window_left, window_right, softcap,
                                   deterministic))
    if found is None or not (launch.enabled(None) and hooks_idle() and q.device.index == current_device()):
        return None
    return found(dout, q, k, v, out, lse, dlse)
