"""Releasing a shared-memory slot right after a wgmma wait, without a warpgroup barrier in front of the arrive.

Gluon 3.6 lowers `mbarrier.arrive` to an arrive by the partition's thread 0 and puts a `bar.sync <id>, 128` of the
whole warpgroup in front of it, so that every thread's earlier shared-memory accesses are ordered before the one
arrive that speaks for them. Where the only access the arrive announces is a wgmma operand read, that barrier is
not needed: the wgmma is one operation of the warpgroup, complete (its operands read) once any of its warps' wgmma
wait returned, so thread 0 may arrive as soon as its own wait returned. CUTLASS's Hopper pipelines and
FlashAttention-4 release their K / V stages that way (one elected thread, no warpgroup barrier).

`release_after_wait(bar, NOSYNC)` marks such an arrive: with NOSYNC the arrive sits on a line of this file that
`strip_arrive_syncs` recognises in the PTX (by its `.loc`), and the compile-stage hook installed by
`install_hook` removes the `bar.sync` right in front of it. Kernels compiled without the hook keep the barrier
(correct, slower); the kernel's NOSYNC constexpr keeps the two builds apart in Triton's cache.

Never use it after the warpgroup's own shared-memory stores (dS, O staging): those need the barrier.
"""
import re

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier


@gluon.jit
def release_after_wait(bar, NOSYNC: gl.constexpr):
    """mbarrier.arrive(bar) after this warpgroup's wgmma reading the slot has been waited for."""
    if NOSYNC:
        mbarrier.arrive(bar)  # fa4: arrive without warpgroup barrier
    else:
        mbarrier.arrive(bar)


_MARK = "# fa4: arrive without warpgroup barrier"


def _marked_lines():
    with open(__file__, encoding="utf-8") as f:
        return {i + 1 for i, line in enumerate(f) if line.rstrip().endswith(_MARK) and "mbarrier.arrive" in line}


_LINES = _marked_lines()
# `.loc F L C` (this file, a marked line), then the warpgroup barrier, at most a few integer moves and adds (the
# barrier's address), then the lowered arrive.
_SYNC_BEFORE_ARRIVE = re.compile(
    r"(?P<loc>[ \t]*\.loc[ \t]+(?P<file>\d+)[ \t]+(?P<line>\d+)[ \t]+\d+[^\n]*\n)"
    r"[ \t]*bar\.sync[ \t]+\d+,[ \t]*128;\n"
    r"(?P<arrive>(?:[ \t]*(?:add\.s32|mov\.b32|mov\.u32)[ \t]+%r\d+,[^;\n]*;\n){0,3}"
    r"[ \t]*// begin inline asm\n[ \t]*@%p\d+ mbarrier\.arrive\.shared::cta\.b64 _, \[%r\d+\];)")


def strip_arrive_syncs(ptx):
    """ptx without the warpgroup `bar.sync` in front of each arrive on a marked line of this file; and how many."""
    files = {m.group(1) for m in re.finditer(r'^\s*\.file\s+(\d+)\s+"([^"]*)"', ptx, re.M)
             if m.group(2).endswith("fa4/kernels/sm90/arrive.py")}
    if not files:
        return ptx, 0
    count = 0

    def drop(m):
        nonlocal count
        if m.group("file") in files and int(m.group("line")) in _LINES:
            count += 1
            return m.group("loc") + m.group("arrive")
        return m.group(0)

    return _SYNC_BEFORE_ARRIVE.sub(drop, ptx), count


STRIPPED = []  # (kernel name, count) of every compile the hook rewrote (tests, probes)


def _hook(backend, stages, options, language, capability):
    make_ptx = stages.get("ptx")
    if make_ptx is None:
        return

    def ptx_stage(src, metadata):
        ptx, count = strip_arrive_syncs(make_ptx(src, metadata))
        if count:
            STRIPPED.append((metadata.get("name"), count))
        return ptx

    stages["ptx"] = ptx_stage


def install_hook():
    """Chain the PTX rewrite onto Triton's compile-stage hook (once); a hook set before stays in the chain."""
    from triton import knobs
    prev = knobs.runtime.add_stages_inspection_hook
    if getattr(prev, "_fa4_arrive", False):
        return

    def chained(backend, stages, options, language, capability):
        if prev is not None:
            prev(backend, stages, options, language, capability)
        _hook(backend, stages, options, language, capability)

    chained._fa4_arrive = True
    knobs.runtime.add_stages_inspection_hook = chained


install_hook()
