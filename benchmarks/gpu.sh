#!/usr/bin/env bash
# The prepared accelerator check: ours against PyTorch on the same card, in the same run.
#   1. here:   bash benchmarks/gpu_payload.sh PATH/TO/MNIST    (fills device_payload/)
#   2. there:  bash benchmarks/gpu.sh                          (with device_payload/ carried)
# The step harness (throughput and roofline) for ResNet-18/50 at 32x32 and 64x64 (batch 256,
# float32 with TF32 in both), then the end-to-end table: whole `experiments.train` processes
# against the plain PyTorch script on MNIST, one epoch, cold and warm compilation cache.
set -euo pipefail
payload=${PAYLOAD:-device_payload}
if ls "$payload"/wheels/*.whl >/dev/null 2>&1; then
  site="$(cd "$payload" && pwd)/site"
  python3 -m pip install -q --no-index --no-deps --target "$site" "$payload"/wheels/*.whl
  export PYTHONPATH=$site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
out=${OUT:-$payload/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__)"
for size in 32 64; do
  python3 -m benchmarks.step --models=resnet18,resnet50 --image_size=$size \
    --batch_size=256 --rounds=3 --steps=20 --json="$out/step_$size.json"
done
python3 -m benchmarks.end_to_end --data_dir="$payload/mnist" --models=mlp,cnn,lenet5 \
  --modes=cold,warm --num_epochs=1 --repeats=1 --json="$out/end_to_end.json"
