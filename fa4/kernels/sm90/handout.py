"""Work units handed out from a global counter, for the persistent Hopper kernels (the keys-as-rows backward's
tiles, the forward's DYNAMIC units).

The loader warp draws each unit with one atomic add and publishes it in a two-slot ring in shared memory; every
consumer warpgroup reads it from there. A slot is reused only after all consumers have read it (free barrier:
one arrival a consumer), and the draw past the last unit, published like any other, ends every partition's loop.
Dynamic rather than a static stride: units of unequal cost (causal tiles, packed sequences of mixed lengths)
would otherwise leave SMs idle behind the longest ones (benchmarks/NOTES.md).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier
from triton.language.core import _aggregate as aggregate


@aggregate
class TileHandout:
    """The two-slot ring: ids (the drawn unit indices), ready (1 arrival, the loader's), free (one a consumer)."""
    ids: gl.shared_memory_descriptor    # [2, 1] int32
    ready: gl.shared_memory_descriptor  # [2, 1] mbarriers
    free: gl.shared_memory_descriptor   # [2, 1] mbarriers

    @gluon.constexpr_function
    def __init__(self, ids, ready, free):
        self.ids = ids
        self.ready = ready
        self.free = free


@gluon.jit
def new_handout(consumers: gl.constexpr):
    """The ring's shared memory and barriers, initialised for `consumers` reading warpgroups."""
    ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(free.index(i), count=consumers)
    ids = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
    return TileHandout(ids, ready, free)


@gluon.jit
def draw(counter, units, fcount):
    """Loader (one warp): the CTA's fcount-th unit from the global int32 counter, published in slot fcount % 2 once
    the consumers have read that slot's previous unit (a fresh barrier passes parity 1)."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    slot = fcount % 2
    mbarrier.wait(units.free.index(slot), ((fcount // 2) & 1) ^ 1)
    t = gl.atomic_add(counter + gl.zeros([1], gl.int32, layout), gl.full([1], 1, gl.int32, layout))
    units.ids.index(slot).store(t)
    mbarrier.arrive(units.ready.index(slot))
    return gl.max(t, axis=0)


@gluon.jit
def take(units, fcount, WARPS: gl.constexpr = 4):
    """Consumer (a warpgroup, or WARPS warps): the CTA's fcount-th unit, read from its slot, which is then handed
    back."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    slot = fcount % 2
    mbarrier.wait(units.ready.index(slot), (fcount // 2) & 1)
    t = gl.max(units.ids.index(slot).load(layout), axis=0)
    mbarrier.arrive(units.free.index(slot))
    return t
