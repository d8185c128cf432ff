"""The Hopper (sm_90a) forward in Gluon: `forward` with the backend signature of docs/INTERNALS.md, and
`unsupported_reason`, which says why a request cannot be served here (None when it can).

Importing this package never compiles anything; the Gluon modules load on the first call, so an
incompatible Triton shows up as a reason, not as an import error of fa4.
"""
import functools
import os

import torch

from . import configs

# Gluon's API changes every release; the kernel is enabled only where it was compiled and checked.
TESTED_TRITON = ("3.6.0", )
# FA4_SM90=0 disables the path, FA4_SM90=1 enables it, unset means ENABLED_BY_DEFAULT. On by default since
# H100 run r1 (2026-11-25): tests/gpu/test_sm90_forward.py 60/60 and faster than the portable Triton forward
# on every training-suite row.
ENABLED_BY_DEFAULT = True


@functools.lru_cache(maxsize=None)
def _triton_reason():
    """Constant per process (the Triton version and the Gluon import): computed once."""
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    if triton.__version__ not in TESTED_TRITON:
        return f"triton version {triton.__version__} not tested (tested: {', '.join(TESTED_TRITON)})"
    try:
        from . import attention_fwd  # noqa: F401  (import-time Gluon API check)
    except Exception as exc:  # an API drift in Gluon: fall back rather than fail
        return f"Gluon kernel failed to import ({type(exc).__name__}: {exc})"
    return None


@functools.lru_cache(maxsize=None)
def _capability(index):
    return torch.cuda.get_device_capability(index)


def _tma_reason(name, t):
    """TMA reads a tensor through a descriptor: 16-byte aligned base and strides, unit last stride."""
    if t.stride(-1) != 1:
        return f"{name} has last-dim stride {t.stride(-1)} (TMA needs 1)"
    elem = t.element_size()
    if t.data_ptr() % 16:
        return f"{name} is not 16-byte aligned"
    for s in t.stride()[:-1]:
        if (s * elem) % 16:
            return f"{name} has a stride of {s * elem} bytes (TMA needs multiples of 16)"
    if any(dim >= 2**31 for dim in t.shape):
        return f"{name} has a dimension of 2^31 or more"
    return None


def common_reason(q, k, v, *, sink=None, cu_seqlens_q=None, page_table=None):
    """The requirements the sm90 forward and backward share: None if they hold, else a short reason."""
    if q.device.type != "cuda":
        return "not a CUDA tensor"
    major, minor = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if (major, minor) != (9, 0):
        return f"not sm_90 (compute capability {major}.{minor})"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} (the sm90 kernels take bf16 and fp16)"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return "q, k, v dtypes differ"
    if page_table is not None:
        return "paged KV cache is not supported by the sm90 kernels"
    d, dv = q.shape[-1], v.shape[-1]
    if d % 8 or dv % 8 or d > 256 or dv > 256:
        return f"head dims ({d}, {dv}) (the sm90 kernels take multiples of 8 up to 256)"
    seq_dim = 0 if cu_seqlens_q is not None else 1
    if q.shape[seq_dim] == 0 or k.shape[seq_dim] == 0:
        return "empty sequence"
    if sink is not None and sink.dtype != torch.float32:
        return "sink must be fp32"
    for name, t in (("q", q), ("k", k), ("v", v)):
        reason = _tma_reason(name, t)
        if reason is not None:
            return reason
    return _triton_reason()


def unsupported_reason(q, k, v, *, window_left=-1, window_right=-1, softcap=0.0, sink=None, cu_seqlens_q=None,
                       page_table=None, seqused_k=None, **_):
    """None if the sm90 forward serves the request, else a short reason (logged at debug level by dispatch)."""
    switch = os.environ.get("FA4_SM90")
    if switch == "0":
        return "the sm90 path is off (FA4_SM90=0)"
    if switch is None and not ENABLED_BY_DEFAULT:
        return "the sm90 path is off (FA4_SM90=1 enables it)"
    reason = common_reason(q, k, v, sink=sink, cu_seqlens_q=cu_seqlens_q)
    if reason is not None:
        return reason
    d, dv = q.shape[-1], v.shape[-1]
    cfg = configs.get_config(configs.tile_dim(d), configs.tile_dim(dv))
    if cfg is None:
        return f"no sm90 tile for head dims ({d}, {dv})"
    if page_table is not None:
        reason = _paged_reason(k, v, cu_seqlens_q, seqused_k, page_table, cfg.block_n)
        if reason is not None:
            return reason
    if q.shape[-2] * q.shape[0] * (1 if cu_seqlens_q is not None else q.shape[1]) >= 2**31:
        return "lse would have 2^31 elements or more"
    return None


def _paged_reason(k, v, cu_seqlens_q, seqused_k, page_table, block_n):
    """Why the forward cannot read this paged cache (None if it can): it loads whole key blocks of one page by
    TMA from the pool viewed as one run of rows, so pages must hold whole blocks and the pool must be that view."""
    page_size = k.shape[1]
    if cu_seqlens_q is None or seqused_k is None:
        return "paged KV cache without packed queries and seqused_k"
    if page_size % block_n:
        return f"page size {page_size} is not a multiple of the {block_n}-key block"
    for name, t in (("k", k), ("v", v)):
        if t.stride(0) != t.shape[1] * t.stride(1):
            return f"{name}'s pages are not one run of rows (stride {t.stride(0)})"
    if k.shape[0] * page_size >= 2**31:
        return "the page pool has 2^31 rows or more"
    if page_table.stride(-1) != 1:
        return "page_table's last dimension is not contiguous"
    return None


def forward(q, k, v, *, softmax_scale, window_left=-1, window_right=-1, softcap=0.0, sink=None,
            cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, max_seqlen_q=None, max_seqlen_k=None,
            page_table=None, variant=None):
    """(out, lse) per docs/INTERNALS.md. `variant` (tests and benchmarks only) overrides kernel switches
    (LAZY, POLY, SCHED, STAGGER, TAIL, TRACE), the host launch path (FAST) and tile fields (block_n, num_wg,
    stages, consumer_regs, pingpong or PINGPONG, q_buffers); see attention_fwd.DEFAULT_VARIANT and
    configs.TileConfig."""
    reason = unsupported_reason(q, k, v, window_left=window_left, window_right=window_right, softcap=softcap,
                                sink=sink, cu_seqlens_q=cu_seqlens_q, page_table=page_table, seqused_k=seqused_k)
    if reason is not None:
        raise ValueError(f"the sm90 kernel cannot serve this call: {reason}")
    return forward_checked(q, k, v, softmax_scale=softmax_scale, window_left=window_left,
                           window_right=window_right, softcap=softcap, sink=sink, cu_seqlens_q=cu_seqlens_q,
                           cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k, max_seqlen_q=max_seqlen_q,
                           max_seqlen_k=max_seqlen_k, page_table=page_table, variant=variant)


def forward_checked(q, k, v, *, softmax_scale, window_left=-1, window_right=-1, softcap=0.0, sink=None,
                    cu_seqlens_q=None, cu_seqlens_k=None, seqused_k=None, max_seqlen_q=None, max_seqlen_k=None,
                    page_table=None, variant=None):
    """`forward` for a caller that has just had unsupported_reason return None for these tensors (dispatch's
    resolve_auto): the same launch without checking twice."""
    from .attention_fwd import attention_forward
    return attention_forward(q, k, v, softmax_scale=softmax_scale, window_left=window_left,
                             window_right=window_right, softcap=softcap, sink=sink, cu_seqlens_q=cu_seqlens_q,
                             cu_seqlens_k=cu_seqlens_k, seqused_k=seqused_k, max_seqlen_q=max_seqlen_q,
                             max_seqlen_k=max_seqlen_k, variant=variant, page_table=page_table)
