#!/usr/bin/env bash
# Nsight Compute, fa4 against FlashAttention-4 on one training-suite row: tensor pipe, shared-memory (LSU)
# wavefronts, instructions, issue, cycles and time of the main kernel (the third call's).
#   bash benchmarks/ncu_peer.sh fwd|bwd D S causal [who ...]   (who: fa4 flashattn4 (default) fa4kt cudnn; writes
#   $OUT/ncu-peer-WHO-...txt)
#   GROUP=4 bash benchmarks/ncu_peer.sh ...   (GQA: H / 4 kv heads; fa4's GQA split, when it applies, repeats K / V
#   first, and ncu profiles its main kernel all the same)
# FlashAttention-4 needs the kit (../shared/anchors/fa4-kit/README.md, /tmp/fa4env.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
. benchmarks/ncu_common.sh
what=$1; d=$2; s=$3; c=$4; shift 4
for who in ${@:-fa4 flashattn4}; do
  if [ "$what" = fwd ]; then
    [ $who = flashattn4 ] && kern='regex:Forward' || kern='regex:attn_fwd'
    [ $who = cudnn ] && kern='regex:cudnn_generated.*fprop'
  else
    [ $who = flashattn4 ] && kern='regex:Sm90.*Backward|Backward.*Sm90' || kern='regex:attn_bwd'
    [ $who = cudnn ] && kern='regex:cudnn_generated.*bprop'
  fi
  f="$OUT/ncu-peer-$who-$what-$d-$s-$c-g${GROUP:-1}.txt"
  "$NCU" --clock-control none -k "$kern" --launch-skip 2 --launch-count 1 --section LaunchStats \
     --metrics "$LOAD_METRICS,launch__registers_per_thread,launch__grid_size,launch__block_size" \
     python3 benchmarks/ncu_peer.py $who "$what" "$d" "$s" "$c" "${GROUP:-1}" > "$f" 2>&1
  echo "== $who $what D=$d S=$s causal=$c group=${GROUP:-1}"
  grep -E "^  [a-zA-Z_]|$LOAD_LINES|registers|grid_size|block_size|Cluster|Shared Memory|Threads|No kernels" "$f" | head -32
done
