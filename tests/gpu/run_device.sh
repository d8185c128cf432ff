#!/usr/bin/env bash
# Run GPU test files on the device machine, several pytest processes side by side (JIT compilation is
# CPU-bound and correctness tests share the card fine), each under its own time limit.
#
#   bash tests/gpu/run_device.sh [--limit SECONDS] [--jobs N] file.py[:SHARDS[:K_EXPR]] [...]
#
# file.py:3 runs that file as three processes (FA4_TEST_SHARD=i/3, see tests/conftest.py); file.py:2:ping
# runs only the tests that `pytest -k ping` selects, in two processes. Logs are packed
# into $OUT/test-logs.tar.gz (the device tool returns at most 8 files); stdout ends with the failures and one
# summary line per process. Exit status: 0 when every process passed (pytest 0, or 5 for a shard that selected no
# test), 1 otherwise (a failure, an error or a timeout), 2 without a CUDA device.
set -uo pipefail
cd "$(dirname "$0")/../.."
limit=540
jobs=8
while [ $# -gt 0 ]; do
  case "$1" in
    --limit) limit=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    *) break ;;
  esac
done
OUT=${OUT:-$PWD/test-out}
logs=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
card=$(nvidia-smi --query-gpu=name,serial,driver_version --format=csv,noheader 2>&1 | head -1)
if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: tests/gpu need one (card query: $card)" >&2
  exit 2
fi

run_one() {  # file shard_index shard_count [k expression]
  local f=$1 i=$2 n=$3 expr=${4:-} name start rc line
  name="$(basename "$f" .py)-$i-of-$n"
  start=$SECONDS
  FA4_TEST_SHARD="$i/$n" timeout -k 10 "$limit" python3 -m pytest -q -rfE --durations=5 -p no:cacheprovider \
    ${expr:+-k "$expr"} "$f" > "$logs/$name.log" 2>&1
  rc=$?
  line=$(grep -E "[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran" "$logs/$name.log" | tail -1)
  echo "$name rc=$rc $((SECONDS - start))s :: ${line:-no summary (timeout?)}" > "$logs/$name.summary"
  echo "$rc" > "$logs/$name.rc"
}

for spec in "$@"; do
  f=${spec%%:*}
  n=1
  expr=
  if [ "$spec" != "$f" ]; then
    rest=${spec#*:}
    n=${rest%%:*}
    [ "$rest" != "$n" ] && expr=${rest#*:}
  fi
  for ((i = 0; i < n; i++)); do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
    run_one "$f" "$i" "$n" "$expr" &
  done
done
wait
tar -czf "$OUT/test-logs.tar.gz" -C "$logs" .
echo "== failures"
grep -h -E "^(FAILED|ERROR) " "$logs"/*.log | cut -c1-400
echo "== card: $card"
cat "$logs"/*.summary
status=0
for f in "$logs"/*.rc; do
  rc=$(cat "$f")
  [ "$rc" = 0 ] || [ "$rc" = 5 ] || status=1
done
exit $status
