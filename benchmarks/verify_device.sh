#!/usr/bin/env bash
# One device call (about 4 minutes on an H100/H200): the GPU tests of the paths changed since the last device
# run, then the timings that decide them, with a short summary last. Logs under $OUT.
#
#   bash benchmarks/verify_device.sh
#
# Order matters: correctness first (the probe's check runs each kernel in a child with a timeout, so a barrier
# hang is reported; tests in parallel shards under a time limit), then timings on a quiet card.
# As left by session 5: the shipped three-consumer D = 64 backward tile (all sm90 backward GPU tests, the API
# tests, the probe's checks and timing). Point it at the next variant to verify (a probe tile name in --tiles, its GPU tests by -k).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/verify-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/card.txt" 2>&1
timeout 150 python3 benchmarks/sm90_bwd_probe.py --check-only --dims 64 > "$OUT/bwd-check.log" 2>&1
bash tests/gpu/run_device.sh --limit 300 --jobs 16 "tests/gpu/test_sm90_backward.py:8" "tests/gpu/test_api_gpu.py:4" \
  > "$OUT/tests.txt" 2>&1
timeout 200 python3 benchmarks/sm90_bwd_probe.py --time-only --dims 64 --tiles wg2,wg3c --peers sdpa_cudnn \
  > "$OUT/bwd.log" 2>&1
echo "== card"; cat "$OUT/card.txt"
echo "== backward check"; tail -12 "$OUT/bwd-check.log"
echo "== tests"; cat "$OUT/tests.txt"
echo "== backward probe"; sed -n '/phase 2/,$p' "$OUT/bwd.log"

