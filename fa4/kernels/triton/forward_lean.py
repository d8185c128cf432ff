"""The portable forward's fast path for the plain training call: one key loop, compiler warp specialization.

The general kernel (forward.py) splits its key loop in three (left boundary, unmasked interior, right boundary)
and carries every feature as a constexpr. Triton 3.6's automatic warp specialization on sm_90 needs the
opposite: a kernel with exactly one loop, no branch in its body, no early return, num_warps = 4 (a second loop
anywhere makes its pass assert, an `if` in the body makes it skip silently; see docs/INTERNALS.md). When it
engages it turns the loop into FA3's schedule: a TMA producer warpgroup and two consumer warpgroups of
BLOCK_M / 2 query rows each, so one consumer's softmax runs under the other's wgmma. On the H100 that is worth
+9% at D = 128 against the general kernel's best tile (benchmarks/NOTES.md, session 6).

So this kernel serves only the call that needs nothing else: batched (B, S, H, D) tensors that TMA can address,
D = Dv a power of two listed in the table, fp16/bf16, no window other than causal, no softcap, no sink, keys a
whole number of key blocks (no tail mask) unless causal (whose mask also hides the tail), Sq <= Sk under causal
(so every row sees at least one key and no row needs the empty-row guard), and Sq % 4 == 0 (lse by TMA). Causal masks every key block,
not only the diagonal ones: the mask must not be a branch. GQA is a head index. Everything else runs on the
general kernel, which this one must match bit for bit in semantics (out and lse), not in rounding.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl


@triton.jit
def _lean_fwd_kernel(Q, K, V, Out, Lse,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                     stride_lb, stride_lh,
                     num_heads, group, seqlen_q, seqlen_k, qk_scale,
                     HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                     WARP_SPEC: tl.constexpr):
    # One program per (query block, head, sequence); query blocks fastest (the programs resident together share
    # one head's K/V in L2) and in reverse (under causal the longest blocks start first).
    num_m = tl.cdiv(seqlen_q, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = num_m - 1 - pid % num_m
    pid_bh = pid // num_m
    h = pid_bh % num_heads
    b = pid_bh // num_heads
    h_kv = h // group
    m_start = pid_m * BLOCK_M
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
        # Bottom-right alignment: row i sees keys j <= i + (Sk - Sq). The last row of the block bounds the loop.
        hi = tl.minimum(seqlen_k, m_start + BLOCK_M + (seqlen_k - seqlen_q))
    for start_n in tl.range(0, hi, BLOCK_N, warp_specialize=WARP_SPEC):
        k = k_desc.load([start_n, 0])
        qk = tl.dot(q, k.T)
        if CAUSAL:
            # Computed inside the loop from aranges (not a row vector captured from outside it): the warp
            # specializer splits the block's rows between its two consumers and must split this mask with them.
            diag = (start_n + tl.arange(0, BLOCK_N))[None, :] - tl.arange(0, BLOCK_M)[:, None]
            qk = tl.where(diag <= m_start + (seqlen_k - seqlen_q), qk, float("-inf"))
        # Base-2 online softmax with the scale folded into the exponent's multiply-add. Row i's first key
        # block always holds a visible key (Sq <= Sk under causal), so m is finite from the first block on and
        # a fully hidden later block gives p = exp2(-inf) = 0, never NaN.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = v_desc.load([start_n, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

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


class LeanConfig(NamedTuple):
    block_m: int
    block_n: int
    num_stages: int
    warp_spec: bool  # always num_warps = 4 (the specializer adds its producer and second consumer warpgroups)


# (arch, head dim, causal) -> [(largest Sq it serves, LeanConfig), ...], first match wins; rows absent here take
# the general kernel. From `python benchmarks/ws_probe.py` (benchmarks/NOTES.md, session 6), TFLOP/s on the H100
# (2026-11-26, with the lse TMA store) against the general kernel's table tile in the same run:
# - D = 128 non-causal: S = 1024 plain one-warpgroup 128 x 64 422, warp-specialized 128 x 128 401, general 403;
#   S = 4096 496 / 514 / 485; S = 16384 519 / 542 / 511. Short programs (8 key blocks) pay for the specializer's
#   set-up; long ones gain from it.
# - D = 128 causal: S = 1024 plain 288, warp-specialized 255, general 284; S = 4096 399 / 410 / 406;
#   S = 16384 420 / 493 / 468.
# - D = 64: the general kernel's tiles stay ahead (H200: 411 against 394 warp-specialized at S = 4096).
# Three stages miscompile under warp specialization (NaN on the H100), so every warp-specialized tile has two.
TABLE = {
    ("sm90", 128, False): [(1024, LeanConfig(128, 64, 2, False)), (None, LeanConfig(128, 128, 2, True))],
    ("sm90", 128, True): [(1024, LeanConfig(128, 64, 2, False)), (None, LeanConfig(128, 128, 2, True))],
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
    major, _ = torch.cuda.get_device_capability(q.device)
    if major != 9:
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
    if seqlen_q % 4:
        return None  # lse rows must start 16-byte aligned for its TMA store
    if causal and seqlen_q > seqlen_k:
        return None
    if not causal and seqlen_k % cfg.block_n:
        return None
    return cfg


def launch(launch_args, cfg):
    """Run the lean kernel for a call described by forward.prepare (batched, validated by config_for)."""
    a = launch_args
    strides = a["strides"]
    # forward.prepare's order: q (b, s, h), k (b, s, h), v (b, s, h), out (b, s, h), lse (b, h), page table.
    num_heads, group, seqlen_q, seqlen_k, _ = a["ints"]
    grid = (triton.cdiv(seqlen_q, cfg.block_m) * a["batch"] * num_heads,)
    _lean_fwd_kernel[grid](a["q"], a["k"], a["v"], a["out"], a["lse"], *strides[:14],
                           num_heads, group, seqlen_q, seqlen_k, a["scalars"][0],
                           HEAD_D=a["flags"]["HEAD_D"], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                           CAUSAL=a["causal"], WARP_SPEC=cfg.warp_spec, num_warps=4, num_stages=cfg.num_stages)
