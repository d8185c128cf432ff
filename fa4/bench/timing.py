"""Time and memory of one call on the GPU, measured the way the peers' anchors were.

Time: `triton.testing.do_bench` median. do_bench zeroes a 256 MB buffer before every timed call, so each call
starts with a cold L2 (50 MB on an H100) and is timed alone between two CUDA events. Python's garbage collector
is paused while timing (bench_ms).

The memset leaves up to the L2's size of dirty lines, which the timed call writes back to memory while it runs.
For a compute-bound call that is noise; for a decode step that streams 268 MB it is ~50 MB of extra DRAM traffic
(~15%), a ceiling of about 2,570 GB/s on the card's ~3 TB/s for any kernel. `l2_flush="read"` times the same
way but clears L2 by reading a 256 MB buffer instead (clean lines, nothing to write back): the step then pays
only for its own bytes. `fa4 bench` uses it for the decode suite by default (`--l2-flush`, cli.DEFAULT_L2_FLUSH)
and do_bench's memset, the method of the anchors in ../shared/anchors, for training.

Extra memory of a call: reset the allocator's peak, note `memory_allocated()` as the base, make the call,
then (peak − base − bytes of the tensors the call returned), in MiB. It is what the call allocated beyond its
inputs (already allocated before) and its outputs: workspaces, tensors saved for the backward (e.g. lse), fp32
accumulators. The caching allocator rounds blocks, so figures are good to about 1 MiB.
"""
import gc
from dataclasses import dataclass

import torch

MIB = 1 << 20


@dataclass(frozen=True)
class Reps:
    """do_bench budgets in milliseconds."""
    warmup: int
    rep: int


# The anchors used 50/200 ms for training and 20/100 ms for decode; --quick trades precision for time.
REPS = {"training": Reps(50, 200), "gqa": Reps(50, 200), "decode": Reps(20, 100)}
QUICK_REPS = {"training": Reps(10, 40), "gqa": Reps(10, 40), "decode": Reps(5, 25)}


L2_FLUSHES = ("memset", "read")
FLUSH_BYTES = 256 << 20


def bench_ms(fn, reps, l2_flush="memset"):
    """do_bench median of fn, with Python's cyclic garbage collector collected first and paused while timing
    (as `timeit` does): a collection inside the timed loop of a sub-millisecond, host-launched call lands in
    its time. (Two all-peer runs each had one D = 128 S = 1024 figure at about half its rerun value; a
    collection after a peer's compile is one suspect. Same treatment for every backend.)"""
    from triton.testing import do_bench
    if l2_flush not in L2_FLUSHES:
        raise ValueError(f"l2_flush is {l2_flush!r}; expected one of {L2_FLUSHES}")
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        if l2_flush == "read":
            return _read_flush_bench(fn, reps)
        return do_bench(fn, warmup=reps.warmup, rep=reps.rep, return_mode="median")
    finally:
        if was_enabled:
            gc.enable()


_flush_buffers = {}


def _read_flush_bench(fn, reps):
    """do_bench's loop (warm-up and repetitions sized from a first estimate, one pair of CUDA events per call,
    median) with L2 cleared by summing a 256 MB buffer: every line the sum leaves is clean."""
    device = torch.cuda.current_device()
    buf = _flush_buffers.get(device)
    if buf is None:
        buf = _flush_buffers[device] = torch.ones(FLUSH_BYTES // 4, dtype=torch.float32, device="cuda")
    total = torch.empty((), dtype=torch.float32, device="cuda")

    def flush():
        torch.sum(buf, dim=0, out=total)

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = start.elapsed_time(end) / 5  # ms per flush + call, as do_bench estimates
    n_warmup = max(1, int(reps.warmup / estimate))
    n_repeat = max(1, int(reps.rep / estimate))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_repeat)]
    for _ in range(n_warmup):
        fn()
    for i in range(n_repeat):
        flush()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]


def tensors_in(result):
    """The tensors of a call's result (a tensor, or a possibly nested tuple/list with Nones)."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for item in result for t in tensors_in(item)]
    return []


def storage_bytes(tensors):
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def call_with_extra_memory(fn):
    """Runs fn() once; returns (its result, MiB allocated at peak beyond its inputs and returned tensors)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return result, (peak - storage_bytes(tensors_in(result))) / MIB
