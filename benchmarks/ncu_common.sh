# Sourced by the ncu_*.sh probes, from the repository root: PYTHONPATH, $OUT (made) and $NCU, the Nsight Compute
# binary (the probe stops if there is none).
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-$PWD/ncu-out}
mkdir -p "$OUT"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "ncu not found" >&2; exit 1; }
