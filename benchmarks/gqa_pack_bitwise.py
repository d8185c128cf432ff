"""GQA packing changes no arithmetic: is the packed forward bitwise equal to the unpacked one (out, lse, and
the gradients computed from them)? And how often does the numerics rule fail on dsink for
tests/gpu/test_api_gpu.py's MQA + sink case (fp16, 8 query heads), packed and unpacked, over fresh seeds?

    python benchmarks/gqa_pack_bitwise.py
"""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import fa4  # noqa: E402
from fa4.kernels.sm90 import configs, launch  # noqa: E402
from attention_check import check_attention, make_inputs  # noqa: E402

def run(seed, pack_on):
    configs.PACK_MAX_SEQLEN_Q = 1024 if pack_on else 0
    launch._PLANS.clear()
    torch.manual_seed(seed)
    q, k, v, _ = make_inputs(1, 777, 1543, 8, 1, 128, 128, torch.float16, "cuda")
    s = torch.randn(8, device="cuda")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    sl = s.detach().requires_grad_()
    out, lse = fa4.flash_attn_func(*leaves, causal=True, learnable_sink=sl, return_lse=True)
    torch.manual_seed(1000 + seed)
    do, dl = torch.randn_like(out), torch.randn_like(lse)
    torch.autograd.backward((out, lse), (do, dl))
    return [out, lse] + [t.grad for t in leaves] + [sl.grad], (q, k, v, s)

for seed in range(3):
    a, _ = run(seed, True); b, _ = run(seed, False)
    print("seed", seed, "bitwise equal out/lse/dq/dk/dv/dsink:", [torch.equal(x, y) for x, y in zip(a, b)])
fails = {True: 0, False: 0}
for pack_on in (True, False):
    configs.PACK_MAX_SEQLEN_Q = 1024 if pack_on else 0
    for seed in range(30):
        launch._PLANS.clear()
        torch.manual_seed(seed)
        q, k, v, _ = make_inputs(1, 777, 1543, 8, 1, 128, 128, torch.float16, "cuda")
        s = torch.randn(8, device="cuda")
        try:
            check_attention(q, k, v, causal=True, sink=s)
        except AssertionError as e:
            fails[pack_on] += 1
            print("pack" if pack_on else "nopack", seed, str(e)[:100])
print("rule failures over 30 seeds: packed", fails[True], "unpacked", fails[False])
