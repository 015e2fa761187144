#!/usr/bin/env bash
# Issue 8 on a lent several-GPU machine, one stage per device call (each under the 10-minute limit).
# Run from the repository root with `.whl` carried (../shared/tools/device-wheels.sh); results in $OUT.
# The device takes at most 64 MiB of tree + carry: the wheels are ~62.4 MB, so the tracked tree
# must stay under ~4.6 MB (large result JSONs are kept gzipped: bench/results/*.json.gz).
#
#   bash bench/multigpu_run.sh transfer   # kvtransfer GPU0 -> GPU1 vs raw ucxx vs torch peer copy
#   bash bench/multigpu_run.sh pair       # 1P1D vs 2D on two GPUs (chat, long, multi-turn)
#   bash bench/multigpu_run.sh four       # 1P3D, 2P2D, 3P1D, 4D on four GPUs (chat, long)
#
# Predicted beforehand: bench/results/predict-sim-gpu-four.md (bench/predict_gpu.py, same requests and rates).
# Then, here: python bench/validate_sim_gpu.py <the cluster-gpu-*.json files> --tag multigpu
# (the simulator's prediction for the same shapes and requests, profile h200-llama3-8b-profiled).
set -euo pipefail
stage=${1:?usage: multigpu_run.sh transfer|pair|four}
: "${OUT:?set OUT to the results folder}"
case $stage in transfer|pair|four) ;; *) echo "unknown stage $stage (transfer, pair, four)" >&2; exit 2 ;; esac
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export UCX_WARN_UNUSED_ENV_VARS=n GIT_COMMIT=${GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
for d in engine kernels kvtransfer prefill_worker decode_worker router proto deploy; do ln -sfn ../$d splitserve/$d; done
export PYTHONPATH=$PWD:/tmp/site
gpus=$(nvidia-smi -L | wc -l)
need() { if [ "$gpus" -lt "$1" ]; then echo "stage $stage needs $1 GPUs, this machine has $gpus" >&2; exit 2; fi; }
case $stage in
  transfer)
    need 2
    timeout 500 python3 bench/transfer.py --device cuda --gpus 0,1 --sizes 8,32,128,512 --reps 5 --tag x2 --out "$OUT" ;;
  pair)
    need 2
    timeout 560 python3 bench/cluster_gpu.py --shapes 1P1D,2D --workloads chat,long,multi_turn \
      --rates 'chat=4,8,16,32;long=1.5,3,4.5;multi_turn=4,8,16' --deadline-s 480 --out "$OUT" --tag pair ;;
  four)
    need 4
    timeout 560 python3 bench/cluster_gpu.py --shapes 1P3D,2P2D,3P1D,4D --workloads chat,long \
      --rates 'chat=16,32,64;long=3,6,9' --deadline-s 480 --out "$OUT" --tag four ;;
esac
