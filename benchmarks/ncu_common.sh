# Sourced by the ncu_*.sh probes, from the repository root: PYTHONPATH, $OUT (made) and $NCU, the Nsight Compute
# binary (the probe stops if there is none).
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-$PWD/ncu-out}
mkdir -p "$OUT"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "ncu not found" >&2; exit 1; }
# What ncu_peer.sh and ncu_fwd_smem.sh collect (load on the tensor pipe, shared memory, issue, L2 and DRAM; cycles and
# time) and the pattern that picks those lines out of ncu's report.
LOAD_METRICS="sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed.sum,sm__cycles_elapsed.avg,gpu__time_duration.sum,smsp__issue_active.avg.pct_of_peak_sustained_active,lts__t_bytes.sum,dram__bytes.sum,lts__t_sector_hit_rate.pct,dram__bytes_read.sum,dram__bytes_write.sum"
LOAD_LINES="pipe_tensor_cycles_active|lsu_wavefronts|inst_executed|cycles_elapsed|time_duration|issue_active|lts__t_bytes|lts__t_sector_hit_rate|dram__bytes|rror"
