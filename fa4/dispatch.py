"""Which backend serves a request.

Backends: "reference" (eager PyTorch, any device, every feature), "triton" (portable kernels, CUDA compute
capability >= 8.0, or the CPU under TRITON_INTERPRET=1), "sm90" (Gluon forward and backward for Hopper; the
backward serves D = Dv up to 256 and D, Dv up to 128, the Triton backward the rest), "splitkv" (forward only,
chosen by backend=None: a few query tokens against long keys on the split-KV decode kernels, beside the sm90 or
the portable forward, see splitkv_wanted; the backward is then resolved as for any other forward). An explicitly requested
backend that cannot serve raises a ValueError with the reason; only backend=None falls back.

backend=None on a CUDA device resolves in two steps. `choose` (called by the interface, traced by
torch.compile) only decides "reference" or "auto" from facts that are constant for a graph (device type,
Triton present, compute capability). The custom op then calls `resolve_auto` on the real tensors, outside
any trace: the sm90 kernel's own requirements include run-time facts (16-byte aligned pointers for TMA), and
a Python-side choice there costs no graph break. The backward backend "auto" is resolved the same way by the
backward op (`resolve_auto_backward`). The reason for each choice is logged at debug level on the
"fa4" logger.
"""
import logging
import os
import sys

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


_CAPABILITY_REASONS = {}


@torch.compiler.assume_constant_result
def _capability_reason(index):
    """None if CUDA device `index` can run Triton's tensor-core kernels (compute capability >= 8.0).
    Cached per device: it is asked on every call."""
    if index not in _CAPABILITY_REASONS:
        major, minor = torch.cuda.get_device_capability(index)
        _CAPABILITY_REASONS[index] = None if major >= 8 else f"compute capability {major}.{minor} < 8.0"
    return _CAPABILITY_REASONS[index]


# The portable kernels build TMA tensor descriptors (tl.make_tensor_descriptor, triton.tools.tensor_descriptor):
# Triton 3.4 and later.
MIN_TRITON = (3, 4)


_TOO_OLD = {}


@torch.compiler.assume_constant_result
def _triton_too_old():
    """Why the installed Triton cannot run the portable kernels (too old), or None. Asked on every call: cached."""
    import triton
    version = triton.__version__
    if version not in _TOO_OLD:
        try:
            old = tuple(int(x) for x in version.split("+")[0].split(".")[:2]) < MIN_TRITON
        except ValueError:  # an unparsable development version: let it try
            old = False
        _TOO_OLD[version] = (f"triton {version} is older than {MIN_TRITON[0]}.{MIN_TRITON[1]}, which the Triton "
                             f"kernels need" if old else None)
    return _TOO_OLD[version]


def triton_reason(q):
    """None if the portable Triton kernels can run on q's device, else why not."""
    if not _triton_available():
        return "triton is not installed"
    old = _triton_too_old()
    if old is not None:
        return old
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
    """A DEBUG line on the fa4 logger, outside tracing (dynamo cannot trace a logger call, so is_compiling goes
    first) and only when someone listens."""
    if not torch.compiler.is_compiling() and logger.isEnabledFor(logging.DEBUG):
        logger.debug(msg)


# The backward backend of an explicit backend="sm90" call: the sm90 backward, or a ValueError saying why not.
EXPLICIT_SM90 = "sm90-explicit"


def explicit_sm90_backward(q, k, v, **features):
    """The backward of an explicit backend="sm90" call (DESIGN: an explicit backend that cannot serve raises;
    backend=None would take the Triton backward here). Returns the checked sm90 backend name."""
    reason = _sm90_backward_reason(q, k, v, **features)
    if reason is not None:
        raise ValueError(f"backend='sm90' cannot serve the backward of this call: {reason} (backend=None runs the "
                         f"sm90 forward and the Triton backward)")
    return "sm90-checked"


def choose(q, k, v, backend, **features):
    """(forward_backend, backward_backend) names for this request; "auto" is resolved by the op."""
    if backend == "reference":
        return "reference", "reference"
    if backend == "triton":
        reason = triton_reason(q)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot serve this call: {reason}")
        return "triton", "triton"
    if backend == "sm90":
        if q.device.type != "cuda":
            raise ValueError("backend='sm90' cannot serve this call: the sm90 backend needs a CUDA device")
        # Run-time requirements (alignment) are checked again by the kernel wrapper, which raises.
        reason = triton_reason(q) or (None if torch.compiler.is_compiling() else _sm90_reason(q, k, v, **features))
        if reason is not None:
            raise ValueError(f"backend='sm90' cannot serve this call: {reason}")
        # The backward is held to the same rule when it runs (ops._run_backward, EXPLICIT_SM90): a call whose
        # gradients only the Triton kernels can compute raises then; a forward-only call never does.
        return "sm90", EXPLICIT_SM90
    if q.device.type == "cpu":
        _note("fa4: CPU tensors -> reference backend")
        return "reference", "reference"
    reason = triton_reason(q)
    if reason is not None:
        _note(f"fa4: reference backend ({reason})")
        return "reference", "reference"
    return "auto", "auto"


def planned_sm90_forward(q, k, v, *, max_seqlen_q, window_left, window_right, **kwargs):
    """backend=None on a call whose exact signature the sm90 forward served before: (out, lse) through its
    cached launch plan, skipping resolve_auto's checks (their outcome is fixed by that signature); None when
    there is no such plan or the sm90 path is switched off."""
    sm90 = sys.modules.get("fa4.kernels.sm90.attention_fwd")
    if sm90 is None or os.environ.get("FA4_SM90") == "0":
        return None
    # A plan left by an explicit backend="sm90" call must not take a call that backend=None sends to "splitkv".
    if _splitkv_on() and splitkv_wanted(q, k, v, **kwargs):
        return None
    return sm90.planned_forward(q, k, v, max_seqlen_q=max_seqlen_q, window_left=window_left,
                                window_right=window_right, **kwargs)


# "splitkv": a forward with a few query tokens (at most SPLITKV_MAX_ROWS query rows per kv head) against long
# keys runs on the split-KV decode kernels (fa4.inference.forward_splitkv) where the attention kernel would
# leave the GPU mostly idle: the sm90 forward when its work units fill under half the SMs, the portable Triton
# forward (where sm90 does not serve) always.
# H100, benchmarks/short_query_probe.py (session 11): one query token against 8192 keys 99 -> 25 µs, 16 tokens
# 101 -> 69 µs, 64 tokens against 32768 keys 365 -> 124 µs; where the units fill the GPU (128 tokens, B = 4,
# 8 kv heads) the sm90 forward was 1.7x faster, so it keeps those.
SPLITKV_MIN_KEYS = 2048
SPLITKV_MAX_ROWS = 256  # query tokens x GQA group: the rows one decode program holds


def _num_sms(device):
    """SM count of a CUDA device (inference's cache), None for other devices."""
    if device.type != "cuda":
        return None
    from . import inference
    return inference._sm_count(device)


def _splitkv_on():
    return os.environ.get("FA4_SPLITKV") != "0"


def splitkv_wanted(q, k, v, *, num_sms=None, cu_seqlens_q=None, page_table=None, seqused_k=None, path="sm90",
                   **_):
    """Whether a batched forward runs faster on the split-KV decode kernels than on the attention kernel of
    `path` ("sm90": the Gluon forward, GQA-packed tiles, kept where its units fill half the SMs; "triton": the
    portable forward, one query head a program). num_sms: the device's SM count (None: looked up, for CUDA
    tensors only, once the shapes qualify)."""
    if cu_seqlens_q is not None or page_table is not None or seqused_k is not None or q.dim() != 4:
        return False
    batch, seqlen_q, num_heads, _d = q.shape
    seqlen_k, num_heads_kv = k.shape[1], k.shape[2]
    if seqlen_k < SPLITKV_MIN_KEYS or num_heads_kv == 0:
        return False
    group = num_heads // num_heads_kv
    if seqlen_q * group > SPLITKV_MAX_ROWS:
        return False
    if path != "sm90":
        # The portable forward gives each query head its own program and tile rows: at these row counts its
        # tiles are mostly empty and every head of a group reads the group's K/V again, so the decode kernels
        # were as fast or faster at every grid size measured (H100, FA4_SM90=0: 1.0-3.7x).
        return True
    if num_sms is None:
        num_sms = _num_sms(q.device)
        if num_sms is None:  # not a CUDA tensor
            return False
    from .kernels.sm90 import configs
    cfg = configs.get_config(configs.tile_dim(q.shape[-1]), configs.tile_dim(v.shape[-1]))
    pack = configs.gqa_pack(group, seqlen_q)
    units = batch * (num_heads // pack) * -(-seqlen_q // (cfg.block_m // pack))
    return 2 * units <= num_sms


# resolve_auto's "splitkv" decisions by call signature, so that repeated short-query calls (a decoding loop through
# flash_attn_func) skip the checks: ~20 of a call's ~90 µs of host time on an H100 host (host_overhead_probe.py).
_SPLITKV_ROUTES = {}
_SPLITKV_ROUTES_SIZE = 256


def _route_key(q, k, v, *, window_left, window_right, softcap, sink, cu_seqlens_q=None, page_table=None,
               seqused_k=None, **_):
    """Everything resolve_auto's answer depends on for a batched call, or None for calls never cached."""
    if cu_seqlens_q is not None or page_table is not None or seqused_k is not None:
        return None
    return (q.device, q.dtype, k.dtype, v.dtype, q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(),
            (q.data_ptr() | k.data_ptr() | v.data_ptr()) % 16 == 0, None if sink is None else sink.dtype,
            window_left, window_right, softcap > 0, os.environ.get("FA4_SM90"), os.environ.get("FA4_SPLITKV"))


def routed_splitkv(q, k, v, **features):
    """True when resolve_auto sent a call of this exact signature to "splitkv" before."""
    if not _SPLITKV_ROUTES or q.dim() != 4 or k.shape[-2] == 0 or \
            q.shape[1] * (q.shape[2] // k.shape[-2]) > SPLITKV_MAX_ROWS:
        return False  # (nothing routed yet, or a call the rule never routes: no key to build)
    key = _route_key(q, k, v, **features)
    return key is not None and key in _SPLITKV_ROUTES


def _remember_splitkv(q, k, v, features):
    key = _route_key(q, k, v, **features)
    if key is not None:
        if len(_SPLITKV_ROUTES) >= _SPLITKV_ROUTES_SIZE:
            _SPLITKV_ROUTES.clear()
        _SPLITKV_ROUTES[key] = True


def resolve_auto(q, k, v, **features):
    """The forward backend for backend=None on real CUDA tensors: "splitkv" for a few query tokens against long
    keys (splitkv_wanted), else "sm90" where it serves and is faster, else "triton"."""
    # The sm90 kernel measured ahead of the Triton forward on every row of the training suite (H100,
    # 2026-11-25; the one exception, D = 64 causal at S = 1024, went once such problems took 128-row tiles:
    # configs.problem_config). So it serves wherever it can.
    reason = _sm90_reason(q, k, v, **features)
    if reason is None:
        if _splitkv_on() and splitkv_wanted(q, k, v, **features):
            _note("fa4: splitkv forward (few query rows against long keys)")
            _remember_splitkv(q, k, v, features)
            return "splitkv"
        _note("fa4: sm90 forward")
        return "sm90"
    if _splitkv_on() and splitkv_wanted(q, k, v, path="triton", **features):
        logger.debug(f"fa4: splitkv forward (sm90 path not used: {reason})")
        _remember_splitkv(q, k, v, features)
        return "splitkv"
    logger.debug(f"fa4: triton forward (sm90 path not used: {reason})")
    return "triton"


def resolve_auto_backward(q, k, v, **features):
    """The backward backend for "auto" on real CUDA tensors: the Gluon sm90 backward where it serves
    (measured 1.17-1.38x the Triton backward at D = 128 on the H100 and 1.30-1.34x at D = 256 on an H200,
    benchmarks/NOTES.md), else Triton.
    FA4_SM90=0 or FA4_SM90_BWD=0 keeps the Triton backward."""
    reason = _sm90_backward_reason(q, k, v, **features)
    if reason is None:
        _note("fa4: sm90 backward")
        return "sm90"
    logger.debug(f"fa4: triton backward (sm90 backward not used: {reason})")
    return "triton"


def _sm90_backward_reason(q, k, v, **features):
    """None if the Gluon sm90 backward serves this call, else why not."""
    reason = None
    if os.environ.get("FA4_SM90") == "0" or os.environ.get("FA4_SM90_BWD") == "0":
        reason = "switched off by FA4_SM90=0 / FA4_SM90_BWD=0"
    elif q.device.type != "cuda":
        reason = "not a CUDA tensor"
    else:
        try:
            from .kernels.sm90 import backward as sm90_backward
            reason = sm90_backward.unsupported_reason(q, k, v, **features)
        except Exception as exc:  # a Gluon import failure on an untested Triton must not break fa4
            reason = f"the sm90 backward failed to import ({type(exc).__name__}: {exc})"
    return reason
