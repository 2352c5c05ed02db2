"""Fine-tune MISSRec on a downstream dataset and report valid/test metrics (SPEC 4, 5).

    python finetune.py -d Scientific_mm_full                          # from scratch, with item IDs
    python finetune.py -d Scientific_mm_full -p saved/MISSRec-FHCKM_mm_full-100.pth
    python finetune.py -d Scientific_mm_full -mode inductive          # no ID embedding
    python finetune.py -d Scientific_mini --data_path=../shared/datasets/downstream/ --kmeans_mode=lloyd
    torchrun --nproc_per_node=4 finetune.py -d Scientific_mm_full     # 4 GPUs, one process each
    python finetune.py --nproc 2 --use_gpu=False -d Scientific_mini   # 2 CPU processes (gloo)

One process unless --nproc or torchrun says otherwise (ddp_finetune.py: one per GPU).
Any config key can be overridden with --key=value (see config.py and props/).
"""
import sys

from quick_start import main

if __name__ == '__main__':
    sys.exit(main('finetune', description=__doc__))
