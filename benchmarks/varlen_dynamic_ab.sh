#!/usr/bin/env bash
# A/B of the Hopper forward's DYNAMIC unit handout on packed calls (benchmarks/NOTES.md, session 20): two rounds of
# FA4_SM90_DYNAMIC=0 (static stride everywhere) against the default (attention_fwd.dynamic_units), each in its own
# processes, over varlen_train_probe's rows and paged_prefill_probe's. About 2 minutes on an H100.
#
#   bash benchmarks/varlen_dynamic_ab.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-$PWD/dynamic-ab-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,serial --format=csv,noheader
ROWS=128:16:8x2048:1,128:16:2048+1024+512+4608+8192:1,128:16:1000+3000+500+6000+5884:1,64:32:2048+1024+512+4608+8192:1,128:16:2048+1024+512+4608+8192:0,128:16:8x2048:0
for mode in 0 default 0 default; do
  if [ "$mode" = default ]; then unset FA4_SM90_DYNAMIC; else export FA4_SM90_DYNAMIC=$mode; fi
  echo "== FA4_SM90_DYNAMIC=$mode"
  python3 benchmarks/varlen_train_probe.py --reps 3 --rows "$ROWS" 2>&1 | grep -v "^#" | tee -a "$OUT/varlen-$mode.log"
  python3 benchmarks/paged_prefill_probe.py --reps 3 2>&1 | grep -v "^#" | tee -a "$OUT/paged-$mode.log"
done
