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
process's rows only (the original's effective setting). Rank 0 alone clusters
(the interest tables are broadcast), logs, shows progress and saves
`saved/MISSRec-{dataset}-{epoch}[-{ckpt_suffix}].pth` every `save_step` epochs.
Any config key can be overridden with --key=value (props/MISSRec.yaml, props/pretrain.yaml).
"""
import argparse
import logging
import math
import os
import sys
import time
import traceback

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import distributed as D
from cluster_utils import discover_interests
from config import Config, ConfigError, parse_overrides, stage_files
from data.dataset import DataError
from data.pretrain import PretrainBatches, PretrainDataset
from missrec import MISSRec
from trainer import atomic_save, init_logger, init_seed, local_time, logger, rng_state, set_rng_state


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-d', type=str, default='FHCKM_mm_full', help='pre-training dataset name')
    parser.add_argument('-props', type=str, default='', help='comma-separated props files '
                        '(default: props/MISSRec.yaml,props/pretrain.yaml)')
    parser.add_argument('--nproc', type=int, default=0, help='processes to spawn (default: one per GPU, or 1)')
    parser.add_argument('--resume', type=str, default='', help='checkpoint of this script to continue from')
    parser.add_argument('-note', type=str, default='')
    return parser.parse_known_args(argv)


def build_config(args, rest):
    overrides = parse_overrides(rest)
    overrides['train_stage'] = 'pretrain'
    overrides['note'] = args.note
    files = args.props.split(',') if args.props else stage_files('pretrain')
    return Config(dataset=args.d, config_files=files, overrides=overrides)


class LossModule(nn.Module):
    """What DDP wraps: its forward is the model's pre-training loss (MISSRec has no forward)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, interest_table, gather):
        return self.model.pretrain_losses(batch, interest_table, gather)


def _to(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


class Pretrainer:
    """Pre-training loop of one process.

    Args:
        config: resolved `Config` (train_stage pretrain).
        dataset: `PretrainDataset` (tables already on `device`).
        device: this process's device.
    """

    def __init__(self, config, dataset, device):
        self.config, self.dataset, self.device = config, dataset, device
        self.epochs, self.save_step = config['pretrain_epochs'], config['save_step']
        self.show_progress = config['show_progress'] and D.is_main_process()
        self.global_negatives = config['contrastive_negatives'] == 'global'
        self.lam, self.gamma = config['lambda'], config['gamma']
        init_seed(config['seed'], config['reproducibility'])        # same initial weights on every rank
        self.raw_model = MISSRec(config, dataset.n_items).to(device)
        init_seed(config['seed'] + D.rank(), config['reproducibility'])   # dropout differs per rank
        wrapped = LossModule(self.raw_model)
        if D.is_dist():   # wrap once; train through the wrapper, save raw_model
            wrapped = DistributedDataParallel(wrapped, device_ids=[device] if device.type == 'cuda' else None)
        self.model = wrapped
        self.optimizer = torch.optim.Adam(self.raw_model.parameters(), lr=config['learning_rate'],
                                          weight_decay=config['weight_decay'])
        self.batches = PretrainBatches(dataset, config['train_batch_size'], config, seed=config['seed'],
                                       rank=D.rank(), world_size=D.world_size())
        self.start_epoch = 0
        self.saved = []

    # ------------------------------------------------------ interest discovery
    @torch.no_grad()
    def discover(self, epoch):
        """Rank 0 clusters the adapted rows of all pre-training items; every rank gets the tables."""
        interests, config = self.dataset.interests, self.config
        n_points = len(interests.modalities) * (self.dataset.n_items - 1)
        labels = torch.zeros(n_points, dtype=torch.long, device=self.device)
        centroids = torch.zeros(interests.num_interest, self.raw_model.hidden_size, device=self.device)
        failed = ''
        if D.is_main_process():
            logger.info(f'Discovering multi-modal user interest before {epoch}-th epoch')
            start = time.perf_counter()
            self.raw_model.eval()
            points = self.raw_model.pretrain_interest_points(self.dataset.tables, config['train_batch_size'])
            try:
                lab, cen, info = discover_interests(
                    points, interests.num_interest, algorithm=config['interest_clustering'],
                    kmeans_mode=config['kmeans_mode'], seed=config['seed'] + epoch,
                    local_size=max(math.ceil(n_points * config['knn_local_ratio']), 1),
                    memory_budget_mb=config['cluster_memory_mb'])
            except FloatingPointError as e:   # NaN/inf points; sent to every rank so that all stop
                failed = (f"interest discovery before epoch {epoch}: {e}; the last good checkpoint is "
                          f"{self.saved[-1] if self.saved else 'none yet'}")
            else:
                labels.copy_(lab)
                centroids.copy_(cen)
                logger.info(f"interest discovery [time: {time.perf_counter() - start:.2f}s, "
                            f"interests used: {info['n_used']} of {interests.num_interest}, "
                            f"objective: {info['objective']:.4f}]")
        failed = D.broadcast_object(failed)
        if failed:
            raise FloatingPointError(failed)
        D.broadcast_(labels)
        D.broadcast_(centroids)
        interests.set(labels, centroids)

    # ---------------------------------------------------------------- one step
    def step(self, batch):
        """Forward, backward and optimiser step of one batch; returns the global batch loss."""
        gather = D.all_gather_with_grad if self.global_negatives else None
        # forward
        seq_item, seq_seq, reg = self.model(batch, self.dataset.interests.embeddings, gather)
        b = len(seq_item)
        stats = torch.stack([seq_item.sum(), seq_seq.sum(), reg, torch.tensor(float(b), device=reg.device)])
        total = D.all_reduce_sum(stats.detach())                      # [4] over all ranks
        w = D.world_size()
        if self.global_negatives:
            # DDP averages gradients over ranks; with the gather's summed backward, this makes
            # the averaged gradient that of (mean over the global batch + gamma * batch-sum reg)
            loss = w * ((seq_item.sum() + self.lam * seq_seq.sum()) / total[3] + self.gamma * reg)
            value = (total[0] + self.lam * total[1]) / total[3] + self.gamma * total[2]
        else:   # each rank's own in-batch loss, averaged
            loss = seq_item.mean() + self.lam * seq_seq.mean() + self.gamma * reg
            value = D.all_reduce_sum(loss.detach()) / w
        if not torch.isfinite(value):   # the same value on every rank: all of them stop
            raise FloatingPointError(f'training loss is {value.item()}')
        # step
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config['clip_grad_norm']:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), **self.config['clip_grad_norm'])
        self.optimizer.step()
        return value.item()

    def train_epoch(self, epoch):
        self.model.train()
        self.batches.set_epoch(epoch)
        it = tqdm(self.batches, desc=f'Train {epoch:>5}', ncols=100) if self.show_progress else self.batches
        total = 0.0
        for i, batch in enumerate(it):
            try:
                total += self.step(_to(batch, self.device))
            except FloatingPointError as e:
                last = self.saved[-1] if self.saved else 'none yet'
                raise FloatingPointError(f'{e} at epoch {epoch}, batch {i}; the last good checkpoint is {last}') \
                    from None
        return total

    # ------------------------------------------------------------- checkpoints
    def checkpoint_path(self, epoch):
        suffix = f"-{self.config['ckpt_suffix']}" if self.config['ckpt_suffix'] else ''
        return os.path.join(self.config['checkpoint_dir'],
                            f"MISSRec-{self.config['dataset']}-{epoch + 1}{suffix}.pth")

    def save(self, epoch):
        """`epoch` is the last finished epoch (0-based; the file name says epoch + 1)."""
        states = [rng_state()]
        if D.is_dist():
            states = [None] * D.world_size()
            torch.distributed.all_gather_object(states, rng_state())
        if D.is_main_process():
            path = self.checkpoint_path(epoch)
            atomic_save({'config': self.config.to_dict(), 'epoch': epoch, 'next_epoch': epoch + 1,
                         'world_size': D.world_size(), 'state_dict': self.raw_model.state_dict(),
                         'optimizer': self.optimizer.state_dict(), 'rng_states': states}, path)
            logger.info(f'Saving current: {path}')
            self.saved.append(path)
        D.barrier()

    def resume(self, path):
        if not os.path.exists(path):
            raise FileNotFoundError(f'{path}: checkpoint to resume from not found')
        ckpt = torch.load(path, map_location=self.device, weights_only=True)
        self.raw_model.load_state_dict(ckpt['state_dict'])
        self.optimizer.load_state_dict(ckpt['optimizer'])
        self.start_epoch = ckpt['epoch'] + 1
        states = ckpt.get('rng_states') or []
        if len(states) == D.world_size():
            set_rng_state(states[D.rank()])
        else:
            logger.warning(f'{path} was written by {len(states)} processes, now {D.world_size()}: '
                           'random states not restored')
        logger.info(f'Loading checkpoint {path}: resuming at epoch {self.start_epoch}')

    # ----------------------------------------------------------------- the loop
    def fit(self):
        """Interest discovery and one training epoch per epoch; returns the epoch losses."""
        losses = []
        for epoch in range(self.start_epoch, self.epochs):
            self.discover(epoch)
            start = time.time()
            loss = self.train_epoch(epoch)
            losses.append(loss)
            logger.info(f'epoch {epoch} training [time: {time.time() - start:.2f}s, train loss: {loss:.4f}]')
            if (epoch + 1) % self.save_step == 0:
                self.save(epoch)
        return losses


def run(config, resume=''):
    """One process's pre-training (the process group, if any, is already set up).

    Returns {'losses': [...], 'checkpoints': [...], 'log': path or None, 'trainer': Pretrainer}.
    """
    device = D.process_device(config['use_gpu'])
    dataset = PretrainDataset(config).to(device)          # read and checked before anything is written
    log_path = init_logger(config, ['MISSRec', config['dataset'], config['note'], 'pretrain', local_time()],
                           main_process=D.is_main_process())
    logger.info('\n' + str(config) + '\n')
    logger.info(str(dataset))
    logger.info(f'processes: {D.world_size()}, device: {device}, '
                f'contrastive negatives: {config["contrastive_negatives"]}')
    trainer = Pretrainer(config, dataset, device)
    logger.info(str(trainer.raw_model))
    if resume:
        trainer.resume(resume)
    losses = trainer.fit()
    return {'losses': losses, 'checkpoints': trainer.saved, 'log': log_path, 'trainer': trainer}


def process_main(args, rest):
    """Entry of one process: set up the group from the environment, run, tear down."""
    try:
        config = build_config(args, rest)
        D.select_gpus(config['gpu_id'], config['use_gpu'])   # under torchrun: before CUDA starts
        D.init_from_env(config['use_gpu'])
        if not (config['use_gpu'] and torch.cuda.is_available()) and 'OMP_NUM_THREADS' not in os.environ:
            torch.set_num_threads(D.cpu_threads())
        run(config, args.resume)
    except (ConfigError, DataError, FileNotFoundError, FloatingPointError) as e:
        print(f'error (rank {D.rank()}): {e}', file=sys.stderr)
        return 2
    except BaseException:
        # printed before the group goes down: the other ranks then fail with "connection reset",
        # and the launcher may report that secondary error first
        print(f'rank {D.rank()} failed:\n{traceback.format_exc()}', file=sys.stderr, flush=True)
        raise
    finally:
        D.teardown()
    return 0


def main(argv=None):
    args, rest = parse_args(argv)
    if not D.launched_by_torchrun():
        try:
            config = build_config(args, rest)
            D.select_gpus(config['gpu_id'], config['use_gpu'])
            args.nproc = D.resolve_nproc(args.nproc, config['use_gpu'])
        except ValueError as e:   # ConfigError included
            print(f'error: {e}', file=sys.stderr)
            return 2
    return D.launch(process_main, args.nproc, args, rest)


if __name__ == '__main__':
    logging.captureWarnings(True)
    sys.exit(main())
