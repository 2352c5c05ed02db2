"""Fine-tune MISSRec on several processes: finetune.py, one process per visible GPU by default (SPEC 4).

    python ddp_finetune.py -d Scientific_mm_full                       # one process per GPU (or 1)
    torchrun --nproc_per_node=4 ddp_finetune.py -d Scientific_mm_full -p saved/MISSRec-FHCKM_mm_full-100.pth
    python ddp_finetune.py --nproc 2 --use_gpu=False -d Scientific_mini --data_path=../shared/datasets/downstream/

Same arguments as finetune.py. Each of W processes trains on the rows r::W of
every `train_batch_size` batch; gradients are synchronised by DDP and the loss is
scaled so that the averaged gradient is the one of the whole batch (CE mean over
the global batch + gamma * batch-sum regulariser). Evaluation is sharded the same
way; every process collects the ranks of all rows of each batch in their original
order, so the metrics (and therefore the early-stopping decision, identical on
every process) equal the single-process ones exactly, whatever the number of rows.
Rank 0 alone clusters (the interest tables are broadcast), logs and writes the
checkpoints; the others wait for it, then read them.
"""
import sys

from quick_start import main

if __name__ == '__main__':
    sys.exit(main('finetune', nproc=0, description=__doc__))
