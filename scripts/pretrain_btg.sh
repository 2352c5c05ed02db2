#!/bin/bash
# Pre-training on BTG_text, a real three-domain Amazon corpus (Beauty, Toys, Games; all-MiniLM-L6-v2
# text features, 384-d, no images), with the paper's pre-training settings (props/pretrain.yaml:
# global batch 4096, interest_ratio 0.02, both losses, item and word drop), text only.
# Checkpoints saved/MISSRec-BTG_text-{2,4,...}.pth; scripts/transfer_btg.sh fine-tunes from them.
# The reference run (reference_log/BTG_text/) used one shared dropout draw for the PAD interest
# slots of the regulariser (--reg_pad_draws=shared): the original's own draw per slot, the default,
# costs 2.2x per batch on 2 CPU cores (README, "Speed"). Pass --reg_pad_draws=independent to
# pre-train exactly as the original.
# Usage: bash scripts/pretrain_btg.sh [GPU_IDS] [--key=value ...]
#   e.g. bash scripts/pretrain_btg.sh --pretrain_epochs=20
#        bash scripts/pretrain_btg.sh --resume saved/MISSRec-BTG_text-4.pth     # continue a run
#        BTG_DATA=/data/pretrain bash scripts/pretrain_btg.sh 0,1               # corpus elsewhere, 2 GPUs
cd "$(dirname "$0")/.." || exit 1
if [[ $1 =~ ^[0-9]+(,[0-9]+)*$ ]]; then export CUDA_VISIBLE_DEVICES=$1; shift; fi
python ddp_pretrain.py -d BTG_text --data_path="${BTG_DATA:-../shared/datasets/pretrain}" \
    --modal_type=text --plm_size=384 --pretrain_epochs=10 --save_step=2 --reg_pad_draws=shared "$@"
