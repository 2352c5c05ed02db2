#!/usr/bin/env bash
# One check of every GPU path (the CUDA/CuPy tests and a CPU subset of the suite, CuPy vs torch, CUDA
# fine-tuning with resume and recommend, CUDA pre-training, NCCL with one rank, two gloo ranks sharing
# the GPU, timings), one verdict table at the end naming the python, torch, CUDA and CuPy it ran with.
# Usage: bash scripts/gpu_check.sh [--dry-run] [--no-suite] [--out DIR] [--data DIR]
#   on one H200 it takes under 4 minutes; --dry-run runs what the CPU can (CPU, gloo, tiny sizes) and
#   marks the GPU-only parts SKIPPED. Exit status 1 if a step fails. Steps: tools/gpu_check.py.
# Installs nothing: it runs with the interpreter it finds, $PYTHON if set, else python3, else python.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
    py=$PYTHON
elif command -v python3 >/dev/null 2>&1; then
    py=python3
elif command -v python >/dev/null 2>&1; then
    py=python
else
    echo "gpu_check.sh: no python3 or python on PATH; set PYTHON=/path/to/python" >&2
    exit 2
fi
exec "$py" tools/gpu_check.py "$@"
