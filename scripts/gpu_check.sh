#!/usr/bin/env bash
# GPU checks: CuPy vs torch interest discovery, the packed model on CUDA, and the GPU benchmarks.
# Usage: bash scripts/gpu_check.sh   (from the repository root; the timeouts bound it at 5 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
python -c "import cupy; print('cupy', cupy.__version__)" || echo "cupy missing: CuPy tests skip, torch CUDA path only"
timeout 60 python -m pytest -q tests/test_cluster.py tests/test_model.py
timeout 150 python bench/kmeans.py --gpu
timeout 90 python bench/finetune.py --epochs 3   # Scientific_mini from ../shared; seconds per epoch on the GPU
