#!/bin/bash
# Pre-training on BTG_text, a real three-domain Amazon corpus (Beauty, Toys, Games; all-MiniLM-L6-v2
# text features, 384-d, no images), with the paper's pre-training settings (props/pretrain.yaml:
# global batch 4096, interest_ratio 0.02, both losses, item and word drop), text only, 10 epochs, a
# checkpoint after every epoch. scripts/transfer_btg.sh fine-tunes from them.
# Two regimes (docs/transfer.md, "Does pre-training transfer?"):
#   bash scripts/pretrain_btg.sh --ckpt_suffix=sync                 # one model, 4096 rows a step (the paper)
#   bash scripts/pretrain_btg.sh --sync_gradients=False --models_per_batch=4 --ckpt_suffix=orig4
#                                    # the original's 4-GPU run: rank 0's model, 1024 rows and negatives
# Usage: bash scripts/pretrain_btg.sh [GPU_IDS] [--key=value ...]
#   e.g. bash scripts/pretrain_btg.sh --ckpt_suffix=sync --resume saved/MISSRec-BTG_text-4-sync.pth
#        BTG_DATA=/data/pretrain bash scripts/pretrain_btg.sh 0,1 --ckpt_suffix=sync   # elsewhere, 2 GPUs
cd "$(dirname "$0")/.." || exit 1
if [[ $1 =~ ^[0-9]+(,[0-9]+)*$ ]]; then export CUDA_VISIBLE_DEVICES=$1; shift; fi
python ddp_pretrain.py -d BTG_text --data_path="${BTG_DATA:-../shared/datasets/pretrain}" \
    --modal_type=text --plm_size=384 --pretrain_epochs=10 --save_step=1 "$@"
