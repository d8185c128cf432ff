#!/usr/bin/env bash
# The GPU machine's benchmark run: `fa4 bench` for one suite or both, results and logs under $OUT.
#
#   bash benchmarks/run_device.sh [training|decode|gqa|all] [more `fa4 bench` options, e.g. --quick --rows D=128]
#
# Writes $OUT/<suite>.json (DESIGN.md's schema), $OUT/<suite>.log (progress and table), and from --out the
# detailed .json, the .md table and the .png plot. $OUT defaults to ./bench-out. The FlashAttention-4 peer is
# used when shared/anchors/fa4-kit/install.sh ran on this machine (it leaves /tmp/fa4env.sh).
set -uo pipefail
cd "$(dirname "$0")/.."

which=${1:-all}
[ $# -gt 0 ] && shift
case "$which" in
  all) suites="training decode" ;;
  training|decode|gqa) suites=$which ;;
  *) echo "usage: bash benchmarks/run_device.sh [training|decode|gqa|all] [fa4 bench options]" >&2; exit 2 ;;
esac

OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
if [ -f /tmp/fa4env.sh ]; then . /tmp/fa4env.sh; fi
# Run from this checkout whether or not fa4 is pip-installed here.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

status=0
for suite in $suites; do
  echo "== fa4 bench --suite $suite $* ==" | tee "$OUT/$suite.log"
  python3 -u -m fa4.bench.cli --suite "$suite" --json "$OUT/$suite.json" --out "$OUT" "$@" 2>&1 \
    | tee -a "$OUT/$suite.log"
  rc=${PIPESTATUS[0]}
  echo "== $suite: exit $rc ==" | tee -a "$OUT/$suite.log"
  [ "$rc" -ne 0 ] && status=$rc
done
exit $status
