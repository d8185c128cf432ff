"""A host launch path for the Hopper forward that skips Triton's per-call binding (the FAST variant).

`attn_fwd_kernel[grid](...)` (JITFunction.run) builds four TMA descriptors and their shared layouts, binds and
specialises ~50 arguments, stringifies the options for its cache key and looks the kernel up on every call:
about 100 µs of Python on the dev VM, where the whole call's kernel at S = 1024 takes ~250 µs on the GPU.
A `Plan` is built from one call's arguments (attention_fwd.launch_plan) and the CompiledKernel its JIT launch
returned; later calls with the same signature copy the argument list, put in their own tensors (descriptor
templates get a new base) and call the compiled launcher directly.

Exact as long as everything Triton specialises on is in the signature: shapes, strides, dtypes, the scalar
arguments, the variant, and the 16-byte alignment of the optional pointers (q, k, v are checked aligned by
unsupported_reason; out and lse come fresh from the caching allocator). A launch hook (profilers) sends every
call back through JITFunction.
"""
import copy
import os

from triton.runtime import driver

from fa4.kernels.direct_launch import hooks_idle

_MAX_PLANS = 64
_PLANS = {}


def enabled(variant_fast):
    """The FAST switch: the variant's value, or when it is None on unless FA4_SM90_FAST=0."""
    if variant_fast is None:
        return os.environ.get("FA4_SM90_FAST") != "0"
    return bool(variant_fast)


def _aligned(t):
    return None if t is None else t.data_ptr() % 16 == 0


def signature(q, k, v, *, softmax_scale, window_left, window_right, softcap, sink, cu_seqlens_q, cu_seqlens_k,
              seqused_k, max_seqlen_q, variant, page_table=None):
    """Everything besides the tensors' addresses that decides the launch arguments and the compiled kernel.
    A paged call's page table is a kernel argument (in cu_k's slot) whose row stride is baked into the plan."""
    var = tuple(sorted((key, val) for key, val in (variant or {}).items() if key != "FAST"))
    paged = None if page_table is None else (tuple(page_table.shape), page_table.stride(), _aligned(page_table))
    return (q.device.index, q.dtype, k.dtype, v.dtype, None if sink is None else sink.dtype,
            tuple(q.shape), q.stride(), tuple(k.shape), k.stride(), tuple(v.shape),
            v.stride(), float(softmax_scale), int(window_left), int(window_right), float(softcap),
            None if cu_seqlens_q is None else (cu_seqlens_q.numel(), int(max_seqlen_q)),
            _aligned(sink), _aligned(cu_seqlens_q), _aligned(cu_seqlens_k), _aligned(seqused_k), var, paged)


class Plan:
    """The launch of one signature: argument template in kernel-parameter order and the compiled kernel.

    `descs` names the TMA-descriptor parameters and the tensor each is built over, `tensors` the plain tensor
    parameters and their source; the defaults are the forward kernel's (attention_fwd.attn_fwd_kernel), the
    backward passes its own (backward.BWD_DESCS / BWD_TENSORS). `grid`: an int or a tuple of up to 3."""
    __slots__ = ("grid", "values", "desc_slots", "tensor_slots", "run", "function", "metadata", "dynamic", "raw")

    # The forward's parameters filled per call: descriptors (over which tensor) and plain tensor pointers.
    FWD_DESCS = (("q_desc", "q"), ("k_desc", "k"), ("v_desc", "v"), ("o_desc", "out"))
    FWD_TENSORS = (("o_ptr", "out"), ("lse_ptr", "lse"), ("sink_ptr", "sink"), ("cu_q", "cu_q"),
                   ("cu_k", "cu_k"), ("seqused", "seqused"), ("trace_ptr", "dummy"), ("sched_ptr", "sched"))

    def __init__(self, arg_names, args, constexprs, grid, compiled=None, descs=FWD_DESCS, tensors=FWD_TENSORS):
        # The forward's DYNAMIC units need a fresh counter (and a packed call's sequence order) a call.
        self.dynamic = bool(constexprs.get("DYNAMIC", False))
        values = dict(args)
        values.update(constexprs)
        index = {name: i for i, name in enumerate(arg_names)}
        self.desc_slots = tuple((index[name], src) for name, src in descs)
        self.tensor_slots = tuple((index[name], src) for name, src in tensors)
        self.values = [values[name] for name in arg_names]
        # The template keeps no tensor of the call it was built from (it would hold that call's memory).
        for i, _ in self.desc_slots:
            self.values[i] = copy.copy(self.values[i])
            self.values[i].base = None
        for i, _ in self.tensor_slots:
            self.values[i] = None
        grid = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
        self.grid = grid + (1,) * (3 - len(grid))
        self.run = self.function = self.metadata = self.raw = None
        if compiled is not None:
            self.run, self.function, self.metadata = compiled.run, compiled.function, compiled.packed_metadata
            self.raw = RawLaunch.of(self) if self.desc_slots else None

    def arguments(self, q, k, v, out, lse, sink, cu_q, cu_k, seqused, dummy, sched=None):
        """The forward's full argument list (constexprs included) for these tensors."""
        return self.bind(self.sources(q, k, v, out, lse, sink, cu_q, cu_k, seqused, dummy, sched))

    @staticmethod
    def sources(q, k, v, out, lse, sink, cu_q, cu_k, seqused, dummy, sched=None):
        """The forward's per-call tensors by source name (for bind or launch_tensors)."""
        return dict(q=q, k=k, v=v, out=out, lse=lse, sink=sink if sink is not None else lse,
                    cu_q=cu_q if cu_q is not None else dummy, cu_k=cu_k if cu_q is not None else dummy,
                    seqused=seqused if seqused is not None else dummy, dummy=dummy,
                    sched=sched if sched is not None else dummy)

    def bind(self, tensors):
        """The full argument list with the per-call tensors (by source name) put in."""
        vals = list(self.values)
        for i, src in self.desc_slots:
            # A shallow clone of the template with a new base (copy.copy costs ~2 µs a descriptor; the
            # dataclass constructor re-validates what the signature already fixes).
            template = vals[i]
            desc = object.__new__(type(template))
            desc.__dict__ = dict(template.__dict__, base=tensors[src])
            vals[i] = desc
        for i, src in self.tensor_slots:
            vals[i] = tensors[src]
        return vals

    def launch(self, device_index, vals):
        stream = driver.active.get_current_stream(device_index)
        g0, g1, g2 = self.grid
        self.run(g0, g1, g2, stream, self.function, self.metadata, None, None, None, *vals)

    def launch_tensors(self, device_index, tensors):
        """launch(device_index, bind(tensors)), through RawLaunch where it serves (the descriptors' encoded
        tensor maps kept per base address)."""
        if self.raw is not None:
            self.raw.launch(device_index, tensors)
        else:
            self.launch(device_index, self.bind(tensors))


class RawLaunch:
    """A Plan's launch straight into Triton's C launcher, with each TMA descriptor's encoded tensor map kept per
    base address.

    Triton 3.6 wraps the C launcher of a kernel with host descriptors in a Python loop that re-encodes every
    descriptor (cuTensorMapEncodeTiled) on every call: ~50 µs of the backward's host path on the H100 machine for
    nine descriptors (benchmarks/bwd_host_probe.py, session 25). A plan's descriptors differ between calls only in
    their base address (shape, strides, box, swizzle and dtype are in the signature), and the caching allocator
    hands a training loop the same addresses step after step, so the maps are kept per (parameter, address).
    Built only where the wrapper has the 3.6 shape this reads (its closure's launcher and descriptor metadata, no
    scratch buffers); otherwise the plan launches as before."""
    __slots__ = ("c_launch", "fill", "function", "metadata", "grid", "flags", "template", "desc_at", "tensor_at",
                 "maps")
    _MAX_MAPS = 16  # per descriptor parameter: more distinct addresses than a training loop's buffers

    @classmethod
    def of(cls, plan):
        try:
            wrapper = plan.run.launch
            cells = dict(zip(wrapper.__code__.co_freevars, (c.cell_contents for c in wrapper.__closure__)))
            c_launch, desc_idx, meta = cells["launcher"], cells["tensordesc_indices"], cells["tensordesc_meta"]
            fill = driver.active.utils.fill_tma_descriptor
            from triton.backends.nvidia.driver import TMA_DTYPE_DEVICE_TO_HOST
        except (AttributeError, KeyError, TypeError, ImportError):
            return None
        if (plan.run.global_scratch_size or plan.run.profile_scratch_size or getattr(plan.run, "num_ctas", 1) != 1
                or any(m is None or m.get("fp4_padded") for m in meta)
                or sorted(desc_idx) != sorted(i for i, _ in plan.desc_slots)):
            return None
        self = cls()
        self.c_launch, self.fill, self.function, self.metadata = c_launch, fill, plan.function, plan.metadata
        self.grid = plan.grid
        self.flags = (plan.run.launch_cooperative_grid, plan.run.launch_pdl)
        # The C launcher's arguments: each descriptor parameter expands to (tensor map, *shape, *strides).
        order = {i: n for n, i in enumerate(sorted(desc_idx))}
        template, self.desc_at, self.tensor_at, self.maps = [], [], [], []
        sources = dict(plan.desc_slots)
        tensor_src = dict(plan.tensor_slots)
        for i, val in enumerate(plan.values):
            if i in sources:
                m = meta[order[i]]
                shape, strides = list(val.shape), list(val.strides)
                encode = (m["swizzle"], m["elem_size"], TMA_DTYPE_DEVICE_TO_HOST[m["elem_type"]], m["block_size"],
                          shape, strides, 1 if val.padding == "nan" else 0)
                self.desc_at.append((len(template), sources[i], encode))
                self.maps.append({})
                template.extend([None, *shape, *strides])
            else:
                if i in tensor_src:
                    self.tensor_at.append((len(template), tensor_src[i]))
                template.append(val)
        self.template = template
        return self

    def launch(self, device_index, tensors):
        """tensors: by source name, tensors or raw device addresses (ints; the C launcher takes both)."""
        args = list(self.template)
        for (at, src, encode), maps in zip(self.desc_at, self.maps):
            base = tensors[src]
            ptr = base if isinstance(base, int) else base.data_ptr()
            tmap = maps.get(ptr)
            if tmap is None:
                if len(maps) >= self._MAX_MAPS:
                    maps.clear()
                swizzle, elem_size, elem_type, block, shape, strides, padding = encode
                tmap = maps[ptr] = self.fill(ptr, swizzle, elem_size, elem_type, block, shape, strides, padding)
            args[at] = tmap
        for at, src in self.tensor_at:
            args[at] = tensors[src]
        stream = driver.active.get_current_stream(device_index)
        g0, g1, g2 = self.grid
        self.c_launch(g0, g1, g2, stream, self.function, *self.flags, None, None, self.metadata, None, None, None,
                      *args)


def usable():
    """False while a launch hook is installed (the JIT path calls it; this one would not).

    (Triton 3.6 keeps each hook as a HookChain object that is never None: an empty chain is idle.)"""
    return hooks_idle()


def lookup(key):
    return _PLANS.get(key)


def store(key, plan):
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = plan
