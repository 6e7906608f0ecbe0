#!/usr/bin/env bash
# The wheels `python -m bench.gpu_report` needs and the GPU image lacks, downloaded where there is a network into
# .whl/ (git-ignored), to travel with the checkout: Python 3.12, manylinux x86_64, binaries only, no dependencies
# resolved (each one needed is named below). The report installs them with
# `pip install --no-index --no-deps --target <a temporary folder>` and puts that folder on its stages' PYTHONPATH.
#
#   bash bench/gpu_wheels.sh [DEST]            # DEST defaults to .whl
#
# The image (../shared/GPU.md) has torch, triton, numpy, einops, sympy, tqdm, pytest and pytest-benchmark already.
# Not downloaded:
#   wandb      the report never imports it (the training stage runs with wandb.mode=disabled)
#   faiss      PyPI's GPU wheels are built for CUDA 12 and need the nvidia-*-cu12 runtime and cuBLAS wheels, which
#              the image (CUDA 13) lacks and which are far larger than what travels with a checkout (faiss-gpu 1.15.1
#              alone is 130 MB); the report lists FAISS as "skipped: faiss is not installed"
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-.whl}"

wheels=(
    vector-quantize-pytorch==1.32.0  # the peer quantizer; its dependencies that the image lacks follow
    einx==0.4.3
    frozendict==2.5.1                # einx's
    loguru==0.7.3
    torch-einops-utils==0.2.0
    flash-kmeans==0.3.1              # pure Python (Triton kernels): its assignment kernel is a nearest_code peer
    pytorch-msssim==1.0.0            # SSIM: a dependency of the project, for evaluating a training run there
)
platforms=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
                manylinux1_x86_64 any; do
    platforms+=(--platform "$platform")
done

python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp "${platforms[@]}" --dest "$dest" "${wheels[@]}"
ls -l "$dest"/*.whl
