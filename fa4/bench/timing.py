"""Time and memory of one call on the GPU, measured the way the peers' anchors were.

Time: `triton.testing.do_bench` median. do_bench zeroes a 256 MB buffer before every timed call, so each call
starts with a cold L2 (50 MB on an H100) and is timed alone between two CUDA events. Python's garbage collector
is paused while timing (bench_ms).

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
REPS = {"training": Reps(50, 200), "decode": Reps(20, 100)}
QUICK_REPS = {"training": Reps(10, 40), "decode": Reps(5, 25)}


def bench_ms(fn, reps):
    """do_bench median of fn, with Python's cyclic garbage collector collected first and paused while timing
    (as `timeit` does): a collection inside the timed loop of a sub-millisecond, host-launched call lands in
    its time. (Two all-peer runs each had one D = 128 S = 1024 figure at about half its rerun value; a
    collection after a peer's compile is one suspect. Same treatment for every backend.)"""
    from triton.testing import do_bench
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return do_bench(fn, warmup=reps.warmup, rep=reps.rep, return_mode="median")
    finally:
        if was_enabled:
            gc.enable()


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
