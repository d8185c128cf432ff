"""The work order of a packed (varlen) forward with dynamic units: sequences longest first, and the unit counter.

The Hopper forward's DYNAMIC schedule (attention_fwd.py, handout.py) hands its units out from a global counter
in sequence order sched[1], sched[2], ...: the sequences with the most keys first, so the short ones fill the
CTAs that finish early instead of a long one starting last and running alone (longest-processing-time-first
list scheduling). sched[0] is the counter and must be zero when the forward starts.

One small launch writes both, from the key counts on the device (no host read of the lengths): program i
counts the sequences that go before it, those with more keys and those with as many and a lower index, and
that count is its place. O(batch²) comparisons in all, a few µs of GPU time up to MAX_RANKED_BATCH sequences
(past it torch's stable sort gives the same order). The ties broken by index make the order a stable
descending sort, the same every call (the forward's output is bitwise repeatable).
"""
import torch
import triton
import triton.language as tl

from fa4.kernels.direct_launch import Launch, current_device, hooks_idle, raw_stream

_BLOCK = 1024
# Past this many sequences the O(batch²) ranking would cost more than torch's sort (a few kernels, still no host
# read): 4096 sequences are 16M comparisons, ~10 µs on an H100.
MAX_RANKED_BATCH = 4096


@triton.jit
def _key_count(cu_k, seqused, idx, ok, HAS_SEQUSED: tl.constexpr):
    """Keys of sequences idx (0 where not ok): seqused_k's entry, else cu_seqlens_k's difference."""
    if HAS_SEQUSED:
        return tl.load(seqused + idx, mask=ok, other=0)
    return tl.load(cu_k + idx + 1, mask=ok, other=0) - tl.load(cu_k + idx, mask=ok, other=0)


@triton.jit
def _longest_first_kernel(cu_k, seqused, sched, batch, HAS_SEQUSED: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    mine = _key_count(cu_k, seqused, i, True, HAS_SEQUSED)
    place = 0
    for start in range(0, batch, BLOCK):
        j = start + tl.arange(0, BLOCK)
        ok = j < batch
        n = _key_count(cu_k, seqused, j, ok, HAS_SEQUSED)
        before = ok & ((n > mine) | ((n == mine) & (j < i)))
        place += tl.sum(before.to(tl.int32), axis=0)
    tl.store(sched + 1 + place, i)
    if i == 0:
        tl.store(sched, 0)  # the unit counter


_LAUNCHES = {}


def longest_first(batch, cu_seqlens_k, seqused_k, device):
    """sched (1 + batch,) int32 on `device`: [0] the zeroed unit counter, [1 + r] the index of the sequence with the
    r-th most keys (seqused_k's counts when given, else cu_seqlens_k's differences; ties by index). Enqueued on
    the current stream; a fresh tensor every call, so calls on different streams never share a counter."""
    if device.type != "cuda":  # ahead-of-time compiles (aot.py) bind CPU stand-ins; nothing runs
        return torch.zeros(1 + batch, dtype=torch.int32, device=device)
    has_used = seqused_k is not None
    counts_from = seqused_k if has_used else cu_seqlens_k
    if batch > MAX_RANKED_BATCH:
        return sorted_order(seqused_k if has_used else cu_seqlens_k[1:] - cu_seqlens_k[:-1])
    sched = torch.empty(1 + batch, dtype=torch.int32, device=device)
    index = device.index if device.index is not None else current_device()
    # Triton specialises pointers on 16-byte alignment, so a plan is kept per alignment of the counts' tensor.
    key = (index, batch, has_used, counts_from.data_ptr() % 16 == 0)
    run = _LAUNCHES.get(key)
    if run is not None and run.compiled is not None and index == current_device() and hooks_idle():
        ptr = counts_from.data_ptr()
        run.fast((ptr, ptr, sched.data_ptr()), raw_stream(index))
        return sched
    if run is None:
        run = Launch(_longest_first_kernel, 3, (batch,), (batch,), dict(HAS_SEQUSED=has_used, BLOCK=_BLOCK), 4, 1)
        _LAUNCHES[key] = run
    with torch.cuda.device(device):
        run.jit((counts_from, counts_from, sched), keep=hooks_idle())
    return sched


def sorted_order(counts):
    """longest_first's result by torch's stable sort (for batches past MAX_RANKED_BATCH): [0] = 0, then the
    indices of counts in descending order, ties by index."""
    order = torch.sort(counts, descending=True, stable=True).indices.to(torch.int32)
    return torch.cat([order.new_zeros(1), order])
