#!/bin/bash
# Baselines on one dataset, in the same harness (data, full-sort evaluator, early stopping, log lines):
# Pop (most-popular), TextSim (text similarity to the history, props/TextSim.yaml), SASRec (RecBole's
# defaults, props/SASRec.yaml, with props/finetune.yaml's training settings) and MISSRec from scratch with
# the settings of run01.sh (transductive) and run03.sh (inductive);
# then one comparison table (tools/compare.py --table): test metrics in both conventions, mean ± spread
# over the seeds, epochs and seconds per epoch.
# Usage: bash scripts/baselines.sh DATASET [GPU_IDS] [--key=value ...]
#   e.g. bash scripts/baselines.sh Scientific_mini --data_path=../shared/datasets/downstream/
#        SEEDS="2020 2021 2022" bash scripts/baselines.sh Scientific_mm_full 0
# The --key=value flags reach every run (data flags, --epochs, ...). Logs, curves CSVs and the table
# go to log/baselines-DATASET-TIME/ (BASELINES_LOG_DIR to choose), checkpoints to saved/.
cd "$(dirname "$0")/.." || exit 1
if [ $# -lt 1 ] || [[ $1 == -* ]]; then
    echo "usage: bash scripts/baselines.sh DATASET [GPU_IDS] [--key=value ...]" >&2
    exit 2
fi
DATASET=$1; shift
if [[ $1 =~ ^[0-9]+(,[0-9]+)*$ ]]; then export CUDA_VISIBLE_DEVICES=$1; shift; fi
SEEDS=${SEEDS:-2020}
LOG_DIR=${BASELINES_LOG_DIR:-log/baselines-$DATASET-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$LOG_DIR"
set -e
run() { python finetune.py -d "$DATASET" "$@" --log_dir="$LOG_DIR"; }
run -m Pop "$@"                                           # deterministic: once
run -m TextSim "$@"                                       # deterministic: once
for seed in $SEEDS; do
    run -m SASRec "$@" --seed="$seed"
    run -m MISSRec -mode transductive -note run01 --script=run01.sh "$@" --seed="$seed"
    run -m MISSRec -mode inductive -note run03 --script=run03.sh "$@" --seed="$seed"
done
python tools/compare.py --logs "$LOG_DIR" --table | tee "$LOG_DIR/table.md"
echo "table: $LOG_DIR/table.md"
