#!/bin/bash
# Quick start: generate the demo dataset (once) and fine-tune MISSRec on it on the CPU or GPU 0.
# Usage: bash scripts/demo.sh [--key=value ...]   e.g. --kmeans_mode=lloyd
cd "$(dirname "$0")/.." || exit 1
set -e
[ -f datasets/downstream/Demo/Demo.train.inter ] || python tools/make_demo_data.py --out datasets/downstream --name Demo
python finetune.py -d Demo "$@"
