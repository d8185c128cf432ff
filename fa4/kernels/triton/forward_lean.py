"""The portable forward's fast path for the plain training call on sm_90: one key loop, no feature branches.

The general kernel (forward.py) splits its key loop in three (left boundary, unmasked interior, right boundary),
carries every feature as a constexpr and builds its TMA descriptors in each program. This module serves the call
that needs none of that with two lean kernels:

- `_lean_fwd_kernel`, for Triton 3.6's automatic warp specialization on sm_90, which needs a kernel with exactly
  one loop, no branch in its body, no early return, num_warps = 4 (a second loop anywhere makes its pass assert,
  an `if` in the body makes it skip silently; see docs/INTERNALS.md). When it engages it turns the loop into
  FA3's schedule: a TMA producer warpgroup and two consumer warpgroups of BLOCK_M / 2 query rows each, so one
  consumer's softmax runs under the other's wgmma. Causal masks every key block there (the mask must not be a
  branch). It builds its descriptors in the program: the specializer must halve a descriptor's block for its
  two consumers, which it cannot do to a host-built one.
- `_lean_fwd_host_desc_kernel`, one warpgroup, TMA descriptors built on the host over the (B, H, S, D) view of
  each tensor, and under causal the unmasked key blocks in a loop of their own. Short programs gain most: at
  S = 1024 the device-built descriptors' set-up (five tensormaps written and fenced per program) is not hidden,
  because the two programs sharing an SM start and end together (benchmarks/NOTES.md, session 7).

Both serve only: batched (B, S, H, D) tensors that TMA can address, D = Dv listed in the table, fp16/bf16, no
window other than causal, no softcap, no sink, keys a whole number of key blocks (no tail mask) unless causal
(whose mask also hides the tail), and Sq <= Sk under causal (so every row sees at least one key and no row needs
the empty-row guard). The warp-specialized tiles also need Sq % 4 == 0 (lse by TMA), the host-descriptor ones
no zero stride (a broadcast tensor). GQA is a head index. Everything else runs on the general kernel, which these
must match bit for bit in semantics (out and lse), not in rounding.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from triton.tools.tensor_descriptor import TensorDescriptor

from fa4.kernels.direct_launch import Launch, current_device, hooks_idle, raw_stream


@triton.jit
def _program_tile(seqlen_q, num_heads, group, BLOCK_M: tl.constexpr):
    """(sequence, query head, kv head, first query row) of this program. One program per (query block, head,
    sequence); query blocks fastest (the programs resident together share one head's K/V in L2) and in reverse
    (under causal the longest blocks start first)."""
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = num_m - 1 - pid % num_m
    pid_bh = pid // num_m
    h = pid_bh % num_heads
    return pid_bh // num_heads, h, h // group, pid_m * BLOCK_M


@triton.jit
def _causal_mask(qk, start_n, m_start, diag_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Bottom-right alignment: row i sees keys j <= i + (Sk - Sq). Computed from aranges inside the loop (not a
    # row vector captured from outside it): the warp specializer splits the block's rows between its two
    # consumers and must split this mask with them.
    diag = (start_n + tl.arange(0, BLOCK_N))[None, :] - tl.arange(0, BLOCK_M)[:, None]
    return tl.where(diag <= m_start + diag_offset, qk, float("-inf"))


@triton.jit
def _softmax_step(qk, m_i, l_i, acc, qk_scale):
    # Base-2 online softmax with the scale folded into the exponent's multiply-add. Row i's first key block
    # always holds a visible key (Sq <= Sk under causal), so m is finite from the first block on and a fully
    # hidden later block gives p = exp2(-inf) = 0, never NaN. Returns P (fp32) and the updated m, l, acc.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return p, m_new, l_i, acc


@triton.jit
def _lean_fwd_kernel(Q, K, V, Out, Lse,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                     stride_lb, stride_lh,
                     num_heads, group, seqlen_q, seqlen_k, qk_scale,
                     HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     WARP_SPEC: tl.constexpr):
    b, h, h_kv, m_start = _program_tile(seqlen_q, num_heads, group, BLOCK_M)
    # 64-bit bases: B * S * H * D may pass 2^31.
    q_desc = tl.make_tensor_descriptor(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh,
                                       shape=[seqlen_q, HEAD_D], strides=[stride_qs, 1],
                                       block_shape=[BLOCK_M, HEAD_D])
    k_desc = tl.make_tensor_descriptor(K + b.to(tl.int64) * stride_kb + h_kv.to(tl.int64) * stride_kh,
                                       shape=[seqlen_k, HEAD_D], strides=[stride_ks, 1],
                                       block_shape=[BLOCK_N, HEAD_D])
    v_desc = tl.make_tensor_descriptor(V + b.to(tl.int64) * stride_vb + h_kv.to(tl.int64) * stride_vh,
                                       shape=[seqlen_k, HEAD_D], strides=[stride_vs, 1],
                                       block_shape=[BLOCK_N, HEAD_D])
    q = q_desc.load([m_start, 0])

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    hi = seqlen_k
    if CAUSAL:
        # The last row of the block bounds the loop.
        hi = tl.minimum(seqlen_k, m_start + BLOCK_M + (seqlen_k - seqlen_q))
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        k = k_desc.load([start_n, 0])
        qk = tl.dot(q, k.T)
        if CAUSAL:
            qk = _causal_mask(qk, start_n, m_start, seqlen_k - seqlen_q, BLOCK_M, BLOCK_N)
        p, m_i, l_i, acc = _softmax_step(qk, m_i, l_i, acc, qk_scale)
        v = v_desc.load([start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)

    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    lse_base = Lse + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh
    if WARP_SPEC:
        # lse by a 1-D TMA store, like O: Triton 3.6's warp specializer shifts both the block offset and the
        # arange of a pointer-indexed store for its second consumer (rows written twice the offset away, the
        # lse of rows BLOCK_M/2.. lost), while it offsets a descriptor store's coordinate right. config_for
        # requires Sq % 4 == 0 (16-byte aligned rows of lse).
        lse_desc = tl.make_tensor_descriptor(lse_base, shape=[seqlen_q], strides=[1], block_shape=[BLOCK_M])
        lse_desc.store([m_start], lse)
    else:
        offs_m = m_start + tl.arange(0, BLOCK_M)
        tl.store(lse_base + offs_m, lse, mask=offs_m < seqlen_q)
    o_desc = tl.make_tensor_descriptor(Out + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh,
                                       shape=[seqlen_q, HEAD_D], strides=[stride_os, 1],
                                       block_shape=[BLOCK_M, HEAD_D])
    o_desc.store([m_start, 0], (acc / l_i[:, None]).to(Out.dtype.element_ty))


@triton.jit
def _lean_fwd_host_desc_kernel(q_desc, k_desc, v_desc, o_desc, Lse, stride_lb, stride_lh,
                               num_heads, group, seqlen_q, seqlen_k, qk_scale,
                               HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               CAUSAL: tl.constexpr, SPLIT: tl.constexpr):
    # The same kernel with TMA descriptors built on the host (no warp specialization: its pass would have to
    # halve a host descriptor's block for its two consumers). Each descriptor spans the whole (B, H, S, D) view
    # of its tensor, so a program indexes it by (sequence, head, row, 0) and TMA clips every tile at its own
    # sequence's end. The device-built form spends each program's prologue writing and fencing five tensormaps
    # in global memory; at S = 1024 a program lasts only ~16 key blocks and that prologue is not hidden,
    # because the two programs sharing an SM start and end together.
    b, h, h_kv, m_start = _program_tile(seqlen_q, num_heads, group, BLOCK_M)
    q = q_desc.load([b, h, m_start, 0]).reshape(BLOCK_M, HEAD_D)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
    hi = seqlen_k
    lo_masked = 0
    if CAUSAL:
        hi = tl.minimum(seqlen_k, m_start + BLOCK_M + (seqlen_k - seqlen_q))
        if SPLIT:
            # Key blocks wholly left of the block's first row's diagonal need no mask: a loop of their own.
            lo_masked = tl.maximum(m_start + (seqlen_k - seqlen_q), 0) // BLOCK_N * BLOCK_N
            for start_n in tl.range(0, lo_masked, BLOCK_N):
                k = k_desc.load([b, h_kv, start_n, 0]).reshape(BLOCK_N, HEAD_D)
                qk = tl.dot(q, k.T)
                p, m_i, l_i, acc = _softmax_step(qk, m_i, l_i, acc, qk_scale)
                v = v_desc.load([b, h_kv, start_n, 0]).reshape(BLOCK_N, HEAD_D)
                acc = tl.dot(p.to(v.dtype), v, acc)
    for start_n in tl.range(lo_masked, hi, BLOCK_N):
        k = k_desc.load([b, h_kv, start_n, 0]).reshape(BLOCK_N, HEAD_D)
        qk = tl.dot(q, k.T)
        if CAUSAL:
            qk = _causal_mask(qk, start_n, m_start, seqlen_k - seqlen_q, BLOCK_M, BLOCK_N)
        p, m_i, l_i, acc = _softmax_step(qk, m_i, l_i, acc, qk_scale)
        v = v_desc.load([b, h_kv, start_n, 0]).reshape(BLOCK_N, HEAD_D)
        acc = tl.dot(p.to(v.dtype), v, acc)

    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    offs_m = m_start + tl.arange(0, BLOCK_M)
    tl.store(Lse + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + offs_m, lse, mask=offs_m < seqlen_q)
    o = (acc / l_i[:, None]).to(o_desc.dtype)
    o_desc.store([b, h, m_start, 0], o.reshape(1, 1, BLOCK_M, HEAD_D))


class LeanConfig(NamedTuple):
    block_m: int
    block_n: int
    num_stages: int
    warp_spec: bool  # always num_warps = 4 (the specializer adds its producer and second consumer warpgroups)
    host_desc: bool = False  # TMA descriptors built on the host (_lean_fwd_host_desc_kernel; not with warp_spec)
    split: bool = False  # causal, host_desc: the unmasked key blocks in a loop of their own


# (arch, head dim, causal) -> [(largest Sq it serves, LeanConfig), ...], first match wins; a call no row matches
# takes the general kernel. From `python benchmarks/ws_probe.py` (benchmarks/NOTES.md, sessions 6 and 7), TFLOP/s
# on the H100 (2026-11-26, same run; hd = host descriptors, sp = causal split, ws = warp-specialized, general =
# the general kernel's table tile; the H200 ranks them the same except where said):
# - D = 128 non-causal: S = 1024 128 x 64 s2 hd 453-456, general 397, ws 128 x 128 401 (session 6); S = 4096
#   ws 527, hd 515; S = 16384 ws 559, hd 526. The specializer's set-up weighs at 8 key blocks a program.
# - D = 128 causal: S = 1024 64 x 64 s3 hd sp 350, 128 x 64 hd 327, general 282; S = 4096 64 x 64 s3 hd sp 451,
#   ws 435; S = 16384 ws 497, 64 x 64 s3 hd sp 487. (128 x 64 hd sp beat ws on the H200 at 4096 and 16384 but
#   spills 152 bytes: two pipelined loops at 255 registers.)
# - D = 64 non-causal: S = 1024 128 x 64 s3 hd 376, general 314; S = 4096 128 x 128 s3 hd 419, general 410;
#   S = 16384 441 / 430 (the H200: equal within 1%).
# - D = 64 causal: S = 1024 64 x 64 s3 hd sp 297, general 222; S = 4096 383 / 357; S = 16384 64 x 64 s3 hd sp
#   389, 64 x 128 s3 hd sp 414, general 406: the general kernel keeps it.
# Three stages miscompile under warp specialization (NaN on the H100), so every warp-specialized tile has two.
TABLE = {
    ("sm90", 128, False): [(1024, LeanConfig(128, 64, 2, False, True)), (None, LeanConfig(128, 128, 2, True))],
    ("sm90", 128, True): [(4096, LeanConfig(64, 64, 3, False, True, True)), (None, LeanConfig(128, 128, 2, True))],
    ("sm90", 64, False): [(1024, LeanConfig(128, 64, 3, False, True)), (None, LeanConfig(128, 128, 3, False, True))],
    ("sm90", 64, True): [(4096, LeanConfig(64, 64, 3, False, True, True))],
}

# Triton versions the specializer was verified with (its pass asserts or miscompiles on shapes it does not
# handle, and its rules move between releases).
TESTED_TRITON = ("3.6.",)


def config_for(q, k, v, *, window_left, window_right, softcap, sink, varlen, paged, seqused_k, tma_ok):
    """The LeanConfig serving this call, or None when it needs the general kernel (see the module docstring)."""
    if q.device.type != "cuda" or varlen or paged or seqused_k is not None or sink is not None or softcap > 0.0:
        return None
    if not triton.__version__.startswith(TESTED_TRITON) or not tma_ok:
        return None
    if q.dtype not in (torch.float16, torch.bfloat16):
        return None
    from .forward import capability
    if capability(q.device)[0] != 9:
        return None
    d = q.shape[-1]
    if v.shape[-1] != d:
        return None
    causal = window_right == 0 and window_left < 0
    if not causal and (window_left >= 0 or window_right >= 0):
        return None
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    cfg = next((c for bound, c in TABLE.get(("sm90", d, causal), []) if bound is None or seqlen_q <= bound), None)
    if cfg is None:
        return None
    if cfg.warp_spec and seqlen_q % 4:
        return None  # lse rows must start 16-byte aligned for its TMA store
    if cfg.host_desc and any(0 in t.stride() for t in (q, k, v)):
        return None  # a broadcast (zero-stride) dimension: the device-built descriptors' base offsets serve it
    if causal and seqlen_q > seqlen_k or seqlen_k == 0:
        return None  # rows that see no key: the general kernel's empty-row guard gives them zeros and lse = -inf
    if not causal and seqlen_k % cfg.block_n:
        return None
    return cfg


def launch(launch_args, cfg, remember=None):
    """Run the lean kernel for a call described by forward.prepare (batched, validated by config_for).
    remember: the call's `signature`, kept with what its host-descriptor launch needs (see repeat_call)."""
    a = launch_args
    strides = a["strides"]
    # forward.prepare's order: q (b, s, h), k (b, s, h), v (b, s, h), out (b, s, h), lse (b, h), page table.
    num_heads, group, seqlen_q, seqlen_k, _ = a["ints"]
    grid = (triton.cdiv(seqlen_q, cfg.block_m) * a["batch"] * num_heads,)
    d = a["flags"]["HEAD_D"]
    if cfg.host_desc:
        assert not cfg.warp_spec, "host descriptors are built for the plain (not warp-specialized) kernel"
        descs = _host_descs(a["q"], a["k"], a["v"], a["out"], cfg, d)
        lse = a["lse"]
        tail = (*strides[12:14], num_heads, group, seqlen_q, seqlen_k, a["scalars"][0])
        constexprs = dict(HEAD_D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=a["causal"], SPLIT=cfg.split)
        _launch_planned(descs, lse, tail, constexprs, grid, cfg)
        if remember is not None:
            _CALLS[remember] = (cfg, tuple(a["out"].shape), tuple(lse.shape), tail, constexprs, grid, d)
        return
    _lean_fwd_kernel[grid](a["q"], a["k"], a["v"], a["out"], a["lse"], *strides[:14],
                           num_heads, group, seqlen_q, seqlen_k, a["scalars"][0],
                           HEAD_D=d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                           CAUSAL=a["causal"], WARP_SPEC=cfg.warp_spec, num_warps=4, num_stages=cfg.num_stages)


# Calls that took the host-descriptor kernel, by `signature`: everything forward.prepare and config_for derived
# from it. A repeated call (the same shapes, strides, dtype, device, scale and mask: every training step) skips
# both (~30 µs of the ~130-150 µs a call costs the H100's host; at D = 128 S = 1024 causal the kernel takes ~195).
# Probes that edit TABLE or flip forward.USE_LEAN must clear it.
_CALLS = {}


def signature(q, k, v, softmax_scale, window_left, window_right):
    """The key of _CALLS for a batched call without softcap, sink, varlen, paged keys or seqused_k."""
    return (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, q.device.index,
            softmax_scale, window_left, window_right)


def repeat_call(key, q, k, v):
    """(out, lse) of a call whose signature ran the host-descriptor kernel before, or None (then the caller
    takes the full path). Only the tensors' addresses are new: TMA needs them 16-byte aligned (out and lse are
    fresh allocations)."""
    entry = _CALLS.get(key)
    if entry is None or (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15:
        return None
    cfg, out_shape, lse_shape, tail, constexprs, grid, d = entry
    out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    _launch_planned(_host_descs(q, k, v, out, cfg, d), lse, tail, constexprs, grid, cfg)
    return out, lse


# Launches of the host-descriptor kernel kept per call signature. Through JITFunction a launch binds and
# specialises every argument again (~25 µs of Python on the H100's host, next to a ~200 µs kernel at D = 128
# S = 1024 causal); a kept launch goes straight to the compiled kernel's launcher, which encodes the descriptors.
_PLANS = {}


def _launch_planned(descs, lse, tail, constexprs, grid, cfg):
    if lse.device.type != "cuda":  # the CPU interpreter
        _lean_fwd_host_desc_kernel[grid](*descs, lse, *tail, **constexprs, num_warps=4, num_stages=cfg.num_stages)
        return
    index = lse.device.index
    key = (index, descs[0].base.dtype, tuple((x.base.dtype, tuple(x.block_shape)) for x in descs), tail,
           tuple(constexprs.items()), grid, cfg.num_stages)
    plan = _PLANS.get(key)
    fast = (plan is not None and plan.compiled is not None and lse.data_ptr() % 16 == 0
            and current_device() == index and hooks_idle() and not torch.compiler.is_compiling())
    if fast:
        plan.fast((*descs, lse.data_ptr()), raw_stream(index))
        return
    if plan is None:
        plan = _PLANS[key] = Launch(_lean_fwd_host_desc_kernel, 5, grid, tail, constexprs, 4, cfg.num_stages)
    with torch.cuda.device(lse.device):
        plan.jit((*descs, lse), keep=lse.data_ptr() % 16 == 0 and not torch.compiler.is_compiling())


def _host_descs(q, k, v, out, cfg, d):
    """The four descriptors of a host-descriptor launch: query-block boxes for q and out, key-block ones for k, v."""
    return (_host_desc(q, cfg.block_m, d), _host_desc(k, cfg.block_n, d), _host_desc(v, cfg.block_n, d),
            _host_desc(out, cfg.block_m, d))


def _host_desc(t, rows, d):
    """A TMA descriptor over the (B, H, S, D) view of a (B, S, H, D) tensor, one [1, 1, rows, D] box a load.

    TMA takes any 16-byte-multiple strides in any order, so the heads-major view costs no copy; forward.prepare's
    tma_ok has checked the alignment; config_for admits only head dims that are the kernel's HEAD_D."""
    view = t.transpose(1, 2)
    # The dataclass's own __init__ re-validates what tma_ok checked (~2 µs a descriptor, four a call): set
    # its fields directly.
    desc = object.__new__(TensorDescriptor)
    desc.base, desc.shape, desc.strides, desc.block_shape, desc.padding = (
        view, list(view.shape), list(view.stride()), [1, 1, rows, d], "zero")
    return desc
