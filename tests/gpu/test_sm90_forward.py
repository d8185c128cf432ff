"""The Gluon Hopper forward (fa4.kernels.sm90) against fa4.reference, by DESIGN.md's numerics rule.

Calls the backend directly, so every feature and every softmax variant of this path is exercised whatever
dispatch would pick. Skipped without an sm_90 GPU. The path is on by default (fa4/kernels/sm90/__init__.py);
FA4_SM90=1 is set here only where the environment does not set it.
"""
import os

import pytest
import torch

os.environ.setdefault("FA4_SM90", "1")

from attention_check import case_seed, cu_seqlens, make_inputs, poison_allocator  # noqa: E402
from fa4 import reference  # noqa: E402
from numerics import assert_close_rule  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0), reason="needs an sm_90 GPU")
DEV = "cuda"


def _poison():
    poison_allocator(DEV)


def _cu(lens):
    return cu_seqlens(lens, DEV)


def _run(q, k, v, *, causal=False, window=(-1, -1), softcap=0.0, sink=None, varlen=None, variant=None,
         scale=None):
    from fa4.kernels import sm90
    left, right = window
    if causal:
        right = 0
    opts = dict(softmax_scale=scale if scale is not None else q.shape[-1] ** -0.5, window_left=left,
                window_right=right, softcap=softcap, sink=sink, **(varlen or {}))
    reason = sm90.unsupported_reason(q, k, v, **opts)
    assert reason is None, reason
    _poison()
    out, lse = sm90.forward(q, k, v, variant=variant, **opts)
    torch.cuda.synchronize()
    ref_out, ref_lse = reference.forward(q.float(), k.float(), v.float(), **opts)
    low_out, low_lse = reference.forward(q, k, v, compute_dtype=q.dtype, **opts)
    assert out.dtype == q.dtype and out.shape == ref_out.shape
    assert_close_rule("out", out, ref_out, low_out, softcap=softcap > 0)
    assert_close_rule("lse", lse, ref_lse, low_lse, softcap=softcap > 0)
    return out, lse


# (b, sq, sk, hq, hkv, d, dv, causal, window, softcap, sink)
BATCHED = [
    (2, 1024, 1024, 4, 4, 64, 64, False, (-1, -1), 0.0, False),
    (2, 1000, 1000, 4, 2, 128, 128, True, (-1, -1), 0.0, False),
    (1, 2049, 2049, 2, 2, 256, 256, True, (-1, -1), 0.0, False),
    (1, 1000, 1000, 2, 1, 256, 256, False, (-1, -1), 0.0, True),
    (1, 777, 1543, 4, 1, 128, 128, True, (-1, -1), 0.0, True),      # Sq < Sk, MQA, sink
    (1, 1543, 777, 4, 2, 64, 64, True, (-1, -1), 0.0, False),       # Sq > Sk: leading rows see nothing
    (2, 1, 3001, 8, 2, 128, 128, True, (-1, -1), 0.0, False),       # one query
    (1, 1500, 1500, 4, 4, 96, 96, False, (256, 0), 0.0, False),     # sliding window, padded head dim
    (1, 1200, 1200, 4, 2, 64, 64, False, (100, 50), 30.0, False),   # window both sides + softcap
    (1, 1000, 1000, 6, 3, 192, 128, True, (-1, -1), 0.0, False),    # Dv != D
    (1, 513, 513, 2, 2, 40, 24, False, (-1, -1), 0.0, True),        # small odd head dims
    (1, 3000, 3000, 4, 1, 128, 128, False, (-1, -1), 50.0, True),
    (1, 300, 300, 2, 2, 128, 128, False, (0, 0), 0.0, False),       # each query sees one key
    # D = 64 with a mask takes 128-row tiles up to a visible span of configs.MASKED_SPAN_WG2 keys, the
    # table's 192-row tiles past it: these two reach the masked 192-row path.
    (1, 4500, 4500, 2, 1, 64, 64, True, (-1, -1), 0.0, False),
    (1, 5000, 5000, 2, 2, 64, 64, False, (4500, 0), 0.0, False),
]


def _ids(c):
    b, sq, sk, hq, hkv, d, dv, causal, window, softcap, sink = c
    return f"b{b}-sq{sq}-sk{sk}-h{hq}/{hkv}-d{d}/{dv}-c{int(causal)}-w{window[0]}_{window[1]}-cap{softcap}-s{int(sink)}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", BATCHED, ids=[_ids(c) for c in BATCHED])
def test_batched(case, dtype):
    torch.manual_seed(case_seed(case, str(dtype)))
    b, sq, sk, hq, hkv, d, dv, causal, window, softcap, sink = case
    q = torch.randn(b, sq, hq, d, dtype=dtype, device=DEV)
    k = torch.randn(b, sk, hkv, d, dtype=dtype, device=DEV)
    v = torch.randn(b, sk, hkv, dv, dtype=dtype, device=DEV)
    s = torch.randn(hq, dtype=torch.float32, device=DEV) if sink else None
    _run(q, k, v, causal=causal, window=window, softcap=softcap, sink=s)


# Every softmax/schedule variant the probe times, on shapes that reach the rescale and masking paths.
VARIANTS = [
    dict(PINGPONG=False), dict(PINGPONG=True), dict(LAZY=True), dict(POLY=1), dict(POLY=2), dict(POLY=4),
    dict(LAZY=True, POLY=1), dict(stages=3), dict(num_wg=2, consumer_regs=240), dict(num_wg=3, consumer_regs=160),
    dict(SCHED="reversed"), dict(SCHED="flat"), dict(STAGGER=True),
    # r2 analysis (benchmarks/NOTES.md): tile-end hand-offs, two Q buffers, the probe's trace.
    dict(TAIL=True), dict(TAIL=True, q_buffers=2), dict(q_buffers=2), dict(TRACE=True),
    # Session 9: the causal walk that converges on one K/V block per head (the default) and the descending one.
    dict(CONVERGE=True), dict(CONVERGE=False),
    # O staged half its columns at a time (probe variant; frees Q's buffer of O at D = 256).
    dict(O_HALVES=True), dict(O_HALVES=True, TAIL=False),
    # Units handed out from a global counter (packed calls of unequal lengths take it by default; see
    # test_dynamic_varlen); here forced onto batched calls too.
    dict(DYNAMIC=True),
    # Single tiles longest first in L2 sections (batched calls): the automatic section, one pair a section, and
    # sections of 3 of the 8 (sequence, head) pairs (the last one partial).
    dict(SCHED="lpt"), dict(SCHED="lpt", SECTION=1), dict(SCHED="lpt", SECTION=3),
    # Three consumers on 64-key blocks (probe variants at D = 128; D = 64 takes them too).
    dict(num_wg=3, consumer_regs=160, block_n=64), dict(num_wg=3, consumer_regs=160, block_n=64, stages=3),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=[str(v) for v in VARIANTS])
@pytest.mark.parametrize("d,causal", [(64, False), (128, True), (256, False)])
def test_variants(variant, d, causal):
    if variant.get("num_wg") == 3 and not (d == 64 or (d == 128 and variant.get("block_n") == 64)):
        pytest.skip("three consumer warpgroups fit registers at D = 64, and at D = 128 on 64-key blocks")
    if (variant.get("stages") == 3 or variant.get("q_buffers") == 2) and d == 256:
        pytest.skip("three K/V stages or two Q buffers do not fit shared memory at D = 256")
    if "SCHED" in variant and not causal:
        pytest.skip("the schedules differ only where a window makes tile costs differ")
    torch.manual_seed(d)
    q = torch.randn(2, 1500, 4, d, dtype=torch.bfloat16, device=DEV)
    # Keys are visited last block first; a key scale falling from 6 to 0.1 along the sequence makes the row
    # max climb by more than 8 (log2 units) as the walk proceeds, so the lazy rescale must fire too.
    k = torch.randn(2, 1500, 2, d, dtype=torch.bfloat16, device=DEV)
    k = (k * torch.linspace(6.0, 0.1, 1500, device=DEV)[None, :, None, None]).to(torch.bfloat16)
    v = torch.randn(2, 1500, 2, d, dtype=torch.bfloat16, device=DEV)
    _run(q, k, v, causal=causal, variant=variant)


# GQA packing (attention_fwd PACK, configs.gqa_pack): the query heads of a kv head share a tile, row t · G + g
# being token t of head g. (b, sq, sk, hq, hkv, d, causal, window, softcap, sink), the query sequences short
# enough to pack.
PACKED = [
    (2, 1, 3001, 32, 4, 128, True, (-1, -1), 0.0, False),     # one query token, group 8
    (3, 16, 2000, 16, 2, 128, True, (-1, -1), 0.0, False),    # a 16-token chunk against a long cache
    (1, 17, 17, 8, 1, 64, True, (-1, -1), 0.0, False),        # MQA, group 8, odd length, D = 64
    (2, 100, 700, 8, 4, 256, True, (-1, -1), 0.0, True),      # group 2, D = 256, sink
    (1, 333, 333, 16, 1, 128, False, (64, 0), 30.0, False),   # group 16, left window, softcap
    (1, 1000, 1000, 8, 2, 64, True, (-1, -1), 0.0, False),    # group 4 at D = 64 (two-consumer masked tile)
    (2, 64, 64, 64, 1, 128, True, (-1, -1), 0.0, True),       # group 64: one token a warpgroup
    (1, 900, 900, 12, 2, 128, True, (-1, -1), 0.0, False),    # group 6 (not a power of two): not packed
]


def _packed_ids(c):
    b, sq, sk, hq, hkv, d, causal, window, softcap, sink = c
    return f"b{b}-sq{sq}-sk{sk}-h{hq}/{hkv}-d{d}-c{int(causal)}-w{window[0]}_{window[1]}-cap{softcap}-s{int(sink)}"


@pytest.mark.parametrize("pack", ["auto", "off"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", PACKED, ids=[_packed_ids(c) for c in PACKED])
def test_gqa_packed(case, dtype, pack):
    """Packed tiles (the default for these shapes) and the same problems unpacked, under the rule; lse too."""
    from fa4.kernels.sm90 import configs
    torch.manual_seed(case_seed(case, str(dtype), pack))
    b, sq, sk, hq, hkv, d, causal, window, softcap, sink = case
    group = hq // hkv
    assert configs.gqa_pack(group, sq) == (group if group & (group - 1) == 0 else 1)
    q = torch.randn(b, sq, hq, d, dtype=dtype, device=DEV)
    k = torch.randn(b, sk, hkv, d, dtype=dtype, device=DEV)
    v = torch.randn(b, sk, hkv, d, dtype=dtype, device=DEV)
    s = torch.randn(hq, dtype=torch.float32, device=DEV) if sink else None
    _run(q, k, v, causal=causal, window=window, softcap=softcap, sink=s,
         variant=None if pack == "auto" else dict(PACK=1))


@pytest.mark.parametrize("pack", [2, 4, 8])
def test_gqa_pack_forced(pack):
    """PACK forced on a long causal problem (past configs.PACK_MAX_SEQLEN_Q, paired schedule, many tiles),
    and packing part of a group (2 or 4 of 8 heads a tile)."""
    torch.manual_seed(pack)
    q = torch.randn(1, 2049, 16, 128, dtype=torch.bfloat16, device=DEV)
    k = torch.randn(1, 2049, 2, 128, dtype=torch.bfloat16, device=DEV)
    v = torch.randn(1, 2049, 2, 128, dtype=torch.bfloat16, device=DEV)
    _run(q, k, v, causal=True, variant=dict(PACK=pack))


def test_gqa_packed_varlen():
    """Packed tiles over ragged sequences: tiles that end past a sequence store O row by row (a TMA box would
    write the next sequence's rows), empty sequences, Sq != Sk, group 8."""
    torch.manual_seed(5)
    lens_q, lens_k = [1, 16, 0, 37, 200, 9], [500, 16, 40, 37, 900, 3000]
    q, k, v, varlen = make_inputs(None, None, None, 16, 2, 128, 128, torch.bfloat16, DEV,
                                  varlen_lens=(lens_q, lens_k))
    _run(q, k, v, causal=True, varlen=varlen)
    _run(q, k, v, causal=False, sink=torch.randn(16, dtype=torch.float32, device=DEV), varlen=varlen)


WINDOWED = [c for c in BATCHED if c[7] or c[8] != (-1, -1)]


@pytest.mark.parametrize("converge", [False, True], ids=["descend", "converge"])
@pytest.mark.parametrize("case", WINDOWED, ids=[_ids(c) for c in WINDOWED])
def test_walks(case, converge):
    """Every windowed shape of BATCHED (both edges, Sq != Sk both ways, one query, a window of one key, the
    192-row D = 64 tile) with both walks over the key blocks: the converging one (the default under a right
    window, attention_fwd._block) and every tile from its last key block down."""
    torch.manual_seed(case_seed(case))
    b, sq, sk, hq, hkv, d, dv, causal, window, softcap, sink = case
    q = torch.randn(b, sq, hq, d, dtype=torch.bfloat16, device=DEV)
    k = torch.randn(b, sk, hkv, d, dtype=torch.bfloat16, device=DEV)
    v = torch.randn(b, sk, hkv, dv, dtype=torch.bfloat16, device=DEV)
    s = torch.randn(hq, dtype=torch.float32, device=DEV) if sink else None
    _run(q, k, v, causal=causal, window=window, softcap=softcap, sink=s, variant=dict(CONVERGE=converge))


@pytest.mark.parametrize("case", ["batched-causal-d128", "batched-d64-gqa", "varlen-sink-softcap-d128",
                                  "batched-causal-d256-sink"])
def test_fast_launch(case):
    """FAST: the first call of a signature goes through JITFunction and keeps a Plan; the later calls (other
    tensors, same signature) launch from it and must give the same results as the reference."""
    from fa4.kernels.sm90 import launch
    d = 256 if "d256" in case else 64 if "d64" in case else 128
    causal = "causal" in case
    for i in range(3):
        torch.manual_seed(i)
        if case.startswith("varlen"):
            lens = [300, 1, 777]
            q = torch.randn(sum(lens), 4, d, dtype=torch.bfloat16, device=DEV)
            k = torch.randn(sum(lens), 2, d, dtype=torch.bfloat16, device=DEV)
            v = torch.randn(sum(lens), 2, d, dtype=torch.bfloat16, device=DEV)
            s = torch.randn(4, dtype=torch.float32, device=DEV)
            varlen = dict(cu_seqlens_q=_cu(lens), cu_seqlens_k=_cu(lens), max_seqlen_q=max(lens),
                          max_seqlen_k=max(lens))
            _run(q, k, v, causal=causal, softcap=20.0, sink=s, varlen=varlen, variant=dict(FAST=True))
        else:
            hkv = 2 if "gqa" in case else 4
            q = torch.randn(2, 1100, 4, d, dtype=torch.bfloat16, device=DEV)
            k = torch.randn(2, 1100, hkv, d, dtype=torch.bfloat16, device=DEV)
            v = torch.randn(2, 1100, hkv, d, dtype=torch.bfloat16, device=DEV)
            s = torch.randn(4, dtype=torch.float32, device=DEV) if "sink" in case else None
            _run(q, k, v, causal=causal, sink=s, variant=dict(FAST=True))
    assert launch._PLANS, "the first call should have kept a launch plan"


VARLEN = [
    # (lens_q, lens_k, hq, hkv, d, dv, causal, window, use_seqused)
    ([1, 200, 777, 64, 1000, 0, 129], None, 4, 2, 128, 128, False, (-1, -1), False),
    ([1, 200, 777, 64, 1000, 0, 129], None, 4, 2, 128, 128, True, (-1, -1), False),
    ([300, 5, 1024], [1000, 3, 70], 4, 4, 64, 64, True, (-1, -1), False),      # Sq != Sk per sequence
    ([513, 257], [513, 257], 2, 1, 256, 256, False, (64, 64), False),
    ([700, 129, 64], [900, 300, 64], 4, 2, 128, 128, True, (-1, -1), True),   # seqused_k < allocated keys
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", VARLEN, ids=[f"varlen{i}" for i in range(len(VARLEN))])
def test_varlen(case, dtype):
    torch.manual_seed(len(case[0]))
    causal, window = case[6], case[7]
    q, k, v, varlen = _varlen_inputs(case, dtype)
    _run(q, k, v, causal=causal, window=window, varlen=varlen)


def _varlen_inputs(case, dtype):
    """Packed q, k, v and the varlen keywords of a VARLEN case (seqused_k 37 keys short of each sequence's)."""
    lens_q, lens_k, hq, hkv, d, dv, causal, window, use_seqused = case
    lens_k = lens_k or lens_q
    q, k, v, varlen = make_inputs(None, None, None, hq, hkv, d, dv, dtype, DEV, varlen_lens=(lens_q, lens_k))
    if use_seqused:
        varlen["seqused_k"] = torch.tensor([max(n - 37, 0) for n in lens_k], dtype=torch.int32, device=DEV)
    return q, k, v, varlen


@pytest.mark.parametrize("case", VARLEN, ids=[f"varlen{i}" for i in range(len(VARLEN))])
def test_varlen_o_halves(case):
    """O_HALVES (O staged half its columns at a time) on the varlen table: full tiles through the half-width
    TMA box at column 0 and Dv/2 of each token's row, ragged tails by pointer stores."""
    torch.manual_seed(7 + len(case[0]))
    q, k, v, varlen = _varlen_inputs(case, torch.bfloat16)
    _run(q, k, v, causal=case[6], window=case[7], varlen=varlen, variant=dict(O_HALVES=True))


def test_strided_inputs():
    """q, k, v as views of one packed qkv tensor (non-contiguous heads): descriptors take the strides."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 1000, 3, 8, 128, dtype=torch.bfloat16, device=DEV)
    q, k, v = qkv.unbind(2)
    _run(q, k, v, causal=True)


def test_offsets_past_2_31():
    """B·S·H·D > 2^31 elements: coordinates stay per-dimension, lse offsets are 64-bit."""
    b, s, h, d = 1025, 1024, 16, 128  # 2^31 + 2^21 elements per tensor
    try:
        q = torch.randn(b, s, h, d, dtype=torch.bfloat16, device=DEV)
        k = torch.randn(b, s, h, d, dtype=torch.bfloat16, device=DEV)
        v = torch.randn(b, s, h, d, dtype=torch.bfloat16, device=DEV)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    from fa4.kernels import sm90
    out, lse = sm90.forward(q, k, v, softmax_scale=d ** -0.5, window_left=-1, window_right=0, softcap=0.0,
                            sink=None)
    tail = slice(b - 2, b)
    opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0)
    qt, kt, vt = q[tail], k[tail], v[tail]
    ref_out, ref_lse = reference.forward(qt.float(), kt.float(), vt.float(), **opts)
    low_out, low_lse = reference.forward(qt, kt, vt, compute_dtype=q.dtype, **opts)
    assert_close_rule("out", out[tail], ref_out, low_out)
    assert_close_rule("lse", lse[tail], ref_lse, low_lse)


def test_dispatch_reasons():
    """What this path declines, with a reason (dispatch then falls back; backend='sm90' raises)."""
    from fa4.kernels import sm90
    q = torch.randn(1, 64, 2, 128, dtype=torch.bfloat16, device=DEV)
    kw = dict(window_left=-1, window_right=-1, softcap=0.0, sink=None, cu_seqlens_q=None, page_table=None)
    assert sm90.unsupported_reason(q, q, q, **kw) is None
    assert "dtype" in sm90.unsupported_reason(q.float(), q.float(), q.float(), **kw)
    # A paged cache is served for packed calls with seqused_k and pages of whole key blocks (test_paged_prefill).
    assert "paged" in sm90.unsupported_reason(q, q, q, **dict(kw, page_table=torch.zeros(1, 1, device=DEV)))
    pool = torch.randn(4, 64, 2, 128, dtype=torch.bfloat16, device=DEV)
    packed = dict(kw, cu_seqlens_q=_cu([64]), seqused_k=torch.tensor([64], dtype=torch.int32, device=DEV),
                  page_table=torch.zeros(1, 4, dtype=torch.int32, device=DEV))
    assert "multiple" in sm90.unsupported_reason(q[0], pool, pool, **packed)
    q_odd = torch.randn(1, 64, 2, 130, dtype=torch.bfloat16, device=DEV)[..., :124]
    assert sm90.unsupported_reason(q_odd, q_odd, q_odd, **kw) is not None


# Paged prefill (flash_attn_varlen_func with page_table): K/V blocks loaded by TMA from the page pool, a block's page
# looked up in the table. (lens_q, lens_k, hq, hkv, d, page_size, causal, window): chunks against longer caches
# (the chunk's keys at the cache end), a whole prompt, GQA packing, sequences ending mid-page and mid-block, pages
# of two blocks, D = 64 and 256 tiles.
PAGED = [
    ([1000, 1, 513], [3000, 1500, 513], 8, 2, 128, 128, True, (-1, -1)),
    ([2047], [2047], 4, 4, 128, 256, True, (-1, -1)),
    ([64, 17], [4096, 777], 32, 8, 128, 128, True, (-1, -1)),
    ([700, 300], [900, 300], 4, 1, 64, 128, False, (128, 0)),
    ([333, 1200], [1000, 1200], 4, 2, 256, 64, True, (-1, -1)),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", PAGED, ids=[f"paged{i}" for i in range(len(PAGED))])
def test_paged_prefill(case, dtype):
    """The sm90 forward over a paged cache whose pages are shuffled (and with spare pages the table never names),
    under the rule; and the public call takes this path."""
    import fa4
    torch.manual_seed(case_seed(case, str(dtype)))
    lens_q, lens_k, hq, hkv, d, page, causal, window = case
    batch = len(lens_q)
    max_pages = max(-(-n // page) for n in lens_k)
    num_pages = batch * max_pages + 3
    q = torch.randn(sum(lens_q), hq, d, dtype=dtype, device=DEV)
    k = torch.randn(num_pages, page, hkv, d, dtype=dtype, device=DEV)
    v = torch.randn(num_pages, page, hkv, d, dtype=dtype, device=DEV)
    table = torch.randperm(num_pages, device=DEV)[:batch * max_pages].view(batch, max_pages).to(torch.int32)
    lay = dict(cu_seqlens_q=_cu(lens_q), max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k),
               seqused_k=torch.tensor(lens_k, dtype=torch.int32, device=DEV), page_table=table)
    out, _ = _run(q, k, v, causal=causal, window=window, varlen=lay)
    public = fa4.flash_attn_varlen_func(q, k, v, lay["cu_seqlens_q"], None, lay["max_seqlen_q"], lay["max_seqlen_k"],
                                        seqused_k=lay["seqused_k"], page_table=table, causal=causal,
                                        window_size=window, backend="sm90")
    assert torch.equal(public, out)


# (b, sq, sk, hq, hkv, d, window, sink): SCHED "lpt" where tile costs differ.
LPT_CASES = [
    (2, 1000, 1000, 8, 2, 128, (-1, 0), False),    # causal, GQA
    (1, 777, 1543, 4, 1, 64, (-1, 0), True),       # Sq < Sk, sink, three consumers
    (3, 1100, 1100, 2, 2, 256, (300, 0), False),   # sliding window
    (2, 1200, 900, 4, 4, 128, (200, -1), False),   # left window only: the first query blocks cost most
    (1, 2049, 2049, 6, 3, 128, (-1, 0), False),    # a lone last query block
]


@pytest.mark.parametrize("case", LPT_CASES, ids=[f"lpt{i}" for i in range(len(LPT_CASES))])
def test_lpt_schedule(case):
    """SCHED "lpt": every tile once, from the dynamic counter, whatever the section size."""
    b, sq, sk, hq, hkv, d, window, sink = case
    torch.manual_seed(sq + d)
    q = torch.randn(b, sq, hq, d, dtype=torch.bfloat16, device=DEV)
    k = torch.randn(b, sk, hkv, d, dtype=torch.bfloat16, device=DEV)
    v = torch.randn(b, sk, hkv, d, dtype=torch.bfloat16, device=DEV)
    s = torch.randn(hq, dtype=torch.float32, device=DEV) if sink else None
    for section in (None, 1, 5):
        out, _ = _run(q, k, v, window=window, sink=s, variant=dict(SCHED="lpt", SECTION=section))
        again, _ = _run(q, k, v, window=window, sink=s, variant=dict(SCHED="lpt", SECTION=section, FAST=True))
        assert torch.equal(out, again)


@pytest.mark.parametrize("d,causal", [(128, True), (64, True), (128, False), (256, True)])
def test_dynamic_varlen(d, causal):
    """DYNAMIC (forced): packed sequences of mixed lengths, longest first from a global unit counter, with
    an empty sequence and one shorter than a tile; the same answer as the static schedule, under the rule."""
    torch.manual_seed(d + causal)
    lens = [2048, 0, 1024, 77, 4608, 512, 8192]
    q = torch.randn(sum(lens), 8, d, dtype=torch.bfloat16, device=DEV)
    k = torch.randn(sum(lens), 2, d, dtype=torch.bfloat16, device=DEV)
    v = torch.randn(sum(lens), 2, d, dtype=torch.bfloat16, device=DEV)
    lay = dict(cu_seqlens_q=_cu(lens), cu_seqlens_k=_cu(lens), max_seqlen_q=max(lens), max_seqlen_k=max(lens))
    out, lse = _run(q, k, v, causal=causal, varlen=lay, variant=dict(DYNAMIC=True))
    again, _ = _run(q, k, v, causal=causal, varlen=lay, variant=dict(DYNAMIC=True))
    assert torch.equal(out, again)  # each tile is computed by one CTA whatever the order: bitwise repeatable
    static, _ = _run(q, k, v, causal=causal, varlen=lay, variant=dict(DYNAMIC=False))
    assert torch.equal(out, static)  # the same tiles, computed the same way, in another order


@pytest.mark.parametrize("d", [128, 64])
def test_dynamic_by_default_through_plans(d):
    """Mixed lengths take DYNAMIC by default (attention_fwd.dynamic_units), also from a FAST plan: later calls of
    the signature with other lengths (same count, same total) need a fresh order and counter each, and the public
    call must agree with the kernel's."""
    import fa4
    from fa4.kernels.sm90 import attention_fwd
    for i, lens in enumerate(([2048, 0, 1024, 77, 4608], [77, 4608, 2048, 1024, 0], [1000, 1000, 1000, 3000, 1757])):
        torch.manual_seed(10 * d + i)
        q = torch.randn(sum(lens), 8, d, dtype=torch.bfloat16, device=DEV)
        k = torch.randn(sum(lens), 2, d, dtype=torch.bfloat16, device=DEV)
        v = torch.randn(sum(lens), 2, d, dtype=torch.bfloat16, device=DEV)
        lay = dict(cu_seqlens_q=_cu(lens), cu_seqlens_k=_cu(lens), max_seqlen_q=4608, max_seqlen_k=4608)
        assert attention_fwd.dynamic_units(q, lay["cu_seqlens_q"], 4608, None)
        out, _ = _run(q, k, v, causal=True, varlen=lay, variant=dict(FAST=True))
        public = fa4.flash_attn_varlen_func(q, k, v, lay["cu_seqlens_q"], lay["cu_seqlens_k"], 4608, 4608, causal=True,
                                            backend="sm90")
        assert torch.equal(public, out)


def test_dynamic_many_sequences():
    """More packed sequences than packed_order ranks (MAX_RANKED_BATCH): the order from torch's sort, the same
    answer under the rule, bitwise repeatable."""
    from fa4.kernels.sm90 import packed_order
    gen = torch.Generator().manual_seed(11)
    lens = torch.randint(0, 40, (packed_order.MAX_RANKED_BATCH + 300, ), generator=gen).tolist()
    q = torch.randn(sum(lens), 4, 64, dtype=torch.bfloat16, device=DEV)
    k = torch.randn(sum(lens), 2, 64, dtype=torch.bfloat16, device=DEV)
    v = torch.randn(sum(lens), 2, 64, dtype=torch.bfloat16, device=DEV)
    lay = dict(cu_seqlens_q=_cu(lens), cu_seqlens_k=_cu(lens), max_seqlen_q=max(lens), max_seqlen_k=max(lens))
    out, _ = _run(q, k, v, causal=True, varlen=lay)
    again, _ = _run(q, k, v, causal=True, varlen=lay, variant=dict(DYNAMIC=False))
    assert torch.equal(out, again)
