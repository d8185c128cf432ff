export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader
FA4_KT_PERSISTENT=1 bash tests/gpu/run_device.sh --limit 300 --jobs 12 tests/gpu/test_sm90_backward.py:8 2>&1 | tail -10
for f in "" "--flag KT_PERSISTENT"; do python3 benchmarks/bwd_cta_overhead.py --d 64 $f 2>&1 | grep -v -i warn; python3 benchmarks/bwd_cta_overhead.py --d 128 --kt $f 2>&1 | grep -v -i warn; done | tee $OUT/cta-overhead-persistent.log
python3 benchmarks/bwd_flag_ab.py --flag KT_PERSISTENT --rounds 7 --rows 128:1024,64:4096,128:4096 2>&1 | grep -v -i warn | tee $OUT/bwd-ab-kt-persistent-split.log
