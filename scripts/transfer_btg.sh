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
# run's -note names its checkpoint. A run whose note, stage and seed already have a finished log
# (one with its test result) in that folder is skipped, so pointing TRANSFER_LOG_DIR at an
# interrupted or smaller earlier protocol completes it (extra --key=value arguments are not compared).
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
finished() {  # finished NOTE STAGE SEED: LOG_DIR holds a log of that run with its test result
    local log
    for log in "$LOG_DIR/MISSRec-Scientific_mini-$1-$2_ft-"*.log; do
        [ -f "$log" ] && grep -qx "seed = $3" "$log" && grep -q "test result" "$log" && return 0
    done
    return 1
}
run() {
    finished "$NOTE" "$MODE" "$SEED" && { echo "done before: $NOTE $MODE seed $SEED"; return 0; }
    python finetune.py -d Scientific_mini --data_path="${SCI_DATA:-../shared/datasets/downstream}" \
        --plm_suffix=feat1MiniLM --plm_size=384 --modal_type=text --eval_topk_plus_one=True \
        --show_progress=False --log_dir="$LOG_DIR" -mode "$MODE" -note "$NOTE" --seed="$SEED" "$@"
}
for SEED in $SEEDS; do
    for kmeans in $MODES; do
        for MODE in transductive inductive; do
            NOTE=scratch-$kmeans run --kmeans_mode=$kmeans "$@"
            for ckpt in $CKPTS; do
                name=$(basename "$ckpt" .pth)
                NOTE=${name#MISSRec-}-$kmeans run -p "$ckpt" --kmeans_mode=$kmeans "$@"
            done
        done
    done
done
python tools/compare.py --logs "$LOG_DIR" --table | tee "$LOG_DIR/table.md"
python tools/compare.py --logs "$LOG_DIR" --paired | tee "$LOG_DIR/paired.md"
echo "tables: $LOG_DIR/table.md, $LOG_DIR/paired.md (pre-trained minus scratch, paired by seed)"
