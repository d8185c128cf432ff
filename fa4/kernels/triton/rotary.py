"""Rotary embedding and the KV-cache append, in Triton.

Rotary position embedding rotates pairs of head-dim coordinates by an angle that depends on the position p:

    (x_a, x_b) -> (x_a cos θ - x_b sin θ,  x_b cos θ + x_a sin θ),   cos θ = cos[p, c], sin θ = sin[p, c]

over the first `rotary_dim = 2 * cos.shape[1]` coordinates; the rest pass unchanged. The pairs are
(2c, 2c + 1) when interleaved (GPT-J) and (c, c + rotary_dim / 2) otherwise (GPT-NeoX). Computed in fp32 and
rounded once to the tensor's dtype, as FlashAttention does.

`rotated_rows` is the building block: it loads rows of x together with each coordinate's rotation partner,
so one gather gives the rotated tile in registers. The decode kernel uses it for q; the append kernel uses it
for the new keys, which it writes into the cache at positions cache_seqlens[b] + t (contiguous or paged cache).
`append_launch` describes the append's launch; decode.Step launches it.
"""
import triton
import triton.language as tl


@triton.jit
def rotated_rows(X, row_offs, row_mask, offs_d, pos, Cos, Sin, stride_rot, rot_half,
                 HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, INTERLEAVED: tl.constexpr):
    """fp32 (R, BLOCK_D) tile of rows X + row_offs rotated at positions pos (R,); padding columns read 0.

    Coordinate d pairs with `partner`; its output is x_d cos - x_partner sin for the first of the pair and
    x_d cos + x_partner sin for the second. Coordinates past rotary_dim load cos = 1, sin = 0.
    """
    two_half = 2 * rot_half
    if INTERLEAVED:
        partner = offs_d ^ 1
        c_idx = offs_d // 2
        first = (offs_d % 2) == 0
    else:
        first = offs_d < rot_half
        partner = tl.where(first, offs_d + rot_half, offs_d - rot_half)
        c_idx = tl.where(first, offs_d, offs_d - rot_half)
    in_rot = offs_d < two_half
    d_ok = offs_d < HEAD_D
    mask = row_mask[:, None] & d_ok[None, :]
    x = tl.load(X + row_offs[:, None] + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    rmask = row_mask[:, None] & in_rot[None, :]
    xp = tl.load(X + row_offs[:, None] + partner[None, :], mask=rmask, other=0.0).to(tl.float32)
    cs_offs = pos.to(tl.int64)[:, None] * stride_rot + c_idx[None, :]
    cos = tl.load(Cos + cs_offs, mask=rmask, other=1.0).to(tl.float32)
    sin = tl.load(Sin + cs_offs, mask=rmask, other=0.0).to(tl.float32)
    sign = tl.where(first, -1.0, 1.0)
    return x * cos + sign[None, :] * xp * sin


@triton.jit
def cache_length(CacheSeqlens, b, seqlen_fixed, HAS_SEQLENS: tl.constexpr):
    """Keys already cached for sequence b: cache_seqlens[b], or the one length given for all."""
    if HAS_SEQLENS:
        n = tl.load(CacheSeqlens + b)
    else:
        n = seqlen_fixed
    return n


@triton.jit
def cache_row(CacheBatchIdx, b, HAS_BATCH_IDX: tl.constexpr):
    """Row of a contiguous cache that holds sequence b (64-bit: row offsets may pass 2^31 elements)."""
    if HAS_BATCH_IDX:
        row = tl.load(CacheBatchIdx + b).to(tl.int64)
    else:
        row = b.to(tl.int64)
    return row


# seqlen_fixed (the one cached length of every sequence when cache_seqlens is an int) changes from call to call:
# no recompilation for its value. It follows the pointers: the per-call head of a launch (decode.Launch).
@triton.jit(do_not_specialize=["seqlen_fixed"])
def _append_kv_kernel(Knew, Vnew, Kc, Vc, CacheSeqlens, CacheBatchIdx, PageTable, Cos, Sin, seqlen_fixed,
                      stride_knb, stride_kns, stride_knh, stride_vnb, stride_vns, stride_vnh,
                      stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                      stride_ptb, stride_rot,
                      seqlen_new, page_size, num_heads_kv, rot_half, capacity, cache_rows,
                      HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_DV: tl.constexpr, BLOCK_H: tl.constexpr,
                      HAS_SEQLENS: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, PAGED: tl.constexpr,
                      ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr):
    # One program: token t of sequence b, BLOCK_H kv heads. Its cache position is cache_seqlens[b] + t.
    pid = tl.program_id(0)
    b = pid // seqlen_new
    t = pid % seqlen_new
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < num_heads_kv
    pos = cache_length(CacheSeqlens, b, seqlen_fixed, HAS_SEQLENS) + t
    # fa4.inference checks positions, pages and cache rows on the host before launching, but it remembers a
    # passing set of tensors by their version counters, which a write through .data, DLPack or another kernel
    # does not move. A slot outside this sequence's cache is then skipped here instead of landing in another
    # sequence's keys.
    slot_ok = (pos >= 0) & (pos < capacity)
    if PAGED:
        page = tl.load(PageTable + b.to(tl.int64) * stride_ptb + pos // page_size, mask=slot_ok, other=0)
        slot_ok = slot_ok & (page >= 0) & (page < cache_rows)
        page = page.to(tl.int64)
        row = pos % page_size
        kc_base = page * stride_kcb + row * stride_kcs
        vc_base = page * stride_vcb + row * stride_vcs
    else:
        cb = cache_row(CacheBatchIdx, b, HAS_BATCH_IDX)
        slot_ok = slot_ok & (cb >= 0) & (cb < cache_rows)
        kc_base = cb * stride_kcb + pos.to(tl.int64) * stride_kcs
        vc_base = cb * stride_vcb + pos.to(tl.int64) * stride_vcs
    h_ok = h_ok & slot_ok

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    heads = offs_h.to(tl.int64)
    kn_rows = b.to(tl.int64) * stride_knb + t.to(tl.int64) * stride_kns + heads * stride_knh
    k_mask = h_ok[:, None] & (offs_d[None, :] < HEAD_D)
    if ROTARY:
        k = rotated_rows(Knew, kn_rows, h_ok, offs_d, tl.zeros([BLOCK_H], dtype=tl.int32) + pos, Cos, Sin,
                         stride_rot, rot_half, HEAD_D, BLOCK_D, INTERLEAVED)
    else:
        k = tl.load(Knew + kn_rows[:, None] + offs_d[None, :], mask=k_mask, other=0.0)
    tl.store(Kc + (kc_base + heads * stride_kch)[:, None] + offs_d[None, :], k.to(Kc.dtype.element_ty),
             mask=k_mask)
    vn_rows = b.to(tl.int64) * stride_vnb + t.to(tl.int64) * stride_vns + heads * stride_vnh
    v_mask = h_ok[:, None] & (offs_dv[None, :] < HEAD_DV)
    v = tl.load(Vnew + vn_rows[:, None] + offs_dv[None, :], mask=v_mask, other=0.0)
    tl.store(Vc + (vc_base + heads * stride_vch)[:, None] + offs_dv[None, :], v, mask=v_mask)


def _padded(d):
    return max(16, 1 << (d - 1).bit_length())


def append_launch(k, v, k_cache, v_cache, *, has_seqlens, has_batch_idx, page_table, rotary_cos,
                  rotary_interleaved):
    """(grid, tail, constexprs, num_warps, num_stages) of the append of k (B, Sn, Hkv, D), v (B, Sn, Hkv, Dv).

    The launch's arguments are (k, v, k_cache, v_cache, cache_seqlens, cache_batch_idx, page_table, rotary_cos,
    rotary_sin, seqlen_fixed) + tail, absent tensors as None; arguments are validated by fa4.inference. New token t
    of sequence b goes to cache position cache_seqlens[b] + t (or seqlen_fixed + t): a contiguous cache
    (Bc, L, Hkv, D) indexed by cache_batch_idx[b] (or b), or a paged one (num_pages, page_size, Hkv, D) through
    page_table (B, max_pages).
    """
    batch, seqlen_new, num_heads_kv, head_d = k.shape
    head_dv = v.shape[-1]
    paged = page_table is not None
    rotary = rotary_cos is not None
    block_h = min(_padded(num_heads_kv), 16)
    grid = (batch * seqlen_new, -(-num_heads_kv // block_h), 1)
    tail = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            page_table.stride(0) if paged else 0, rotary_cos.stride(0) if rotary else 0,
            seqlen_new, k_cache.shape[1] if paged else 1, num_heads_kv, rotary_cos.shape[1] if rotary else 0,
            page_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1], k_cache.shape[0])
    constexprs = dict(HEAD_D=head_d, HEAD_DV=head_dv, BLOCK_D=_padded(head_d), BLOCK_DV=_padded(head_dv),
                      BLOCK_H=block_h, HAS_SEQLENS=has_seqlens, HAS_BATCH_IDX=has_batch_idx, PAGED=paged,
                      ROTARY=rotary, INTERLEAVED=bool(rotary_interleaved))
    return grid, tail, constexprs, 4, 1
