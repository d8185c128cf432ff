#!/usr/bin/env bash
# One device call (about 4 minutes on an H100/H200): the GPU tests of the paths changed since the last device
# run, then the timings that decide them, with a short summary last. Logs under $OUT.
#
#   bash benchmarks/verify_device.sh
#
# Order matters: correctness first (the probe's check runs each kernel in a child with a timeout, so a barrier
# hang is reported; tests in parallel shards under a time limit), then timings on a quiet card.
# As left by session 5: the Triton backward kernels' grid order (blocks of a head adjacent) A/B, with the Triton
# backward's GPU tests and the sm90 ones it touches (its D = 64 dQ pass). Point it at the next variant to verify (a probe tile name in --tiles, its GPU tests by -k).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/verify-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/card.txt" 2>&1
timeout 300 python3 benchmarks/bwd_grid_ab.py --dims 64,128,256 --backends triton,sm90 > "$OUT/grid_ab.log" 2>&1
bash tests/gpu/run_device.sh --limit 240 --jobs 16 "tests/gpu/test_triton_backward.py:6" \
  "tests/gpu/test_sm90_backward.py:6:keys or unsupported or declines or feature_matrix or varlen" > "$OUT/tests.txt" 2>&1
echo "== card"; cat "$OUT/card.txt"
echo "== tests"; cat "$OUT/tests.txt"
echo "== grid order A/B"; grep -v Warn "$OUT/grid_ab.log"
