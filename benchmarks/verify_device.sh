#!/usr/bin/env bash
# One device call (about 8 minutes on an H100/H200): the GPU tests of the paths changed since the last device
# run, then the timings that decide them, with a short summary last. Logs under $OUT.
#
#   bash benchmarks/verify_device.sh
#
# Order matters: correctness first (tests in parallel shards under a time limit), then timings on a quiet card.
# As left by session 6: the lean Triton forward (fa4/kernels/triton/forward_lean.py: its tiles and the routing
# of fwd.forward), the API tests over it, the lean tiles against the general kernel and FA2 (ws_probe.py), and
# then the Triton path's training bench with FA2 and FlexAttention.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/verify-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/card.txt" 2>&1
bash tests/gpu/run_device.sh --limit 150 --jobs 16 "tests/gpu/test_triton_forward.py:8:lean or routing" \
  tests/gpu/test_api_gpu.py:4 > "$OUT/tests.txt" 2>&1
timeout 120 python3 benchmarks/ws_probe.py --rows 128:1024,128:4096,128:16384 --tiles 128x128s2ws,128x64s2 \
  > "$OUT/ws_probe.log" 2>&1
echo "== card"; cat "$OUT/card.txt"
echo "== tests"; cat "$OUT/tests.txt"
echo "== lean forward tiles"; grep -v -i warn "$OUT/ws_probe.log"
