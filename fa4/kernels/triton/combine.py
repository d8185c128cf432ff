"""Merging attention results computed over disjoint key sets (split-KV, cascade attention, context parallelism).

Split s holds o_s = Σ_{j in s} exp(x_j - lse_s) v_j and lse_s = log Σ_{j in s} exp(x_j). Over all keys (and an
optional sink logit per head, which has no value row):

    lse = log( Σ_s exp(lse_s) [+ exp(sink)] ),      out = Σ_s exp(lse_s - lse) o_s

computed around the largest term so nothing overflows. A split with lse_s = -inf (no visible key) has weight 0
and its o_s is never read; a row where every split is empty and there is no sink gives out = 0, lse = -inf.

One program merges one (sequence, token, head) row: first the lse of all splits (one vector load), then the
partial outputs in chunks of CHUNK splits, each a (CHUNK, Dv) tile reduced over its splits. Split-KV decoding
launches it through decode.Step (`combine_launch`); flash_attn_combine through `combine_into`.
"""
import triton
import triton.language as tl
from triton.language.extra import cuda as tl_cuda


@triton.jit
def merged_lse(lse_s, sink, HAS_SINK: tl.constexpr):
    """The merge's statistics over axis 0 of lse_s (the splits; any trailing axes are rows, and sink broadcasts
    against them): lse = m + log(Σ_s exp(lse_s − m) [+ exp(sink − m)]) around the largest term m (0 when every term
    is −inf, to avoid inf − inf), −inf when nothing is visible; and the shift of the weights exp(lse_s − shift):
    lse, or 0 where it is −inf. Shared by _combine_kernel and decode's in-cluster merge."""
    m = tl.max(lse_s, 0)
    if HAS_SINK:
        m = tl.maximum(m, sink)
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp(lse_s - tl.expand_dims(m, 0)), 0)
    if HAS_SINK:
        total += tl.exp(sink - m)
    lse = tl.where(total > 0.0, m + tl.log(total), float("-inf"))
    return lse, tl.where(total > 0.0, lse, 0.0)


@triton.jit
def _combine_kernel(OutPartial, LsePartial, Out, Lse, Sink,
                    num_splits, seqlen, num_heads,
                    stride_pn, stride_pb, stride_ps, stride_ph,
                    stride_ln, stride_lb, stride_ls, stride_lh,
                    stride_ob, stride_os, stride_oh,
                    stride_fb, stride_fs, stride_fh,
                    HEAD_DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
                    CHUNK: tl.constexpr, HAS_SINK: tl.constexpr, WRITE_LSE: tl.constexpr,
                    PDL_WAIT: tl.constexpr = False):
    if PDL_WAIT:
        # Launched dependent on the split kernel (programmatic dependent launch): this program may be resident
        # before the partials exist; griddepcontrol.wait returns once that kernel has finished and its writes
        # are visible.
        tl_cuda.gdc_wait()
    pid = tl.program_id(0)
    h = pid % num_heads
    bs = pid // num_heads
    s = bs % seqlen
    b = bs // seqlen
    lse_row = LsePartial + b.to(tl.int64) * stride_lb + s.to(tl.int64) * stride_ls + h.to(tl.int64) * stride_lh
    o_row = OutPartial + b.to(tl.int64) * stride_pb + s.to(tl.int64) * stride_ps + h.to(tl.int64) * stride_ph

    splits = tl.arange(0, BLOCK_SPLITS)
    lse_s = tl.load(lse_row + splits.to(tl.int64) * stride_ln, mask=splits < num_splits, other=float("-inf"))
    sink = tl.load(Sink + h).to(tl.float32) if HAS_SINK else 0.0
    lse, lse_sub = merged_lse(lse_s, sink, HAS_SINK)

    offs_d = tl.arange(0, BLOCK_DV)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for c in range(0, num_splits, CHUNK):
        sp = c + tl.arange(0, CHUNK)
        l_c = tl.load(lse_row + sp.to(tl.int64) * stride_ln, mask=sp < num_splits, other=float("-inf"))
        live = l_c > float("-inf")
        w = tl.where(live, tl.exp(l_c - lse_sub), 0.0)
        o = tl.load(o_row + sp.to(tl.int64)[:, None] * stride_pn + offs_d[None, :],
                    mask=live[:, None] & (offs_d[None, :] < HEAD_DV), other=0.0)
        acc += tl.sum(w[:, None] * o, 0)

    o_ptr = Out + b.to(tl.int64) * stride_ob + s.to(tl.int64) * stride_os + h.to(tl.int64) * stride_oh
    tl.store(o_ptr + offs_d, acc.to(Out.dtype.element_ty), mask=offs_d < HEAD_DV)
    if WRITE_LSE:
        tl.store(Lse + b.to(tl.int64) * stride_fb + s.to(tl.int64) * stride_fs + h.to(tl.int64) * stride_fh, lse)


def _pow2(n):
    return 1 << (n - 1).bit_length()


def combine_launch(*, num_splits, batch, seqlen, num_heads, head_dv, partial_strides, lse_partial_strides,
                   out_strides, lse_strides, has_sink, write_lse, pdl_wait=False):
    """(grid, tail, constexprs, num_warps, num_stages) of the merge; the launch's arguments are
    (out_partial, lse_partial, out, lse, sink) + tail, absent tensors as None.

    Strides are element strides in (split, b, s, h) order for the partials, and in (b, s, h) for out and lse
    (out's last dimension contiguous). `sink` is an fp32 (H,) tensor. `pdl_wait`: the launch is a programmatic
    dependent of the kernel that writes the partials (the kernel then waits for it first).
    """
    block_splits = max(2, _pow2(num_splits))
    block_dv = max(16, _pow2(head_dv))
    chunk = min(block_splits, max(2, 4096 // block_dv))  # a (CHUNK, Dv) tile of 4096 fp32: 32 per thread
    tail = (num_splits, seqlen, num_heads, *partial_strides, *lse_partial_strides, *out_strides,
            *(lse_strides or (0, 0, 0)))
    constexprs = dict(HEAD_DV=head_dv, BLOCK_DV=block_dv, BLOCK_SPLITS=block_splits, CHUNK=chunk,
                      HAS_SINK=has_sink, WRITE_LSE=write_lse, PDL_WAIT=pdl_wait)
    return (batch * seqlen * num_heads, 1, 1), tail, constexprs, 4, 1


def combine_into(out_partial, lse_partial, out, lse, *, num_splits, batch, seqlen, num_heads, head_dv,
                 partial_strides, lse_partial_strides, lse_strides):
    """Merges partials into out (B, S, H, Dv) and lse (strides in (b, s, h) order): flash_attn_combine's launch."""
    grid, tail, constexprs, num_warps, num_stages = combine_launch(
        num_splits=num_splits, batch=batch, seqlen=seqlen, num_heads=num_heads, head_dv=head_dv,
        partial_strides=partial_strides, lse_partial_strides=lse_partial_strides,
        out_strides=(out.stride(0), out.stride(1), out.stride(2)), lse_strides=lse_strides, has_sink=False,
        write_lse=True)
    if grid[0] == 0:
        return
    _combine_kernel[grid](out_partial, lse_partial, out, lse, None, *tail, **constexprs, num_warps=num_warps,
                          num_stages=num_stages)
