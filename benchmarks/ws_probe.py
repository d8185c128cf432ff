"""The lean forward (fa4/kernels/triton/forward_lean.py) against the general Triton kernel and FA2, per tile.

    python benchmarks/ws_probe.py [--rows 128:1024,128:4096,64:4096] [--tiles 128x128s2ws,128x64s2,...]
                                  [--causal 0,1]

Triton 3.6 splits a `tl.range(..., warp_specialize=True)` loop on sm_90 into a TMA producer warpgroup and two
consumer warpgroups of BLOCK_M / 2 query rows each (FA3's schedule, compiler-generated), but only in a kernel
with that one loop and no branch in it (forward_lean.py's docstring). A tile name is BMxBNsSTAGES, with `ws`
for warp specialization (num_warps is always 4), `hd` for host-built TMA descriptors and `sp` for the causal
split of unmasked and masked key blocks (with hd), e.g. 128x64s2hdsp.

For each row of the training suite (bf16, B = 16384 / S, H = 2048 / D) it prints TFLOP/s of FA2 (SDPA flash),
fa4's Triton forward with the lean path off (the general kernel, table config) and on (as shipped), then each
lean tile; every output and lse is checked against the general kernel's (a wrong result is marked ERR).
"""
import argparse

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import fa4
from fa4.kernels.triton import forward as fwd
from fa4.kernels.triton import forward_lean


def _tile(name):
    """BMxBNsSTAGES followed by any of ws (warp-specialized), hd (host-built descriptors), sp (causal: the
    unmasked key blocks in a loop of their own; with hd)."""
    import re
    m = re.fullmatch(r"(\d+)x(\d+)s(\d+)((?:ws|hd|sp)*)", name)
    if m is None:
        raise SystemExit(f"bad tile name {name!r}: BMxBNsSTAGES[ws][hd][sp]")
    flags = m.group(4)
    return forward_lean.LeanConfig(int(m.group(1)), int(m.group(2)), int(m.group(3)), "ws" in flags,
                                   "hd" in flags, "sp" in flags)


def _lean_call(q, k, v, causal, cfg):
    kw = dict(softmax_scale=q.shape[-1] ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0,
              sink=None)
    out, lse, launch = fwd.prepare(q, k, v, **kw)
    fwd._ensure_allocator()
    forward_lean.launch(launch, cfg)
    return out, lse


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="128:1024,128:4096,128:16384,64:4096,64:16384")
    ap.add_argument("--tiles", default="128x128s2ws,128x64s2ws,128x128s2,128x64s2")
    ap.add_argument("--causal", default="0,1")
    args = ap.parse_args()
    from triton.testing import do_bench
    print(torch.cuda.get_device_name(), "triton", triton.__version__, flush=True)
    for row in args.rows.split(","):
        d, s = map(int, row.split(":"))
        b, h = 16384 // s, 2048 // d
        for causal in map(int, args.causal.split(",")):
            torch.manual_seed(0)
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flops = 4.0 * b * h * s * s * d / (2 if causal else 1)
            fwd.USE_LEAN = False
            ref_out, ref_lse = fa4.flash_attn_func(q, k, v, causal=bool(causal), backend="triton", return_lse=True)
            cells = []

            def timed(label, fn, check=True):
                try:
                    res = fn()
                    note = ""
                    if check:
                        e_out = (res[0].float() - ref_out.float()).abs().max().item()
                        e_lse = (res[1] - ref_lse).abs().max().item()
                        if not (e_out < 2e-2 and e_lse < 1e-3):
                            note = f" ERR out {e_out:.2g} lse {e_lse:.2g}"
                    ms = do_bench(fn, warmup=25, rep=100)
                    cells.append(f"{label} {flops / ms / 1e9:5.0f}{note}")
                except Exception as e:  # a tile that does not compile or launch is a result, not a stop
                    cells.append(f"{label} fail({type(e).__name__}: {str(e).splitlines()[0][:60]})")
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                timed("fa2", lambda: torch.nn.functional.scaled_dot_product_attention(
                    qt, kt, vt, is_causal=bool(causal)), check=False)
            timed("general", lambda: fa4.flash_attn_func(q, k, v, causal=bool(causal), backend="triton",
                                                         return_lse=True))
            fwd.USE_LEAN = True
            timed("shipped", lambda: fa4.flash_attn_func(q, k, v, causal=bool(causal), backend="triton",
                                                         return_lse=True))
            for name in args.tiles.split(","):
                cfg = _tile(name)
                timed(name, lambda: _lean_call(q, k, v, bool(causal), cfg))
            print(f"D {d:3d} S {s:5d} causal {causal}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
