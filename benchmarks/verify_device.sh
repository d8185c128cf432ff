#!/usr/bin/env bash
# One device call (about 7 minutes on an H100): the GPU tests of the paths changed since the last device run,
# then the timings that decide them, with a short summary last. Logs under $OUT.
#
#   bash benchmarks/verify_device.sh
#
# Order matters: correctness first (tests in parallel shards), then timings on a quiet card.
# Session 4 left for this call: the opt-in D = 256 Gluon backward (tile d256, backward_d256.py; never run on
# a GPU before: the probe's check runs each kernel in a child with a timeout, so a hang is reported), and the
# forward with TAIL per problem (configs.tail_for).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/verify-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
timeout 150 python3 benchmarks/sm90_bwd_probe.py --check-only --dims 256 --tiles d256 > "$OUT/bwd-check.log" 2>&1
bash tests/gpu/run_device.sh --limit 180 --jobs 16 "tests/gpu/test_sm90_backward.py:4:d256" \
  tests/gpu/test_sm90_forward.py:4 > "$OUT/tests.txt" 2>&1
timeout 150 python3 benchmarks/sm90_bwd_probe.py --time-only --dims 256 --tiles d256 --peers sdpa_cudnn \
  > "$OUT/bwd.log" 2>&1
echo "== backward check"; tail -12 "$OUT/bwd-check.log"
echo "== tests"; cat "$OUT/tests.txt"
echo "== backward probe"; sed -n '/phase 2/,$p' "$OUT/bwd.log"
