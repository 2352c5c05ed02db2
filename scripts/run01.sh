#!/bin/bash
# Scientific, transductive fine-tuning (with item IDs), from scratch.
# Usage: bash scripts/run01.sh [GPU_ID] [--key=value ...]   (reference row: reference_log/reference_metrics.csv)
cd "$(dirname "$0")/.." || exit 1
CUDA_VISIBLE_DEVICES=${1:-0} python finetune.py \
    -d Scientific_mm_full \
    -mode transductive \
    --script=run01.sh "${@:2}"
