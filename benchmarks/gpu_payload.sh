#!/usr/bin/env bash
# Prepares device_payload/ (git-ignored) for benchmarks/gpu.sh on a machine with no internet:
# the MNIST IDX files and the wheels the GPU image lacks (ml-collections).
#   bash benchmarks/gpu_payload.sh PATH/TO/MNIST
set -euo pipefail
mnist=${1:?usage: bash benchmarks/gpu_payload.sh PATH/TO/MNIST}
mkdir -p device_payload/mnist device_payload/wheels
cp "$mnist"/*-ubyte.gz device_payload/mnist/
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  -d device_payload/wheels ml-collections==1.1.0
du -sh device_payload
