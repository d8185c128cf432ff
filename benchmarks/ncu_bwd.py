"""One sm90 backward of a training-suite row, for Nsight Compute: what limits the main kernel's step (tensor pipe,
shared-memory bandwidth, or waiting)?

    ncu --clock-control none -k regex:attn_bwd --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        python benchmarks/ncu_bwd.py 128 4096 0 [tile overrides as JSON]

Arguments: D S causal (bf16, B*S = 16384, H*D = 2048, as `fa4 bench`), optionally a JSON dict of BwdTile
overrides (e.g. '{"separate_dq": true}': the main kernel without the dQ product). The backward runs three times
(the first compiles); profile the third. benchmarks/ncu_bwd.sh runs several rows and keeps the key lines.

Overrides apply to the table's tile for (D, D) (backward.get_tile), except two keys of the JSON dict:
"__default__": true applies them to the tile the call would get by default (backward.default_tile: e.g. the
persistent keys-as-rows tile of causal D = 128), and "__switches__": {"NAME": value} sets module switches of
backward.py first (e.g. {"STATS_EXT": false}). Session 30's statistics-extension counts:
    python benchmarks/ncu_bwd.py 64 4096 1 '{"__default__": true, "stats_ext": false}'   # and true
"""
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fa4.kernels import sm90  # noqa: E402
from fa4.kernels.sm90 import backward as bwd  # noqa: E402


def main():
    d, s, causal = int(sys.argv[1]), int(sys.argv[2]), bool(int(sys.argv[3]))
    over = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
    from_default = over.pop("__default__", False)
    for name, value in over.pop("__switches__", {}).items():
        assert hasattr(bwd, name), f"backward.py has no switch {name}"
        setattr(bwd, name, value)
    b, h = 16384 // s, 2048 // d
    q, k, v, dout = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    opts = dict(softmax_scale=d ** -0.5, window_left=-1, window_right=0 if causal else -1, softcap=0.0, sink=None)
    out, lse = sm90.forward(q, k, v, **opts)
    if from_default:
        tile = dataclasses.replace(bwd.default_tile(d, d, -1, window_right=opts["window_right"]), **over)
    else:
        tile = bwd.get_tile(d, d, **over) if over else None
    for _ in range(3):
        bwd.backward(dout, q, k, v, out, lse, None, tile=tile, **opts)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
