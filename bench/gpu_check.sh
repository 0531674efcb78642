#!/usr/bin/env bash
# GPU readiness check (issue 17): device + matmul peak, IWAE-5000 on the 10 000 MNIST test images (s, TFLOP/s),
# training img/s at k = 1 and k = 50, DDP equality with 2 GPUs. Budget: under 8 minutes on one GPU.
#   AMORTLAB_DATA=/path/to/data bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=disabled
timeout 480 python bench/gpu_check.py "$@"
