"""One sm90 forward of a training-suite row, for Nsight Compute (where does a causal key block lose time?).

    ncu --clock-control none -k regex:attn_fwd --launch-skip 2 --launch-count 1 \
        --section WarpStateStats --section SchedulerStats --section InstructionStats \
        python benchmarks/ncu_fwd.py 256 16384 1

Arguments: D S causal [variant JSON] (bf16, B*S = 16384, H*D = 2048, as `fa4 bench`; the variant as
fwd_variant_ab.py takes it, e.g. '{"QREG": true}'). The kernel runs three times (the first
compiles); profile the third. benchmarks/ncu_fwd.sh runs the causal and non-causal rows and keeps the stall
breakdown.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fa4.kernels import sm90  # noqa: E402


def main():
    d, s, causal = int(sys.argv[1]), int(sys.argv[2]), bool(int(sys.argv[3]))
    variant = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
    b, h = 16384 // s, 2048 // d
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for _ in range(3):
        sm90.forward(q, k, v, softmax_scale=d ** -0.5, window_right=0 if causal else -1, variant=variant)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
