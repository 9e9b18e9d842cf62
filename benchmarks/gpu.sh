#!/usr/bin/env bash
# The prepared GPU check: ours against PyTorch in the same run, about 6 minutes on one H100.
#   1. here:   bash benchmarks/gpu_payload.sh PATH/TO/MNIST    (fills device_payload/)
#   2. there:  bash benchmarks/gpu.sh                          (with device_payload/ carried)
# Throughput of ResNet-18/50 at 32x32 and 64x64 (batch 256, float32 with TF32 in both), then
# 300 fine-tuning steps of ResNet-18 on MNIST with the same initial weights and batches.
set -euo pipefail
payload=${PAYLOAD:-device_payload}
if ls "$payload"/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/dlassign_site "$payload"/wheels/*.whl
  export PYTHONPATH=/tmp/dlassign_site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
out=${OUT:-/tmp/dlassign_gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"
for size in 32 64; do
  python3 -m benchmarks.throughput --models=resnet18,resnet50 --image_size=$size \
    --batch_size=256 --rounds=3 --steps=20 --json="$out/throughput_$size.json"
done
python3 -m benchmarks.finetune --data_dir="$payload/mnist" --steps=300 --batch_size=128 \
  --json="$out/finetune.json"
