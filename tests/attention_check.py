"""One call that runs fa4 forward + backward and judges every output by DESIGN.md's numerics rule.

ref = fa4.reference in fp32 on the same (low-precision) inputs; x_lowp = the reference with its products in the
input dtype. The memory the outputs will land in is poisoned with NaN first (through the caching allocator), so
an element a kernel forgets to write fails the check.
"""
import zlib

import torch

import fa4
from fa4 import reference
from numerics import assert_close_rule


def poison_allocator(device, nbytes=256 << 20):
    """Fill free cached blocks with NaN so that unwritten outputs show up as NaN."""
    if torch.device(device).type != "cuda":
        return
    blob = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(float("nan"))
    del blob


def cu_seqlens(lens, device="cpu"):
    """int32 offsets [0, l0, l0 + l1, ...] of packed sequences with these lengths."""
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def make_inputs(b, sq, sk, hq, hkv, d, dv, dtype, device, varlen_lens=None):
    """Batched (B, S, H, D) tensors, or packed varlen ones when varlen_lens = (lens_q, lens_k)."""
    gen = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    if varlen_lens is None:
        return gen(b, sq, hq, d), gen(b, sk, hkv, d), gen(b, sk, hkv, dv), {}
    lens_q, lens_k = varlen_lens
    extra = dict(cu_seqlens_q=cu_seqlens(lens_q, device), cu_seqlens_k=cu_seqlens(lens_k, device),
                 max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))
    return gen(sum(lens_q), hq, d), gen(sum(lens_k), hkv, d), gen(sum(lens_k), hkv, dv), extra


def check_attention(q, k, v, *, causal=False, window_size=(-1, -1), softcap=0.0, sink=None, backend=None,
                    grad=True, lse_grad=True, deterministic=False, varlen=None, softmax_scale=None):
    """Run fa4 and the two references; assert the numerics rule on out, lse and all gradients."""
    varlen = varlen or {}
    left, right = window_size
    if causal:
        right = 0
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    opts = dict(softmax_scale=scale, window_left=left, window_right=right, softcap=softcap,
                sink=sink, **{key: varlen[key] for key in varlen if key != "seqused_k"},
                seqused_k=varlen.get("seqused_k"))
    leaves = [t.detach().requires_grad_(grad) for t in (q, k, v)]
    sink_leaf = sink.detach().requires_grad_(grad) if sink is not None else None
    poison_allocator(q.device)
    kw = dict(causal=causal, window_size=window_size, softcap=softcap, learnable_sink=sink_leaf,
              return_lse=True, backend=backend, deterministic=deterministic, softmax_scale=softmax_scale)
    if varlen:
        out, lse = fa4.flash_attn_varlen_func(*leaves, **varlen, **kw)
    else:
        out, lse = fa4.flash_attn_func(*leaves, **kw)

    f32 = [t.float() for t in (q, k, v)]
    ref_out, ref_lse = reference.forward(*f32, **opts)  # fp32 inputs: out stays fp32, unrounded
    low_out, low_lse = reference.forward(q, k, v, compute_dtype=q.dtype, **opts)
    assert_close_rule("out", out, ref_out, low_out, softcap=softcap > 0)
    assert_close_rule("lse", lse, ref_lse, low_lse, softcap=softcap > 0)
    if not grad:
        return out, lse
    dout = torch.randn_like(out)
    finite = torch.isfinite(ref_lse)
    dlse = torch.where(finite, torch.randn_like(ref_lse), torch.zeros_like(ref_lse)) if lse_grad else None
    loss = (out.float() * dout.float()).sum()
    if lse_grad:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0.0) * dlse).sum()
    targets = leaves + ([sink_leaf] if sink is not None else [])
    poison_allocator(q.device)
    grads = torch.autograd.grad(loss, targets)
    ref_grads = reference.backward(dout.float(), *f32, ref_out, ref_lse, dlse, **opts)
    low_grads = reference.backward(dout, q, k, v, low_out, low_lse, dlse, compute_dtype=q.dtype, **opts)
    for name, g, rg, lg in zip(("dq", "dk", "dv", "dsink"), grads, ref_grads, low_grads):
        assert_close_rule(name, g, rg, lg, softcap=softcap > 0)
    return out, lse, grads


def backend_options(q, left=-1, right=-1, softcap=0.0, sink=None, varlen=None):
    """The canonical keyword arguments of a backend call (docs/INTERNALS.md) at the default softmax scale."""
    varlen = varlen or {}
    return dict(softmax_scale=q.shape[-1] ** -0.5, window_left=left, window_right=right, softcap=softcap,
                sink=sink, cu_seqlens_q=varlen.get("cu_seqlens_q"), cu_seqlens_k=varlen.get("cu_seqlens_k"),
                seqused_k=varlen.get("seqused_k"), max_seqlen_q=varlen.get("max_seqlen_q"),
                max_seqlen_k=varlen.get("max_seqlen_k"))


def reference_backward_inputs(b, s, hq, hkv, d, *, causal, device, dtype=torch.bfloat16):
    """(q, k, v, opts, out, lse, dout) of a backend backward call: fresh (B, S, H, D) inputs from the current
    seed, the canonical options (causal or no mask), the fp32 reference forward's out (in dtype) and lse, and a
    random dout."""
    q = torch.randn(b, s, hq, d, device=device, dtype=dtype)
    k = torch.randn(b, s, hkv, d, device=device, dtype=dtype)
    v = torch.randn(b, s, hkv, d, device=device, dtype=dtype)
    opts = backend_options(q, -1, 0 if causal else -1)
    out, lse = reference.forward(q.float(), k.float(), v.float(), **opts)
    out = out.to(dtype)
    return q, k, v, opts, out, lse, torch.randn_like(out)


def assert_first_capture_creates_no_stream(call, monkeypatch):
    """call(): a backward returning (dq, dk, dv, ...) whose passes use the backwards' shared side stream when one
    exists. Run eagerly once (compiling the kernels), then captured in a CUDA graph with the side-stream table
    emptied (triton/backward.side_stream): no stream may be created during the capture, and a replay into the
    captured outputs, poisoned with NaN first, must equal the eager call bitwise."""
    from fa4.kernels.triton import backward as tb
    eager = call()
    monkeypatch.setattr(tb, "_SIDE_STREAMS", {})
    capture = torch.cuda.Stream()
    capture.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(capture), torch.cuda.graph(graph, stream=capture):
        grads = call()
    assert tb._SIDE_STREAMS == {}, "a side stream was created during the capture"
    for g in grads[:3]:
        g.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for name, a, g in zip("qkv", grads[:3], eager[:3]):
        assert torch.equal(a, g), f"d{name}: the captured replay differs from the eager call"


def check_backend_backward(backward, q, k, v, *, left=-1, right=-1, softcap=0.0, sink=None, with_dlse=False,
                           deterministic=False, varlen=None, dout=None):
    """One backend's `backward` by itself, against the fp32 reference (ref) and the reference in the input dtype
    (lowp). out and lse come from fa4.reference, so a failure is the backward's. Returns (dq, dk, dv, dsink)."""
    opts = backend_options(q, left, right, softcap, sink, varlen)
    f32 = [t.float() for t in (q, k, v)]
    ref_out, lse = reference.forward(*f32, **opts)
    out = ref_out.to(q.dtype)
    if dout is None:
        dout = torch.randn_like(out)
    dlse = None
    if with_dlse:  # empty rows (lse = -inf) get a gradient too: the kernel must ignore it
        dlse = torch.where(torch.isfinite(lse), torch.randn_like(lse), torch.full_like(lse, 3.0))
    poison_allocator(q.device)
    got = backward(dout, q, k, v, out, lse, dlse, deterministic=deterministic, **opts)
    if q.device.type == "cuda":
        torch.cuda.synchronize()
    ref = reference.backward(dout.float(), *f32, ref_out, lse, dlse, **opts)
    low = reference.backward(dout, q, k, v, out, lse, dlse, compute_dtype=q.dtype, **opts)
    for name, g, r, lo, t in zip(("dq", "dk", "dv", "dsink"), got, ref, low, (q, k, v, sink)):
        if t is None:
            assert g is None, f"{name}: expected None"
            continue
        assert g.dtype == t.dtype and g.shape == t.shape and g.is_contiguous(), name
        assert_close_rule(name, g, r, lo, softcap=softcap > 0)
    return got


def dsink_error_ratios(backward, seeds, *, b=1, s=513, hq=8, hkv=2, d=40, dv=24, dtype=torch.bfloat16, device="cpu",
                       deterministic=False):
    """max |dsink − ref| / max |dsink_lowp − ref| of `backward` over fresh inputs per seed (with lse gradients).

    dsink is one number per head and both errors are sums of rounding noise of the same size when the kernel
    takes Delta from the rounded O; the kernels that take it from Σ_j P·dP instead stay far below 1."""
    ratios = []
    for seed in seeds:
        gen = torch.Generator(device=device).manual_seed(seed)
        q, k, v = (torch.randn(b, s, h, w, device=device, dtype=dtype, generator=gen)
                   for h, w in ((hq, d), (hkv, d), (hkv, dv)))
        sink = torch.randn(hq, device=device, generator=gen)
        opts = backend_options(q, sink=sink)
        f32 = [t.float() for t in (q, k, v)]
        ref_out, lse = reference.forward(*f32, **opts)
        out = ref_out.to(dtype)
        dout = torch.randn(out.shape, device=device, generator=gen).to(dtype)
        dlse = torch.randn(lse.shape, device=device, generator=gen)
        got = backward(dout, q, k, v, out, lse, dlse, deterministic=deterministic, **opts)[3]
        ref = reference.backward(dout.float(), *f32, ref_out, lse, dlse, **opts)[3]
        low = reference.backward(dout, q, k, v, out, lse, dlse, compute_dtype=dtype, **opts)[3]
        ratios.append((got - ref).abs().max().item() / max((low - ref).abs().max().item(), 1e-30))
    return ratios


# Backward feature-matrix cases: (b, sq, sk, hq, hkv, d, dv, left, right, softcap, sink, dlse).
def case_seed(*parts):
    """A seed per test case that is the same in every process: Python's hash() of a str is salted per process
    (PYTHONHASHSEED), so hash((case, str(dtype))) drew different inputs on every run and a failure could not be
    reproduced."""
    return zlib.crc32(repr(parts).encode())


def backward_case_id(case):
    b, sq, sk, hq, hkv, d, dv, left, right, cap, sink, dlse = case
    return f"b{b}-sq{sq}-sk{sk}-h{hq}/{hkv}-d{d}/{dv}-w{left}_{right}-cap{cap}-s{int(sink)}-dl{int(dlse)}"


def backward_case_inputs(case, dtype, device):
    """(q, k, v, keyword arguments of check_backend_backward) of one backward feature-matrix case, with a
    seed per (case, dtype)."""
    torch.manual_seed(case_seed(case, str(dtype)))
    b, sq, sk, hq, hkv, d, dv, left, right, cap, sink, dlse = case
    q = torch.randn(b, sq, hq, d, device=device, dtype=dtype)
    k = torch.randn(b, sk, hkv, d, device=device, dtype=dtype)
    v = torch.randn(b, sk, hkv, dv, device=device, dtype=dtype)
    s = torch.randn(hq, device=device) if sink else None
    return q, k, v, dict(left=left, right=right, softcap=cap, sink=s, with_dlse=dlse)
