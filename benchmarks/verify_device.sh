#!/usr/bin/env bash
# One device call (about 8 minutes on an H100): the GPU tests of the paths changed since the last device run,
# then the Hopper backward probe with the open variants, with a short summary last. Logs under $OUT.
#
#   bash benchmarks/verify_device.sh
#
# Order matters: correctness first (tests in parallel shards), then timings on a quiet card.
# Session 3 left unrun on the GPU: the sink gradient from the dQ kernel (Triton backward, sm90 ordered pass;
# the new dsink tests), the sink partials in the Gluon main kernel (tile.sink_pdp, opt-in), and the D = 128
# backward tile with early_dp as shipped (its GPU tests ran with the setting patched in: a confirmation).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/verify-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
bash tests/gpu/run_device.sh --limit 240 --jobs 16 tests/gpu/test_api_gpu.py:5 tests/gpu/test_sm90_backward.py:5 \
  tests/gpu/test_triton_backward.py:3 > "$OUT/tests.txt" 2>&1
timeout 200 python3 benchmarks/sm90_bwd_probe.py --time-only --peers sdpa_cudnn --json "$OUT/bwd.json" \
  > "$OUT/bwd.log" 2>&1
# The sink-partials variant (tile.sink_pdp) against the shipped D = 128 tile, with a sink: its cost decides
# whether it becomes the default (its GPU tests are in test_sm90_backward.py).
timeout 150 python3 benchmarks/sm90_bwd_probe.py --time-only --dims 128 --sink --tiles sinkpdp --peers sdpa_cudnn \
  > "$OUT/bwd-sink.log" 2>&1
echo "== tests"; cat "$OUT/tests.txt"
echo "== backward probe"; sed -n '/phase 2/,$p' "$OUT/bwd.log"
echo "== backward probe with a sink"; sed -n '/phase 2/,$p' "$OUT/bwd-sink.log"
