#!/usr/bin/env bash
# One device call (about 9 minutes on an H100): the GPU tests of the paths changed since the last device run,
# then the Hopper forward and backward probes, with a short summary last. Logs under $OUT.
#
#   bash benchmarks/verify_device.sh
#
# Order matters: correctness first (tests in parallel shards), then timings on a quiet card.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/verify-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
bash tests/gpu/run_device.sh --limit 240 --jobs 16 tests/gpu/test_api_gpu.py:5 tests/gpu/test_sm90_backward.py:3 \
  tests/gpu/test_sm90_forward.py:4 tests/gpu/test_inference_gpu.py:2 tests/gpu/test_triton_backward.py:2 \
  > "$OUT/tests.txt" 2>&1
timeout 170 python3 benchmarks/sm90_probe.py --variants base,fast --budget 120 --json "$OUT/probe.json" \
  > "$OUT/probe.log" 2>&1
timeout 130 python3 benchmarks/sm90_bwd_probe.py --time-only --peers sdpa_cudnn --json "$OUT/bwd.json" \
  > "$OUT/bwd.log" 2>&1
echo "== tests"; cat "$OUT/tests.txt"
echo "== forward probe (tables 1 and 3)"; sed -n '/## 1\./,/## 2\./p;/## 3\./,/## 4\./p' "$OUT/probe.log"
echo "== backward probe"; sed -n '/phase 2/,$p' "$OUT/bwd.log"
