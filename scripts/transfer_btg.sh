#!/bin/bash
# Transfer from BTG_text (scripts/pretrain_btg.sh) to Scientific_mini, text only (all-MiniLM-L6-v2
# features, feat1MiniLM): the paper's four settings, transductive (item IDs) and inductive (no IDs),
# from scratch and from each pre-trained checkpoint (-p, Transformer frozen as in run02/run04.sh), in
# both kmeans modes and over SEEDS; then two tables (tools/compare.py --table, --paired): test metrics in both
# conventions, mean ± spread over the seeds. Model selection on the original's top-K+1 NDCG@10, as the
# run scripts select (the exact top-K lines are logged too). The regulariser's padded interest slots
# each have their own dropout draw (the default, as the original).
# Usage: bash scripts/transfer_btg.sh [GPU_IDS] [--key=value ...]
#   CKPTS="pretrained/MISSRec-BTG_text-10-orig4.pth saved/MISSRec-BTG_text-10-sync.pth"
#   SEEDS="2020 2021 2022 2023 2024" MODES="original lloyd" (the defaults)
#   SCI_DATA=../shared/datasets/downstream (where Scientific_mini is)
# Logs and the table go to log/transfer_btg-TIME/ (TRANSFER_LOG_DIR to choose); each pre-trained
# run's -note names its checkpoint.
cd "$(dirname "$0")/.." || exit 1
if [[ $1 =~ ^[0-9]+(,[0-9]+)*$ ]]; then export CUDA_VISIBLE_DEVICES=$1; shift; fi
CKPTS=${CKPTS:-pretrained/MISSRec-BTG_text-10-orig4.pth}
SEEDS=${SEEDS:-2020 2021 2022 2023 2024}
MODES=${MODES:-original lloyd}
LOG_DIR=${TRANSFER_LOG_DIR:-log/transfer_btg-$(date +%Y%m%d-%H%M%S)}
for ckpt in $CKPTS; do
    if [ ! -f "$ckpt" ]; then
        echo "error: $ckpt: pre-trained checkpoint not found (run scripts/pretrain_btg.sh, or set CKPTS)" >&2
        exit 2
    fi
done
mkdir -p "$LOG_DIR"
set -e
run() {
    python finetune.py -d Scientific_mini --data_path="${SCI_DATA:-../shared/datasets/downstream}" \
        --plm_suffix=feat1MiniLM --plm_size=384 --modal_type=text --eval_topk_plus_one=True \
        --show_progress=False --log_dir="$LOG_DIR" "$@"
}
for seed in $SEEDS; do
    for kmeans in $MODES; do
        for mode in transductive inductive; do
            run -mode $mode -note "scratch-$kmeans" --kmeans_mode=$kmeans --seed=$seed "$@"
            for ckpt in $CKPTS; do
                name=$(basename "$ckpt" .pth)
                run -mode $mode -p "$ckpt" -note "${name#MISSRec-}-$kmeans" --kmeans_mode=$kmeans --seed=$seed "$@"
            done
        done
    done
done
python tools/compare.py --logs "$LOG_DIR" --table | tee "$LOG_DIR/table.md"
python tools/compare.py --logs "$LOG_DIR" --paired | tee "$LOG_DIR/paired.md"
echo "tables: $LOG_DIR/table.md, $LOG_DIR/paired.md (pre-trained minus scratch, paired by seed)"
