#!/usr/bin/env bash
# One device call (about 8 minutes on an H100): the GPU tests of the paths changed since the last device run,
# then the timings that decide them, with a short summary last. Logs under $OUT.
#
#   bash benchmarks/verify_device.sh
#
# Order matters: correctness first (tests in parallel shards), then timings on a quiet card.
# Session 4 left unrun on the GPU: the backward's opt-in ping_pong tile (consumer turn-taking, D = 64 and 128),
# and the Triton forward's new candidate configs (benchmarks/tune_forward.py --names).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/verify-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# Correctness of the new tile first: the probe's own check (child processes with timeouts: a hang is reported).
timeout 120 python3 benchmarks/sm90_bwd_probe.py --check-only --dims 64,128 --tiles pingpong > "$OUT/bwd-check.log" 2>&1
bash tests/gpu/run_device.sh --limit 200 --jobs 16 "tests/gpu/test_sm90_backward.py:4:ping_pong or varlen" \
  > "$OUT/tests.txt" 2>&1
timeout 150 python3 benchmarks/sm90_bwd_probe.py --time-only --dims 64,128 --tiles pingpong --peers sdpa_cudnn \
  > "$OUT/bwd.log" 2>&1
# Decode split counts at B = 1 and 8 with the two-launch path (the session-2 sweep was host-bound).
timeout 90 python3 benchmarks/tune_decode.py --quick --sections 3 --batches 1,8 --layouts contiguous \
  > "$OUT/decode-splits.log" 2>&1
echo "== backward check"; tail -15 "$OUT/bwd-check.log"
echo "== tests"; cat "$OUT/tests.txt"
echo "== backward probe"; sed -n '/phase 2/,$p' "$OUT/bwd.log"
echo "== decode splits"; sed -n '/## 3/,$p' "$OUT/decode-splits.log"
