"""Random-configuration fuzz of the public API on a GPU against the reference, under DESIGN.md's numerics rule:
out, lse and every gradient (dq, dk, dv, dsink) of flash_attn_func / flash_attn_varlen_func, over head dims
8-256 with Dv != D, GQA ratios, causal / windows / softcap / sink, bf16 and fp16, packed sequences with empty ones
and seqused_k, deterministic, backend None (auto) or "triton".

    python benchmarks/gpu_fuzz.py SEED SECONDS          # one process; prints FAIL lines and a SUMMARY
    python benchmarks/gpu_fuzz.py SEED SECONDS long     # lengths up to 5000: many key / query blocks a tile
    for s in $(seq 1 14); do python benchmarks/gpu_fuzz.py $s 400 & done; wait   # 14 side by side (~900 configs)

About 15% of the draws are paged prefill instead (flash_attn_varlen_func with page_table over a pool of shuffled
pages of 1 to 256 tokens, with spare pages the table never names; forward only, out and lse under the rule).

Session 21 (H100) found two Triton-path miscompilations with it (benchmarks/NOTES.md). A dsink failure with
atol 0 on a packed sequence whose rows see no key is the rule's artifact: both references compute that dsink in
fp32 alike, so the rule asks for bitwise agreement.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzz_loop  # noqa: E402
from attention_check import check_attention, cu_seqlens, make_inputs, poison_allocator  # noqa: E402
from numerics import assert_close_rule  # noqa: E402

import fa4  # noqa: E402
from fa4 import reference  # noqa: E402


def check_paged_prefill(rng, cfg, hq, hkv, d, dv, dtype, causal, left, right, softcap, sink, backend):
    """flash_attn_varlen_func over a paged pool (shuffled pages, spare ones) against both references; the draw's
    lengths and page size go into cfg (printed on failure)."""
    nb = rng.choice([1, 2, 3, 5])
    lens_k = [rng.choice(LENS) for _ in range(nb)]
    lens_q = [rng.randint(0, x) if rng.random() < 0.5 else x for x in lens_k]  # chunks at the cache end, or whole
    if sum(lens_q) == 0:
        lens_q[0] = lens_k[0]
    page = rng.choice([1, 3, 16, 64, 128, 256])
    cfg.update(paged=True, lens=(lens_q, lens_k), page=page)
    max_pages = max(-(-n // page) for n in lens_k)
    num_pages = nb * max_pages + 3
    q = torch.randn(sum(lens_q), hq, d, dtype=dtype, device="cuda")
    k = torch.randn(num_pages, page, hkv, d, dtype=dtype, device="cuda")
    v = torch.randn(num_pages, page, hkv, dv, dtype=dtype, device="cuda")
    table = torch.randperm(num_pages, device="cuda")[:nb * max_pages].view(nb, max_pages).to(torch.int32)
    lay = dict(cu_seqlens_q=cu_seqlens(lens_q, "cuda"), max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k),
               seqused_k=torch.tensor(lens_k, dtype=torch.int32, device="cuda"), page_table=table)
    poison_allocator("cuda")
    out, lse = fa4.flash_attn_varlen_func(q, k, v, lay["cu_seqlens_q"], None, lay["max_seqlen_q"],
                                          lay["max_seqlen_k"], seqused_k=lay["seqused_k"], page_table=table,
                                          causal=causal, window_size=(left, right), softcap=softcap,
                                          learnable_sink=sink, return_lse=True, backend=backend)
    opts = dict(softmax_scale=d ** -0.5, window_left=left, window_right=0 if causal else right, softcap=softcap,
                sink=sink, **lay)
    ref_out, ref_lse = reference.forward(q.float(), k.float(), v.float(), **opts)
    low_out, low_lse = reference.forward(q, k, v, compute_dtype=dtype, **opts)
    assert_close_rule("out", out, ref_out, low_out, softcap=softcap > 0)
    assert_close_rule("lse", lse, ref_lse, low_lse, softcap=softcap > 0)


DIMS = [8, 16, 32, 40, 64, 72, 96, 128, 160, 192, 256]
LENS = [1, 2, 7, 63, 64, 65, 127, 128, 129, 200, 255, 256, 257, 511, 700]
if len(sys.argv) > 3 and sys.argv[3] == "long":
    # Long sequences: the sm90 kernels' persistent grids, many blocks a tile, several waves of CTAs.
    LENS = [1, 65, 700, 1023, 1500, 2049, 3000, 4096, 5000]


def one_draw(rng, cfg):
    d = rng.choice(DIMS)
    dv = d if rng.random() < 0.7 else rng.choice([x for x in DIMS if x <= 256])
    hkv = rng.choice([1, 1, 2, 3, 4])
    hq = hkv * rng.choice([1, 1, 2, 3, 4, 8])
    causal = rng.random() < 0.5
    left = rng.choice([-1, -1, -1, 0, 1, 17, 100])
    right = rng.choice([-1, -1, 0, 5]) if not causal else -1
    softcap = rng.choice([0.0, 0.0, 0.0, 15.0])
    use_sink = rng.random() < 0.2
    dtype = rng.choice([torch.bfloat16, torch.float16])
    varlen = rng.random() < 0.35
    deterministic = rng.random() < 0.15
    backend = rng.choice([None, None, None, "triton"])
    cfg.update(d=d, dv=dv, hq=hq, hkv=hkv, causal=causal, window=(left, right), softcap=softcap, sink=use_sink,
               dtype=str(dtype)[6:], varlen=varlen, det=deterministic, backend=backend)
    paged = rng.random() < 0.15
    torch.manual_seed(rng.randrange(1 << 30))
    if paged:
        sink = torch.randn(hq, device="cuda") if use_sink else None
        check_paged_prefill(rng, cfg, hq, hkv, d, dv, dtype, causal, left, right, softcap, sink, backend)
        return
    if varlen:
        nb = rng.choice([1, 2, 3, 5])
        lens_q = [rng.choice(LENS + [0]) for _ in range(nb)]
        lens_k = lens_q if rng.random() < 0.6 else [rng.choice(LENS + [0]) for _ in range(nb)]
        if sum(lens_q) == 0:
            lens_q[0] = 5
        if sum(lens_k) == 0:
            lens_k[0] = 5
        cfg["lens"] = (lens_q, lens_k)
        q, k, v, vl = make_inputs(nb, None, None, hq, hkv, d, dv, dtype, "cuda", varlen_lens=(lens_q, lens_k))
        if rng.random() < 0.3:
            vl["seqused_k"] = torch.tensor([rng.randint(0, x) for x in lens_k], dtype=torch.int32, device="cuda")
            cfg["seqused_k"] = vl["seqused_k"].tolist()
    else:
        b = rng.choice([1, 2, 3])
        sq = rng.choice(LENS)
        sk = sq if rng.random() < 0.6 else rng.choice(LENS)
        cfg.update(b=b, sq=sq, sk=sk)
        q, k, v, vl = make_inputs(b, sq, sk, hq, hkv, d, dv, dtype, "cuda")
    sink = torch.randn(hq, device="cuda") if use_sink else None
    check_attention(q, k, v, causal=causal, window_size=(left, right), softcap=softcap, sink=sink,
                    backend=backend, deterministic=deterministic, varlen=vl or None)


if __name__ == "__main__":
    fuzz_loop.main(one_draw, "python benchmarks/gpu_fuzz.py SEED SECONDS [long]")
