#!/usr/bin/env bash
# One device call (about 3 minutes on an H100/H200): every GPU test file in parallel shards, then the CUDA-graph
# check of the Triton path, with a short summary last. Logs under $OUT. Point it at the next change to verify
# (a probe run after the tests) when there is one; as left by session 6 everything it runs passed on the H100.
#
#   bash benchmarks/verify_device.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/verify-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,serial,driver_version --format=csv,noheader > "$OUT/card.txt" 2>&1
bash tests/gpu/run_device.sh --limit 480 --jobs 16 tests/gpu/test_api_gpu.py:3 tests/gpu/test_sm90_backward.py:6 \
  tests/gpu/test_sm90_forward.py:3 tests/gpu/test_triton_backward.py:3 tests/gpu/test_triton_forward.py:4 \
  tests/gpu/test_inference_gpu.py:2 tests/gpu/test_sm90_backward_replay.py:2 > "$OUT/tests.txt" 2>&1
timeout 120 python3 benchmarks/graph_capture_check.py > "$OUT/graph_capture.log" 2>&1
echo "== card"; cat "$OUT/card.txt"
echo "== tests"; cat "$OUT/tests.txt"
echo "== CUDA graphs (Triton path; sm90 deterministic, chunked causal and packed mixed-length calls)"; grep "captured\|FAILED" "$OUT/graph_capture.log"
