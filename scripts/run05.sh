#!/bin/bash
# Pantry, transductive fine-tuning (with item IDs), from scratch.
# Usage: bash scripts/run05.sh [GPU_ID] [--key=value ...]   (reference row: reference_log/reference_metrics.csv)
cd "$(dirname "$0")/.." || exit 1
CUDA_VISIBLE_DEVICES=${1:-0} python finetune.py \
    -d Pantry_mm_full \
    -mode transductive \
    --script=run05.sh "${@:2}"
