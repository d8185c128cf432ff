"""Small `@triton.jit` helpers shared by fa4's Triton attention kernels.

Conventions: scores live in base-2 log units (natural-log scores times log2(e)), so that the exponential of the
softmax is one `exp2` (a single MUFU.EX2 instruction on NVIDIA GPUs). Key positions are absolute within the
sequence; a query row i is compared with keys in "key coordinates", i + (Sk - Sq) (bottom-right alignment).
"""
import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = 0.6931471805599453  # ln(2): ln(x) = log2(x) * LN2

# The softcap's tanh (tanh_via_exp2): its fast form is off by ~6e-8 absolute near 0, which moves a logit c·tanh(s/c)
# by ~c·6e-8: 6e-5 at c = 1e3, under any 16-bit rounding, but 6e-3 at c = 1e5 (fp16 then failed the numerics rule,
# session 37's audit). Caps above PRECISE_TANH_ABOVE, and fp32 inputs, take the series near 0 instead. It costs the
# Triton softcap kernels 5-15% (H100 card 1653923013328, D = 128 S = 4096, c = 30: forward 778-849 -> 895-907 µs,
# forward + backward 3268-3280 -> 3679-3681 µs), so the caps models use (Gemma's 30 and 50) keep the fast form.
PRECISE_TANH_ABOVE = 1000.0


def softcap_level(softcap, dtype):
    """The kernels' softcap constexpr: 0 off, 1 the fast tanh, 2 the precise one (see PRECISE_TANH_ABOVE)."""
    if not softcap > 0.0:
        return 0
    return 2 if dtype == torch.float32 or softcap > PRECISE_TANH_ABOVE else 1


@triton.jit
def tanh_via_exp2(x, PRECISE: tl.constexpr = False):
    """tanh(x) = 1 - 2 / (exp(2x) + 1), with exp(2x) = exp2(2 log2(e) x); PRECISE: the odd series near 0.

    One exp2 and one reciprocal; saturates cleanly to +-1 (exp2 overflows to inf or underflows to 0). Near 0 that
    form cancels: its error is ~6e-8 absolute (half an ulp of 1), which a softcap c·tanh(s/c) with s ≪ c scales
    by c (PRECISE_TANH_ABOVE). PRECISE takes x − x³/3 + 2x⁵/15 − 17x⁷/315 + 62x⁹/2835 for |x| < 1/4 (truncation
    < 1e-8 relative there), so that the logit error stays ~1e-7·|s| whatever c. Works the same in the interpreter
    and on every GPU (no inline assembly).
    """
    fast = 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)
    if PRECISE:
        x2 = x * x
        series = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
            -0.05396825396825397 + x2 * 0.021869488536155203))))
        fast = tl.where(x2 < 0.0625, series, fast)
    return fast


@triton.jit
def visible_key_range(m_start, seqlen_q, seqlen_k, window_left, window_right,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key-block bounds of the query block [m_start, m_start + BLOCK_M), as multiples of BLOCK_N.

    Returns (lo, full_lo, full_hi, hi) with lo <= full_lo <= full_hi <= hi:
    - keys outside [lo, hi) are invisible to every row of the block (those blocks are never loaded);
    - key blocks in [full_lo, full_hi) are visible to every row (no mask needed);
    - [lo, full_lo) and [full_hi, hi) are the boundary blocks that need the per-element mask.
    Row i sees key j when 0 <= j < Sk, j >= i + off - window_left, j <= i + off + window_right,
    off = Sk - Sq. Rows past Sq (the tail of the last block) are ignored: they are never stored.
    """
    off = seqlen_k - seqlen_q
    m_last = tl.minimum(m_start + BLOCK_M, seqlen_q) - 1
    # Loosest bounds over the block: the first row's left edge, the last row's right edge.
    lo = 0
    hi = seqlen_k
    if HAS_LEFT:
        lo = tl.maximum(m_start + off - window_left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(m_last + off + window_right + 1, seqlen_k)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.maximum(tl.cdiv(tl.maximum(hi, 0), BLOCK_N) * BLOCK_N, lo)
    # Tightest bounds over the block: the last row's left edge, the first row's right edge. A block is
    # unmasked when it lies inside both and inside [0, Sk). Clamp before dividing: negative operands of
    # integer division round toward zero on the GPU.
    full_lo = lo
    if HAS_LEFT:
        full_lo = tl.maximum(tl.cdiv(tl.maximum(m_last + off - window_left, 0), BLOCK_N) * BLOCK_N, lo)
    full_hi = (seqlen_k // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        full_hi = tl.minimum(full_hi, (tl.maximum(m_start + off + window_right + 1, 0) // BLOCK_N) * BLOCK_N)
    full_lo = tl.minimum(full_lo, hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def visible_mask(rows_k, cols, seqlen_k, window_left, window_right,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """(rows, cols) bool: key j = cols visible to query rows at key coordinate rows_k = i + Sk - Sq."""
    mask = cols[None, :] < seqlen_k
    if HAS_LEFT:
        mask = mask & (cols[None, :] >= rows_k[:, None] - window_left)
    if HAS_RIGHT:
        mask = mask & (cols[None, :] <= rows_k[:, None] + window_right)
    return mask
