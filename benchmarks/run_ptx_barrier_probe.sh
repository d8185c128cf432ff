#!/usr/bin/env bash
# One device call: ptx_barrier_probe.py's modes alternated in fresh processes (ROUNDS rounds, default 2), raw JSON
# lines under $OUT, a table last. Usage: bash benchmarks/run_ptx_barrier_probe.sh [modes] [rows]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/ptxbar-out}
mkdir -p "$OUT"
MODES=${1:-none,prearrive,prewait}
ROWS=${2:-128:16384:1,128:16384:0,128:4096:1,128:1024:0,64:4096:0}
nvidia-smi --query-gpu=name,serial,clocks.max.sm --format=csv,noheader | tee "$OUT/card.txt"
for round in $(seq 1 "${ROUNDS:-2}"); do
  for mode in ${MODES//,/ }; do
    python3 benchmarks/ptx_barrier_probe.py --mode "$mode" --rows "$ROWS" >> "$OUT/probe.jsonl" 2>> "$OUT/probe.err" \
      || echo "mode $mode round $round failed" | tee -a "$OUT/probe.err"
  done
done
python3 - "$OUT/probe.jsonl" <<'PY'
import json, sys, collections
rows = collections.defaultdict(lambda: collections.defaultdict(list))
sums = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    key = (r["d"], r["s"], r["causal"])
    rows[key][r["mode"]].append(r["us"])
    sums.setdefault(key, {}).setdefault(r["mode"], (r["sums"], r["repeat_drift"], r["removed"]))
for key, modes in rows.items():
    base = min(modes.get("none", [float("nan")]))
    cells = []
    for mode, ts in modes.items():
        s, drift, removed = sums[key][mode]
        ref = sums[key].get("none", (s,))[0]
        rel = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(s, ref))
        cells.append(f"{mode}: best {min(ts):.1f} us ({base / min(ts):.3f}x) rounds {ts} |grad sums| rel {rel:.1e} drift {drift:.1e} bars -{removed}")
    print(f"D={key[0]} S={key[1]} causal={key[2]}:\n  " + "\n  ".join(cells))
PY
