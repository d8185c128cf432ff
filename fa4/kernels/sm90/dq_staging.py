"""The fp32 dQ staging store of the backward kernels without shared-memory bank conflicts (tile.dq_spread).

A consumer stages its dQ share, a wgmma accumulator [R, C] in fp32, in a tile with the 128-byte swizzle that the
TMA reduce-add reads (backward._dq_descriptor): rows of 32 floats, whose eight 16-byte chunks are permuted by
chunk ^ (row % 8). The accumulator gives lane l rows l / 4 and l / 4 + 8 (of its warp's 16) and columns
2·(l % 4) + {0, 1} + 8·j, so one STS.64 (fixed j) of a half-warp writes rows r .. r + 3, 32 bytes each, in
16-byte chunks {2j, 2j + 1} ^ r: rows r and r ^ 1 land on the same two chunks, i.e. the same eight banks. Every
staging store takes two shared-memory wavefronts a half-warp instead of one (Nsight Compute, sessions 12 and 23).

The remedy moves no data between threads. Odd rows store, in the instruction of column piece j, their piece j ^ 2
(columns XOR 16) instead: a half-warp's four rows then write the chunk pairs j, j ^ 2, j ^ 1 and j ^ 3 (after the
swizzle), all different. In the kernel that is
- the values: a select per register between the register and its partner 16 columns away (odd rows take the
  partner), the partner being a register of the same thread;
- the addresses: the same tile viewed through a shared layout whose logical column is XOR 16 on odd rows
  (`spread_layout`: the tile's own 128-byte swizzle composed with that permutation), so each value lands exactly
  where the plain store would have put it. The TMA reduce-add reads the same bytes as before.

The tile's own layout, as a linear map from the float offset to (row, column): offset bits 0-4 the column within
the 32-float row, bits 5-7 rows 1, 2, 4 (each also XORs the 16-byte chunk: columns 4, 8, 16), then the remaining
rows, then the 32-column blocks (a C > 32 tile is C / 32 such [R, 32] blocks one after another, as TMA boxes).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl


@gluon.constexpr_function
def spread_layout(rows, cols):
    """The [rows, cols] fp32 128-byte-swizzled staging tile viewed with columns XOR 16 on odd rows."""
    rows, cols = int(rows), int(cols)
    bases = [[0, 1], [0, 2], [0, 4], [0, 8], [0, 16],
             [1, 4 ^ 16],  # row 1: the swizzle's chunk XOR 1 (column 4) and the odd-row permutation (column 16)
             [2, 8], [4, 16]]
    r = 8
    while r < rows:
        bases.append([r, 0])
        r *= 2
    c = 32
    while c < cols:
        bases.append([0, c])
        c *= 2
    return gl.SharedLinearLayout(offset_bases=bases)


@gluon.jit
def store_dq_staging(dst, x, SPREAD: gl.constexpr):
    """dst.store(x) for an fp32 wgmma accumulator x [R, C] (R >= 8, C a multiple of 32) and dst an [R, C] view of a
    128-byte-swizzled staging tile; SPREAD: without the bank conflicts (module docstring)."""
    if SPREAD:
        R: gl.constexpr = x.shape[0]
        C: gl.constexpr = x.shape[1]
        gl.static_assert(C % 32 == 0, "the spread staging store needs whole 32-float swizzle rows")
        layout: gl.constexpr = x.type.layout
        # Each thread's partner values (columns XOR 16): a register renaming (column bit 4 is a register bit of
        # the accumulator layout), no data moves between threads.
        halves = gl.reshape(x, [R, C // 32, 2, 16]).permute((0, 1, 3, 2))
        lo, hi = gl.split(halves)
        partner = gl.convert_layout(gl.join(hi, lo).permute((0, 1, 3, 2)).reshape([R, C]), layout)
        rows = gl.arange(0, R, gl.SliceLayout(1, layout))
        odd = gl.expand_dims((rows & 1) != 0, 1)
        dst._reinterpret(gl.float32, [R, C], spread_layout(R, C)).store(gl.where(odd, partner, x))
    else:
        dst.store(x)
