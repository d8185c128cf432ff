"""Decode with the GQA group unpacked (one program per query head) against the packed, split launch.

    python benchmarks/decode_unpack_probe.py [--rows 8:8192,1:65536,1:8192]

For each row of the decode suite (bf16, Hq 32, Hkv 8, D 128, one query token; contiguous and paged with 128-token
pages): GB/s of K+V read per step, do_bench median (memset flush, as `fa4 bench`), of fa4's public call with
fa4.inference.UNPACK_HEADS off (packed, split by the heuristic) and on (as shipped: unpacked where the packed
launch would split and the query heads cover the GPU), with the launch each one picked, and cuDNN (SDPA) in the
same run. The two outputs are compared (they differ by the split's rounding only).
"""
import argparse

import torch
from triton.testing import do_bench

import fa4
from fa4 import inference
from tune_decode import D, HKV, gbps, make_inputs, peers


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="8:8192,1:65536,1:8192,32:4096")
    args = ap.parse_args()
    print(torch.cuda.get_device_name())
    for row in args.rows.split(","):
        batch, length = map(int, row.split(":"))
        for paged in (False, True):
            torch.manual_seed(0)
            q, k, v, lens, table = make_inputs(batch, length, paged)
            out = torch.empty_like(q)
            cells, outs = [], {}
            for unpack in (False, True):
                inference.UNPACK_HEADS = unpack
                inference._steps.clear()

                def call():
                    return fa4.flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, page_table=table, out=out)
                call()
                outs[unpack] = out.clone()
                _, step = next(reversed(inference._steps.values()))
                ms = do_bench(call, warmup=20, rep=100, return_mode="median")
                cells.append(f"{'unpacked' if unpack else 'packed'} {gbps(batch, length, ms):6.0f} "
                             f"(share {step.attend.constexprs['KV_SHARE']}, splits {step.attend.grid[1]}, "
                             f"tile {tuple(step.config)})")
            diff = (outs[True].float() - outs[False].float()).abs().max().item()
            if not paged:
                fn = peers(q, k.view(batch, length, HKV, D), v.view(batch, length, HKV, D)).get("sdpa_cudnn")
                if callable(fn):
                    cells.append(f"cudnn {gbps(batch, length, do_bench(fn, warmup=20, rep=100)):6.0f}")
            print(f"B {batch:3d} L {length:6d} {'paged' if paged else 'contig'}: " + " | ".join(cells)
                  + f" | max|diff| {diff:.1e}", flush=True)
    inference.UNPACK_HEADS = True


if __name__ == "__main__":
    main()
