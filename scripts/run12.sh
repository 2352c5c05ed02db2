#!/bin/bash
# Instruments, inductive fine-tuning (without item IDs), from the pre-trained checkpoint.
# Usage: bash scripts/run12.sh [GPU_ID] [--key=value ...]   (reference row: reference_log/reference_metrics.csv)
cd "$(dirname "$0")/.." || exit 1
CUDA_VISIBLE_DEVICES=${1:-0} python finetune.py \
    -d Instruments_mm_full \
    -p saved/MISSRec-FHCKM_mm_full-100.pth \
    -mode inductive \
    --script=run12.sh "${@:2}"
