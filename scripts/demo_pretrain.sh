#!/bin/bash
# Pre-training in minutes: generate the demo corpus DemoPT and the demo downstream set Demo (once; their
# domains share planted interests), pre-train on DemoPT in NPROC processes (GPUs where there are, else CPU
# processes with gloo), then fine-tune Demo from the last pre-training checkpoint.
# Usage: bash scripts/demo_pretrain.sh [NPROC] [--key=value ...]   (keys go to both stages)
#   EPOCHS=10 (pre-training epochs); DEMO_DATA=datasets, DEMO_SAVED=saved (where the data and the
#   checkpoints go)
cd "$(dirname "$0")/.." || exit 1
set -e
nproc=1
if [[ $1 =~ ^[0-9]+$ ]]; then nproc=$1; shift; fi
epochs=${EPOCHS:-10}
data=${DEMO_DATA:-datasets}
saved=${DEMO_SAVED:-saved}
[ -f "$data/pretrain/DemoPT/DemoPT.train.inter" ] && [ -f "$data/downstream/Demo/Demo.train.inter" ] ||
    python tools/make_demo_data.py --out "$data/downstream" --name Demo --pretrain-out "$data/pretrain"
python ddp_pretrain.py -d DemoPT --data_path="$data/pretrain" --nproc "$nproc" --pretrain_epochs="$epochs" \
    --save_step="$epochs" --train_batch_size=256 --checkpoint_dir="$saved" --ckpt_suffix=demo --overwrite=True \
    --show_progress=False "$@"
python finetune.py -d Demo --data_path="$data/downstream" -p "$saved/MISSRec-DemoPT-$epochs-demo.pth" \
    --checkpoint_dir="$saved" --show_progress=False "$@"
