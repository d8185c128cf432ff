"""Launching a compiled Triton kernel without JITFunction.run, for host paths that must cost a few µs.

`kernel[grid](...)` (JITFunction.run) binds every argument, specialises each one, builds a cache key and looks
the compiled kernel up on every call: tens of µs of Python per launch, more than a decode step or a short
attention call takes on the GPU. The helpers here launch a kernel that JITFunction compiled once, with the
same argument list, straight through its CompiledKernel launcher. Used by the decode path (fa4.inference)
and the Hopper forward's FAST plans (fa4.kernels.sm90.launch).
"""
import inspect

import torch


try:  # the raw handle of a device's current stream, as Triton's own launch path reads it
    from torch._C import _cuda_getCurrentRawStream as raw_stream
except ImportError:  # pragma: no cover
    def raw_stream(index):
        return torch.cuda.current_stream(index).cuda_stream

try:
    from torch._C import _cuda_getDevice as current_device
except ImportError:  # pragma: no cover
    def current_device():
        return torch.cuda.current_device()

try:
    from triton import knobs as _knobs
    from triton.compiler.compiler import CompiledKernel as _CompiledKernel
except ImportError:  # pragma: no cover - another Triton: always launch through JITFunction
    _knobs, _CompiledKernel = None, ()


def hooks_idle():
    """No launch hook is installed (a profiler such as proton adds one; it needs Triton's own launch path)."""
    if _knobs is None:
        return False
    rt = _knobs.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def param_names(fn):
    names = getattr(fn, "arg_names", None)
    if names is None:  # the interpreter's wrapper
        names = list(inspect.signature(getattr(fn, "fn", fn)).parameters)
    return list(names)


class Launch:
    """One kernel launch whose arguments, except the first `n_head` (pointers and per-call ints), are fixed.

    `kernel[grid](...)` (JITFunction.run) binds ~60 arguments, specialises each one, builds a cache key and looks
    the compiled kernel up on every call: tens of µs of Python, more than a decode step takes on the GPU. A Launch
    is built for one call signature (fa4.inference caches it by the arguments' dtypes, devices, shapes, strides
    and Python values), so its tail and Triton's specialisation of it are fixed. The first launch goes through
    JITFunction and keeps the CompiledKernel it returns; later ones call its launcher directly with the head's
    raw pointers. That is exact only while the pointers keep the alignment the kernel was specialised for (16
    bytes; Step checks every call) and the per-call ints are not specialised (do_not_specialize).
    """
    __slots__ = ("fn", "n_head", "grid", "tail", "tail_all", "constexprs", "num_warps", "num_stages", "options",
                 "compiled", "cluster")

    def __init__(self, fn, n_head, grid, tail, constexprs, num_warps, num_stages, launch_pdl=False, cluster=1):
        # The compiled launcher takes all three grid dimensions; JITFunction accepts 1-D and 2-D grids.
        grid = tuple(grid) + (1,) * (3 - len(grid))
        self.fn, self.n_head, self.grid, self.tail, self.constexprs = fn, n_head, grid, tuple(tail), constexprs
        self.num_warps, self.num_stages = num_warps, num_stages
        # Programmatic dependent launch (sm_90+): the kernel may start while the previous one in the stream is still
        # running, and waits for it with griddepcontrol.wait before touching its results. Part of the compiled
        # kernel's metadata, so the fast path launches it the same way. Passed only when on: the interpreter and
        # older Tritons do not know the option.
        self.options = dict(launch_pdl=True) if launch_pdl else {}
        # Thread-block clusters of `cluster` consecutive CTAs along grid axis 0 (sm_90+; grid[0] a multiple of it).
        # Triton's launcher sets the cluster dimension from the launch metadata's num_ctas and multiplies axis 0 by
        # it; a kernel compiled with num_ctas = 1 keeps its own program ids, so the kernel is compiled as usual and
        # launched with (num_warps, cluster, shared) as its metadata (see with_cluster).
        self.cluster = cluster
        if cluster > 1 and grid[0] % cluster:
            raise RuntimeError(f"grid axis 0 ({grid[0]}) is not a multiple of the cluster size {cluster}")
        names = param_names(fn)[n_head:]
        if len(names) != len(self.tail) + len(constexprs):
            raise RuntimeError(f"{names[0]}...: {len(names)} parameters after the head, got {len(self.tail)} values "
                               f"and {len(constexprs)} constexprs")
        # The compiled launcher takes every parameter in signature order, constexprs included (values ignored).
        values = dict(zip(names, self.tail))
        values.update(constexprs)
        self.tail_all = tuple(values[name] for name in names)
        self.compiled = None

    def args(self, head):
        """All positional arguments of a JITFunction launch (constexprs go by keyword: self.constexprs)."""
        return (*head, *self.tail)

    def jit(self, head, keep):
        """Launch through JITFunction (head holds tensors); keep the compiled kernel when `keep`."""
        if self.cluster > 1:
            ret = self._jit_cluster(head)
        else:
            ret = self.fn[self.grid](*head, *self.tail, **self.constexprs, num_warps=self.num_warps,
                                     num_stages=self.num_stages, **self.options)
        if keep and self.compiled is None and isinstance(ret, _CompiledKernel):
            self.compiled = (ret.run, ret.function, self.with_cluster(ret.packed_metadata))

    def _jit_cluster(self, head):
        """JITFunction compiles (warmup: binding, specialisation and the cache as for any launch) and the
        compiled kernel is launched in clusters; launch hooks are not called for it."""
        ret = self.fn.warmup(*head, *self.tail, grid=self.grid, **self.constexprs, num_warps=self.num_warps,
                             num_stages=self.num_stages, **self.options)
        if hasattr(ret, "result"):
            ret = ret.result()
        index = current_device()
        grid = self.grid
        ret.run(grid[0] // self.cluster, grid[1], grid[2], raw_stream(index), ret.function,
                self.with_cluster(ret.packed_metadata), None, None, None, *head, *self.tail_all)
        return ret

    def with_cluster(self, metadata):
        """The launch metadata (num_warps, num_ctas, shared) with num_ctas = the cluster size."""
        if self.cluster == 1:
            return metadata
        num_warps, num_ctas, shared = metadata
        if num_ctas != 1:
            raise RuntimeError(f"a kernel compiled with num_ctas = {num_ctas} cannot be launched in clusters")
        return (num_warps, self.cluster, shared)

    def fast(self, head, stream):
        """Launch the kept kernel on `stream` (head holds raw pointers / None and the per-call ints)."""
        run, function, metadata = self.compiled
        grid = self.grid
        run(grid[0] // self.cluster, grid[1], grid[2], stream, function, metadata, None, None, None, *head,
            *self.tail_all)
