#!/bin/bash
# Arts, transductive fine-tuning (with item IDs), from scratch.
# Selects the best epoch on the original top-K+1 metrics, as the reference table did
# (the exact top-K lines are logged too).
# Usage: bash scripts/run13.sh [GPU_IDS] [--key=value ...]   (reference row: reference_log/reference_metrics.csv)
cd "$(dirname "$0")/.." || exit 1
# a first argument of GPU ids (0 or 0,1) selects the GPUs; otherwise an inherited CUDA_VISIBLE_DEVICES stays
if [[ $1 =~ ^[0-9]+(,[0-9]+)*$ ]]; then export CUDA_VISIBLE_DEVICES=$1; shift; fi
python finetune.py \
    -d Arts_mm_full \
    -mode transductive \
    --eval_topk_plus_one=True --script=run13.sh "$@"
