#!/bin/bash
# Arts, transductive fine-tuning (with item IDs), from the pre-trained checkpoint.
# Usage: bash scripts/run14.sh [GPU_IDS] [--key=value ...]   (reference row: reference_log/reference_metrics.csv)
cd "$(dirname "$0")/.." || exit 1
# a first argument of GPU ids (0 or 0,1) selects the GPUs; otherwise an inherited CUDA_VISIBLE_DEVICES stays
if [[ $1 =~ ^[0-9]+(,[0-9]+)*$ ]]; then export CUDA_VISIBLE_DEVICES=$1; shift; fi
python finetune.py \
    -d Arts_mm_full \
    -p saved/MISSRec-FHCKM_mm_full-100.pth \
    -mode transductive \
    --script=run14.sh "$@"
