#!/bin/bash
# Transfer from BTG_text (scripts/pretrain_btg.sh) to Scientific_mini, text only (all-MiniLM-L6-v2
# features, feat1MiniLM): the paper's four settings, transductive (item IDs) and inductive (no IDs),
# from scratch and from the pre-trained checkpoint (-p, Transformer frozen as in run02/run04.sh), in
# both kmeans modes and over SEEDS; then one table (tools/compare.py --table): test metrics in both
# conventions, mean ± spread over the seeds. Model selection: exact top-K NDCG@10 (the default).
# Like scripts/pretrain_btg.sh, the regulariser's padded interest slots share one dropout draw
# (--reg_pad_draws=shared): with lloyd interests the original's draw per slot made an epoch 3x
# slower here when these runs were made (2.7x now, README "Speed"); with the original k-means
# (one or two interests per row) both are the same.
# Usage: bash scripts/transfer_btg.sh [GPU_IDS] [--key=value ...]
#   CKPT=saved/MISSRec-BTG_text-10.pth SEEDS="2020 2021 2022" MODES="original lloyd" (the defaults)
#   SCI_DATA=../shared/datasets/downstream (where Scientific_mini is)
# Logs and the table go to log/transfer_btg-TIME/ (TRANSFER_LOG_DIR to choose).
cd "$(dirname "$0")/.." || exit 1
if [[ $1 =~ ^[0-9]+(,[0-9]+)*$ ]]; then export CUDA_VISIBLE_DEVICES=$1; shift; fi
CKPT=${CKPT:-saved/MISSRec-BTG_text-10.pth}
SEEDS=${SEEDS:-2020 2021 2022}
MODES=${MODES:-original lloyd}
LOG_DIR=${TRANSFER_LOG_DIR:-log/transfer_btg-$(date +%Y%m%d-%H%M%S)}
if [ ! -f "$CKPT" ]; then
    echo "error: $CKPT: pre-trained checkpoint not found (run scripts/pretrain_btg.sh, or set CKPT)" >&2
    exit 2
fi
mkdir -p "$LOG_DIR"
set -e
run() {
    python finetune.py -d Scientific_mini --data_path="${SCI_DATA:-../shared/datasets/downstream}" \
        --plm_suffix=feat1MiniLM --plm_size=384 --modal_type=text --reg_pad_draws=shared --log_dir="$LOG_DIR" "$@"
}
for seed in $SEEDS; do
    for kmeans in $MODES; do
        for mode in transductive inductive; do
            run -mode $mode -note "scratch-$kmeans" --kmeans_mode=$kmeans --seed=$seed "$@"
            run -mode $mode -p "$CKPT" -note "BTG_text-$kmeans" --kmeans_mode=$kmeans --seed=$seed "$@"
        done
    done
done
python tools/compare.py --logs "$LOG_DIR" --table | tee "$LOG_DIR/table.md"
echo "table: $LOG_DIR/table.md"
