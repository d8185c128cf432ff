#!/usr/bin/env bash
# Nsight Compute, fa4's backward against FlashAttention-4's on training-suite rows: warp-stall reasons per issued
# instruction (WarpStateStats), scheduler occupancy and the load metrics of ncu_peer.sh, the third call's main kernel.
#   . /tmp/fa4env.sh && bash benchmarks/ncu_peer_stalls.sh ["D S causal" ...] | [D S causal]
#   (default "128 16384 0" "64 4096 0";
#   writes $OUT/stalls-WHO-D-S-causal.txt, prints the stall and load lines)
# FlashAttention-4 needs the kit (../shared/anchors/fa4-kit/README.md, /tmp/fa4env.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
. benchmarks/ncu_common.sh
nvidia-smi --query-gpu=name,serial --format=csv,noheader
rows=("$@")
# One row given as three words (ncu_peer.sh's convention: D S causal) is one row, not three.
[ $# -eq 3 ] && [[ "$1" != *" "* ]] && rows=("$1 $2 $3")
[ ${#rows[@]} -eq 0 ] && rows=("128 16384 0" "64 4096 0")
for row in "${rows[@]}"; do
  set -- $row
  for who in fa4 flashattn4; do
    [ $who = flashattn4 ] && kern='regex:Sm90.*Backward|Backward.*Sm90' || kern='regex:attn_bwd'
    f=$OUT/stalls-$who-$1-$2-$3.txt
    timeout 200 "$NCU" --clock-control none -k "$kern" --launch-skip 2 --launch-count 1 --section WarpStateStats \
      --section SchedulerStats --metrics "$LOAD_METRICS" --page raw \
      python3 benchmarks/ncu_peer.py $who bwd "$1" "$2" "$3" > "$f" 2>&1
    echo "== $who D=$1 S=$2 causal=$3 rc=$?"
    grep -E "warps_issue_stalled_[a-z_]+_per_issue_active.ratio |inst_executed.sum |cycles_elapsed.avg |time_duration.sum |pipe_tensor_cycles_active.avg|issue_active.avg.pct|warps_active.avg.per_cycle_active|warps_eligible.avg.per_cycle_active" "$f" \
      | awk '{print $1, $NF}'
  done
done
