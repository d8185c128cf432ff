#!/usr/bin/env bash
# Nsight Compute stall breakdown of the sm90 forward, causal against non-causal (benchmarks/ncu_fwd.py).
#   bash benchmarks/ncu_fwd.sh "256:16384 128:16384"     (D:S pairs; writes $OUT/ncu-fwd-D-S-causal.txt)
set -uo pipefail
cd "$(dirname "$0")/.."
. benchmarks/ncu_common.sh
for row in ${1:-256:16384}; do
  d=${row%%:*}; s=${row##*:}
  for c in 0 1; do
    "$NCU" --clock-control none -k regex:attn_fwd --launch-skip 2 --launch-count 1 \
        --section WarpStateStats --section SchedulerStats \
        --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,smsp__inst_executed.sum,sm__cycles_elapsed.avg,gpu__time_duration.sum,smsp__issue_active.avg.pct_of_peak_sustained_active" \
        python3 benchmarks/ncu_fwd.py "$d" "$s" "$c" > "$OUT/ncu-fwd-$d-$s-$c.txt" 2>&1
    echo "== D=$d S=$s causal=$c"
    grep -E "stalled|inst_executed|cycles_elapsed|time_duration|issue_active|Warp Cycles Per|No Eligible|==ERR|rror" \
        "$OUT/ncu-fwd-$d-$s-$c.txt" | awk '$NF != "0" && $NF != "0.00"' | head -40
  done
done
