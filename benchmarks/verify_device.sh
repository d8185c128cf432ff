#!/usr/bin/env bash
# One device call (about 4 minutes on an H100/H200): the GPU tests of the paths changed since the last device
# run, then the timings that decide them, with a short summary last. Logs under $OUT.
#
#   bash benchmarks/verify_device.sh
#
# Order matters: correctness first (the probe's check runs each kernel in a child with a timeout, so a barrier
# hang is reported; tests in parallel shards under a time limit), then timings on a quiet card.
# As left by session 5: the GPU tests written after its last device call (test_d64_forms: the D = 64 tile's two-
# consumer and three-consumer reduce-add forms over the matrix) and the D = 128 dQ-pass sweep (tune_dq.py) for the
# deterministic backward's cost. Point it at the next variant to verify (a probe tile name in --tiles, its GPU tests by -k).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/verify-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/card.txt" 2>&1
bash tests/gpu/run_device.sh --limit 240 --jobs 16 "tests/gpu/test_sm90_backward.py:6:d64_forms or varlen" \
  > "$OUT/tests.txt" 2>&1
timeout 300 python3 benchmarks/tune_dq.py --rows 128:4096,128:16384 > "$OUT/tune_dq.log" 2>&1
echo "== card"; cat "$OUT/card.txt"
echo "== tests"; cat "$OUT/tests.txt"
echo "== dQ pass at D = 128 (the deterministic backward's)"; grep -v -i warn "$OUT/tune_dq.log"
