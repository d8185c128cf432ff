#!/usr/bin/env bash
# Session 12's device calls: the in-kernel dQ cast (tile.dq_convert) checked, then timed against the host cast.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
OUT=${OUT:-$PWD/s12-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,serial --format=csv,noheader | tee "$OUT/card.txt"
echo "== A: the new path alone (hang-safe)"
timeout 240 python3 -m pytest -x -q -p no:cacheprovider tests/gpu/test_sm90_backward.py -k "dq_cast_in_kernel or dq_chain" 2>&1 | tail -5
echo "== C: probe, D = 128, convert (shipped) vs noconvert"
timeout 300 python3 benchmarks/sm90_bwd_probe.py --time-only --dims 128 --tiles noconvert --peers sdpa_cudnn > "$OUT/probe.log" 2>&1
tail -12 "$OUT/probe.log"
echo "== D: profile"
timeout 120 python3 -c "
import sys; sys.path.insert(0, 'benchmarks')
from tune_dq import profile
for s, c in ((1024, False), (1024, True), (4096, True)):
    profile(128, s, c)
" 2>&1 | grep -v Warn | tail -16
