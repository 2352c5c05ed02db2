#!/bin/bash
# Pantry, inductive fine-tuning (without item IDs), from the pre-trained checkpoint.
# Selects the best epoch on the original top-K+1 metrics, as the reference table did
# (the exact top-K lines are logged too).
# Usage: bash scripts/run08.sh [GPU_IDS] [--key=value ...]   (reference row: reference_log/reference_metrics.csv)
cd "$(dirname "$0")/.." || exit 1
# a first argument of GPU ids (0 or 0,1) selects the GPUs; otherwise an inherited CUDA_VISIBLE_DEVICES stays
if [[ $1 =~ ^[0-9]+(,[0-9]+)*$ ]]; then export CUDA_VISIBLE_DEVICES=$1; shift; fi
python finetune.py \
    -d Pantry_mm_full \
    -p saved/MISSRec-FHCKM_mm_full-100.pth \
    -mode inductive \
    --eval_topk_plus_one=True --script=run08.sh "$@"
