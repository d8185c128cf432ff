set -x
nvidia-smi --query-gpu=name,serial --format=csv,noheader
export PYTHONPATH=$PWD
timeout 200 bash tests/gpu/run_device.sh --limit 180 --jobs 6 "tests/gpu/test_sm90_backward.py:6:dq_cast or chain_by_default" 2>&1 | tail -9
timeout 230 python3 -c "import sys,runpy; sys.path.insert(0,'.'); import fa4.kernels.sm90.backward as b; b.CHAIN_BY_DEFAULT_MAX_ROWS_MASKED=16384; sys.argv=['x','--flag','CHAIN_BY_DEFAULT','--causal-only','--rounds','5','--rows','128:4096,128:8192,128:16384']; runpy.run_path('benchmarks/bwd_flag_ab.py', run_name='__main__')" 2>&1 | tail -4
timeout 150 python3 -c "import sys,runpy; sys.path.insert(0,'.'); import fa4.kernels.sm90.backward as b; b.D64_CAUSAL_CHAIN_MAX_ROWS=16384; sys.argv=['x','--flag','D64_CAUSAL_CHAIN','--causal-only','--rounds','5','--rows','64:2048,64:4096,64:16384']; runpy.run_path('benchmarks/bwd_flag_ab.py', run_name='__main__')" 2>&1 | tail -4
