#!/bin/bash
# Zero-shot on Scientific_mini (text only, inductive: no training at all) of BTG_text pre-training
# checkpoints (scripts/pretrain_btg.sh), against the training-free baselines: most-popular, text
# similarity (TextSim) and a randomly initialised MISSRec (learning rate 0 for one epoch: its test
# line is the initial model's, with interests discovered on the target items).
# Usage: bash scripts/zero_shot_btg.sh CKPT [CKPT ...]       e.g. pretrained/MISSRec-BTG_text-*-orig4.pth
#   MODES="original lloyd" (interest discovery on the target items), SCI_DATA=../shared/datasets/downstream
# Prints one line per evaluation: name, kmeans_mode, test R@10 N@10 (exact top-K), the same top-K+1.
cd "$(dirname "$0")/.." || exit 1
MODES=${MODES:-original lloyd}
LOG_DIR=${ZERO_SHOT_LOG_DIR:-log/zero_shot_btg}
common=(-d Scientific_mini --data_path="${SCI_DATA:-../shared/datasets/downstream}" --plm_suffix=feat1MiniLM
        --plm_size=384 --modal_type=text --show_progress=False --log_dir="$LOG_DIR")
test_line() {   # the markdown rows of the test split (exact top-K, then top-K+1) -> "R@10 N@10" of each
    grep -E '^\| ([A-Za-z]+ )?test \((exact|original)' | grep -v most-popular | awk -F'|' '{printf "%s %s   ", $3, $5}'
}
for ckpt in "$@"; do
    for kmeans in $MODES; do
        echo "$(basename "$ckpt") $kmeans $(python finetune.py --eval_only -p "$ckpt" -mode inductive "${common[@]}" \
            --kmeans_mode=$kmeans 2>/dev/null | test_line)"
    done
done
for kmeans in $MODES; do
    out=$(python finetune.py -mode inductive "${common[@]}" --kmeans_mode=$kmeans --learning_rate=0 --epochs=1 \
          --checkpoint_dir="$LOG_DIR/saved" 2>/dev/null | test_line)
    echo "random-init $kmeans $out"
done
echo "TextSim - $(python finetune.py -m TextSim "${common[@]}" 2>/dev/null | test_line)"
echo "Pop - $(python finetune.py -m Pop -d Scientific_mini --data_path="${SCI_DATA:-../shared/datasets/downstream}" \
      --show_progress=False --log_dir="$LOG_DIR" 2>/dev/null | test_line)"
