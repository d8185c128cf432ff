"""Small `@triton.jit` helpers shared by fa4's Triton attention kernels.

Conventions: scores live in base-2 log units (natural-log scores times log2(e)), so that the exponential of the
softmax is one `exp2` (a single MUFU.EX2 instruction on NVIDIA GPUs). Key positions are absolute within the
sequence; a query row i is compared with keys in "key coordinates", i + (Sk - Sq) (bottom-right alignment).
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = 0.6931471805599453  # ln(2): ln(x) = log2(x) * LN2


@triton.jit
def tanh_via_exp2(x):
    """tanh(x) = 1 - 2 / (exp(2x) + 1), with exp(2x) = exp2(2 log2(e) x); near 0 the odd series to x⁹.

    One exp2 and one reciprocal; saturates cleanly to +-1 (exp2 overflows to inf or underflows to 0). Near 0 that
    form cancels: its error is ~6e-8 absolute (half an ulp of 1), so a softcap c = c·tanh(s/c) with s ≪ c would
    move each logit by ~c·6e-8 (0.06 at c = 1e6; fp16's rule fails from c ≈ 1e5). For |x| < 1/4 the series
    x − x³/3 + 2x⁵/15 − 17x⁷/315 + 62x⁹/2835 is used instead (truncation < 1e-8 relative there), so the logit error
    stays ~1e-7·|s| whatever c. Works the same in the interpreter and on every GPU (no inline assembly).
    """
    x2 = x * x
    series = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (
        -0.05396825396825397 + x2 * 0.021869488536155203))))
    return tl.where(x2 < 0.0625, series, 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0))


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
