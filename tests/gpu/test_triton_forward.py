"""The Triton forward (fa4.kernels.triton.forward) on a GPU against fa4.reference, by DESIGN.md's numerics rule.

Calls the backend directly at real sizes (S 1000-3000, D 64/128/256, bf16 and fp16) over the feature matrix,
with the caching allocator poisoned by NaN before each call so an unwritten output fails. Also: every tuning
candidate of benchmarks/tune_forward.py (so whichever config the table gets is known to be right), the plain
load path next to the TMA one, and tensors past 2^31 elements. Skipped without CUDA.

    pytest tests/gpu/test_triton_forward.py -q
"""
import os
import sys

import pytest
import torch

from attention_check import cu_seqlens, poison_allocator
from fa4 import reference
from fa4.kernels.triton import forward as fwd
from fa4.kernels.triton import forward_lean
from numerics import assert_close_rule

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"
IS_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _poison():
    poison_allocator(DEV)


def _cu(lens):
    return cu_seqlens(lens, DEV)


def check(q, k, v, config=None, **opts):
    """The kernel against the fp32 reference and the reference with input-dtype products."""
    opts.setdefault("window_left", -1)
    opts.setdefault("window_right", -1)
    opts.setdefault("softcap", 0.0)
    opts.setdefault("sink", None)
    opts.setdefault("softmax_scale", q.shape[-1] ** -0.5)
    _poison()
    out, lse = fwd.forward_with_config(q, k, v, config=config, **opts)
    judge(q, k, v, out, lse, **opts)
    return out, lse


def judge(q, k, v, out, lse, **opts):
    """(out, lse) of a call with these options against the fp32 reference and the reference with input-dtype
    products, by the numerics rule."""
    ref_out, ref_lse = reference.forward(q.float(), k.float(), v.float(), **opts)
    low_out, low_lse = reference.forward(q, k, v, compute_dtype=q.dtype, **opts)
    assert_close_rule("out", out, ref_out, low_out, softcap=opts["softcap"] > 0)
    assert_close_rule("lse", lse, ref_lse, low_lse, softcap=opts["softcap"] > 0)


def batched(b, sq, sk, hq, hkv, d, dv, dtype):
    return (torch.randn(b, sq, hq, d, dtype=dtype, device=DEV), torch.randn(b, sk, hkv, d, dtype=dtype, device=DEV),
            torch.randn(b, sk, hkv, dv, dtype=dtype, device=DEV))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(1000, 1000), (1537, 2999), (2999, 1537), (1, 2048)])
def test_batched(dtype, d, causal, sq, sk):
    """Odd lengths, Sq != Sk both ways, one query; GQA 8 on 2."""
    q, k, v = batched(2, sq, sk, 8, 2, d, d, dtype)
    check(q, k, v, window_right=0 if causal else -1)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("window", [(256, 0), (100, 37), (0, 0), (511, -1), (-1, 300)])
def test_windows(d, window):
    q, k, v = batched(2, 1999, 2500, 4, 4, d, d, torch.bfloat16)
    check(q, k, v, window_left=window[0], window_right=window[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_mqa_softcap_sink(dtype, causal):
    q, k, v = batched(2, 1200, 1800, 8, 1, 128, 128, dtype)
    check(q, k, v, window_right=0 if causal else -1, softcap=30.0, sink=torch.randn(8, device=DEV))


def test_sink_empty_rows():
    """Sq > Sk, causal: the top rows see only the sink (out 0, lse = sink); without it, lse = -inf."""
    q, k, v = batched(1, 1500, 1000, 4, 4, 128, 128, torch.bfloat16)
    sink = torch.randn(4, device=DEV)
    out, lse = check(q, k, v, window_right=0, sink=sink)
    assert torch.equal(out[:, :500], torch.zeros_like(out[:, :500]))
    torch.testing.assert_close(lse[:, :, :500], sink[None, :, None].expand(1, 4, 500))
    out, lse = check(q, k, v, window_right=0)
    assert torch.equal(out[:, :500], torch.zeros_like(out[:, :500])) and torch.isneginf(lse[:, :, :500]).all()


@pytest.mark.parametrize("d,dv", [(40, 24), (192, 128), (128, 64), (96, 256), (8, 8)])
def test_head_dims(d, dv):
    q, k, v = batched(2, 1111, 1333, 4, 2, d, dv, torch.bfloat16)
    check(q, k, v, window_right=0)
    check(q, k, v)


@pytest.mark.parametrize("d,dv", [(64, 32), (40, 32), (128, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_narrow_v_block(d, dv, dtype):
    """V's head-dim block narrower than Q/K's, past one query block: Triton 3.6 left NaN in the second block's rows
    (a GPU fuzz, session 21, (64, 32) and (40, 32) at S = 256 causal); both now take one block."""
    q, k, v = batched(3, 256, 256, 4, 1, d, dv, dtype)
    check(q, k, v, window_right=0)
    check(q, k, v)


def test_strided_inputs():
    """(B, H, S, D) storage seen as (B, S, H, D), and a K sliced out of a wider tensor: strides are honoured."""
    q = torch.randn(2, 8, 1500, 128, dtype=torch.bfloat16, device=DEV).transpose(1, 2)
    k = torch.randn(2, 1700, 4, 192, dtype=torch.bfloat16, device=DEV)[..., :128]
    v = torch.randn(2, 4, 1700, 128, dtype=torch.bfloat16, device=DEV).transpose(1, 2)
    check(q, k, v, window_right=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen(dtype, causal):
    lens_q, lens_k = [1000, 0, 2047, 1, 513], [1200, 300, 2047, 0, 3000]
    q = torch.randn(sum(lens_q), 8, 128, dtype=dtype, device=DEV)
    k = torch.randn(sum(lens_k), 2, 128, dtype=dtype, device=DEV)
    v = torch.randn(sum(lens_k), 2, 128, dtype=dtype, device=DEV)
    lay = dict(cu_seqlens_q=_cu(lens_q), cu_seqlens_k=_cu(lens_k), max_seqlen_q=2047, max_seqlen_k=3000)
    check(q, k, v, window_right=0 if causal else -1, **lay)
    lay["seqused_k"] = torch.tensor([700, 300, 2000, 0, 1], dtype=torch.int32, device=DEV)
    check(q, k, v, window_right=0 if causal else -1, **lay)


@pytest.mark.parametrize("page_size", [1, 3, 16, 64, 128, 256])
def test_paged(page_size):
    lens_q, lens_k = [1, 700, 64], [3000, 1500, 777]
    batch, max_pages = len(lens_q), max((n + page_size - 1) // page_size for n in lens_k)
    num_pages = batch * max_pages + 5
    q = torch.randn(sum(lens_q), 8, 128, dtype=torch.bfloat16, device=DEV)
    k = torch.randn(num_pages, page_size, 2, 128, dtype=torch.bfloat16, device=DEV)
    v = torch.randn(num_pages, page_size, 2, 128, dtype=torch.bfloat16, device=DEV)
    table = torch.randperm(num_pages, device=DEV)[:batch * max_pages].view(batch, max_pages).to(torch.int32)
    lay = dict(cu_seqlens_q=_cu(lens_q), max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k),
               seqused_k=torch.tensor(lens_k, dtype=torch.int32, device=DEV), page_table=table)
    check(q, k, v, window_right=0, **lay)
    check(q, k, v, window_left=200, window_right=0, softcap=20.0, **lay)


def _candidates():
    from tune_forward import CANDIDATES
    return [(d, cfg) for d, cfgs in CANDIDATES.items() for cfg in cfgs]


@pytest.mark.parametrize("d,config", _candidates(), ids=lambda x: str(x))
def test_tuning_candidates(d, config):
    """Every config the tuning script may put in the table, at an odd length, causal (all three loops)."""
    q, k, v = batched(2, 1234, 1234, 4, 4, d, d, torch.bfloat16)
    check(q, k, v, config, window_right=0)


@pytest.mark.skipif(not IS_SM90, reason="TMA needs sm_90+")
@pytest.mark.parametrize("tma", [False, True])
def test_plain_and_tma_loads(tma):
    """The same table tile with TMA descriptors and with plain loads (varlen exercises per-sequence bounds)."""
    base = fwd.default_config(torch.device(DEV), torch.bfloat16, 128, 128, True)
    config = base._replace(tma=tma, maxnreg=base.maxnreg if tma else 0)
    lens = [777, 1500, 3]
    q = torch.randn(sum(lens), 8, 128, dtype=torch.bfloat16, device=DEV)
    k, v = torch.randn_like(q), torch.randn_like(q)
    lay = dict(cu_seqlens_q=_cu(lens), cu_seqlens_k=_cu(lens), max_seqlen_q=1500, max_seqlen_k=1500)
    check(q, k, v, config, window_right=0, **lay)


def test_past_2_to_31_elements():
    """q, k, v, out of 2.2e9 elements each: the batch / sequence base offsets must be 64-bit."""
    b, s, h, d = 2100, 1040, 8, 128
    assert b * s * h * d > 2 ** 31
    q, k, v = (torch.randn(b, s, h, d, dtype=torch.bfloat16, device=DEV) for _ in range(3))
    opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0, softcap=0.0, sink=None)
    out, lse = fwd.forward(q, k, v, **opts)
    tail = slice(b - 3, b)  # the sequences whose offsets pass 2^31
    ref_out, ref_lse = reference.forward(q[tail].float(), k[tail].float(), v[tail].float(), **opts)
    low_out, low_lse = reference.forward(q[tail], k[tail], v[tail], compute_dtype=q.dtype, **opts)
    assert_close_rule("out", out[tail], ref_out, low_out)
    assert_close_rule("lse", lse[tail], ref_lse, low_lse)
    # The same tensors as one packed varlen batch.
    cu = torch.arange(0, b + 1, dtype=torch.int32, device=DEV) * s
    out_v, lse_v = fwd.forward(q.view(-1, h, d), k.view(-1, h, d), v.view(-1, h, d), cu_seqlens_q=cu,
                               cu_seqlens_k=cu, max_seqlen_q=s, max_seqlen_k=s, **opts)
    assert_close_rule("varlen out", out_v.view(b, s, h, d)[tail], ref_out, low_out)
    assert_close_rule("varlen lse", lse_v.view(h, b, s).transpose(0, 1)[tail], ref_lse, low_lse)
    del q, k, v, out, out_v
    torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# The lean fast path (fa4/kernels/triton/forward_lean.py): one key loop, warp-specialized by the compiler
# ----------------------------------------------------------------------------------------------------------

# The table's tiles and the probe's others: warp-specialized, device-built and host-built descriptors, causal split.
LEAN_TILES = sorted({cfg for rows in forward_lean.TABLE.values() for _, cfg in rows} | {
    forward_lean.LeanConfig(128, 128, 2, True), forward_lean.LeanConfig(128, 64, 2, True),
    forward_lean.LeanConfig(128, 64, 2, False), forward_lean.LeanConfig(128, 128, 2, False),
    forward_lean.LeanConfig(128, 64, 2, False, True), forward_lean.LeanConfig(64, 64, 3, False, True, True),
    forward_lean.LeanConfig(128, 64, 3, False, True, True), forward_lean.LeanConfig(64, 128, 3, False, True, True)})


def check_lean(q, k, v, cfg, causal):
    """One lean tile launched directly (the call must be one config_for accepts) against the references."""
    opts = dict(window_left=-1, window_right=0 if causal else -1, softcap=0.0, sink=None,
                softmax_scale=q.shape[-1] ** -0.5)
    _poison()
    out, lse, launch = fwd.prepare(q, k, v, **opts)
    fwd._ensure_allocator()
    forward_lean.launch(launch, cfg)
    judge(q, k, v, out, lse, **opts)


@pytest.mark.skipif(not IS_SM90, reason="the lean path is sm_90 only")
@pytest.mark.parametrize("cfg", LEAN_TILES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal,sq,sk", [(False, 1024, 1024), (False, 1000, 2048), (False, 4, 1024),
                                          (True, 1024, 1024), (True, 1540, 2999), (True, 2996, 2996),
                                          (True, 4, 2048)])
def test_lean_tiles(cfg, dtype, d, causal, sq, sk):
    """Every lean tile the probe times, over the calls the lean path accepts (GQA 8 on 2, Sq not a multiple of
    the query block, Sq < Sk, odd Sk under causal)."""
    q, k, v = batched(2, sq, sk, 8, 2, d, d, dtype)
    check_lean(q, k, v, cfg, causal)


@pytest.mark.skipif(not IS_SM90, reason="the lean path is sm_90 only")
@pytest.mark.parametrize("cfg", [c for c in LEAN_TILES if c.host_desc], ids=str)
@pytest.mark.parametrize("causal,sq,sk", [(False, 1001, 1024), (True, 1001, 1001), (True, 333, 2000),
                                          (False, 1, 512), (True, 1, 77)])
def test_lean_host_desc_odd_rows(cfg, causal, sq, sk):
    """The host-descriptor tiles also take Sq % 4 != 0 (their lse leaves by pointer stores), and each program's
    TMA box is clipped at its own sequence's end: batch 3, where an unclipped tile would read or write the next
    sequence's rows."""
    q, k, v = batched(3, sq, sk, 8, 2, 128, 128, torch.bfloat16)
    check_lean(q, k, v, cfg, causal)


@pytest.mark.skipif(not IS_SM90, reason="the lean path is sm_90 only")
@pytest.mark.parametrize("causal", [False, True])
def test_lean_packed_qkv(causal):
    """fwd.forward on q, k, v viewed from one packed (B, S, 3, H, D) tensor: the lean kernel takes the row stride
    3·H·D as it is (no copy) and leaves the packed tensor untouched."""
    qkv = torch.randn(2, 1024, 3, 16, 128, device=DEV, dtype=torch.bfloat16)
    before = qkv.clone()
    q, k, v = qkv.unbind(2)
    opts = dict(window_left=-1, window_right=0 if causal else -1, softcap=0.0, sink=None, softmax_scale=128 ** -0.5)
    assert forward_lean.config_for(q, k, v, varlen=False, paged=False, seqused_k=None, tma_ok=True,
                                   **{key: opts[key] for key in ("window_left", "window_right", "softcap", "sink")})
    _poison()
    out, lse = fwd.forward(q, k, v, **opts)
    judge(q, k, v, out, lse, **opts)
    assert torch.equal(qkv, before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128, 200])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,sk", [(1024, 1024), (4096, 4096), (1000, 1000), (2999, 1537), (1, 2048), (1540, 2048),
                                   (1024, 0)])
def test_forward_routing(dtype, d, causal, sq, sk):
    """fwd.forward as the API calls it: the lean path where config_for accepts the call, the general kernel
    elsewhere (odd Sk without causal, Sq > Sk under causal, a head dim not in the table); right either way."""
    q, k, v = batched(2, sq, sk, 8, 2, d, d, dtype)
    opts = dict(window_left=-1, window_right=0 if causal else -1, softcap=0.0, sink=None, softmax_scale=d ** -0.5)
    _poison()
    out, lse = fwd.forward(q, k, v, **opts)
    judge(q, k, v, out, lse, **opts)


@pytest.mark.skipif(not IS_SM90, reason="the lean path is sm_90 only")
@pytest.mark.parametrize("causal", [False, True])
def test_lean_kept_launch(causal):
    """The host-descriptor kernel's kept launch (forward_lean._PLANS) and repeated calls (forward_lean._CALLS):
    a later call of the same signature skips prepare and goes straight to the compiled launcher. Fresh tensors
    each call; then the same shapes as views of a packed qkv tensor (other strides: the descriptors carry them,
    the kept launch must not assume the first call's); then a misaligned q under the first signature."""
    from fa4.kernels.triton import forward_lean
    b, s, h, d = 2, 1000 if causal else 1024, 8, 128  # without causal, whole key blocks
    opts = dict(window_left=-1, window_right=0 if causal else -1, softcap=0.0, sink=None, softmax_scale=d ** -0.5)
    forward_lean._PLANS.clear()
    forward_lean._CALLS.clear()
    for call in range(4):
        if call < 2:
            q, k, v = batched(b, s, s, h, h, d, d, torch.bfloat16)
        elif call == 2:
            q, k, v = torch.randn(b, s, 3, h, d, device=DEV, dtype=torch.bfloat16).unbind(2)
        else:
            # The first signature again, but q 2 bytes off 16-byte alignment: the repeat path must decline it
            # (TMA cannot address it) and the full path takes the general kernel.
            q, k, v = batched(b, s, s, h, h, d, d, torch.bfloat16)
            q = torch.empty(q.numel() + 1, device=DEV, dtype=q.dtype).as_strided(q.shape, q.stride(), 1).copy_(q)
            assert forward_lean.repeat_call(forward_lean.signature(q, k, v, opts["softmax_scale"], -1,
                                                                   opts["window_right"]), q, k, v) is None
            _poison()
            out, lse = fwd.forward(q, k, v, **opts)
            judge(q, k, v, out, lse, **opts)
            continue
        cfg = forward_lean.config_for(q, k, v, varlen=False, paged=False, seqused_k=None, tma_ok=True,
                                      **{key: opts[key] for key in ("window_left", "window_right", "softcap", "sink")})
        assert cfg is not None and cfg.host_desc
        _poison()
        out, lse = fwd.forward(q, k, v, **opts)
        judge(q, k, v, out, lse, **opts)
    assert len(forward_lean._PLANS) == 1 and next(iter(forward_lean._PLANS.values())).compiled is not None
    assert len(forward_lean._CALLS) == 2  # the contiguous and the packed signatures


@pytest.mark.skipif(not IS_SM90, reason="the lean path is sm_90 only")
def test_lean_routing_decisions():
    """Which calls config_for gives the lean kernel: the plain D = 128 training call yes; each feature it lacks no."""
    def cfg(sq=1024, sk=1024, d=128, causal=False, **kw):
        q, k, v = batched(1, sq, sk, 4, 4, d, d, torch.bfloat16)
        opts = dict(window_left=-1, window_right=0 if causal else -1, softcap=0.0, sink=None, varlen=False,
                    paged=False, seqused_k=None, tma_ok=True)
        opts.update(kw)
        return forward_lean.config_for(q, k, v, **opts)
    assert cfg().host_desc and cfg(causal=True).host_desc and cfg(sq=4096, sk=4096).warp_spec
    assert cfg(sq=4096, sk=4096, causal=True).host_desc and cfg(sq=8192, sk=8192, causal=True).warp_spec
    assert cfg(d=64).host_desc and cfg(d=64, sq=16384, sk=16384, causal=True) is None and cfg(d=256) is None
    assert cfg(sk=1000) is None  # a partial key block without causal would need the tail mask
    assert cfg(sq=1001, sk=1001, causal=True).host_desc  # lse by pointer stores: any Sq
    assert cfg(sq=8194, sk=8194, causal=True) is None  # warp-specialized: lse rows not 16-byte aligned
    assert cfg(sq=2048, sk=1024, causal=True) is None and cfg(sk=0) is None  # rows that see no key
    assert cfg(window_left=128, window_right=0) is None and cfg(softcap=5.0) is None
    assert cfg(sink=torch.zeros(4, device=DEV)) is None and cfg(varlen=True) is None and cfg(tma_ok=False) is None
    # A broadcast batch (zero stride) keeps the device-built descriptors' base offsets: the general kernel.
    q, k, v = batched(1, 1024, 1024, 4, 4, 128, 128, torch.bfloat16)
    k2 = k.expand(3, -1, -1, -1)
    assert forward_lean.config_for(q.expand(3, -1, -1, -1), k2, k2, window_left=-1, window_right=-1, softcap=0.0,
                                   sink=None, varlen=False, paged=False, seqused_k=None, tma_ok=True) is None
