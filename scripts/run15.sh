#!/bin/bash
# Arts, inductive fine-tuning (without item IDs), from scratch.
# Usage: bash scripts/run15.sh [GPU_ID] [--key=value ...]   (reference row: reference_log/reference_metrics.csv)
cd "$(dirname "$0")/.." || exit 1
CUDA_VISIBLE_DEVICES=${1:-0} python finetune.py \
    -d Arts_mm_full \
    -mode inductive \
    --script=run15.sh "${@:2}"
