#!/usr/bin/env bash
# One device call (about 4 minutes on an H100/H200): the GPU tests of the paths changed since the last device
# run, then the timings that decide them, with a short summary last. Logs under $OUT.
#
#   bash benchmarks/verify_device.sh
#
# Order matters: correctness first (the probe's check runs each kernel in a child with a timeout, so a barrier
# hang is reported; tests in parallel shards under a time limit), then timings on a quiet card.
# As left by session 4: the shipped D = 256 backward (tests and the probe beside cuDNN). Point it at the next
# variant to verify (a probe tile name in --tiles, its GPU tests by -k).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/verify-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
timeout 150 python3 benchmarks/sm90_bwd_probe.py --check-only --dims 256 --tiles d256 > "$OUT/bwd-check.log" 2>&1
bash tests/gpu/run_device.sh --limit 180 --jobs 16 "tests/gpu/test_sm90_backward.py:4:d256" \
  > "$OUT/tests.txt" 2>&1
timeout 180 python3 benchmarks/sm90_bwd_probe.py --time-only --dims 256 --peers sdpa_cudnn > "$OUT/bwd.log" 2>&1
echo "== backward check"; tail -10 "$OUT/bwd-check.log"
echo "== tests"; cat "$OUT/tests.txt"
echo "== backward probe"; sed -n '/phase 2/,$p' "$OUT/bwd.log"
