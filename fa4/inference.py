"""Inference API: flash_attn_with_kvcache (decode over a KV cache) and flash_attn_combine (merge partials).

FlashAttention's semantics. `flash_attn_with_kvcache` appends the new keys/values k, v to the cache in place at
positions cache_seqlens[b] + t, rotates q and the new keys when rotary tables are given, and attends q to the
first cache_seqlens[b] + seqlen_new keys, with causal and the window aligned to the end of the cache. The cache
is contiguous (Bc, L, Hkv, D), indexed by cache_batch_idx, or paged (num_pages, page_size, Hkv, D) through
page_table (B, max_pages) int32.

This module checks arguments (before anything is written), picks a backend and the number of key splits, and
calls either the reference (eager PyTorch: append/rotary in torch, then fa4.reference.forward) or the Triton
kernels (kernels/triton/rotary.py append, decode.py split-KV attention, combine.py merge).

CUDA graphs: the Triton path does no host synchronisation and, when `out` is given and return_lse is False,
no allocation (split partials live in a per-stream workspace that is never freed). Checks that need tensor
values (cache_seqlens and cache_batch_idx in range, the page-table entries a sequence uses) read them back
to the host, so they run only outside graph capture and torch.compile tracing, once per argument set: a set
whose tensors are unchanged since they last passed (same objects, same in-place version counter) is not
read again (tensors made under torch.inference_mode have no version counter, so a set holding one is read on
every call). A decode loop that advances cache_seqlens in place therefore pays one small host read per step;
FA4_KVCACHE_VALUE_CHECKS=0 (or inference.CHECK_VALUES = False) turns these value checks off entirely (the
caller vouches), and a captured CUDA graph never runs them. A write that does not move a tensor's version counter
(through .data, DLPack or another kernel) is not seen either; for such unchecked values the append kernel still
skips any slot outside its own sequence's cache rather than write into another sequence's keys.

Host cost: a decode step takes ~10-100 µs on the GPU, so the Python around it matters. The first call with a
given signature (dtypes, devices, shapes and strides of the tensors, the Python arguments) runs every check
and builds a decode.Step (config, splits, launch arguments); it is cached under that signature, and later
calls with the same signature skip straight to the value checks (a dictionary lookup when nothing changed) and
the Step, which launches the compiled kernels without Triton's per-call binding (decode.Launch). Launches per
call: the append only when k/v are given, the attention, the combine only when split.
"""
import math
import os
from typing import Optional

import torch

from . import checks, dispatch, ops

CHECK_VALUES = os.environ.get("FA4_KVCACHE_VALUE_CHECKS", "1") != "0"

# Split heuristic (see choose_num_splits; numbers in benchmarks/NOTES.md, "Decode (Triton split-KV)").
# Split until about this many programs per SM. H100, 2026-11-25 (tune_decode --sections 3, GPU-bound, two
# launches): one a SM beat two by 2% on each split row (B=1 L=8192 1260 vs 1235 GB/s, L=65536 2523 vs 2465, B=8
# L=8192 2539 vs 2484); fewer splits also mean less partial traffic and a smaller combine. (The earlier "2 beat 1
# by 15-40%" was measured while host time dominated the timed window.)
SPLIT_PROGRAMS_PER_SM = 1
SPLIT_OFF_FRACTION = 0.8  # no split once the unsplit programs cover this share of the SMs
MIN_TILES_PER_SPLIT = 4  # each split streams at least this many key tiles (amortises prologue and combine)
MAX_SPLITS = 128
# The most splits a caller may ask for (FlashAttention 3's bound; FlashAttention 2 allows 128).
MAX_NUM_SPLITS = 256


# ----------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------

def _check_like(name, t, ref_name, ref, rank, layout):
    """t is a tensor on ref's device with ref's dtype, `rank` dimensions and a contiguous last dimension."""
    checks.check_tensor(name, t)
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device}; it must be on {ref_name}'s device {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}; it must match {ref_name}'s dtype {ref.dtype}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions {layout}; got shape {checks.shape_of(t)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name}'s last dimension must be contiguous (stride 1); got stride {t.stride(-1)}")


class _Call:
    """The validated shape of one call."""
    __slots__ = ("batch", "seqlen_q", "num_heads", "num_heads_kv", "head_d", "head_dv", "seqlen_new", "paged",
                 "page_size", "num_pages", "cache_batch", "capacity", "scale", "left", "right", "rotary_per_token",
                 "rotary_rows", "value_params")


def _check_static(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, page_table,
                  softmax_scale, causal, window_size, softcap, learnable_sink, rotary_interleaved, num_splits,
                  return_lse, out, backend):
    """Every check that needs only shapes, dtypes and Python values; returns a _Call."""
    checks.check_tensor("q", q)
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"q is on {q.device}; fa4 runs on CUDA devices (and on the CPU via the reference)")
    if q.dtype not in checks.SUPPORTED_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; expected torch.float16, torch.bfloat16 or torch.float32")
    if q.dim() != 4:
        raise ValueError(f"q must have 4 dimensions (batch, seqlen_q, heads, head_dim); got shape {checks.shape_of(q)}")
    if q.stride(-1) != 1:
        raise ValueError(f"q's last dimension must be contiguous (stride 1); got stride {q.stride(-1)}")
    paged = page_table is not None
    layout = ("(num_pages, page_size, heads_k, head_dim)" if paged
              else "(batch_cache, seqlen_cache, heads_k, head_dim)")
    _check_like("k_cache", k_cache, "q", q, 4, layout)
    _check_like("v_cache", v_cache, "q", q, 4, layout)
    if k_cache.shape[:3] != v_cache.shape[:3]:
        raise ValueError(f"v_cache has shape {checks.shape_of(v_cache)}; its first three dimensions must equal "
                         f"k_cache's {checks.shape_of(k_cache)[:3]}")
    c = _Call()
    c.batch, c.seqlen_q, c.num_heads, c.head_d = q.shape
    c.num_heads_kv, c.head_dv = k_cache.shape[2], v_cache.shape[3]
    if c.num_heads_kv == 0 or c.num_heads % c.num_heads_kv != 0:
        raise ValueError(f"k_cache has {c.num_heads_kv} heads; it must divide q's {c.num_heads} heads")
    if k_cache.shape[3] != c.head_d:
        raise ValueError(f"k_cache has head dim {k_cache.shape[3]}; it must equal q's head dim {c.head_d}")
    for name, dim in (("q", c.head_d), ("v_cache", c.head_dv)):
        if dim % 8 != 0 or not 8 <= dim <= checks.MAX_HEAD_DIM:
            raise ValueError(f"{name} has head dim {dim}; expected a multiple of 8 from 8 to {checks.MAX_HEAD_DIM}")

    # Where the cache lives and how many keys it can hold per sequence.
    c.paged = paged
    if paged:
        checks.check_tensor("page_table", page_table)
        if page_table.dtype != torch.int32:
            raise TypeError(f"page_table must be torch.int32; got {page_table.dtype}")
        if page_table.device != q.device:
            raise ValueError(f"page_table is on {page_table.device}; it must be on q's device {q.device}")
        if page_table.dim() != 2:
            raise ValueError(f"page_table must have shape ({c.batch}, max_pages); got {checks.shape_of(page_table)}")
        if page_table.shape[0] != c.batch:
            raise ValueError(f"page_table has {page_table.shape[0]} rows; it must have one per sequence of q "
                             f"({c.batch})")
        if page_table.stride(1) != 1 and page_table.shape[1] > 1:
            raise ValueError(f"page_table's last dimension must be contiguous (stride 1); got stride "
                             f"{page_table.stride(1)}")
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx must be None with page_table (the page table already maps each "
                             "sequence to its pages)")
        c.num_pages, c.page_size = k_cache.shape[0], k_cache.shape[1]
        if c.page_size < 1:
            raise ValueError(f"k_cache has page size {c.page_size}; it must be >= 1")
        c.capacity = page_table.shape[1] * c.page_size
        c.cache_batch = c.batch
    else:
        c.num_pages, c.page_size = 0, 0
        c.cache_batch, c.capacity = k_cache.shape[0], k_cache.shape[1]
        if cache_batch_idx is not None:
            checks.check_index_vector("cache_batch_idx", cache_batch_idx, c.batch, q.device)
        elif c.cache_batch < c.batch:
            raise ValueError(f"k_cache holds {c.cache_batch} sequences; q has {c.batch} (pass cache_batch_idx to "
                             f"map q's sequences to cache rows)")

    # New keys and values.
    if (k is None) != (v is None):
        raise ValueError(f"k and v must be given together; got k={'a tensor' if k is not None else 'None'} and "
                         f"v={'a tensor' if v is not None else 'None'}")
    c.seqlen_new = 0
    if k is not None:
        _check_like("k", k, "k_cache", k_cache, 4, "(batch, seqlen_new, heads_k, head_dim)")
        _check_like("v", v, "v_cache", v_cache, 4, "(batch, seqlen_new, heads_k, head_dim_v)")
        want_k = (c.batch, k.shape[1], c.num_heads_kv, c.head_d)
        if checks.shape_of(k) != want_k:
            raise ValueError(f"k must have shape {want_k} (batch, seqlen_new, heads_k, head_dim); "
                             f"got {checks.shape_of(k)}")
        want_v = (c.batch, k.shape[1], c.num_heads_kv, c.head_dv)
        if checks.shape_of(v) != want_v:
            raise ValueError(f"v must have shape {want_v} (k's first three dimensions, v_cache's head dim); "
                             f"got {checks.shape_of(v)}")
        c.seqlen_new = k.shape[1]

    # Cached lengths.
    if cache_seqlens is None:
        if c.seqlen_new:
            raise ValueError("cache_seqlens is required when k and v are appended (it says where they go)")
    elif isinstance(cache_seqlens, torch.Tensor):
        checks.check_index_vector("cache_seqlens", cache_seqlens, c.batch, q.device)
    elif isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, int):
        raise TypeError(f"cache_seqlens must be an int, a torch.int32 tensor of shape ({c.batch},) or None; "
                        f"got {type(cache_seqlens).__name__}")
    else:
        _check_int_lengths(c, cache_seqlens, None)

    # Options.
    for name, flag in (("causal", causal), ("return_lse", return_lse), ("rotary_interleaved", rotary_interleaved)):
        checks.check_flag(name, flag)
    if backend == "sm90":
        raise ValueError("backend='sm90' has no KV-cache kernel; use None, 'triton' or 'reference'")
    c.left, c.right = checks.check_options(softmax_scale=softmax_scale, window_size=window_size, softcap=softcap,
                                           learnable_sink=learnable_sink, num_heads=c.num_heads, device=q.device,
                                           backend=backend, backends=(None, "triton", "reference"))
    if causal:
        c.right = 0  # causal is the window (left, 0), aligned to the end of the cache
    c.scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(c.head_d)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 0 <= num_splits <= MAX_NUM_SPLITS:
        raise ValueError(f"num_splits must be an int from 0 (the heuristic) to {MAX_NUM_SPLITS}; got {num_splits!r}")

    # Rotary tables: (seqlen_ro, rotary_dim / 2), applied to q and the new keys.
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    # FlashAttention: q rotates at cache_seqlens + i when causal or local, else every token at cache_seqlens. As in
    # FlashAttention 2, a window side at least as wide as the cache's capacity does not make the call local for
    # this choice: q rotates as it would without that side.
    c.rotary_per_token = 0 <= c.left < c.capacity or 0 <= c.right < c.capacity
    # The mask's window: a sequence holds at most the cache's capacity of keys (appending past it is an error
    # below). After the rotary choice, which follows FlashAttention's rule on the window as given.
    c.left, c.right = checks.window_reach(c.left, c.right, c.capacity, q.shape[1])
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos/rotary_sin need the new keys k and v (rotary is applied as they are "
                             "appended)")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            checks.check_tensor(name, t)
            if t.device != q.device:
                raise ValueError(f"{name} is on {t.device}; it must be on q's device {q.device}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor; got {t.dtype}")
            if t.dim() != 2 or t.stride(-1) != 1:
                raise ValueError(f"{name} must be a 2-D (seqlen_ro, rotary_dim / 2) tensor with a contiguous last "
                                 f"dimension; got shape {checks.shape_of(t)} and strides {t.stride()}")
        if rotary_sin.shape != rotary_cos.shape or rotary_sin.stride() != rotary_cos.stride():
            raise ValueError(f"rotary_sin has shape {checks.shape_of(rotary_sin)}; it must have rotary_cos's shape "
                             f"{checks.shape_of(rotary_cos)} and strides")
        if not 1 <= 2 * rotary_cos.shape[1] <= c.head_d:
            raise ValueError(f"rotary_cos has {rotary_cos.shape[1]} columns (rotary_dim / 2); rotary_dim must lie "
                             f"in [2, {c.head_d}] (q's head dim)")
        if isinstance(cache_seqlens, int):
            _check_rotary_length(c, rotary_cos, cache_seqlens)
        elif cache_seqlens is None:  # every sequence fills the cache: q rotates past its end
            _check_rotary_length(c, rotary_cos, c.capacity)
    c.rotary_rows = rotary_cos.shape[0] if rotary_cos is not None else -1
    c.value_params = (c.seqlen_new, c.capacity, c.cache_batch, c.num_pages, c.page_size, c.seqlen_q,
                      c.rotary_per_token, c.rotary_rows)

    if out is not None:
        want = (c.batch, c.seqlen_q, c.num_heads, c.head_dv)
        _check_like("out", out, "q", q, 4, "(batch, seqlen_q, heads, head_dim_v)")
        if checks.shape_of(out) != want:
            raise ValueError(f"out must have shape {want}; got {checks.shape_of(out)}")
        if checks.overlaps_itself(out):
            raise ValueError(f"out has strides {out.stride()} under which some of its elements share memory "
                             f"(an expanded view?); every output element needs its own slot")
    return c


def _check_lengths(c, max_len, argmax):
    """cache_seqlens' largest value (at index argmax; None for an int) leaves room for the new keys."""
    name = "cache_seqlens" if argmax is None else f"cache_seqlens[{argmax}]"
    if max_len > c.capacity:
        raise ValueError(f"{name} = {max_len} is beyond the cache: it holds {c.capacity} keys per sequence")
    if max_len + c.seqlen_new > c.capacity:
        raise ValueError(f"k: appending {c.seqlen_new} keys after {name} = {max_len} needs "
                         f"{max_len + c.seqlen_new} slots; the cache holds {c.capacity} per sequence")


def _check_rotary_length(c, rotary_cos, max_len):
    q_span = c.seqlen_q if c.rotary_per_token else 1
    need = max_len + max(c.seqlen_new, q_span)
    if rotary_cos.shape[0] < need:
        raise ValueError(f"rotary_cos has {rotary_cos.shape[0]} positions; positions up to {need - 1} are needed "
                         f"(cache_seqlens up to {max_len} plus the new tokens)")


def _check_int_lengths(c, cache_seqlens, rotary_cos):
    """An int cache_seqlens (the same for every sequence); rotary_cos None: the rotary table is checked apart."""
    if cache_seqlens < 0:
        raise ValueError(f"cache_seqlens = {cache_seqlens}; it must be >= 0")
    _check_lengths(c, cache_seqlens, None)
    if rotary_cos is not None:
        _check_rotary_length(c, rotary_cos, cache_seqlens)


def _check_negative(name, lo, at):
    if lo < 0:
        raise ValueError(f"{name}[{at}] = {lo}; it must be >= 0")


# Argument sets whose values passed (checks.PassedSets).
_values_ok = checks.PassedSets(32)


def _check_values(c, cache_seqlens, cache_batch_idx, page_table, rotary_cos):
    """Checks that read tensor values: one host read for all of them (skipped as the module docstring says).

    An argument set passes once per (tensor objects, their in-place version counters, shapes): the hit path
    is one dictionary lookup and no device work.
    """
    lens_t = cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None
    if (lens_t is None and cache_batch_idx is None and page_table is None) or not CHECK_VALUES or c.batch == 0:
        return
    tensors = (lens_t, cache_batch_idx, page_table)
    # An int (or None) cache_seqlens is part of the key: the page-table entries a sequence uses depend on it.
    # Inference-mode tensors give no key (checks._remembered_key): such a set is checked on every call.
    key = checks._remembered_key(tensors, (c.value_params, None if lens_t is not None else cache_seqlens))
    if key is not None and _values_ok.passed(key, tensors):
        return
    if not checks.can_read_values(lens_t, cache_batch_idx, page_table):
        return
    stats = []
    lens = cache_seqlens
    if isinstance(cache_seqlens, torch.Tensor):
        lens = cache_seqlens.long()
        stats += [lens.min(), lens.argmin(), lens.max(), lens.argmax()]
    appends_rows = cache_batch_idx is not None and c.seqlen_new > 0 and c.batch > 1
    if cache_batch_idx is not None:
        idx = cache_batch_idx.long()
        stats += [idx.min(), idx.argmin(), idx.max(), idx.argmax()]
        if appends_rows:
            # Appending, two sequences on one cache row would write the same slots (one's keys lost, racily).
            ordered = idx.sort().values
            repeated = ordered[1:] == ordered[:-1]
            stats += [repeated.any(), ordered[1:][repeated.int().argmax()]]
    if page_table is not None and page_table.numel():
        # Only the entries a sequence uses must be valid: pages [0, ceil((cache_seqlens + new) / page_size)).
        if lens is None:
            lens = c.capacity
        need = (lens + c.seqlen_new + c.page_size - 1) // c.page_size
        cols = torch.arange(page_table.shape[1], device=page_table.device)
        need = need[:, None] if isinstance(need, torch.Tensor) else need
        bad = (cols[None, :] < need) & ((page_table < 0) | (page_table >= c.num_pages))
        first = bad.flatten().int().argmax()
        stats += [bad.any(), first, page_table.flatten()[first]]
    vals = torch.stack([s.long() for s in stats]).tolist()
    if isinstance(cache_seqlens, torch.Tensor):
        lo, at_lo, hi, at_hi = vals[:4]
        vals = vals[4:]
        _check_negative("cache_seqlens", lo, at_lo)
        _check_lengths(c, hi, at_hi)
        if rotary_cos is not None:
            _check_rotary_length(c, rotary_cos, hi)
    if cache_batch_idx is not None:
        lo, at_lo, hi, at_hi = vals[:4]
        vals = vals[4:]
        _check_negative("cache_batch_idx", lo, at_lo)
        if hi >= c.cache_batch:
            raise ValueError(f"cache_batch_idx[{at_hi}] = {hi}; it must be < {c.cache_batch} (k_cache's batch "
                             f"size)")
        if appends_rows:
            any_repeated, value = vals[:2]
            vals = vals[2:]
            if any_repeated:
                raise ValueError(f"cache_batch_idx holds {value} more than once; when k and v are appended, each "
                                 f"sequence needs its own cache row (two would write the same slots)")
    if page_table is not None and page_table.numel():
        any_bad, first, value = vals[:3]
        if any_bad:
            b, j = divmod(first, page_table.shape[1])
            raise ValueError(f"page_table[{b}, {j}] = {value} is out of range: k_cache has {c.num_pages} pages "
                             f"(entries a sequence uses must lie in [0, {c.num_pages}))")
    if key is not None:
        _values_ok.remember(key, tensors)


# ----------------------------------------------------------------------------------------------------------
# Backend choice and the split heuristic
# ----------------------------------------------------------------------------------------------------------

def _backend(q, backend):
    """'reference' or 'triton' (dispatch's rules: Triton on CUDA, or on the CPU under TRITON_INTERPRET=1)."""
    if backend == "reference":
        return "reference"
    reason = dispatch.triton_reason(q)
    if backend == "triton" and reason is not None:
        raise ValueError(f"backend='triton' cannot serve this call: {reason}")
    if reason is not None:
        dispatch._note(f"fa4: flash_attn_with_kvcache on the reference backend ({reason})")
    return "triton" if reason is None else "reference"


_sm_counts = {}


def _sm_count(device):
    count = _sm_counts.get(device.index)
    if count is None:
        if device.type != "cuda":
            count = 4  # the CPU interpreter: a few "SMs" so that the heuristic still splits small problems
        else:
            count = torch.cuda.get_device_properties(device).multi_processor_count
        _sm_counts[device.index] = count
    return count


def splits_wanted(programs, num_sms):
    """True when `programs` unsplit programs leave enough of the GPU idle that splitting the keys pays."""
    return programs < SPLIT_OFF_FRACTION * num_sms


def choose_num_splits(programs, max_keys, block_n, num_sms):
    """Key splits per (sequence, kv head, row block) so the launch covers the GPU.

    `programs` unsplit programs already run side by side. Once they cover most SMs, splitting only adds
    partial traffic and a combine. Below that, cut each key range so that about SPLIT_PROGRAMS_PER_SM programs
    run per SM in a single wave (floor: a second, partial wave would leave the tail of the launch on a few
    SMs), keeping at least MIN_TILES_PER_SPLIT key tiles per split. The kernel hands every split
    ceil(tiles / splits) tiles, so the count is rounded to one that leaves no split empty. Uses the cache
    capacity (an upper bound), never device values, so the choice is fixed under a CUDA graph.

    Decode suite on an H100 (132 SMs, Hkv 8, 64-key tiles): B=1 -> 16 splits (128 programs, 8 tiles each at
    L=8192, 64 at L=65536), B=8 -> 2 (128 programs), B >= 32 -> 1.
    """
    tiles = -(-max_keys // block_n)
    if programs == 0 or not splits_wanted(programs, num_sms) or tiles < 2 * MIN_TILES_PER_SPLIT:
        return 1
    want = max(1, SPLIT_PROGRAMS_PER_SM * num_sms // programs)
    splits = max(1, min(want, tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS))
    return -(-tiles // -(-tiles // splits))


def _max_keys(c):
    """Most keys one row block can see: the capacity, or the window's span."""
    keys = c.capacity
    if c.left >= 0:
        keys = min(keys, c.left + c.seqlen_q + (c.right if c.right >= 0 else keys))
    return keys


# ----------------------------------------------------------------------------------------------------------
# Reference path (eager PyTorch)
# ----------------------------------------------------------------------------------------------------------

def apply_rotary(x, cos, sin, pos, interleaved):
    """x (B, S, H, D) rotated at positions pos (B, S) by tables (seqlen_ro, rotary_dim / 2), in fp32."""
    half = cos.shape[1]
    c = cos[pos].float()[:, :, None, :]
    s = sin[pos].float()[:, :, None, :]
    xr = x[..., :2 * half].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        rot = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., 2 * half:]), dim=-1)


def _reference(c, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, page_table,
               softcap, sink, rotary_interleaved):
    from . import reference

    dev = q.device
    batch, seqlen_q = c.batch, c.seqlen_q
    if cache_seqlens is None:
        lens = torch.full((batch,), c.capacity, dtype=torch.long, device=dev)
    elif isinstance(cache_seqlens, torch.Tensor):
        lens = cache_seqlens.long()
    else:
        lens = torch.full((batch,), cache_seqlens, dtype=torch.long, device=dev)
    rows = (torch.arange(batch, device=dev) if cache_batch_idx is None else cache_batch_idx.long())[:, None]
    if rotary_cos is not None:
        steps = torch.arange(seqlen_q, device=dev)[None, :]
        pos_q = lens[:, None] + (steps if c.rotary_per_token else 0 * steps)
        q = apply_rotary(q, rotary_cos, rotary_sin, pos_q, rotary_interleaved)
    if k is not None:
        pos = lens[:, None] + torch.arange(c.seqlen_new, device=dev)[None, :]
        if rotary_cos is not None:
            k = apply_rotary(k, rotary_cos, rotary_sin, pos, rotary_interleaved)
        if c.paged:
            page = page_table.long()[torch.arange(batch, device=dev)[:, None], pos // c.page_size]
            k_cache[page, pos % c.page_size] = k
            v_cache[page, pos % c.page_size] = v
        else:
            k_cache[rows, pos] = k
            v_cache[rows, pos] = v
    # A contiguous cache is a paged one whose pages are whole sequences: page_table = cache row of each sequence.
    table = page_table if c.paged else rows.to(torch.int32)
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=dev) * seqlen_q
    out, lse = reference.forward(
        q.reshape(batch * seqlen_q, c.num_heads, c.head_d), k_cache, v_cache, softmax_scale=c.scale,
        window_left=c.left, window_right=c.right, softcap=float(softcap), sink=sink, cu_seqlens_q=cu_q,
        max_seqlen_q=seqlen_q, seqused_k=(lens + c.seqlen_new).to(torch.int32), max_seqlen_k=c.capacity,
        page_table=table)
    out = out.view(batch, seqlen_q, c.num_heads, c.head_dv)
    lse = lse.view(c.num_heads, batch, seqlen_q).permute(1, 0, 2)
    return out, lse


# ----------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------

def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, page_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, learnable_sink=None,
                            rotary_interleaved=True, num_splits=0, return_lse=False, out=None, backend=None):
    """Attention of q over a KV cache, appending k and v to it in place first (FlashAttention's semantics).

    q (B, Sq, Hq, D); k_cache, v_cache (Bc, L, Hkv, D / Dv), or (num_pages, page_size, Hkv, D / Dv) with
    page_table (B, max_pages) int32. k, v (B, Sn, Hkv, D / Dv): written at cache positions cache_seqlens[b] + t
    (cache_seqlens: int or (B,) int32; None = every sequence fills the cache). Sequence b then attends to its
    first cache_seqlens[b] + Sn keys; causal and window_size are aligned to the end of the cache, so Sq > 1
    (speculative decoding, chunked prefill) works as in FlashAttention. rotary_cos/rotary_sin
    (seqlen_ro, rotary_dim / 2) rotate the new keys at their positions and q at cache_seqlens[b] + i when causal
    or local, else at cache_seqlens[b]; rotary_interleaved picks GPT-J pairs (2c, 2c+1) over GPT-NeoX pairs
    (c, c + rotary_dim/2). cache_batch_idx (B,) picks each sequence's row of a contiguous cache.
    num_splits: key splits per sequence and kv head (0 = heuristic). out: optional (B, Sq, Hq, Dv) output.
    Returns out, and lse (B, Hq, Sq) fp32 (natural log) when return_lse=True. Forward only.
    """
    if isinstance(learnable_sink, torch.Tensor):
        learnable_sink = checks.contiguous_sink(learnable_sink)
    # As FlashAttention: q and the new k, v may have a strided last dimension (copied); the caches, written in
    # place, may not.
    q, k, v = checks.unit_last_stride(q, k, v)
    if ops.opaque_call(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, page_table,
                       learnable_sink, out):
        return _traced_call(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                            page_table, softmax_scale, causal, window_size, softcap, learnable_sink,
                            rotary_interleaved, num_splits, return_lse, out, backend)
    key = None
    try:
        key = (_signature(q), _signature(k_cache), _signature(v_cache), _signature(k), _signature(v),
               _signature(rotary_cos), _signature(rotary_sin), _lens_signature(cache_seqlens),
               _signature(cache_batch_idx), _signature(page_table), _signature(learnable_sink), _signature(out),
               softmax_scale, type(softmax_scale), causal, type(causal), window_size,
               type(window_size[0]), type(window_size[1]), softcap, type(softcap), rotary_interleaved,
               type(rotary_interleaved), num_splits, type(num_splits), return_lse, type(return_lse), backend,
               _decode_switches())
        known = _steps.get(key)
    except Exception:  # an argument that is not what it should be: the full checks name it
        key = known = None
    if known is not None:
        c, step = known
        lens = None
        if cache_seqlens is None:
            fixed = c.capacity
        elif type(cache_seqlens) is int:
            _check_int_lengths(c, cache_seqlens, rotary_cos)
            fixed = cache_seqlens
        else:
            lens, fixed = cache_seqlens, 0
        _check_values(c, cache_seqlens, cache_batch_idx, page_table, rotary_cos)
        res, lse = step(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, lens, cache_batch_idx, page_table,
                        learnable_sink, out, fixed)
        return (res, lse) if return_lse else res

    c = _check_static(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                      page_table, softmax_scale, causal, window_size, softcap, learnable_sink, rotary_interleaved,
                      num_splits, return_lse, out, backend)
    _check_values(c, cache_seqlens, cache_batch_idx, page_table, rotary_cos)
    if _backend(q, backend) == "triton":
        step = make_step(c, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                         page_table, softcap, learnable_sink, rotary_interleaved, num_splits, return_lse, out)
        if key is not None:
            if len(_steps) >= _STEPS_SIZE:
                _steps.pop(next(iter(_steps)))
            _steps[key] = (c, step)
        lens = cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None
        fixed = 0 if lens is not None else c.capacity if cache_seqlens is None else cache_seqlens
        res, lse = step(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, lens, cache_batch_idx, page_table,
                        learnable_sink, out, fixed)
        return (res, lse) if return_lse else res
    # The in-place append must not be recorded by autograd. Tensors made under torch.inference_mode can only be
    # written inside it (the Triton kernels write them through raw pointers): then the whole reference runs there,
    # so that no write fails after another one landed.
    written = (k_cache, v_cache, out) if k is not None else (out, )
    inference = any(t is not None and t.is_inference() for t in written)
    with torch.inference_mode() if inference else torch.no_grad():
        res, lse = _reference(c, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                              cache_batch_idx, page_table, softcap, learnable_sink, rotary_interleaved)
        if out is not None:
            out.copy_(res)
            res = out
    if inference and not torch.is_inference_mode_enabled():
        # Results made inside inference_mode are inference tensors: hand back normal ones, as the Triton path does.
        lse = lse.clone()
        if out is None:
            res = res.clone()
    return (res, lse.contiguous()) if return_lse else res


def _traced_call(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, page_table,
                 softmax_scale, causal, window_size, softcap, learnable_sink, rotary_interleaved, num_splits,
                 return_lse, out, backend):
    """flash_attn_with_kvcache under torch.compile: the argument checks that need no tensor values, then one
    opaque custom op (fa4::with_kvcache) that appends to the caches (and writes `out`) in place, so the graph has
    no break and the compiler sees the mutations."""
    _check_static(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, page_table,
                  softmax_scale, causal, window_size, softcap, learnable_sink, rotary_interleaved, num_splits,
                  return_lse, out, backend)
    lens_t = cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else None
    lens_i = -1 if cache_seqlens is None or lens_t is not None else int(cache_seqlens)
    res, lse = torch.ops.fa4.with_kvcache(
        q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, lens_t, lens_i, cache_batch_idx, page_table,
        None if softmax_scale is None else float(softmax_scale), bool(causal), int(window_size[0]),
        int(window_size[1]), float(softcap), learnable_sink, bool(rotary_interleaved), int(num_splits), out,
        backend)
    if out is not None:
        res = out
    return (res, lse) if return_lse else res


@torch.library.custom_op("fa4::with_kvcache", mutates_args=("k_cache", "v_cache", "out"))
def _with_kvcache_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: Optional[torch.Tensor],
                     v: Optional[torch.Tensor], rotary_cos: Optional[torch.Tensor],
                     rotary_sin: Optional[torch.Tensor], cache_seqlens: Optional[torch.Tensor],
                     cache_seqlens_int: int, cache_batch_idx: Optional[torch.Tensor],
                     page_table: Optional[torch.Tensor], softmax_scale: Optional[float], causal: bool,
                     window_left: int, window_right: int, softcap: float, learnable_sink: Optional[torch.Tensor],
                     rotary_interleaved: bool, num_splits: int, out: Optional[torch.Tensor],
                     backend: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager call, for compiled graphs. cache_seqlens_int: the int cache_seqlens, -1 for None (full
    caches). Returns (out, lse); out is an empty tensor when the caller's `out` was written (an op's result may
    not alias its input)."""
    lens = cache_seqlens if cache_seqlens is not None else None if cache_seqlens_int < 0 else cache_seqlens_int
    res, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, lens, cache_batch_idx,
                                       page_table, softmax_scale, causal, (window_left, window_right), softcap,
                                       learnable_sink, rotary_interleaved, num_splits, True, out, backend)
    if out is not None:
        res = q.new_empty(0)
    return res, lse


@_with_kvcache_op.register_fake
def _with_kvcache_fake(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_seqlens_int,
                       cache_batch_idx, page_table, softmax_scale, causal, window_left, window_right, softcap,
                       learnable_sink, rotary_interleaved, num_splits, out, backend):
    batch, seqlen_q, heads, _ = q.shape
    res = q.new_empty(0) if out is not None else q.new_empty((batch, seqlen_q, heads, v_cache.shape[-1]))
    return res, q.new_empty((batch, heads, seqlen_q), dtype=torch.float32)


def forward_splitkv(q, k, v, *, softmax_scale, window_left, window_right, softcap, sink, cu_seqlens_q=None,
                    cu_seqlens_k=None, seqused_k=None, max_seqlen_q=None, max_seqlen_k=None, page_table=None):
    """The forward backend contract (docs/INTERNALS.md) on the split-KV decode kernels, for batched calls whose
    few query tokens leave the attention kernels' grid mostly idle (dispatch.splitkv_wanted): (out, lse) with
    lse (B, Hq, Sq) fp32. k and v are read as a full contiguous cache; the cache's causal and window alignment
    (to the end of the keys) is the forward's bottom-right alignment."""
    if cu_seqlens_q is not None or cu_seqlens_k is not None or page_table is not None:
        raise ValueError("the splitkv forward serves batched calls only")
    out, lse = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqused_k, softmax_scale=softmax_scale,
                                       window_size=(window_left, window_right), softcap=softcap,
                                       learnable_sink=sink, return_lse=True)
    return out, lse


_decode_module = None


def _decode_switches():
    """decode.py's module switches that a Step's launches depend on (A/B probes flip them): part of the Step key, so
    that a flipped switch builds new launches instead of replaying the old ones."""
    global _decode_module
    if _decode_module is None:
        from .kernels.triton import decode
        _decode_module = decode
    d = _decode_module
    return d.TILE_BASE, d.PDL, d.CLUSTER_MERGE, d.MAX_CLUSTER, d.STRIDED_PAGED, d.STRIDED_CONTIGUOUS


# Steps of the call signatures seen (Triton backend), oldest first: signature -> (_Call, decode.Step).
_steps = {}
_STEPS_SIZE = 256


def _signature(t):
    """What the checks and the launch arguments depend on in a tensor argument (None stays None)."""
    return None if t is None else (t.dtype, t.device, t.shape, t.stride())


def _lens_signature(lens):
    """An int cache_seqlens is checked and passed per call: its signature is its type, not its value."""
    if lens is None:
        return None
    if type(lens) is int:
        return int
    return _signature(lens)


def make_step(c, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, page_table,
              softcap, sink, rotary_interleaved, num_splits, return_lse, out, config=None):
    """The decode.Step of a validated call: tile config and split count, then the launches' fixed arguments."""
    from .kernels.triton import decode

    num_sms = _sm_count(q.device)
    group = c.num_heads // c.num_heads_kv
    rows = c.seqlen_q * group
    block_m = decode.block_m_for(rows)
    programs = c.batch * c.num_heads_kv * -(-rows // block_m)
    if config is None:
        config = decode.default_config(q.device, q.dtype, c.head_d, c.head_dv, block_m=block_m,
                                       wide=not splits_wanted(programs, num_sms), page_size=c.page_size)
    if num_splits == 0:
        num_splits = choose_num_splits(programs, _max_keys(c), config.block_n, num_sms)
    return decode.Step(q, k_cache, v_cache, out, want_lse=return_lse, k=k, v=v, cache_seqlens=cache_seqlens,
                       cache_batch_idx=cache_batch_idx, page_table=page_table, rotary_cos=rotary_cos,
                       rotary_sin=rotary_sin, rotary_interleaved=rotary_interleaved,
                       rotary_per_token=c.rotary_per_token, softmax_scale=c.scale, window_left=c.left,
                       window_right=c.right, softcap=float(softcap), sink=sink, num_splits=num_splits,
                       config=config)


def flash_attn_combine(out_partial, lse_partial, out=None, out_dtype=None):
    """Merges attention results over disjoint key sets by their log-sum-exp (FlashAttention's layout).

    out_partial (num_splits, B, S, H, D) fp32 and lse_partial (num_splits, B, S, H) fp32 (natural log; -inf for
    a split that saw no key), or without the B dimension for packed sequences. Returns (out, lse): out
    (B, S, H, D) in out_dtype (default fp32, or out's dtype when out is given), lse (B, S, H) fp32, a transposed
    view of a contiguous (B, H, S) tensor as in FlashAttention.
    """
    if ops.opaque_call(out_partial, lse_partial, out):
        # One custom op in a compiled graph, a trace or under a dispatch mode (the Triton launch and the
        # value-dependent checks stay out of it).
        res, lse = _combine_op(out_partial, lse_partial, out, out_dtype)
        res = out if out is not None else res
        lse = lse.transpose(1, 2)
        return res, (lse[0] if out_partial.dim() == 4 else lse)
    checks.check_tensor("out_partial", out_partial)
    checks.check_tensor("lse_partial", lse_partial)
    packed = out_partial.dim() == 4
    if out_partial.dim() not in (4, 5):
        raise ValueError(f"out_partial must have 5 dimensions (num_splits, batch, seqlen, heads, head_dim), or 4 "
                         f"without batch; got shape {checks.shape_of(out_partial)}")
    for name, t in (("out_partial", out_partial), ("lse_partial", lse_partial)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be torch.float32; got {t.dtype}")
    if lse_partial.device != out_partial.device:
        raise ValueError(f"lse_partial is on {lse_partial.device}; it must be on out_partial's device "
                         f"{out_partial.device}")
    if checks.shape_of(lse_partial) != checks.shape_of(out_partial)[:-1]:
        raise ValueError(f"lse_partial must have shape {checks.shape_of(out_partial)[:-1]} (out_partial's without "
                         f"head_dim); got {checks.shape_of(lse_partial)}")
    if out_partial.stride(-1) != 1:
        raise ValueError(f"out_partial's last dimension must be contiguous (stride 1); got stride "
                         f"{out_partial.stride(-1)}")
    if out_partial.shape[0] < 1:
        raise ValueError(f"out_partial must hold at least one split; got shape {checks.shape_of(out_partial)}")
    if out_dtype is not None and out_dtype not in checks.SUPPORTED_DTYPES:
        raise TypeError(f"out_dtype must be torch.float32, torch.float16 or torch.bfloat16; got {out_dtype}")
    op = out_partial.unsqueeze(1) if packed else out_partial
    lp = lse_partial.unsqueeze(1) if packed else lse_partial
    n, batch, seqlen, heads, dim = op.shape
    if out is not None:
        checks.check_tensor("out", out)
        want = checks.shape_of(out_partial)[1:]
        if checks.shape_of(out) != want:
            raise ValueError(f"out must have shape {want}; got {checks.shape_of(out)}")
        if out_dtype is not None and out.dtype != out_dtype:
            raise TypeError(f"out has dtype {out.dtype}; it must match out_dtype {out_dtype}")
        if out.device != out_partial.device or out.stride(-1) != 1:
            raise ValueError(f"out must be on out_partial's device {out_partial.device} with a contiguous last "
                             f"dimension; got {out.device} and stride {out.stride(-1)}")
        if out.dtype not in checks.SUPPORTED_DTYPES:
            raise TypeError(f"out has dtype {out.dtype}; expected torch.float32, torch.float16 or torch.bfloat16")
        res = out
    else:
        res = torch.empty(checks.shape_of(out_partial)[1:], dtype=out_dtype or torch.float32, device=out_partial.device)
    res4 = res.unsqueeze(0) if packed else res
    lse = torch.empty((batch, heads, seqlen), dtype=torch.float32, device=out_partial.device)
    if dispatch.triton_reason(out_partial) is None:
        from .kernels.triton.combine import combine_into
        combine_into(op, lp, res4, lse, num_splits=n, batch=batch, seqlen=seqlen, num_heads=heads,
                     head_dv=dim, partial_strides=op.stride()[:4], lse_partial_strides=lp.stride(),
                     lse_strides=(lse.stride(0), lse.stride(2), lse.stride(1)))
    else:
        total = torch.logsumexp(lp, dim=0)  # (B, S, H); -inf where every split is empty
        weight = torch.exp(lp - torch.where(torch.isinf(total), 0.0, total)).nan_to_num(0.0)
        weight = torch.where(torch.isinf(lp), 0.0, weight)
        res4.copy_((weight[..., None] * torch.where(torch.isinf(lp)[..., None], 0.0, op)).sum(0))
        lse.copy_(total.permute(0, 2, 1))
    lse = lse.transpose(1, 2)
    return res, (lse[0] if packed else lse)


@torch.library.custom_op("fa4::combine", mutates_args=("out",))
def _combine_op(out_partial: torch.Tensor, lse_partial: torch.Tensor, out: Optional[torch.Tensor],
                out_dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor]:
    """flash_attn_combine for compiled graphs: (out, lse) with lse as its contiguous (B, H, S) base (the caller
    takes the transposed view); out is an empty tensor when the caller's `out` was written."""
    res, lse = flash_attn_combine(out_partial, lse_partial, out, out_dtype)
    lse = lse.unsqueeze(0) if out_partial.dim() == 4 else lse
    return (out_partial.new_empty(0) if out is not None else res), lse.transpose(1, 2).contiguous()


@_combine_op.register_fake
def _combine_fake(out_partial, lse_partial, out, out_dtype):
    if out_partial.dim() == 4:  # packed: (num_splits, total, heads, dim)
        batch, (seqlen, heads) = 1, out_partial.shape[1:3]
    else:
        batch, seqlen, heads = out_partial.shape[1:4]
    res = out_partial.new_empty(0) if out is not None else out_partial.new_empty(
        out_partial.shape[1:], dtype=out_dtype or torch.float32)
    return res, out_partial.new_empty((batch, heads, seqlen), dtype=torch.float32)
