"""Fine-tune MISSRec on several processes: finetune.py with sharded batches (SPEC 4).

    python ddp_finetune.py -d Scientific_mm_full                       # one process per GPU (or 1)
    torchrun --nproc_per_node=4 ddp_finetune.py -d Scientific_mm_full -p saved/MISSRec-FHCKM_mm_full-100.pth
    python ddp_finetune.py --nproc 2 --use_gpu=False -d Scientific_mini --data_path=../shared/datasets/downstream/

Same arguments as finetune.py (plus --nproc). Each of W processes trains on
the rows r::W of every `train_batch_size` batch; gradients are synchronised by
DDP and the loss is scaled so that the averaged gradient is the one of the
whole batch (CE mean over the global batch + gamma * batch-sum regulariser).
Evaluation is sharded the same way; every process collects the ranks of all
rows of each batch in their original order, so the metrics (and therefore the
early-stopping decision, identical on every process) equal the single-process
ones exactly, whatever the number of rows. Interest discovery runs on every
process and DDP's buffer broadcast makes rank 0's tables the ones in use. Rank
0 alone logs and writes the best checkpoint; the others wait for it, then read it.
"""
import logging
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import distributed as D
import finetune
from checkpoints import CheckpointError
from config import ConfigError
from data.dataset import DataError
from data.loader import SeqBatches
from trainer import Trainer, init_logger, init_seed, local_time, logger


class ShardedBatches(SeqBatches):
    """`SeqBatches` that never hands a process an empty shard.

    Training skips a last batch with fewer rows than processes on every process
    alike, as pre-training's batches do (a process without rows would skip the
    step's collectives while the others wait in them). Evaluation gives such a
    process one dummy row, marked `dummy`, whose rank `gather_ranks` drops.
    """

    def __iter__(self):
        order = self.order()
        for start in range(0, self.n, self.batch_size):
            rows = order[start:start + self.batch_size]
            mine = rows[self.rank::self.world_size]
            if len(rows) >= self.world_size:
                yield self.batch(mine)
            elif not self.shuffle:
                yield self.batch(mine) if len(mine) else dict(self.batch(rows[:1]), dummy=True)


def gather_ranks(rank, batch):
    """Ranks of every row of the global batch, in its original order (on every process)."""
    return D.gather_rows_interleaved(rank[:0] if batch.get('dummy') else rank)


class FinetuneLoss(nn.Module):
    """What DDP wraps: summed CE over this process's rows and their regulariser."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        logits, reg = self.model._all_item_logits(batch)
        return F.cross_entropy(logits, batch['item_id'], reduction='sum'), reg


def make_loss_fn(module, gamma):
    """batch -> loss whose value is the global batch loss and whose DDP-averaged gradient
    is the gradient of that loss."""
    def loss_fn(batch):
        ce, reg = module(batch)
        n = torch.tensor(float(len(batch['item_id'])), device=ce.device)
        total = D.all_reduce_sum(torch.stack([ce.detach(), reg.detach(), n]))
        loss = D.world_size() * (ce / total[2] + gamma * reg)
        value = total[0] / total[2] + gamma * total[1]
        return loss + (value - loss).detach()   # backward through `loss`, reports `value`
    return loss_fn


class DDPTrainer(Trainer):
    """`Trainer` with the DDP forward, gathered evaluation ranks and rank-0 checkpoints."""

    def __init__(self, config, model, device, module):
        super().__init__(config, model, device)
        self.show_progress = self.show_progress and D.is_main_process()
        self.loss_fn = make_loss_fn(module, config['gamma'])
        self.gather_ranks = gather_ranks
        self.saved_model_file = D.broadcast_object(self.saved_model_file)   # one name on every rank

    def save_checkpoint(self, epoch):
        if D.is_main_process():
            super().save_checkpoint(epoch)
        D.barrier()   # load_best on the other ranks reads what rank 0 wrote

    def save_last(self, epoch):
        # rank 0's random states only: a resumed multi-process run continues with rank 0's
        # generator on every rank (dropout masks then differ from the uninterrupted run)
        if D.is_main_process():
            super().save_last(epoch)
        D.barrier()


def has_unused_parameters(model):
    """True when a trainable parameter never gets a gradient, which DDP must be told: with
    modal_type none the interest encoder and the decoder's cross-attention have no input; with
    transductive_ft and id_type none the ID embedding exists (the original's module) but is unused."""
    def trainable(module):
        return module is not None and any(p.requires_grad for p in module.parameters())
    return ((not model.modalities and trainable(model.trm_model.encoder))
            or (not model.use_id and trainable(model.item_embedding)))


def build_trainer(config, device):
    """Dataset, model, DDP wrapper, sharded batches and trainer of this process."""
    init_seed(config['seed'], config['reproducibility'])       # same initial weights everywhere
    dataset, model, loaded = finetune.build(config, device)
    for line in loaded:
        logger.info(line)
    init_seed(config['seed'] + D.rank(), config['reproducibility'])
    module = FinetuneLoss(model)
    if D.is_dist():   # (the search for unused parameters costs a graph walk per step: only when needed)
        module = DistributedDataParallel(module, device_ids=[device] if device.type == 'cuda' else None,
                                         find_unused_parameters=has_unused_parameters(model))
    shard = dict(pad_len=dataset.pad_len, rank=D.rank(), world_size=D.world_size())
    batches = {'train': ShardedBatches(dataset.splits['train'], config['train_batch_size'], shuffle=True,
                                       seed=config['seed'], **shard)}
    for split in ('valid', 'test'):
        batches[split] = ShardedBatches(dataset.splits[split], config['eval_batch_size'], **shard)
    return dataset, DDPTrainer(config, model, device, module), batches


def run(config, resume=''):
    """One process's fine-tuning run; returns what finetune.run returns (on every rank)."""
    log_path = init_logger(config, ['MISSRec', config['dataset'], config['note'], config['train_stage'],
                                    local_time()], main_process=D.is_main_process())
    logger.info('\n' + str(config) + '\n')
    device = D.process_device(config['use_gpu'])
    logger.info(f'processes: {D.world_size()}, device: {device}')
    dataset, trainer, batches = build_trainer(config, device)
    if resume:
        trainer.resume(resume)
    trainer.fit(batches['train'], batches['valid'])
    return finetune.finish(trainer, dataset, config, batches['test'], log_path)


def process_main(args, rest):
    try:
        config = finetune.build_config(args, rest)
        D.select_gpus(config['gpu_id'], config['use_gpu'])   # under torchrun: before CUDA starts
        D.init_from_env(config['use_gpu'])
        if D.is_dist() and not (config['use_gpu'] and torch.cuda.is_available()):
            torch.set_num_threads(D.cpu_threads())
        out = run(config, args.resume)
    except (ConfigError, DataError, FileNotFoundError, CheckpointError, FloatingPointError) as e:
        print(f'error (rank {D.rank()}): {e}', file=sys.stderr)
        return 2
    finally:
        D.teardown()
    if D.rank() == 0 and out['log']:
        finetune.print_table(out)
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    nproc = 0
    if '--nproc' in argv:
        i = argv.index('--nproc')
        nproc = int(argv[i + 1])
        del argv[i:i + 2]
    args, rest = finetune.parse_args(argv)
    if not D.launched_by_torchrun():
        try:
            config = finetune.build_config(args, rest)
            D.select_gpus(config['gpu_id'], config['use_gpu'])
            nproc = D.resolve_nproc(nproc, config['use_gpu'])
        except ValueError as e:   # ConfigError included
            print(f'error: {e}', file=sys.stderr)
            return 2
    return D.launch(process_main, nproc, args, rest)


if __name__ == '__main__':
    logging.captureWarnings(True)
    sys.exit(main())
