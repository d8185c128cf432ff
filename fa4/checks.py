"""Argument validation for the public API.

Every check raises a ValueError or TypeError that names the argument, what was expected and what came,
before anything is computed or written. Checks that need tensor *values* (cu_seqlens monotone, lengths within
max_seqlen, page indices in range) read them back to the host; they are skipped while torch.compile traces
or a CUDA graph is being captured, where a host read is impossible (the caller vouches for the values there).

A host read waits for the GPU, so the packed-sequence checks remember the argument sets that passed: the same
tensors (same objects, same in-place version counter) with the same sizes are not read again. A training step
that builds cu_seqlens once and calls every layer with it pays one read, not one a layer. Tensors made under
torch.inference_mode have no version counter; a set holding one is read on every call.
"""
import collections
import numbers
import weakref

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BACKENDS = (None, "triton", "reference", "sm90")
MAX_HEAD_DIM = 256


def shape_of(t):
    return tuple(t.shape)


def overlaps_itself(t):
    """Whether two elements of t share memory (a stride-0 or otherwise overlapping view, e.g. from expand):
    walking the dimensions by increasing stride, each must step past everything the smaller ones span."""
    if t.numel() == 0:
        return False
    dims = sorted((abs(st), sz) for st, sz in zip(t.stride(), t.shape) if sz > 1)
    span = 1
    for stride, size in dims:
        if stride < span:
            # Not the simple nesting: decide exactly, by the elements' offsets, when that is cheap (an out of a
            # few rows with interleaved strides is legitimate); a large tensor laid out like this is rejected.
            if t.numel() <= 1 << 16:
                offsets = torch.zeros((), dtype=torch.long)
                for st, sz in zip(t.stride(), t.shape):
                    offsets = (offsets.unsqueeze(-1) + torch.arange(sz) * st).flatten()
                return offsets.unique().numel() < t.numel()
            return True
        span = stride * size
    return False


def can_read_values(*tensors):
    """True when tensor values may be read on the host: not compiling or tracing, not capturing a CUDA graph, no
    fake tensor (FakeTensorMode: shapes only)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    cuda = False
    # is_fake only for subclasses and functorch-wrapped tensors (their type is torch.Tensor, a fake may be inside):
    # every packed call and decode step comes here, and is_fake costs ~2 µs a tensor.
    wrapped = torch._C._are_functorch_transforms_active()
    for t in tensors:
        if t is None:
            continue
        if wrapped or type(t) is not torch.Tensor:
            from torch._subclasses.fake_tensor import is_fake
            if is_fake(t):
                return False
        cuda = cuda or t.is_cuda
    return not (cuda and torch.cuda.is_current_stream_capturing())


def _type_name(value):
    """The value's type as an error message names it: module-qualified unless built in (numpy.bool, not bool)."""
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__name__}"


def check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {_type_name(value)}")


def contiguous_sink(sink):
    """learnable_sink as the kernels read it: one float per head at stride 1 (a column of a (heads, layers)
    parameter is a strided view; its copy keeps the autograd link, so the gradient reaches the parameter)."""
    if sink is not None and sink.dim() == 1 and sink.shape[0] > 1 and sink.stride(0) != 1:
        return sink.contiguous()
    return sink


def unit_last_stride(*tensors):
    """Tensors with a contiguous last dimension, copying one that lacks it (FlashAttention's maybe_contiguous: a
    (B, S, D, H) tensor transposed to (B, S, H, D) is accepted, at the price of a copy); non-tensors pass."""
    return tuple(t.contiguous() if isinstance(t, torch.Tensor) and t.dim() and t.stride(-1) != 1 else t
                 for t in tensors)


def check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")


def check_qkv(q, k, v, *, varlen, paged=False):
    """Types, devices, dtypes, ranks, head counts and head dims of q, k, v."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t)
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}; it must be on q's device {q.device}")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"q is on {q.device}; fa4 runs on CUDA devices (and on the CPU via the reference)")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; expected torch.float16, torch.bfloat16 or torch.float32")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}; it must match q's dtype {q.dtype}")
    q_rank = 3 if varlen else 4
    kv_rank = 4 if paged else q_rank
    layout = "(total_q, heads, head_dim)" if varlen else "(batch, seqlen, heads, head_dim)"
    kv_layout = ("(num_pages, page_size, heads, head_dim)" if paged
                 else "(total_k, heads, head_dim)" if varlen else "(batch, seqlen_k, heads, head_dim)")
    if q.dim() != q_rank:
        raise ValueError(f"q must have {q_rank} dimensions {layout}; got shape {shape_of(q)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != kv_rank:
            raise ValueError(f"{name} must have {kv_rank} dimensions {kv_layout}; got shape {shape_of(t)}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"k has batch size {k.shape[0]}; it must equal q's batch size {q.shape[0]}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"v has shape {shape_of(v)}; its dimensions other than the last must equal k's "
                         f"{shape_of(k)[:-1]}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"k has {hkv} heads; it must divide q's {hq} heads")
    d, dv = q.shape[-1], v.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"k has head dim {k.shape[-1]}; it must equal q's head dim {d}")
    for name, dim in (("q", d), ("v", dv)):
        if dim % 8 != 0 or not 8 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name} has head dim {dim}; expected a multiple of 8 from 8 to {MAX_HEAD_DIM}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}'s last dimension must be contiguous (stride 1); got stride {t.stride(-1)}")


def window_reach(left, right, max_keys, max_queries):
    """(left, right) with -1 for a side that no sequence can reach past: query i sees keys j in
    [i + Sk - Sq - left, i + Sk - Sq + right], so left >= Sk - 1 excludes no key, nor does right >= Sq - 1. As in
    FlashAttention (a side >= seqlen_k becomes -1), but from bounds on every sequence's lengths (max_keys,
    max_queries), so that a huge side (2**31 - 1, sys.maxsize: "unbounded") never reaches the kernels' int32 (or the
    reference's int64) index arithmetic, and a window wider than the sequences takes the unwindowed paths."""
    if left >= max_keys:
        left = -1
    if right >= max_queries:
        right = -1
    return left, right


def check_options(*, softmax_scale, window_size, softcap, learnable_sink, num_heads, device, backend,
                  backends=BACKENDS):
    """Scalars and the sink; returns (window_left, window_right) as ints."""
    if softmax_scale is not None:
        # numbers.Real takes numpy's floats and ints too (np.float32 is not a float subclass); the callers convert.
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
            raise TypeError(f"softmax_scale must be a float or None; got {type(softmax_scale).__name__}")
        if not softmax_scale == softmax_scale or softmax_scale in (float("inf"), float("-inf")):
            raise ValueError(f"softmax_scale must be finite; got {softmax_scale}")
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be a pair (left, right); got {window_size!r}")
    left, right = (-1 if w is None else w for w in window_size)
    for side, w in (("left", left), ("right", right)):
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window_size {side} must be an int (-1 = unbounded); got {w!r}")
        if w < -1:
            raise ValueError(f"window_size {side} must be >= -1 (-1 = unbounded); got {w}")
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a float; got {type(softcap).__name__}")
    if not softcap >= 0 or softcap == float("inf"):
        raise ValueError(f"softcap must be >= 0 and finite (0 = off); got {softcap}")
    if learnable_sink is not None:
        check_tensor("learnable_sink", learnable_sink)
        if tuple(learnable_sink.shape) != (num_heads,):
            raise ValueError(f"learnable_sink must have shape ({num_heads},), one logit per query head; "
                             f"got {shape_of(learnable_sink)}")
        if learnable_sink.dtype != torch.float32:
            raise TypeError(f"learnable_sink must be torch.float32; got {learnable_sink.dtype}")
        if learnable_sink.device != device:
            raise ValueError(f"learnable_sink is on {learnable_sink.device}; it must be on q's device {device}")
    if backend not in backends:
        raise ValueError(f"backend must be one of {backends}; got {backend!r}")
    return int(left), int(right)


def check_index_vector(name, t, length, device):
    check_tensor(name, t)
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be torch.int32; got {t.dtype}")
    if t.dim() != 1 or (length is not None and t.shape[0] != length):
        want = f"({length},)" if length is not None else "1-D"
        raise ValueError(f"{name} must have shape {want}; got {shape_of(t)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}; it must be on q's device {device}")
    if t.shape[0] > 1 and t.stride(0) != 1:
        # The kernels read the entries at consecutive addresses (as FlashAttention's do).
        raise ValueError(f"{name} must be contiguous (stride 1); got stride {t.stride(0)}")


def check_varlen(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, page_table):
    """The packed-sequence description; returns the batch size."""
    check_index_vector("cu_seqlens_q", cu_seqlens_q, None, q.device)
    batch = cu_seqlens_q.shape[0] - 1
    if batch < 1:
        raise ValueError(f"cu_seqlens_q must have batch + 1 >= 2 entries; got shape {shape_of(cu_seqlens_q)}")
    if page_table is None:
        if cu_seqlens_k is None:
            raise ValueError("cu_seqlens_k is required unless page_table is given")
        check_index_vector("cu_seqlens_k", cu_seqlens_k, batch + 1, q.device)
    elif cu_seqlens_k is not None:
        check_index_vector("cu_seqlens_k", cu_seqlens_k, batch + 1, q.device)
    if seqused_k is not None:
        check_index_vector("seqused_k", seqused_k, batch, q.device)
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(m, bool) or not isinstance(m, (numbers.Integral, torch.SymInt)):
            raise TypeError(f"{name} must be an int; got {type(m).__name__}")
        if torch.compiler.is_compiling() or isinstance(m, torch.SymInt):
            # Possibly traced from a device value (torch.compile with capture_scalar_outputs, e.g. max_seqlen from
            # cu_seqlens by .item()): asserted without a guard, which an unbacked value cannot take.
            torch._check(m >= 0, lambda name=name: f"{name} must be >= 0")
        elif m < 0:
            raise ValueError(f"{name} must be >= 0; got {m}")
    if page_table is not None:
        check_tensor("page_table", page_table)
        if page_table.dtype != torch.int32:
            raise TypeError(f"page_table must be torch.int32; got {page_table.dtype}")
        if page_table.dim() != 2 or page_table.shape[0] != batch:
            raise ValueError(f"page_table must have shape ({batch}, max_pages); got {shape_of(page_table)}")
        if page_table.device != q.device:
            raise ValueError(f"page_table is on {page_table.device}; it must be on q's device {q.device}")
        if page_table.shape[1] > 1 and page_table.stride(1) != 1:
            raise ValueError(f"page_table's last dimension must be contiguous (stride 1); got stride "
                             f"{page_table.stride(1)}")
        if k.shape[1] < 1:
            raise ValueError(f"k has page size {k.shape[1]}; a paged cache (num_pages, page_size, Hkv, D) needs "
                             f"page_size >= 1")
        if seqused_k is None and cu_seqlens_k is None:
            raise ValueError("seqused_k (keys per sequence) is required with page_table")
    check_varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, page_table)
    return batch


def check_varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, page_table,
                        in_op=False):
    """check_varlen's checks of tensor values, where values can be read: at the interface on an eager call, and in
    the body of the fa4::attn_fwd op (in_op), which runs on real tensors also under torch.compile, where the
    interface saw fake tensors and could not read them. An argument set that passed is remembered, so a repeated
    set costs a dictionary lookup; the op body also skips the set the interface has just checked (inference-mode
    tensors, which are not remembered, are then read once a call, not twice)."""
    global _just_checked
    if cu_seqlens_q is None or not can_read_values(cu_seqlens_q, cu_seqlens_k, seqused_k, page_table):
        return
    tensors = (cu_seqlens_q, cu_seqlens_k, seqused_k, page_table)
    params = (q.shape[0], k.shape[0], k.shape[1], max_seqlen_q, max_seqlen_k)
    if in_op:
        just, _just_checked = _just_checked, None
        if (just is not None and just[0] == params and all(ref() is t for ref, t in zip(just[1], tensors))
                and just[2] == _versions(tensors)):
            return
    key = _remembered_key(tensors, params)
    if not (key is not None and _varlen_ok.passed(key, tensors)):
        _check_varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, page_table)
        if key is not None:
            _varlen_ok.remember(key, tensors)
    if not in_op:
        _just_checked = (params, tuple(_no_tensor if t is None else weakref.ref(t) for t in tensors),
                         _versions(tensors))


# The argument set the interface checked last (params, weak references, in-place versions), for the op body's check
# of the same call.
_just_checked = None


def _versions(tensors):
    return tuple(None if t is None or t.is_inference() else t._version for t in tensors)


def _remembered_key(tensors, params):
    """The key under which an argument set's passed value checks are remembered: params (what else the checks
    depend on) and each tensor's identity and in-place version counter. None: not to be remembered (a tensor made
    under torch.inference_mode has no version counter, so an in-place change could not be seen)."""
    if any(t is not None and t.is_inference() for t in tensors):
        return None
    return tuple(params) + tuple((id(t), t._version) if t is not None else None for t in tensors)


def _no_tensor():
    return None


class PassedSets:
    """Argument sets whose value checks passed, most recent last: key -> weak references to their tensors (a key
    matches only while those very tensors are alive: an id can be reused by a new tensor)."""

    def __init__(self, size):
        self.size = size
        self.sets = collections.OrderedDict()

    def passed(self, key, tensors):
        refs = self.sets.get(key)
        if refs is None or any(ref() is not t for ref, t in zip(refs, tensors)):
            return False
        self.sets.move_to_end(key)
        return True

    def remember(self, key, tensors):
        self.sets[key] = tuple(_no_tensor if t is None else weakref.ref(t) for t in tensors)
        if len(self.sets) > self.size:
            self.sets.popitem(last=False)


_varlen_ok = PassedSets(64)


def _check_varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, page_table):
    """check_varlen's checks of tensor values (host reads)."""
    batch = cu_seqlens_q.shape[0] - 1
    _check_offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
    if page_table is None:
        lens_k = _check_offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0],
                                max_seqlen_k if seqused_k is None else None, "max_seqlen_k")
    else:
        # A paged sequence's keys: seqused_k[b], else cu_seqlens_k's difference (FlashAttention's reading), at most
        # what its page-table row holds.
        capacity = page_table.shape[1] * k.shape[1]
        lens_k = [capacity] * batch
        if cu_seqlens_k is not None:
            lens_k = _check_offsets("cu_seqlens_k", cu_seqlens_k, None,
                                    max_seqlen_k if seqused_k is None else None, "max_seqlen_k")
            for b, n in enumerate(lens_k):
                if n > capacity and seqused_k is None:
                    raise ValueError(f"cu_seqlens_k gives sequence {b} {n} keys; its page_table row holds "
                                     f"{capacity} ({page_table.shape[1]} pages of {k.shape[1]})")
            lens_k = [capacity] * batch if seqused_k is not None else lens_k
    used = lens_k
    if seqused_k is not None:
        used = seqused_k.tolist()
        for b, (u, n) in enumerate(zip(used, lens_k)):
            if u < 0 or u > n:
                raise ValueError(f"seqused_k[{b}] = {u}; it must lie in [0, {n}] (the keys sequence {b} has)")
            if u > max_seqlen_k:
                raise ValueError(f"max_seqlen_k = {max_seqlen_k} is smaller than seqused_k[{b}] = {u}")
    if page_table is not None and page_table.numel():
        _check_used_pages(page_table, used, k.shape[1], k.shape[0])


def _check_used_pages(page_table, used, page_size, num_pages):
    """The page-table entries sequence b reads, [0, ceil(used[b] / page_size)), name pages of the pool; entries
    past them are never read and may hold anything (serving stacks pad rows with -1). One host read."""
    dev = page_table.device
    need = torch.tensor([-(-u // page_size) for u in used], device=dev)
    cols = torch.arange(page_table.shape[1], device=dev)
    bad = (cols[None, :] < need[:, None]) & ((page_table < 0) | (page_table >= num_pages))
    first = bad.flatten().int().argmax()
    any_bad, at, value = torch.stack([bad.any().long(), first.long(), page_table.flatten()[first].long()]).tolist()
    if any_bad:
        b, j = divmod(at, page_table.shape[1])
        raise ValueError(f"page_table[{b}, {j}] = {value} is out of range: k has {num_pages} pages (the entries a "
                         f"sequence uses must lie in [0, {num_pages}))")


def _check_offsets(name, cu, total, max_len, max_name):
    vals = cu.tolist()
    if vals[0] < 0:
        raise ValueError(f"{name}[0] must be >= 0; got {vals[0]}")
    lens = [b - a for a, b in zip(vals[:-1], vals[1:])]
    for i, n in enumerate(lens):
        if n < 0:
            raise ValueError(f"{name} must be non-decreasing; got {name}[{i}] = {vals[i]} > "
                             f"{name}[{i + 1}] = {vals[i + 1]}")
    if total is not None and vals[-1] > total:
        raise ValueError(f"{name}[-1] = {vals[-1]} exceeds the {total} packed rows of the tensor it indexes")
    if max_len is not None and lens and max(lens) > max_len:
        raise ValueError(f"{max_name} = {max_len} is smaller than the longest sequence in {name} ({max(lens)})")
    return lens
