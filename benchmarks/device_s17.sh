export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,serial --format=csv,noheader
python3 benchmarks/bwd_flag_ab.py --tile-field persistent --causal-only --rounds 7 --rows 128:1024,128:4096,128:16384 2>&1 | grep -v -i warn | tee $OUT/bwd-ab-d128-causal-persistent.log
OUT=$OUT/verify bash benchmarks/verify_device.sh 2>&1 | tail -25
