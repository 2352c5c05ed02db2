#!/bin/bash
# Instruments, transductive fine-tuning (with item IDs), from the pre-trained checkpoint.
# Usage: bash scripts/run10.sh [GPU_ID] [--key=value ...]   (reference row: reference_log/reference_metrics.csv)
cd "$(dirname "$0")/.." || exit 1
CUDA_VISIBLE_DEVICES=${1:-0} python finetune.py \
    -d Instruments_mm_full \
    -p saved/MISSRec-FHCKM_mm_full-100.pth \
    -mode transductive \
    --script=run10.sh "${@:2}"
