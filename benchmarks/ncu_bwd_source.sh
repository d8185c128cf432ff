#!/usr/bin/env bash
# Per-instruction Nsight Compute counters (warp-stall samples, shared-memory bank conflicts) of the sm90 backward's
# main kernel, exported as CSV of the SASS source page (gzip) for offline ranking (benchmarks/ncu_source_rank.py).
#   bash benchmarks/ncu_bwd_source.sh 128 4096 0 ['{"separate_dq": true}']   (optional BwdTile overrides)
set -uo pipefail
cd "$(dirname "$0")/.."
. benchmarks/ncu_common.sh
d=${1:-128}; s=${2:-4096}; c=${3:-0}; over=${4:-}
tag=$(echo "$over" | tr -dc 'a-z0-9_')
rep="$OUT/bwd-$d-$s-$c${tag:+-$tag}"
"$NCU" --clock-control none -k regex:attn_bwd --launch-skip 2 --launch-count 1 \
    --section SourceCounters --section WarpStateStats --import-source no -f -o "$rep" \
    python3 benchmarks/ncu_bwd.py "$d" "$s" "$c" ${over:+"$over"} > "$rep.log" 2>&1
tail -3 "$rep.log"
"$NCU" -i "$rep.ncu-rep" --page source --csv --print-source sass 2> "$rep.err" | gzip > "$rep-sass.csv.gz"
head -c 600 "$rep.err"
rm -f "$rep.ncu-rep"
