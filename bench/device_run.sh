#!/usr/bin/env bash
# One device call that measures ours and the PyTorch peers on the same GPU, in priority order, each step
# under its own time limit so the whole call fits a 15-minute device session. Logs go to $OUT (or ./bench_out).
# Prepare here first: ../shared/tools/device_wheels.sh tensorboardX  (-> .whl/), and copy
# ../shared/bench/peer_pytorch.py to .peer/; then run with carry [".whl", ".peer"]:
#   bash bench/device_run.sh [sample|train|fid|peer|all]...
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
run() { local name=$1 limit=$2; shift 2; timeout "$limit" "$@" 2>&1 | grep '^{' | tee -a "$OUT/$name.log"; }
for what in "${@:-all}"; do
  case $what in
    sample|all) run sample 120 python3 bench/sample_throughput.py --dtype bfloat16
                run peer_sampling 150 python3 bench/peer_sampling.py --calls 3 ;;&
    train|all) run train 200 python3 bench/train_throughput.py --dtype bfloat16 float32 --batch 128 512 ;;&
    fid|all) run fid 60 python3 bench/fid_throughput.py --numerics bf16 'fp32/tf32' ;;&
    peer) PEER_QUICK=0 run peer 420 python3 .peer/peer_pytorch.py ;;
  esac
done
