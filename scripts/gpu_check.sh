#!/usr/bin/env bash
# GPU check for interest discovery: tests (CuPy vs torch paths on CUDA) and the GPU benchmark.
# Usage: bash scripts/gpu_check.sh   (from the repository root; under 5 minutes on one H100/H200)
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
python -c "import cupy; print('cupy', cupy.__version__)" || echo "cupy missing: CuPy tests skip, torch CUDA path only"
timeout 120 python -m pytest -q tests/test_cluster.py
timeout 170 python bench/kmeans.py --gpu
