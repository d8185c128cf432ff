#!/usr/bin/env bash
# Nsight Compute of the sm90 backward's main kernel (benchmarks/ncu_bwd.py): tensor-pipe and shared-memory
# utilisation, bank conflicts and warp stalls per row.
#   bash benchmarks/ncu_bwd.sh "128:4096:0 64:4096:0" ['{"separate_dq": true}']   (D:S:causal triples)
set -uo pipefail
cd "$(dirname "$0")/.."
. benchmarks/ncu_common.sh
over=${2:-}
tag=$(echo "$over" | tr -dc 'a-z0-9_')
for row in ${1:-128:4096:0}; do
  IFS=: read -r d s c <<< "$row"
  f="$OUT/ncu-bwd-$d-$s-$c${tag:+-$tag}.txt"
  "$NCU" --clock-control none -k regex:attn_bwd --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
      --section WarpStateStats \
      --metrics "regex:^sm__pipe_tensor.*pct_of_peak_sustained_active$,regex:^sm__inst_executed_pipe_.*gmma.*,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.avg.pct_of_peak_sustained_elapsed,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,sm__cycles_elapsed.avg,gpu__time_duration.sum" \
      python3 benchmarks/ncu_bwd.py "$d" "$s" "$c" ${over:+"$over"} > "$f" 2>&1
  echo "== D=$d S=$s causal=$c $over"
  grep -iE "tensor|shared|gmma|bank|stalled|cycles_elapsed|time_duration|Throughput|Pipe|==ERR|rror" "$f" \
      | awk '$NF != "0" && $NF != "0.00"' | head -60
done
