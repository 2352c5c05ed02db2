#!/usr/bin/env bash
# One check of every GPU path (test suite with the CUDA tests, CuPy vs torch, CUDA fine-tuning with
# resume and recommend, CUDA pre-training, NCCL with one rank, timings), one verdict table at the end.
# Usage: bash scripts/gpu_check.sh [--dry-run] [--no-suite] [--out DIR] [--data DIR]
#   on one H200 it takes under 4 minutes; --dry-run runs what the CPU can (CPU, gloo, tiny sizes) and
#   marks the GPU-only parts SKIPPED. Exit status 1 if a step fails. Steps: tools/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python tools/gpu_check.py "$@"
