"""torch.library custom ops for attention: forward, backward, their fake implementations and autograd.

The ops take canonical arguments (docs/INTERNALS.md) and a backend name chosen by `dispatch`, so that
torch.compile sees one opaque node per call (no graph break, no recompilation for the same shapes) and
`torch.library.opcheck` can test the registration. Backends are imported lazily: a CPU-only install never
imports a kernel module it does not use.
"""
import sys
from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from . import checks, dispatch


def _forward_impl(backend):
    if backend == "reference":
        from . import reference
        return reference.forward
    if backend == "triton":
        from .kernels.triton import forward
        return forward.forward
    if backend == "sm90":
        from .kernels import sm90
        return sm90.forward
    if backend == "sm90-checked":
        from .kernels import sm90
        return sm90.forward_checked
    if backend == "splitkv":
        from . import inference
        return inference.forward_splitkv
    raise ValueError(f"unknown forward backend {backend!r}")


def _backward_impl(backend):
    if backend == "reference":
        from . import reference
        return reference.backward
    if backend == "triton":
        from .kernels.triton import backward
        return backward.backward
    if backend == "sm90":
        from .kernels.sm90 import backward
        return backward.backward
    if backend == "sm90-checked":
        from .kernels.sm90 import backward
        return backward.backward_checked
    raise ValueError(f"unknown backward backend {backend!r}")


def _lse_shape(q, varlen):
    # batched q (B, Sq, Hq, D) -> (B, Hq, Sq); varlen q (Tq, Hq, D) -> (Hq, Tq)
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def _new_outputs(q, v, varlen):
    out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, varlen), dtype=torch.float32, device=q.device)
    return out, lse


def _run_forward(q, k, v, sink, cu_seqlens_q, cu_seqlens_k, seqused_k, page_table, max_seqlen_q, max_seqlen_k,
                 softmax_scale, window_left, window_right, softcap, backend):
    """The forward on real tensors (the body of fa4::attn_fwd and of the eager autograd path)."""
    varlen = cu_seqlens_q is not None
    # Under torch.compile the interface checked fake tensors, whose values it cannot read: the kernels would index
    # past the packed rows with a bad cu_seqlens. Read them here, on the real tensors (remembered: eager calls that
    # already passed the interface's read cost a lookup).
    checks.check_varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, page_table,
                               in_op=True)
    if q.numel() == 0:
        out, lse = _new_outputs(q, v, varlen)
        return out.zero_(), lse.fill_(float("-inf"))
    if backend == "auto" and dispatch.routed_splitkv(q, k, v, window_left=window_left, window_right=window_right,
                                                     softcap=softcap, sink=sink, cu_seqlens_q=cu_seqlens_q,
                                                     page_table=page_table, seqused_k=seqused_k):
        backend = "splitkv"  # this signature's earlier call was sent there
    if backend == "auto":  # backend=None on CUDA: decided here, on real tensors, outside any trace
        planned = dispatch.planned_sm90_forward(
            q, k, v, softmax_scale=softmax_scale, window_left=window_left, window_right=window_right,
            softcap=softcap, sink=sink, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k,
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k) if page_table is None else None
        if planned is not None:
            return planned
        backend = dispatch.resolve_auto(q, k, v, max_seqlen_q=max_seqlen_q, window_left=window_left,
                                        window_right=window_right, softcap=softcap, sink=sink,
                                        cu_seqlens_q=cu_seqlens_q, page_table=page_table, seqused_k=seqused_k)
        if backend == "sm90":  # resolve_auto has just run sm90.unsupported_reason on these tensors
            backend = "sm90-checked"
    forward = _forward_impl(backend)
    kwargs = dict(softmax_scale=softmax_scale, window_left=window_left, window_right=window_right, softcap=softcap,
                  sink=sink, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k,
                  max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, page_table=page_table)
    if torch.is_autocast_enabled(q.device.type):
        # The kernels pick their own precision; an enclosing autocast must not re-cast the reference's products.
        with torch.autocast(q.device.type, enabled=False):
            return forward(q, k, v, **kwargs)
    return forward(q, k, v, **kwargs)


def _run_backward(dout, q, k, v, out, lse, dlse, sink, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                  max_seqlen_k, softmax_scale, window_left, window_right, softcap, deterministic, backend):
    """The backward on real tensors (the body of fa4::attn_bwd and of the eager autograd path): (dq, dk, dv, dsink),
    dsink None without a sink or when the backend gave none."""
    if q.numel() == 0 or (k.numel() == 0 and sink is None):
        dsink = torch.zeros(0 if sink is None else sink.shape[0], dtype=torch.float32, device=q.device)
        return torch.zeros_like(q, memory_format=torch.contiguous_format), \
            torch.zeros_like(k, memory_format=torch.contiguous_format), \
            torch.zeros_like(v, memory_format=torch.contiguous_format), dsink
    if backend == "auto" and sink is None:
        # A signature the sm90 backward served before on its plain route: its Replay (no checks, no decisions).
        replays = sys.modules.get("fa4.kernels.sm90.backward_fast")
        grads = None if replays is None else replays.replay(
            dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
            softmax_scale, window_left, window_right, softcap, deterministic)
        if grads is not None:
            return (*grads, None)
    if backend == "auto":  # decided here, on real tensors, outside any trace
        backend = dispatch.resolve_auto_backward(q, k, v, window_left=window_left, window_right=window_right,
                                                 softcap=softcap, sink=sink, cu_seqlens_q=cu_seqlens_q,
                                                 seqused_k=seqused_k)
        if backend == "sm90":  # resolve_auto_backward has just run its unsupported_reason on these tensors
            backend = "sm90-checked"
    elif backend == dispatch.EXPLICIT_SM90:
        backend = dispatch.explicit_sm90_backward(q, k, v, window_left=window_left, window_right=window_right,
                                                  softcap=softcap, sink=sink, cu_seqlens_q=cu_seqlens_q,
                                                  seqused_k=seqused_k)
    with torch.autocast(q.device.type, enabled=False):
        dq, dk, dv, dsink = _backward_impl(backend)(
            dout, q, k, v, out, lse, dlse, softmax_scale=softmax_scale, window_left=window_left,
            window_right=window_right, softcap=softcap, sink=sink, cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, deterministic=deterministic)
    return dq, dk, dv, dsink


@torch.library.custom_op("fa4::attn_fwd", mutates_args=())
def attn_fwd(q: Tensor, k: Tensor, v: Tensor, sink: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
             cu_seqlens_k: Optional[Tensor], seqused_k: Optional[Tensor], page_table: Optional[Tensor],
             max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, window_left: int, window_right: int,
             softcap: float, backend: str, bwd_backend: str, deterministic: bool,
             lse_has_grad: bool) -> tuple[Tensor, Tensor]:
    """Attention forward -> (out, lse). bwd_backend, deterministic and lse_has_grad are for autograd."""
    return _run_forward(q, k, v, sink, cu_seqlens_q, cu_seqlens_k, seqused_k, page_table, max_seqlen_q,
                        max_seqlen_k, softmax_scale, window_left, window_right, softcap, backend)


@attn_fwd.register_fake
def _attn_fwd_fake(q, k, v, sink, cu_seqlens_q, cu_seqlens_k, seqused_k, page_table, max_seqlen_q,
                   max_seqlen_k, softmax_scale, window_left, window_right, softcap, backend, bwd_backend,
                   deterministic, lse_has_grad):
    return _new_outputs(q, v, cu_seqlens_q is not None)


@torch.library.custom_op("fa4::attn_bwd", mutates_args=())
def attn_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
             sink: Optional[Tensor], cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
             seqused_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
             window_left: int, window_right: int, softcap: float, deterministic: bool,
             backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Attention backward -> (dq, dk, dv, dsink); dsink is an empty tensor when there is no sink."""
    dq, dk, dv, dsink = _run_backward(dout, q, k, v, out, lse, dlse, sink, cu_seqlens_q, cu_seqlens_k, seqused_k,
                                      max_seqlen_q, max_seqlen_k, softmax_scale, window_left, window_right, softcap,
                                      deterministic, backend)
    if dsink is None:
        dsink = torch.zeros(0, dtype=torch.float32, device=q.device)
    return dq, dk, dv, dsink


@attn_bwd.register_fake
def _attn_bwd_fake(dout, q, k, v, out, lse, dlse, sink, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                   max_seqlen_k, softmax_scale, window_left, window_right, softcap, deterministic, backend):
    def new(t):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)
    n_sink = 0 if sink is None else sink.shape[0]
    return new(q), new(k), new(v), torch.empty(n_sink, dtype=torch.float32, device=q.device)


def _setup_context(ctx, inputs, output):
    (q, k, v, sink, cu_q, cu_k, seqused_k, page_table, max_q, max_k, scale, left, right, softcap, _backend,
     bwd_backend, deterministic, lse_has_grad) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, sink, cu_q, cu_k, seqused_k)
    ctx.options = (max_q, max_k, scale, left, right, softcap, deterministic, bwd_backend)
    ctx.lse_has_grad = lse_has_grad
    ctx.paged = page_table is not None


def _gradients(ctx, dout, dlse, run_backward):
    """The autograd backward of both host paths; run_backward is fa4::attn_bwd (the op) or _run_backward
    (the eager Function), which take the same arguments."""
    if ctx.paged:
        raise RuntimeError("fa4: gradients through a paged KV cache are not supported (inference only)")
    q, k, v, out, lse, sink, cu_q, cu_k, seqused_k = ctx.saved_tensors
    max_q, max_k, scale, left, right, softcap, deterministic, bwd_backend = ctx.options
    dlse = dlse if ctx.lse_has_grad else None
    if dout is None:  # only lse reached the loss (the eager Function does not materialise undefined gradients)
        dout = torch.zeros_like(out)
    dq, dk, dv, dsink = run_backward(dout, q, k, v, out, lse, dlse, sink, cu_q, cu_k, seqused_k, max_q, max_k,
                                     scale, left, right, softcap, deterministic, bwd_backend)
    dsink = dsink if sink is not None else None
    return dq, dk, dv, dsink, None, None, None, None, None, None, None, None, None, None, None, None, None, None


def _backward(ctx, dout, dlse):
    return _gradients(ctx, dout, dlse, attn_bwd)


attn_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# The eager path: the same forward and backward without the custom-op dispatcher
# ----------------------------------------------------------------------------------------------------------
# A torch.library custom op with registered autograd costs ~190 µs of Python per call on the dev VM (most of it
# in the dispatcher's argument handling) and 0.5-1 ms on the H100 host: more than the whole kernel of a
# 1k-token call. Outside torch.compile and on plain tensors the op buys nothing, so eager calls go through this
# autograd.Function, which runs the same _run_forward / _run_backward. The op stays what torch.compile traces
# (one opaque node, fake implementation) and what opcheck tests.

class _EagerAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        (q, k, v, sink, cu_q, cu_k, seqused_k, page_table, max_q, max_k, scale, left, right, softcap, backend,
         _bwd_backend, _deterministic, lse_has_grad) = inputs
        out, lse = _run_forward(q, k, v, sink, cu_q, cu_k, seqused_k, page_table, max_q, max_k, scale, left,
                                right, softcap, backend)
        _setup_context(ctx, inputs, (out, lse))
        if not lse_has_grad:
            ctx.mark_non_differentiable(lse)
        # An unused lse's gradient reaches backward as None, not as a zero tensor autograd fills per call.
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        with torch.no_grad():
            grads = _gradients(ctx, dout, dlse, _run_backward)
        if not torch.is_grad_enabled():
            return grads
        # create_graph=True: the gradients depend on q, k, v (and dout), but the kernels give values only. Unlike
        # torch's once_differentiable, which marks them only when dout itself requires grad (with a loss linear in
        # out a gradient penalty would silently lose its attention term), every gradient gets a node that raises if
        # anything differentiates through it.
        marked = [g.detach().requires_grad_() if isinstance(g, torch.Tensor) else g for g in grads]
        tensors = [g for g in marked if isinstance(g, torch.Tensor)]
        if not tensors:
            return grads
        raised = iter(_DelayedError(_NO_DOUBLE_BACKWARD, len(tensors))(*tensors))
        return tuple(next(raised) if isinstance(g, torch.Tensor) else g for g in marked)


_NO_DOUBLE_BACKWARD = (b"fa4 attention's gradients are not differentiable: double backward (a gradient penalty, "
                       b"second-order meta-learning) through attention is not supported")
_DelayedError = torch._C._functions.DelayedError


_len_dispatch_stack = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)
_tracing_state = getattr(torch._C, "_get_tracing_state", torch.jit.is_tracing)  # torch.jit.trace recording


def opaque_call(*tensors):
    """Whether a call must go through its custom op rather than run eagerly: under torch.compile, while
    torch.jit.trace records (the op is one node of the trace, not the kernels' host code with its sizes frozen),
    under a dispatch mode (FakeTensorMode included), or with a tensor subclass among the arguments."""
    if torch.compiler.is_compiling() or _tracing_state() or _len_dispatch_stack():
        return True
    for t in tensors:  # a plain loop: this runs on every eager decode step
        if t is not None and type(t) is not torch.Tensor and isinstance(t, torch.Tensor):
            return True
    return False


def _under_jvp(*tensors):
    """Whether a tensor is wrapped at the level of an active torch.func.jvp transform (its tangent would pass
    through attention); inputs a jvp does not reach (constants of the function) are not."""
    from torch._C import _functorch as ft
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    levels = {i.level() for i in retrieve_all_functorch_interpreters() if i.key() == ft.TransformType.Jvp}
    if not levels:
        return False
    for t in tensors:
        while t is not None and ft.is_functorch_wrapped_tensor(t):
            if ft.maybe_get_level(t) in levels:
                return True
            t = ft.get_unwrapped(t)
    return False


def _check_no_forward_ad(q, k, v, sink, backend):
    """fa4 has no forward-mode AD rule: a jvp transform, or dual tensors entering a kernel backend, would get a
    zero or missing tangent. Raise instead (FlashAttention's autograd.Function raises too). Dual tensors on the
    reference backend are fine: its torch ops carry the tangents."""
    if _functorch_active():
        if _under_jvp(q, k, v, sink):
            raise RuntimeError("fa4 attention has no forward-mode AD rule: torch.func.jvp (and jacfwd, hessian) "
                               "cannot pass through it; use reverse mode (backward, torch.func.grad, vjp)")
    elif getattr(_forward_ad, "_current_level", -1) >= 0 and backend != "reference":
        if any(t is not None and _forward_ad.unpack_dual(t).tangent is not None for t in (q, k, v, sink)):
            raise RuntimeError("fa4 attention has no forward-mode AD rule: dual tensors (torch.autograd."
                               "forward_ad) cannot pass through its kernels; use reverse mode, or "
                               "backend='reference'")


class _FunctorchAttention(torch.autograd.Function):
    """fa4::attn_fwd with its backward as an autograd.Function in the functorch form (a ctx-free forward and
    setup_context), for torch.func.grad / vjp: torch 2.13's autograd for a custom op (register_autograd) refuses
    functorch's grad transform, while an autograd.Function with setup_context is supported. Under vmap as well
    (per-sample gradients), functorch runs forward and backward on batched tensors (generate_vmap_rule), which
    reach the custom ops' own vmap handling."""
    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs):
        return attn_fwd(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)
        if not inputs[-1]:  # lse_has_grad
            ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, dout, dlse):
        # No graph of the gradients (fa4 has no double backward): without no_grad attn_bwd's own autograd wrapper
        # would run, which the grad transform refuses as it refuses attn_fwd's.
        with torch.no_grad():
            return _gradients(ctx, dout, dlse, attn_bwd)


def _under_grad_only():
    """Whether a reverse-mode transform (torch.func.grad, vjp) is active, with vmaps around or inside it at most:
    vmap alone and jvp keep the custom op (its own rules, and the jvp error above)."""
    from torch._C import _functorch as ft
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    keys = [i.key() for i in retrieve_all_functorch_interpreters()]
    grads = sum(key == ft.TransformType.Grad for key in keys)
    if not grads or any(key not in (ft.TransformType.Grad, ft.TransformType.Vmap) for key in keys):
        return False
    if grads > 1:
        # grad of grad: the inner backward's gradients would reach the outer transform as constants (a silently
        # wrong second derivative), as they would in a double backward.
        raise RuntimeError(_NO_DOUBLE_BACKWARD.decode())
    return True


def attention(q, k, v, sink, cu_seqlens_q, cu_seqlens_k, seqused_k, page_table, max_seqlen_q, max_seqlen_k,
              softmax_scale, window_left, window_right, softcap, backend, bwd_backend, deterministic,
              lse_has_grad):
    """(out, lse): fa4::attn_fwd under torch.compile, tensor subclasses (fake, DTensor), dispatch modes or
    functorch transforms; the eager autograd.Function otherwise. Both run the same kernels."""
    if not torch.compiler.is_compiling():
        _check_no_forward_ad(q, k, v, sink, backend)
    args = (q, k, v, sink, cu_seqlens_q, cu_seqlens_k, seqused_k, page_table, max_seqlen_q, max_seqlen_k,
            softmax_scale, window_left, window_right, softcap, backend, bwd_backend, deterministic, lse_has_grad)
    if not torch.compiler.is_compiling() and _functorch_active() and _under_grad_only():
        return _FunctorchAttention.apply(*args)
    if _functorch_active() or opaque_call(q, k, v, sink, cu_seqlens_q, cu_seqlens_k, seqused_k, page_table):
        return attn_fwd(*args)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or (sink is not None and sink.requires_grad)):
        return _EagerAttention.apply(*args)
    return _run_forward(*args[:15])
