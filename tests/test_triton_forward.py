"""The Triton forward kernel under Triton's interpreter (CPU), at tiny shapes, fp16 and fp32.

Oracle: fa4.reference (fp32 products); fp16 results are judged by DESIGN.md's numerics rule against the
reference run with fp16 products, fp32 results by a tight tolerance. The outputs the wrapper allocates are
poisoned with NaN (torch.empty is patched for the call), so a row the kernel forgets to write fails.
Tiles of 16-32 rows make every shape span several query and key blocks, so the masked-left / interior /
masked-right split of the key loop, the partial last blocks and the reversed query-block order all run; the
TMA-descriptor and lazy-rescale variants run too (the interpreter emulates descriptors).
One test compiles the table's configs ahead of time for sm_80 and sm_90 (no GPU needed) and checks the SASS
for spills (benchmarks/tune_forward.py sass --table --check).
"""
import os
import subprocess
import sys

import pytest
import torch

from fa4 import reference
from fa4.kernels.triton import forward as fwd
from numerics import assert_close_rule

pytestmark = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="interpreter tests (tests/gpu/test_triton_forward.py covers the GPU)"),
    # numpy < 2.4 warns when the interpreter turns a loop bound into a Python int (triton#9171).
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

SMALL = fwd.Config(32, 16, 4, 1)
TILES = [SMALL, fwd.Config(16, 32, 4, 1), fwd.Config(16, 16, 4, 1, tma=True)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _poisoned_empty(real_empty):
    def empty(*shape, **kw):
        t = real_empty(*shape, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    return empty


def run_kernel(monkeypatch, q, k, v, config=SMALL, **opts):
    """The kernel's (out, lse), with its output buffers pre-filled with NaN."""
    with monkeypatch.context() as m:
        m.setattr(torch, "empty", _poisoned_empty(torch.empty))
        return fwd.forward_with_config(q, k, v, config=config, **opts)


def check(monkeypatch, q, k, v, config=SMALL, **opts):
    """Run the kernel and judge out and lse against the reference; returns (out, lse, ref_lse)."""
    opts.setdefault("window_left", -1)
    opts.setdefault("window_right", -1)
    opts.setdefault("softcap", 0.0)
    opts.setdefault("sink", None)
    opts.setdefault("softmax_scale", q.shape[-1] ** -0.5)
    out, lse = run_kernel(monkeypatch, q, k, v, config, **opts)
    ref_out, ref_lse = reference.forward(q.float(), k.float(), v.float(), **opts)
    if q.dtype == torch.float32:
        torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)
    else:
        low_out, low_lse = reference.forward(q, k, v, compute_dtype=q.dtype, **opts)
        assert_close_rule("out", out, ref_out, low_out, softcap=opts["softcap"] > 0)
        assert_close_rule("lse", lse, ref_lse, low_lse, softcap=opts["softcap"] > 0)
    return out, lse, ref_lse


def batched(b, sq, sk, hq, hkv, d, dv, dtype):
    return (torch.randn(b, sq, hq, d, dtype=dtype), torch.randn(b, sk, hkv, d, dtype=dtype),
            torch.randn(b, sk, hkv, dv, dtype=dtype))


def cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


# ----------------------------------------------------------------------------------------------------------
# Batched layout
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(37, 53), (53, 37), (1, 45), (64, 64)])
def test_lengths(monkeypatch, dtype, causal, sq, sk):
    """Odd lengths, Sq != Sk both ways, a single query; GQA (4 query heads on 2 kv heads)."""
    q, k, v = batched(2, sq, sk, 4, 2, 32, 32, dtype)
    check(monkeypatch, q, k, v, window_right=0 if causal else -1)


@pytest.mark.parametrize("config", TILES, ids=["32x16", "16x32", "16x16-tma"])
@pytest.mark.parametrize("window", [(8, 0), (5, 3), (0, 0), (20, -1), (-1, 4), (3, 40)])
def test_windows(monkeypatch, config, window):
    """Sliding windows (bottom-right aligned): left and right boundary blocks, rows with few keys."""
    q, k, v = batched(1, 45, 61, 2, 1, 32, 32, torch.float16)
    check(monkeypatch, q, k, v, config, window_left=window[0], window_right=window[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_mqa_softcap(monkeypatch, dtype):
    q, k, v = batched(2, 40, 50, 3, 1, 32, 32, dtype)
    check(monkeypatch, q, k, v, window_right=0, softcap=5.0, softmax_scale=0.9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (2, 0)])
def test_sink(monkeypatch, dtype, window):
    """The sink joins the normaliser only; with Sq > Sk and causal, the top rows see only the sink."""
    q, k, v = batched(1, 50, 30, 4, 2, 32, 32, dtype)
    sink = torch.randn(4) * 2
    out, lse, _ = check(monkeypatch, q, k, v, window_left=window[0], window_right=window[1], sink=sink)
    if window[1] == 0:
        # Rows 0..19 see no key: out 0, lse = sink.
        assert torch.equal(out[:, :20], torch.zeros_like(out[:, :20]))
        torch.testing.assert_close(lse[:, :, :20], sink[None, :, None].expand(1, 4, 20))


@pytest.mark.parametrize("d,dv", [(40, 24), (24, 40), (8, 8), (64, 16)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_head_dims(monkeypatch, d, dv, dtype):
    """Head dims padded to a power of two inside the kernel; Dv != D."""
    q, k, v = batched(1, 33, 47, 2, 2, d, dv, dtype)
    for config in (SMALL, fwd.Config(16, 16, 4, 1, tma=True)):
        check(monkeypatch, q, k, v, config, window_right=0)


def test_empty_rows(monkeypatch):
    """Rows with no visible key: out exactly 0 and lse -inf (not NaN) through the poisoned buffers."""
    q, k, v = batched(1, 50, 30, 2, 2, 32, 32, torch.float16)
    out, lse, ref_lse = check(monkeypatch, q, k, v, window_right=0)
    assert torch.equal(out[:, :20], torch.zeros_like(out[:, :20]))
    assert torch.isneginf(lse[:, :, :20]).all() and torch.isfinite(lse[:, :, 20:]).all()
    # Sk = 0: every row is empty.
    q, k, v = batched(1, 20, 0, 2, 2, 32, 32, torch.float16)
    out, lse, _ = check(monkeypatch, q, k, v)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_strided_inputs(monkeypatch):
    """Strides come from the tensors: (B, H, S, D) storage seen as (B, S, H, D), and padded rows."""
    q = torch.randn(2, 3, 37, 32, dtype=torch.float16).transpose(1, 2)
    k = torch.randn(2, 64, 3, 48, dtype=torch.float16)[..., :32]
    v = torch.randn(2, 3, 64, 32, dtype=torch.float16).transpose(1, 2)[:, 5:58]
    k = k[:, 5:58]
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    out, lse, _ = check(monkeypatch, q, k, v, window_right=0)
    assert out.is_contiguous() and lse.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("ramp", [0.25, -0.01])
def test_lazy_rescale(monkeypatch, dtype, ramp):
    """Lazy rescaling of O: key norms that grow along the sequence push row maxima up by more than 2^8
    between blocks (the rescale branch), shrinking ones never do (the stale-maximum branch)."""
    q, k, v = batched(2, 40, 97, 2, 2, 32, 32, dtype)
    k = (k.float() * (1 + ramp * torch.arange(97)).clamp(min=0.05)[None, :, None, None]).to(dtype)
    for config in (fwd.Config(16, 16, 4, 1, lazy_rescale=True), fwd.Config(32, 16, 4, 1, True, lazy_rescale=True)):
        check(monkeypatch, q, k, v, config)
        check(monkeypatch, q, k, v, config, window_right=0, sink=torch.randn(2))


def test_default_config(monkeypatch):
    q, k, v = batched(1, 70, 90, 2, 1, 64, 64, torch.float16)
    check(monkeypatch, q, k, v, config=None, window_right=0)


# ----------------------------------------------------------------------------------------------------------
# Varlen and paged layouts
# ----------------------------------------------------------------------------------------------------------

def varlen_inputs(lens_q, lens_k, hq, hkv, d, dv, dtype):
    tq, tk = sum(lens_q), sum(lens_k)
    q = torch.randn(tq, hq, d, dtype=dtype)
    k = torch.randn(tk, hkv, d, dtype=dtype)
    v = torch.randn(tk, hkv, dv, dtype=dtype)
    return q, k, v, dict(cu_seqlens_q=cu(lens_q), cu_seqlens_k=cu(lens_k), max_seqlen_q=max(lens_q),
                         max_seqlen_k=max(lens_k))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("config", [SMALL, fwd.Config(16, 16, 4, 1, tma=True)], ids=["ptr", "tma"])
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (6, 2)])
def test_varlen(monkeypatch, dtype, config, window):
    """Packed sequences, one of zero length on each side (a sequence with queries but no key)."""
    lens_q, lens_k = [17, 0, 40, 5, 1], [23, 9, 31, 0, 50]
    q, k, v, lay = varlen_inputs(lens_q, lens_k, 4, 2, 32, 24, dtype)
    out, lse, ref_lse = check(monkeypatch, q, k, v, config, window_left=window[0], window_right=window[1],
                              **lay)
    rows = slice(57, 62)  # the sequence with 5 queries and no key
    assert torch.equal(out[rows], torch.zeros_like(out[rows])) and torch.isneginf(lse[:, rows]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_seqused(monkeypatch, dtype, causal):
    lens_q, lens_k = [12, 30, 7], [40, 33, 20]
    q, k, v, lay = varlen_inputs(lens_q, lens_k, 2, 2, 32, 32, dtype)
    lay["seqused_k"] = torch.tensor([25, 33, 0], dtype=torch.int32)
    check(monkeypatch, q, k, v, window_right=0 if causal else -1, **lay)


def test_batched_seqused(monkeypatch):
    q, k, v = batched(3, 20, 40, 2, 1, 32, 32, torch.float16)
    check(monkeypatch, q, k, v, window_right=0, seqused_k=torch.tensor([40, 13, 0], dtype=torch.int32))


def paged_inputs(lens_q, lens_k, page_size, hq, hkv, d, dv, dtype):
    """Varlen queries over a paged cache whose pages are shuffled (and a few left unused)."""
    batch = len(lens_q)
    max_pages = max((n + page_size - 1) // page_size for n in lens_k) + 1
    num_pages = batch * max_pages + 3
    q = torch.randn(sum(lens_q), hq, d, dtype=dtype)
    k = torch.randn(num_pages, page_size, hkv, d, dtype=dtype)
    v = torch.randn(num_pages, page_size, hkv, dv, dtype=dtype)
    page_table = torch.randperm(num_pages)[:batch * max_pages].view(batch, max_pages).to(torch.int32)
    return q, k, v, dict(cu_seqlens_q=cu(lens_q), max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k),
                         seqused_k=torch.tensor(lens_k, dtype=torch.int32), page_table=page_table)


@pytest.mark.parametrize("page_size", [1, 3, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_paged(monkeypatch, page_size, dtype):
    """Page sizes below, unaligned to and multiples of the key block (16): gathered and per-block pages."""
    q, k, v, lay = paged_inputs([9, 1, 20], [37, 16, 0], page_size, 4, 1, 32, 32, dtype)
    check(monkeypatch, q, k, v, window_right=0, **lay)


def test_paged_window_softcap_sink(monkeypatch):
    q, k, v, lay = paged_inputs([1, 13], [50, 29], 16, 2, 2, 40, 24, torch.float16)
    check(monkeypatch, q, k, v, fwd.Config(16, 16, 4, 1), window_left=10, window_right=0, softcap=3.0,
          sink=torch.randn(2), **lay)


def test_paged_batched_queries(monkeypatch):
    """Paged keys under batched (B, Sq, H, D) queries (the kvcache call's layout)."""
    _, k, v, lay = paged_inputs([4, 4], [30, 45], 16, 2, 1, 32, 32, torch.float16)
    q = torch.randn(2, 4, 2, 32, dtype=torch.float16)
    check(monkeypatch, q, k, v, window_right=0, seqused_k=lay["seqused_k"], page_table=lay["page_table"])


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation for real GPUs
# ----------------------------------------------------------------------------------------------------------

def test_compiles_for_sm80_sm90_and_blackwell():
    """Every table config compiles for sm_80, sm_90, sm_100 (B200) and sm_120 (consumer Blackwell) without
    local-memory spills and fits shared memory (the portable path's promise, Ampere to Blackwell)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "tune_forward.py"), "sass",
                           "--table", "--check", "--cc", "90", "80", "100", "120"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


# Config.overlap: the unmasked key blocks software-pipelined by one block (P V of block j-1 under the softmax of
# block j). The last P V after the loop, the first block before it and the eager rescale are what can go wrong.
OVERLAP = [fwd.Config(16, 16, 4, 1, overlap=True), fwd.Config(32, 16, 4, 1, True, overlap=True)]


@pytest.mark.parametrize("config", OVERLAP, ids=["16x16", "32x16-tma"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(37, 53), (1, 45), (20, 16), (20, 33)])
def test_overlap_lengths(monkeypatch, config, causal, sq, sk):
    q, k, v = batched(2, sq, sk, 4, 2, 32, 32, torch.float16)
    check(monkeypatch, q, k, v, config, window_right=0 if causal else -1)


@pytest.mark.parametrize("window", [(8, 0), (5, 3), (40, 40)])
def test_overlap_windows(monkeypatch, window):
    q, k, v = batched(1, 45, 61, 2, 1, 32, 32, torch.float32)
    check(monkeypatch, q, k, v, OVERLAP[0], window_left=window[0], window_right=window[1])


def test_overlap_sink_softcap_ramp(monkeypatch):
    q, k, v = batched(2, 40, 97, 4, 2, 32, 32, torch.float16)
    k = (k.float() * (1 + 0.25 * torch.arange(97)).clamp(min=0.05)[None, :, None, None]).to(torch.float16)
    check(monkeypatch, q, k, v, OVERLAP[0], sink=torch.randn(4) * 2)
    check(monkeypatch, q, k, v, OVERLAP[1], softcap=5.0, softmax_scale=0.9, window_right=0)


def test_overlap_varlen_paged(monkeypatch):
    q, k, v, lay = varlen_inputs([17, 0, 40, 5, 1], [23, 9, 31, 0, 50], 4, 2, 32, 24, torch.float16)
    check(monkeypatch, q, k, v, OVERLAP[1], window_left=6, window_right=2, **lay)
    check(monkeypatch, q, k, v, OVERLAP[0], **lay)
    q, k, v, lay = paged_inputs([9, 1, 20], [37, 16, 0], 3, 4, 1, 32, 32, torch.float16)
    check(monkeypatch, q, k, v, OVERLAP[0], window_right=0, **lay)


def test_overlap_off_for_two_padded_head_dims():
    """(D, Dv) both padded to different blocks: the overlapped loop computed a wrong O on the H100, so such calls
    take the plain loop (kernel_call's config); one padded dim or equal blocks keep the overlap."""
    cfg = fwd.Config(128, 64, 4, 3, tma=True, overlap=True)

    def used(d, dv):
        flags = dict(BLOCK_D=fwd._padded_dim(d), BLOCK_DV=fwd._padded_dim(dv), HEAD_D=d, HEAD_DV=dv, PAGED=False)
        a = dict(flags=flags, tma_ok=True, seqlen_q=1, batch=1, num_heads=1, page_size=0)
        a.update({key: None for key in ("q", "k", "v", "out", "lse", "sink", "cu_q", "cu_k", "seqused",
                                        "page_table")}, strides=(), ints=(), scalars=())
        return fwd.kernel_call(a, cfg)[3]

    assert not used(40, 24).overlap and used(40, 24).tma
    assert used(64, 24).overlap and used(40, 40).overlap and used(128, 128).overlap


# ----------------------------------------------------------------------------------------------------------
# The lean fast path (fa4/kernels/triton/forward_lean.py): its kernel's math in the interpreter
# ----------------------------------------------------------------------------------------------------------

# ws: lse by the 1-D descriptor store; hd: host-built descriptors over the (B, H, S, D) views; hd-split: causal
# unmasked key blocks in a loop of their own.
LEAN_KERNEL_FORMS = {"plain": dict(), "ws": dict(warp_spec=True), "hd": dict(host_desc=True),
                     "hd-split": dict(host_desc=True, split=True)}


LEAN_KERNEL_CASES = [(form, causal, sq, sk) for form in LEAN_KERNEL_FORMS
                     for causal, sq, sk in [(False, 36, 48), (False, 4, 32), (True, 36, 48), (True, 48, 48),
                                            (True, 4, 37), (True, 21, 70), (False, 7, 48)]
                     if not (form == "ws" and sq % 4)]  # config_for keeps Sq % 4 != 0 off ws (lse by TMA)


@pytest.mark.parametrize("form,causal,sq,sk", LEAN_KERNEL_CASES)
def test_lean_kernel(monkeypatch, form, causal, sq, sk):
    """The lean kernels on calls forward_lean.config_for accepts (a partial key block only under causal, whose
    mask hides it; Sq <= Sk under causal; Sq % 4 == 0 for ws), GQA 4 on 2, fp16, outputs poisoned with NaN."""
    from fa4.kernels.triton import forward_lean
    cfg = forward_lean.LeanConfig(16, 16, 1, **{"warp_spec": False, **LEAN_KERNEL_FORMS[form]})
    q, k, v = batched(2, sq, sk, 4, 2, 32, 32, torch.float16)
    opts = dict(softmax_scale=32 ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0, sink=None)
    with monkeypatch.context() as m:
        m.setattr(torch, "empty", _poisoned_empty(torch.empty))
        out, lse, launch = fwd.prepare(q, k, v, **opts)
    forward_lean.launch(launch, cfg)
    ref_out, ref_lse = reference.forward(q.float(), k.float(), v.float(), **opts)
    low_out, low_lse = reference.forward(q, k, v, compute_dtype=q.dtype, **opts)
    assert_close_rule("out", out, ref_out, low_out)
    assert_close_rule("lse", lse, ref_lse, low_lse)


@pytest.mark.parametrize("causal", [False, True])
def test_lean_repeat_call(monkeypatch, causal):
    """A host-descriptor launch remembered under its signature (forward_lean._CALLS) serves a repeated call
    with new tensors of the same shapes and strides: right against the reference, and nothing for an unseen
    signature. fp16, GQA 4 on 2, the interpreter."""
    from fa4.kernels.triton import forward_lean
    monkeypatch.setattr(forward_lean, "_CALLS", {})
    opts = dict(softmax_scale=32 ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0, sink=None)
    cfg = forward_lean.LeanConfig(16, 16, 1, False, True, causal)
    q, k, v = batched(2, 36, 48, 4, 2, 32, 32, torch.float16)
    key = forward_lean.signature(q, k, v, opts["softmax_scale"], opts["window_left"], opts["window_right"])
    assert forward_lean.repeat_call(key, q, k, v) is None
    _, _, launch = fwd.prepare(q, k, v, **opts)
    forward_lean.launch(launch, cfg, remember=key)
    q, k, v = batched(2, 36, 48, 4, 2, 32, 32, torch.float16)  # new values, the same signature
    assert forward_lean.signature(q, k, v, opts["softmax_scale"], opts["window_left"], opts["window_right"]) == key
    out, lse = forward_lean.repeat_call(key, q, k, v)
    ref_out, ref_lse = reference.forward(q.float(), k.float(), v.float(), **opts)
    low_out, low_lse = reference.forward(q, k, v, compute_dtype=q.dtype, **opts)
    assert_close_rule("out", out, ref_out, low_out)
    assert_close_rule("lse", lse, ref_lse, low_lse)


@pytest.mark.parametrize("causal", [False, True])
def test_lean_host_desc_packed_qkv(causal):
    """Host-built descriptors take the caller's strides: q, k, v as views of one packed (B, S, 3, H, D) tensor
    (row stride 3·H·D), MHA, fp16; the packed tensor is left as it was."""
    from fa4.kernels.triton import forward_lean
    qkv = torch.randn(2, 40, 3, 4, 32, dtype=torch.float16)
    before = qkv.clone()
    q, k, v = qkv.unbind(2)
    opts = dict(softmax_scale=32 ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0, sink=None)
    out, lse, launch = fwd.prepare(q, k, v, **opts)
    out.fill_(float("nan"))
    forward_lean.launch(launch, forward_lean.LeanConfig(16, 8, 1, False, True, causal))
    ref_out, ref_lse = reference.forward(q.float(), k.float(), v.float(), **opts)
    low_out, low_lse = reference.forward(q, k, v, compute_dtype=q.dtype, **opts)
    assert_close_rule("out", out, ref_out, low_out)
    assert_close_rule("lse", lse, ref_lse, low_lse)
    assert torch.equal(qkv, before)
