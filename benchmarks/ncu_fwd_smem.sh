#!/usr/bin/env bash
# Nsight Compute: tensor pipe, shared-memory (LSU) wavefronts and issue of the sm90 forward, per variant.
#   bash benchmarks/ncu_fwd_smem.sh D S causal 'JSON variant' ...   (writes $OUT/ncu-fwd-smem-D-S-causal-N.txt)
# e.g. bash benchmarks/ncu_fwd_smem.sh 128 16384 0 '{}' '{"QREG": true}'
set -uo pipefail
cd "$(dirname "$0")/.."
. benchmarks/ncu_common.sh
d=$1; s=$2; c=$3; shift 3
n=0
for v in "$@"; do
  f="$OUT/ncu-fwd-smem-$d-$s-$c-$n.txt"
  "$NCU" --clock-control none -k regex:attn_fwd --launch-skip 2 --launch-count 1 \
     --metrics "$LOAD_METRICS,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum" \
     python3 benchmarks/ncu_fwd.py "$d" "$s" "$c" "$v" > "$f" 2>&1
  echo "== D=$d S=$s causal=$c variant $v"
  grep -E "$LOAD_LINES" "$f" | head -12
  n=$((n + 1))
done
