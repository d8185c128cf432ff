"""Online softmax of one key block, for a consumer warpgroup (Gluon, base 2).

Scores arrive raw (q·k in fp32); `qk_scale` = softmax_scale·log2(e) turns them into base-2 logits, so every
exponential is one exp2 and the FMA that scales a score also subtracts the row max. Row statistics:
m (running max, base-2 logits) and l (running sum of exp2(s - m)).

FlashAttention-4's two ideas, each a compile-time switch:
- lazy rescale (LAZY): the max used for P only moves when a row's true max grew by more than
  RESCALE_THRESHOLD (log2 units), so P <= 2^8. The sum and O share the stale max, so the final O / l is
  exact, provided the sum adds up the same rounded P that feeds P·V (see online_softmax). On Hopper O lives
  in registers and O *= alpha is Dv/2 FMUL a thread per key block; skipping it for a whole warpgroup needs a
  cross-warp vote (a shared-memory reduction and a barrier), which cost more than it saved (r1 probe: lazy
  5-10% slower). So O is always multiplied (by exactly 1 where the max stayed) and LAZY is off by default.
- exp2 on the FMA pipe (POLY = k of every 4 elements): 2^x = 2^floor(x) · 2^frac(x); the fraction through a
  degree-3 polynomial (3 FMA), the integer added straight into the exponent bits. The MUFU unit does 16
  exp2/clk/SM against 4096 MMA FLOP/clk/SM, so at D = 64 it is as busy as the tensor cores.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

RESCALE_THRESHOLD = gl.constexpr(8.0)

# 2^f on [0, 1) ~ 1 + f·(C1 + f·(C2 + f·C3)): minimax relative error 8.6e-5, below bf16/fp16 rounding of P.
# The constant term is exactly 1 so that x = -127 (where -inf is clamped) gives exactly +0.
_POLY_C1, _POLY_C2, _POLY_C3 = "0f3F31F32D", "0f3E691BBB", "0f3D9DD566"


def _poly_exp2_ptx(out, inp):
    # floor via the 1.5·2^23 trick (an FADD rounding down leaves floor(x) in the low mantissa bits), so the
    # whole evaluation stays on the FMA and integer pipes; shl by 23 moves floor(x) into the exponent field.
    return "\n".join([
        f"max.ftz.f32 xc, {inp}, 0fC2FE0000;",
        "add.rm.ftz.f32 t, xc, 0f4B400000;",
        "sub.ftz.f32 j, t, 0f4B400000;",
        "sub.ftz.f32 f, xc, j;",
        f"fma.rn.ftz.f32 p, f, {_POLY_C3}, {_POLY_C2};",
        f"fma.rn.ftz.f32 p, p, f, {_POLY_C1};",
        "fma.rn.ftz.f32 p, p, f, 0f3F800000;",
        "mov.b32 ti, t;",
        "mov.b32 pi, p;",
        "shl.b32 ti, ti, 23;",
        "add.s32 pi, pi, ti;",
        f"mov.b32 {out}, pi;",
    ])


def _exp2_pack4_ptx(num_poly):
    """PTX for 4 elements ($0..$3 <- exp2($4..$7)); the first num_poly of them on the FMA pipe."""
    lines = ["{", ".reg .f32 xc, t, j, f, p;", ".reg .b32 ti, pi;"]
    for i in range(4):
        if i < num_poly:
            lines.append(_poly_exp2_ptx(f"${i}", f"${i + 4}"))
        else:
            lines.append(f"ex2.approx.ftz.f32 ${i}, ${i + 4};")
    lines.append("}")
    return "\n".join(lines)


EXP2_ASM_1OF4 = gl.constexpr(_exp2_pack4_ptx(1))
EXP2_ASM_2OF4 = gl.constexpr(_exp2_pack4_ptx(2))
EXP2_ASM_4OF4 = gl.constexpr(_exp2_pack4_ptx(4))


@gluon.jit
def exp2_mixed(x, POLY: gl.constexpr):
    """exp2(x) for x <= 8 (or -inf), POLY of every 4 elements by polynomial, the rest by MUFU.EX2."""
    if POLY == 0:
        return gl.exp2(x)
    elif POLY == 1:
        return gl.inline_asm_elementwise(EXP2_ASM_1OF4, "=f,=f,=f,=f,f,f,f,f", [x], dtype=gl.float32,
                                         is_pure=True, pack=4)
    elif POLY == 2:
        return gl.inline_asm_elementwise(EXP2_ASM_2OF4, "=f,=f,=f,=f,f,f,f,f", [x], dtype=gl.float32,
                                         is_pure=True, pack=4)
    else:
        return gl.inline_asm_elementwise(EXP2_ASM_4OF4, "=f,=f,=f,=f,f,f,f,f", [x], dtype=gl.float32,
                                         is_pure=True, pack=4)


@gluon.jit
def tanh_approx(x):
    # MUFU.TANH: ~2^-11 relative error, the precision FlashAttention's softcap uses too.
    return gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True,
                                     pack=1)


@gluon.jit
def online_softmax(s, m_i, l_i, qk_scale, LAZY: gl.constexpr, POLY: gl.constexpr, dtype: gl.constexpr):
    """One key block: returns (m, l, P, alpha) with O to be multiplied by alpha row-wise; P in fp32, or
    already rounded to `dtype` with LAZY.

    Masked scores are -inf. A row with nothing visible so far keeps m = -inf and gets P = 0, alpha = 0:
    the guarded max m_safe = 0 avoids (-inf) - (-inf).

    Rounding of P: O = sum(rnd(P)·V) / l. With the exact max the largest P of a row is exactly 1 (exp2(0)),
    so a row dominated by one key has no rounding in its dominant weight and l may add the fp32 P. With the
    stale max (LAZY) the dominant P is some 2^x, x in (0, 8], rounded by up to 2^-9 (bf16) in the numerator
    but not in an fp32 l: the output is off by that factor (r1 probe: 1.8e-2 against 0.9e-2 at D = 128).
    l then adds the rounded P, so numerator and denominator carry the same weights and a dominant key's
    rounding cancels.
    """
    m_blk = gl.max(s, axis=1) * qk_scale
    m_new = gl.maximum(m_i, m_blk)
    if LAZY:
        # (-inf) - (-inf) is NaN, which compares False: an empty row keeps m = -inf.
        m_new = gl.where(m_new - m_i > RESCALE_THRESHOLD, m_new, m_i)
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.where(m_new == m_i, 1.0, gl.exp2(m_i - m_safe))
    # x = s·scale - m: one FFMA per score; x <= 0 (<= 8 with the lazy max).
    x = s * qk_scale - gl.expand_dims(m_safe, 1)
    p = exp2_mixed(x, POLY)
    if LAZY:
        p = p.to(dtype)
        l_i = l_i * alpha + gl.sum(p.to(gl.float32), axis=1)
    else:
        # P stays fp32 here: the caller rounds it once the previous P·V has released its registers.
        l_i = l_i * alpha + gl.sum(p, axis=1)
    return m_new, l_i, p, alpha


@gluon.jit
def rescale_o(acc, alpha):
    """O *= alpha row-wise (the S and O accumulators give each thread the same rows: no data movement)."""
    alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))
    return acc * gl.expand_dims(alpha_o, 1)
