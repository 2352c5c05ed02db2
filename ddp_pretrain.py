"""Pre-train MISSRec on the multi-domain corpus (SPEC 3.4, 4), on one or several processes.

    python ddp_pretrain.py                                    # 1 process: one GPU, or the CPU
    python ddp_pretrain.py -d FHCKM_mm_full --pretrain_epochs=10 --save_step=5
    torchrun --nproc_per_node=4 ddp_pretrain.py               # 4 GPUs (nccl), one process each
    python ddp_pretrain.py --nproc 4                          # the same, processes spawned from here
    python ddp_pretrain.py --nproc 2 --use_gpu=False          # 2 CPU processes (gloo)
    python ddp_pretrain.py --resume saved/MISSRec-FHCKM_mm_full-10.pth --pretrain_epochs=20

Without --nproc (and outside torchrun) one process is started per visible GPU,
or a single CPU process. `train_batch_size` is the global batch: each of W
processes trains on the rows r::W of every batch. Gradients are synchronised
(DDP; the original's missing all-reduce is not reproduced) and, with
`contrastive_negatives: global` (default), the contrastive negatives are the
whole global batch, gathered across processes, so W processes compute the same
loss and gradients as one process with the same batch. `local` uses each
process's rows only. Rank 0 alone clusters (the interest tables are broadcast),
logs, shows progress and saves `saved/MISSRec-{dataset}-{epoch}[-{ckpt_suffix}].pth`
every `save_step` epochs.

The original's effective regime (it never synchronised gradients: each of its W
GPUs trained a model of its own on 4096/W rows of every batch, with its own
negatives, and saved rank 0's): `--sync_gradients=False`, with W processes or,
on one process, `--models_per_batch=W` (rank 0's share and model).
    python ddp_pretrain.py --sync_gradients=False --models_per_batch=4
Any config key can be overridden with --key=value (props/MISSRec.yaml, props/pretrain.yaml).
"""
import sys

from quick_start import main

if __name__ == '__main__':
    sys.exit(main('pretrain', nproc=0, description=__doc__))
