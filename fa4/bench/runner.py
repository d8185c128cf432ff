"""Runs a suite: every case × every backend, one progress line each, failures recorded and never fatal.

Training, per backend: a first call (compilation, autotuning), one call measured for extra memory, then the
forward timed under autograd (inputs require grad, so it saves what its backward needs, as in training). The
backward is timed alone: the graph of one forward is built once and `torch.autograd.grad(out, (q, k, v), dout,
retain_graph=True)` is timed, so no forward time is subtracted or included.

Decode, per backend: one step (one query token per sequence) over the whole cache, timed under no_grad. Caches
under 100 MB are rotated among several copies so that no call finds its K/V in L2.
"""
import itertools
import math
import sys
import time
from dataclasses import dataclass, field

import torch

from .peers import NotApplicable, make_decode_inputs
from .timing import bench_ms, call_with_extra_memory

ROTATE_BELOW_BYTES = 100e6
MAX_ROTATION = 8


@dataclass
class Outcome:
    """Schema rows (see report.py) plus what does not belong in them: timings in ms, reasons, n/a."""
    rows: list = field(default_factory=list)
    details: list = field(default_factory=list)   # per row: backend, case, ms, first-call s, errors
    failures: list = field(default_factory=list)  # "backend case phase: reason" lines
    not_applicable: list = field(default_factory=list)

    def add(self, row, detail, failure_prefix):
        self.rows.append(row)
        self.details.append(detail)
        if "error" in detail:
            self.failures.append(failure_prefix + detail["error"])


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _reason(exc):
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out of memory"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _training_row(backend, case):
    """The schema row with null figures: the case's key (training; gqa adds Hkv), then the figures."""
    return {"backend": backend, **case.key(), "fwd_tflops": None, "bwd_tflops": None, "fwd_extra_mib": None,
            "bwd_extra_mib": None}


def _fmt(value, spec, unit):
    return "--" if value is None else f"{value:{spec}} {unit}"


def _time(fn, reps, l2_flush):
    """bench_ms of fn; the flush argument is passed only when it is not do_bench's own (the memset)."""
    if l2_flush == "memset":
        return bench_ms(fn, reps)
    return bench_ms(fn, reps, l2_flush)


def measure_training(backend, case, inputs, reps, fwd_only, l2_flush="memset"):
    """(schema row, details) of one backend on one case; raises NotApplicable if it cannot express it."""
    q, k, v, dout = inputs
    row, detail = _training_row(backend.name, case), {"backend": backend.name, **case.key()}
    try:
        fn = backend.training(case.causal)
    except NotApplicable:
        raise
    except Exception as exc:
        detail["error"] = f"setup: {_reason(exc)}"
        return row, detail
    try:
        t0 = time.perf_counter()
        fn(q, k, v)
        torch.cuda.synchronize()
        detail["first_call_s"] = round(time.perf_counter() - t0, 2)
        row["fwd_extra_mib"] = call_with_extra_memory(lambda: fn(q, k, v))[1]
        ms = _time(lambda: fn(q, k, v), reps, l2_flush)
        detail["fwd_ms"] = ms
        row["fwd_tflops"] = case.fwd_flops / ms / 1e9
        out = fn(q, k, v)
    except Exception as exc:
        detail["error"] = f"forward: {_reason(exc)}"
        return row, detail
    if fwd_only:
        return row, detail

    def grad():
        return torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    try:
        grad()  # compile / autotune outside the measurements
        row["bwd_extra_mib"] = call_with_extra_memory(grad)[1]
        ms = _time(grad, reps, l2_flush)
        detail["bwd_ms"] = ms
        row["bwd_tflops"] = case.bwd_flops / ms / 1e9
    except Exception as exc:
        detail["error"] = f"backward: {_reason(exc)}"
    return row, detail


def _training_inputs(case, dtype, device):
    shape = (case.B, case.S, case.H, case.D)
    kv_shape = (case.B, case.S, case.kv_heads, case.D)
    torch.manual_seed(0)
    q, k, v = (torch.randn(s, device=device, dtype=dtype, requires_grad=True) for s in (shape, kv_shape, kv_shape))
    return q, k, v, torch.randn(shape, device=device, dtype=dtype)


def _run_suite(cases, backends, make_inputs, measure, progress, error_prefix, log):
    """Each case's inputs once, then every backend on them: rows and details into an Outcome, a progress
    line per (case, backend)."""
    result = Outcome()
    for i, case in enumerate(cases, 1):
        inputs = make_inputs(case)
        for backend in backends:
            try:
                row, detail = measure(backend, case, inputs)
            except NotApplicable as exc:
                result.not_applicable.append(f"{backend.name} {case.label()}: {exc}")
                continue
            finally:
                torch.cuda.empty_cache()
            result.add(row, detail, f"{backend.name} {case.label()}{error_prefix}")
            log(f"[{i:>2}/{len(cases)}] {progress(case, backend, row)}"
                + (f"  FAILED {detail['error']}" if "error" in detail else ""))
        del inputs
        torch.cuda.empty_cache()
    return result


def run_training(cases, backends, *, dtype, reps, fwd_only=False, log=_log, device="cuda",
                 l2_flush="memset"):
    def progress(case, backend, row):
        return (f"{case.label():<34} {backend.name:<14} "
                f"fwd {_fmt(row['fwd_tflops'], '6.1f', 'TFLOP/s')} ({_fmt(row['fwd_extra_mib'], '+.1f', 'MiB')})  "
                f"bwd {_fmt(row['bwd_tflops'], '6.1f', 'TFLOP/s')} ({_fmt(row['bwd_extra_mib'], '+.1f', 'MiB')})")
    return _run_suite(cases, backends, lambda case: _training_inputs(case, dtype, device),
                      lambda backend, case, inputs: measure_training(backend, case, inputs, reps, fwd_only,
                                                                     l2_flush),
                      progress, " ", log)


def rotation_count(case):
    return max(1, min(MAX_ROTATION, math.ceil(ROTATE_BELOW_BYTES / case.kv_bytes)))


def measure_decode(backend, case, caches, reps, l2_flush="memset"):
    """(schema row, details) of one backend on one case; raises NotApplicable if it cannot express it."""
    row = {"backend": backend.name, **case.key(), "gbps": None}
    detail = {"backend": backend.name, **case.key(), "rotated_caches": len(caches)}
    try:
        fn = backend.decode(case)
    except NotApplicable:
        raise
    except Exception as exc:
        detail["error"] = f"setup: {_reason(exc)}"
        return row, detail
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            fn(caches[0])
            torch.cuda.synchronize()
            detail["first_call_s"] = round(time.perf_counter() - t0, 2)
            rotation = itertools.cycle(caches)
            ms = _time(lambda: fn(next(rotation)), reps, l2_flush)
        detail["ms"] = ms
        row["gbps"] = case.kv_bytes / ms / 1e6
    except Exception as exc:
        detail["error"] = _reason(exc)
    return row, detail


def run_decode(cases, backends, *, dtype, reps, log=_log, device="cuda", l2_flush="memset", page_tables=1):
    """page_tables: a paged row rotates over at least this many caches, each with its own random page table (on an
    H100 the table drawn moves a 268 MB paged row by about ±1%, session 38)."""
    gen = torch.Generator().manual_seed(0)

    def caches(case):
        torch.manual_seed(0)
        count = max(rotation_count(case), page_tables if case.paged else 1)
        return [make_decode_inputs(case, dtype, device=device, generator=gen) for _ in range(count)]

    def progress(case, backend, row):
        return f"{case.label():<26} {backend.name:<14} {_fmt(row['gbps'], '7.0f', 'GB/s')}"
    return _run_suite(cases, backends, caches,
                      lambda backend, case, inputs: measure_decode(backend, case, inputs, reps, l2_flush),
                      progress, ": ", log)
