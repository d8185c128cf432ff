"""Which backend serves a request.

Backends: "reference" (eager PyTorch, any device, every feature), "triton" (portable kernels, CUDA compute
capability >= 8.0, or the CPU under TRITON_INTERPRET=1), "sm90" (Gluon forward for Hopper; its backward is the
Triton one). backend=None picks the fastest that can serve the request and says why at debug level on the
"fa4" logger; an explicitly requested backend that cannot serve raises a ValueError with the reason.
"""
import logging
import os

import torch

logger = logging.getLogger("fa4")


@torch.compiler.assume_constant_result
def _triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@torch.compiler.assume_constant_result
def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result
def _capability_reason(index):
    """None if CUDA device `index` can run Triton's tensor-core kernels (compute capability >= 8.0)."""
    major, minor = torch.cuda.get_device_capability(index)
    return None if major >= 8 else f"compute capability {major}.{minor} < 8.0"


def _triton_reason(q):
    """None if the portable Triton kernels can run on q's device, else why not."""
    if not _triton_available():
        return "triton is not installed"
    if q.device.type == "cpu":
        return None if _interpreting() else "CPU tensors need TRITON_INTERPRET=1 for the Triton backend"
    if q.device.type != "cuda":
        return f"device {q.device.type} is not supported by the Triton kernels"
    return _capability_reason(q.device.index if q.device.index is not None else torch.cuda.current_device())


def _sm90_reason(q, k, v, **features):
    if q.device.type != "cuda":
        return "the sm90 backend needs a CUDA device"
    try:
        from .kernels import sm90
    except Exception as exc:  # a Gluon import failure on an untested Triton must not break fa4
        return f"the sm90 kernels failed to import ({type(exc).__name__}: {exc})"
    return sm90.unsupported_reason(q, k, v, **features)


def _note(msg):
    if not torch.compiler.is_compiling():
        logger.debug(msg)


def choose(q, k, v, backend, **features):
    """Returns (forward_backend, backward_backend) names for this request."""
    if backend == "reference":
        return "reference", "reference"
    if backend == "triton":
        reason = _triton_reason(q)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot serve this call: {reason}")
        return "triton", "triton"
    if backend == "sm90":
        reason = _sm90_reason(q, k, v, **features) or _triton_reason(q)
        if reason is not None:
            raise ValueError(f"backend='sm90' cannot serve this call: {reason}")
        return "sm90", "triton"
    # backend=None: fastest available.
    if q.device.type == "cpu":
        _note("fa4: CPU tensors -> reference backend")
        return "reference", "reference"
    reason = _triton_reason(q)
    if reason is not None:
        _note(f"fa4: reference backend ({reason})")
        return "reference", "reference"
    sm90_reason = _sm90_reason(q, k, v, **features)
    if sm90_reason is None:
        return "sm90", "triton"
    _note(f"fa4: triton backend (sm90 path not used: {sm90_reason})")
    return "triton", "triton"
