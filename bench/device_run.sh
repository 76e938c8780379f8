#!/usr/bin/env bash
# One device call that measures ours and the PyTorch peers on the same GPU, in the order given, each step under
# its own time limit so that a call fits the device session. Logs (JSON lines) go to $OUT (or ./bench_out).
# Prepare here first: ../shared/tools/device_wheels.sh tensorboardX  (-> .whl/; the image lacks tensorboardX, which
# train/logger.py imports), and copy ../shared/bench/peer_pytorch.py to .peer/; then run with carry [".whl", ".peer"]:
#   bash bench/device_run.sh [check|sample|train|train16|profile|fid|peer|peer_quick|graphs|all]...
# check    bench/gpu_checks.py: cuDNN and Pallas attention against XLA (bf16), ~1 min
# sample   ours (both networks, bf16), then the peer (same networks, torch.compile), ~8 min; NETWORKS=ddpm_cifar10
#          for the DDPM network alone
# train    the training step, bf16 and fp32 at batch 128 and 512, with their compiled HLO (hlo.tar), ~5 min
# train16  the bf16 step at batch 128 and 512, each with its per-op profile and compiled HLO (hlo.tar), ~3 min
# profile  the bf16 batch-512 step: base, Pallas flash attention (cuDNN's rejects the DDPM network's 256-wide
#          head), no dropout; each with a per-op profile and its compiled HLO (returned as $OUT/hlo.tar, to
#          study XLA:GPU's fusions on the CPU), ~6 min
# fid      FID Inception features, bf16 and TF32, ~1 min
# peer     the PyTorch training peer with compiled batch 128 (PEER_QUICK=0), ~7 min
# peer_quick  the PyTorch peer at batch 512 only (train eager and compiled, compiled forward, pytorch-fid), ~3.5 min
# graphs   the bf16 step at batch 128 and 512 (1 and 4 steps per call) with XLA:GPU's command buffers (CUDA graphs)
#          for fusions, cuBLAS, cuDNN and custom calls from one command up (XLA's default: from 5 consecutive
#          ones): to try if the profile's idle_share says kernel launches bound the step (compare with the train
#          rows; its compiled programs come back as $OUT/hlo_graphs.tar: whether XLA formed the graphs on the
#          device, and kernel_times' rest of each call against train16's), ~4 min
set -uo pipefail
OUT=${OUT:-bench_out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)  # absolute: XLA writes into it
NETWORKS=${NETWORKS:-ddpm_cifar10 ldm_text}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
export PYTHONUNBUFFERED=1
# Compile-time only (the measured steps are unchanged): programs and per-fusion autotuning results are cached
# across the steps of this call, so e.g. the profile's base row reuses the train row's compilation.
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache XLA_FLAGS="--xla_gpu_per_fusion_autotune_cache_dir=/tmp/xla_autotune"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
# JSON lines to $OUT/<name>.log and the console; everything (warnings, tracebacks) to $OUT/raw.txt. XLA:GPU writes
# its autotuning results (the kernel chosen for each convolution, GEMM and tuned fusion, with its measured time) to
# $OUT/autotune_<name>.textproto: with the compiled programs of hlo.tar, bench/kernel_times.py says on the CPU what
# those kernels take per step (the traces of the lent machines have held no kernel events). No device time.
run() { local name=$1 limit=$2; shift 2
        XLA_FLAGS="$XLA_FLAGS --xla_gpu_dump_autotune_results_to=$OUT/autotune_$name.textproto" \
          timeout "$limit" "$@" 2>&1 | tee -a "$OUT/raw.txt" | grep '^{' | tee -a "$OUT/$name.log"; }
for what in "${@:-all}"; do
  case $what in
    check|all) run check 120 python3 bench/gpu_checks.py ;;&
    sample|all) run sample 240 python3 bench/sample_throughput.py --dtype bfloat16 --network $NETWORKS --dump_hlo /tmp/hlo
                run peer_sampling 300 python3 bench/peer_sampling.py --calls 3 --network $NETWORKS ;;&
    train|all) run train 300 python3 bench/train_throughput.py --dtype bfloat16 float32 --batch 128 512 \
                 --dump_hlo /tmp/hlo ;;&
    train16) run train 260 python3 bench/train_throughput.py --dtype bfloat16 --batch 512 128 \
               --profile /tmp/profile --dump_hlo /tmp/hlo; tar -C /tmp -cf "$OUT/hlo.tar" hlo ;;
    profile|all) run profile 400 python3 bench/train_throughput.py --dtype bfloat16 --batch 512 --steps 10 \
                   --variant base model.attention=pallas model.dropout=0.0 --profile /tmp/profile --dump_hlo /tmp/hlo ;;&
    fid|all) run fid 90 python3 bench/fid_throughput.py --numerics bf16 'fp32/tf32' ;;&
    peer) PEER_QUICK=0 run peer 420 python3 .peer/peer_pytorch.py ;;
    peer_quick) PEER_QUICK=1 run peer 240 python3 .peer/peer_pytorch.py ;;
    graphs) GRAPHS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1"
            XLA_FLAGS="$XLA_FLAGS $GRAPHS" run graphs 300 python3 bench/train_throughput.py --dtype bfloat16 --batch 128 512 \
              --steps_per_call 1 4 --dump_hlo /tmp/hlo_graphs; tar -C /tmp -cf "$OUT/hlo_graphs.tar" hlo_graphs ;;
  esac
done
[ -d /tmp/hlo ] && tar -C /tmp -cf "$OUT/hlo.tar" hlo
exit 0
