set -x
nvidia-smi --query-gpu=name,serial --format=csv,noheader
export PYTHONPATH=$PWD
timeout 200 bash tests/gpu/run_device.sh --limit 180 --jobs 6 "tests/gpu/test_sm90_backward.py:6:dq_cast or chain_by_default" 2>&1 | tail -9
# the cast on every chain (also without a right window) against the cast after the kernel
timeout 330 python3 -c "import sys,runpy; sys.path.insert(0,'.'); import fa4.kernels.sm90.backward as b; f=b.dq_cast_serves; b.dq_cast_serves=lambda t,sf,d,wr: f(t,sf,d,0); sys.argv=['x','--flag','DQ_CAST','--rounds','5','--rows','128:1024,128:2048,128:4096,128:16384,64:1024']; runpy.run_path('benchmarks/bwd_flag_ab.py', run_name='__main__')" 2>&1 | tail -11
