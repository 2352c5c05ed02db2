"""Training loops (SPEC 4, 5): fine-tuning with early stopping (`Trainer`) and pre-training
(`Pretrainer`), on one process or several.

Both loops share one epoch: interest discovery (rank 0 clusters, every rank gets the
tables), then the training batches through the model's `calculate_loss`; and one
checkpoint format, written and read by checkpoints.py. With several processes the
forward runs through `DistributedDataParallel`, each process trains on its share
of every global batch, and the losses are scaled so that the synchronised gradient
is the one of the whole batch.

The log lines follow the original's, so logs compare line by line:

    epoch 3 training [time: 3.67s, train loss: 464.6397]
    epoch 3 evaluating [time: 0.70s, valid_score: 0.067000]
    valid result:
    hit@10 : 0.127    hit@50 : 0.2507    ndcg@10 : 0.067    ndcg@50 : 0.0934
"""
import ctypes
import functools
import logging
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import distributed as D
import metrics as M
from checkpoints import load_checkpoint, resume_from, save_checkpoint, state_dict_of
from cluster_utils import discover_interests
from config import ConfigError
from curves import term_column
from data.loader import to_device
from data.pretrain import PretrainBatches
from missrec import MISSRec
from run_log import init_seed, new_run_id

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------- utilities
class HeapTrimmer:
    """Returns freed heap memory to the system at most every few seconds.

    Batches of changing shapes leave glibc's heap fragmented, and the process keeps
    every page it ever touched: fine-tuning a Scientific-sized set grew by ~25 MB/s.
    `malloc_trim(0)` every 3 s keeps it flat for about 3% of the epoch time (after
    every step it cost 34%); where the C library is not glibc it does nothing."""

    def __init__(self, interval_s=3.0):
        self.interval_s, self.last = interval_s, time.perf_counter()
        try:
            self.trim = ctypes.CDLL('libc.so.6').malloc_trim
        except (OSError, AttributeError):    # not glibc
            self.trim = None

    def __call__(self):
        now = time.perf_counter()
        if self.trim is not None and now - self.last >= self.interval_s:
            self.trim(0)
            self.last = time.perf_counter()


def has_unused_parameters(model):
    """True when a trainable parameter never gets a gradient, which DDP must be told: with
    modal_type none the interest encoder and the decoder's cross-attention have no input; with
    transductive_ft and id_type none the ID embedding exists (the original's module) but is unused."""
    def trainable(module):
        return module is not None and any(p.requires_grad for p in module.parameters())
    if getattr(model, 'modalities', None) is None:   # the baselines (sasrec.py) use every parameter
        return False
    return ((not model.modalities and trainable(model.trm_model.encoder))
            or (not model.use_id and trainable(model.item_embedding)))


class DiscoveryFailed(RuntimeError):
    """Interest discovery failed on rank 0; raised on the other ranks with its message."""


class _LossForward(nn.Module):
    """What DDP wraps: its forward is the model's `calculate_loss` (DDP synchronises what runs inside
    its forward, and `MISSRec.forward` is only the sequence side of the loss);
    with `parts` it returns (loss, {term: value}) (`MISSRec.calculate_loss`; the baselines'
    take no `parts`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, gather, parts=False):
        if parts:
            return self.model.calculate_loss(batch, gather, parts=True)
        return self.model.calculate_loss(batch, gather)


# ------------------------------------------------------------ both stages
class _Loop:
    """What both stages share: optimiser, the (DDP) training forward, interest discovery,
    one training epoch, resuming.

    Args:
        config: resolved `Config`.
        model: the MISSRec module (already on `device`).
        device: torch device of the model and batches.
        gather: `distributed.all_gather_with_grad` when every process trains on its share of
            one global batch (see `MISSRec.calculate_loss`); None when each process's batch
            stands alone (one process, or pre-training with `contrastive_negatives: local`).
        synced: False when every process trains a model of its own (pre-training with
            `sync_gradients: False`): no DDP, and each process discovers its own interests.
        loss_parts: log each epoch's loss terms (`MISSRec.calculate_loss` with parts).
    """

    def __init__(self, config, model, device, gather=None, synced=True, loss_parts=False):
        self.config, self.model, self.device, self.gather = config, model, device, gather
        self.synced = synced
        self.show_progress = config['show_progress'] and D.is_main_process()
        self.clip_grad_norm = config['clip_grad_norm']
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=config['learning_rate'], weight_decay=config['weight_decay'])
        self.loss = _LossForward(model)
        self.loss_parts = loss_parts
        self.epoch_parts = {}   # the epoch's sums of the loss terms (tensors: read once, at its end)
        if D.is_dist() and synced:   # wrap once: train through the wrapper, save `model` (interest discovery broadcasts
            # the tables; the search for unused parameters costs a graph walk per step: only when needed)
            # (no device_ids: DDP would move the batch's host tensors, which stay on the host, to the GPU)
            self.loss = DistributedDataParallel(self.loss, device_ids=None,
                                                broadcast_buffers=False,
                                                find_unused_parameters=has_unused_parameters(model))
        self.start_epoch = 0
        self.curves = None   # the run's curves.EpochCurves (rank 0; set by quick_start): one CSV row per epoch

    def _record(self, **figures):
        if self.curves is not None:
            self.curves.add(**figures)

    def _end_epoch(self):
        if self.curves is not None:
            self.curves.end_epoch()

    def last_good(self):
        """The checkpoint named when training stops on a NaN."""
        raise NotImplementedError

    def interest_points(self):
        """[M*(N-1), H] adapted item rows to cluster (SPEC 3.1)."""
        raise NotImplementedError

    # ------------------------------------------------------ interest discovery
    @torch.no_grad()
    def discover(self, epoch):
        """Rank 0 clusters the adapted item rows of every modality and writes the model's
        interest tables; every rank gets them (SPEC 3.1). Unsynced models (`synced` False)
        each cluster their own. Models without interests skip it.

        When a rank's discovery fails, every rank stops: NaN/inf rows with a FloatingPointError
        everywhere, anything else (out of memory, a kernel error) raised again where it happened
        and as `DiscoveryFailed` with its message on the other ranks (instead of their waiting
        in the next collective until the timeout)."""
        if not getattr(self.model, 'modalities', None):
            return
        failed, error = '', None
        if D.is_main_process() or not self.synced:
            logger.info(f'Discovering multi-modal user interest before {epoch}-th epoch')
            start = time.perf_counter()
            was_training = self.model.training
            self.model.eval()
            points = self.interest_points()                                   # [M*(N-1), H]
            local = max(int(np.ceil(len(points) * self.config['knn_local_ratio'])), 1)
            try:
                labels, centroids, info = discover_interests(
                    points, self.model.num_interest, algorithm=self.config['interest_clustering'],
                    kmeans_mode=self.config['kmeans_mode'], seed=self.config['seed'] + epoch, local_size=local,
                    memory_budget_mb=self.config['cluster_memory_mb'])
            except FloatingPointError as e:   # NaN/inf item rows: sent to every rank, so that all stop
                failed = f'interest discovery before epoch {epoch}: {e}; the last good checkpoint is {self.last_good()}'
            except Exception as e:
                failed, error = f'interest discovery before epoch {epoch} failed on rank {D.rank()}: ' \
                                f'{type(e).__name__}: {e}', e
            else:
                self.model.set_interests(labels, centroids)
                logger.info(f'Finish multi-modal interest discovery before {epoch}-th epoch')
                took = time.perf_counter() - start
                logger.info(f"interest discovery [time: {took:.2f}s, "
                            f"interests used: {info['n_used']} of {self.model.num_interest}, "
                            f"objective: {info['objective']:.4f}]")
                self._record(discovery_time_s=took, interests_used=info['n_used'],
                             interests=self.model.num_interest, discovery_objective=float(info['objective']))
            self.model.train(was_training)
        reports = [r for r in D.all_gather_object((failed, error is None)) if r[0]]
        if reports:
            if error is not None:
                raise error
            message, not_finite = reports[0]
            raise (FloatingPointError if not_finite else DiscoveryFailed)(message)
        if self.synced:
            for table in self.model.interest_tables():
                D.broadcast_(table)

    # ---------------------------------------------------------------- training
    def step(self, batch):
        """Forward, backward and optimiser step of one batch; returns the loss of the global batch."""
        value = self._step(batch)
        if not torch.isfinite(value):   # the same value on every rank: all of them stop
            raise FloatingPointError(f'training loss is {value.item()}')
        return value.item()

    def _step(self, batch):
        """`step` without reading the loss on the host: returns it as a tensor (no GPU stall)."""
        # forward
        gather = self.gather
        if gather is not None:   # every rank's share of the global batch is known: no sizes to exchange
            gather = functools.partial(gather, sizes=D.share_sizes(batch['global_rows']))
        loss = self.loss(to_device(batch, self.device), gather, parts=self.loss_parts)
        if self.loss_parts:
            loss, parts = loss
            for k, v in parts.items():
                self.epoch_parts[k] = self.epoch_parts.get(k, 0) + v
        value = D.all_reduce_sum(loss.detach())
        if self.gather is None:   # each process's own batch loss: report their mean
            value /= D.world_size()
        else:   # shares of the global batch loss; DDP averages gradients over the W processes
            loss = loss * D.world_size()
        # step
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), **self.clip_grad_norm)
        self.optimizer.step()
        return value

    def train_epoch(self, batches, epoch):
        """One pass over `batches` (shuffled for `epoch`); returns the sum of the batch losses.

        The losses are read on the host every `loss_read_step` batches, all at once (on a GPU each
        read waits for the queued work). A non-finite loss stops training then, naming its batch."""
        self.model.train()
        batches.set_epoch(epoch)
        self.epoch_parts = {}
        total, pending = 0.0, []
        trim = HeapTrimmer()
        it = tqdm(batches, desc=f'Train {epoch:>5}', ncols=100) if self.show_progress else batches
        for i, batch in enumerate(it):
            pending.append(self._step(batch))
            if len(pending) == self.config['loss_read_step']:
                total = self._read_losses(pending, total, epoch, i)
                pending = []
            trim()
        return self._read_losses(pending, total, epoch, i) if pending else total

    def _read_losses(self, pending, total, epoch, last):
        """Adds the losses of batches last - len(pending) + 1 .. last to `total`, in order."""
        for j, value in enumerate(torch.stack(pending).tolist()):
            if not math.isfinite(value):   # the same value on every rank: all of them stop
                raise FloatingPointError(f'training loss is {value} at epoch {epoch}, batch {last - len(pending) + 1 + j}; '
                                         f'the last good checkpoint is {self.last_good()}')
            total += value
        return total

    def _fit_epoch(self, batches, epoch):
        """Interest discovery, one training epoch and its log line; returns the epoch's loss."""
        self.discover(epoch)
        start = time.time()
        loss = self.train_epoch(batches, epoch)
        took = time.time() - start
        logger.info(f'epoch {epoch} training [time: {took:.2f}s, train loss: {loss:.4f}]')
        self._record(epoch=epoch, train_loss=loss, train_time_s=took)
        if self.epoch_parts:   # summed like the loss: over the batches, the processes' shares (or mean)
            parts = {k: float(D.all_reduce_sum(torch.as_tensor(v, device=self.device)))
                     / (D.world_size() if self.gather is None else 1) for k, v in self.epoch_parts.items()}
            logger.info(f'epoch {epoch} loss terms [' + ', '.join(f'{k}: {v:.4f}' for k, v in parts.items()) + ']')
            self._record(**{term_column(k): v for k, v in parts.items()})
        return loss

    def resume(self, path, expected, required=()):
        """Continue after the epoch that the checkpoint `path` finished; returns the checkpoint."""
        ckpt = resume_from(path, self.model, self.optimizer, expected, required)
        self.start_epoch = ckpt['epoch'] + 1
        logger.info(f'Loading checkpoint {path}: resuming at epoch {self.start_epoch}')
        return ckpt


# ------------------------------------------------------------ fine-tuning
class Trainer(_Loop):
    """Fits a fine-tuning model with early stopping on `valid_metric` (SPEC 4).

    Args:
        config: resolved `Config`.
        model: the MISSRec module (already on `device`).
        device: torch device of the model and batches.
    """

    def __init__(self, config, model, device, run_id=None):
        super().__init__(config, model, device, gather=D.all_gather_with_grad if D.is_dist() else None)
        self.epochs = config['epochs']
        self.eval_step = config['eval_step']
        self.stopping_step = config['stopping_step']
        self.original_metrics = config['eval_topk_plus_one']
        self.valid_metric = config['valid_metric'].lower()
        run_id = run_id or D.broadcast_object(new_run_id())   # one name on every rank
        self.saved_model_file = os.path.join(config['checkpoint_dir'], f"{config['model']}-{run_id}.pth")
        self.cur_step = 0
        self.best_valid_score = -np.inf
        self.best_valid_result = None
        self.best_valid_epoch = -1

    def interest_points(self):
        return self.model.interest_points()

    def last_good(self):
        return self.saved_model_file if self.best_valid_epoch >= 0 else 'none yet'

    @torch.no_grad()
    def evaluate(self, batches, desc='Evaluate'):
        """Full-sort metrics over a split: (exact top-K, original top-K+1) OrderedDicts.
        With several processes each ranks its share of a batch, and every process
        collects the ranks of all rows, so the metrics are those of one process."""
        self.model.eval()
        metrics, topk = self.config['metrics'], self.config['topk']
        sums = [None, None]
        count = 0
        it = tqdm(batches, desc=desc, ncols=100) if self.show_progress else batches
        for batch in it:
            batch = to_device(batch, self.device)
            scores = self.model.full_sort_predict(batch)
            scores[:, 0] = -np.inf                                     # never rank PAD
            rank = M.ranks(scores, batch['item_id'])
            rank = D.gather_rows_interleaved(rank[:0] if batch.get('dummy') else rank)
            for j, original in enumerate((False, True)):
                part = M.metric_sums(rank, metrics, topk, original)
                sums[j] = part if sums[j] is None else {k: sums[j][k] + v for k, v in part.items()}
            count += len(rank)
        return tuple(M.average(s, count, self.config['metric_decimal_place']) for s in sums)

    def primary(self, results):
        """The result in the convention used for model selection and the log lines."""
        return results[1] if self.original_metrics else results[0]

    def fit(self, train_batches, valid_batches):
        """Train until early stopping; returns (best valid score, best valid results)."""
        for epoch in range(self.start_epoch, self.epochs):
            self._fit_epoch(train_batches, epoch)
            stop = self.eval_step > 0 and (epoch + 1) % self.eval_step == 0 and self._validate(valid_batches, epoch)
            self.save(self.last_model_file, epoch)
            self._end_epoch()
            if stop:
                logger.info(f'Finished training, best eval result in epoch {self.best_valid_epoch}')
                break
        return self.best_valid_score, self.best_valid_result

    def _validate(self, valid_batches, epoch):
        """Evaluate, update the best checkpoint; True when early stopping triggers."""
        start = time.time()
        results = self.evaluate(valid_batches, desc=f'Valid {epoch:>5}')
        result = self.primary(results)
        score = result[self.valid_metric]
        took = time.time() - start
        logger.info(f'epoch {epoch} evaluating [time: {took:.2f}s, valid_score: {score:f}]')
        logger.info('valid result: \n' + M.result_str(result))
        self._record(valid_time_s=took, valid_score=score, **{f'valid_{k}': v for k, v in result.items()})
        if score >= self.best_valid_score:                             # ties count as improvement
            self.best_valid_score, self.best_valid_result = score, results
            self.best_valid_epoch, self.cur_step = epoch, 0
            self.save(self.saved_model_file, epoch)
            logger.info(f'Saving current: {self.saved_model_file}')
            return False
        self.cur_step += 1
        return self.cur_step > self.stopping_step

    # ---------------------------------------------------------- checkpoints
    @property
    def last_model_file(self):
        """Written after every epoch: everything needed to continue the run."""
        return self.saved_model_file[:-len('.pth')] + '-last.pth'

    def save(self, path, epoch):
        """A checkpoint after `epoch` with the early-stopping state (the best model, or the last)."""
        save_checkpoint(path, self.config, epoch, self.model, self.optimizer, cur_step=self.cur_step,
                        best_valid_score=self.best_valid_score, best_valid_result=self.best_valid_result,
                        best_valid_epoch=self.best_valid_epoch, best_model_file=self.saved_model_file)

    def resume(self, path):
        ckpt = super().resume(path, 'the *-last.pth file of a fine-tuning run', required=('best_model_file',))
        self.cur_step = ckpt['cur_step']
        self.best_valid_score = ckpt['best_valid_score']
        self.best_valid_result = ckpt['best_valid_result']
        self.best_valid_epoch = ckpt['best_valid_epoch']
        self.saved_model_file = ckpt['best_model_file']
        return ckpt

    def load_best(self):
        """Reload the best checkpoint, buffers included (no new interest discovery)."""
        ckpt = load_checkpoint(self.saved_model_file)
        self.model.load_state_dict(state_dict_of(ckpt, self.saved_model_file))
        logger.info(f'Loading model structure and parameters from {self.saved_model_file}')


# ----------------------------------------------------------- pre-training
def models_per_batch(config):
    """How many processes' shares each global pre-training batch is cut into: the number of
    processes, or with `sync_gradients: False` the `models_per_batch` the run emulates (one process
    then trains the share of rank 0, whose model the original saved)."""
    world = D.world_size()
    wanted = config['models_per_batch']
    if wanted is None or wanted == world:
        return world
    if world > 1:
        raise ConfigError(f'models_per_batch = {wanted}: {world} processes run; leave it unset '
                          'or start as many processes')
    return wanted


class Pretrainer(_Loop):
    """Pre-training loop of one process (SPEC 3.4, 4): builds the model (the same initial
    weights on every rank), then interest discovery and one epoch per epoch, and a checkpoint
    `saved/MISSRec-{dataset}-{epoch}[-{ckpt_suffix}].pth` every `save_step` epochs.

    Args:
        config: resolved `Config` (train_stage pretrain).
        dataset: `PretrainDataset` (tables already on `device`).
        device: this process's device.
    """

    def __init__(self, config, dataset, device):
        init_seed(config['seed'], config['reproducibility'])             # same initial weights on every rank
        model = MISSRec(config, dataset.n_items).to(device)
        init_seed(config['seed'] + D.rank(), config['reproducibility'])  # dropout differs per rank
        synced = config['sync_gradients']
        shares = synced and D.is_dist() and config['contrastive_negatives'] == 'global'
        super().__init__(config, model, device, gather=D.all_gather_with_grad if shares else None,
                         synced=synced, loss_parts=True)
        self.dataset = dataset
        self.epochs, self.save_step = config['pretrain_epochs'], config['save_step']
        self.batches = PretrainBatches(dataset, config['train_batch_size'], config, seed=config['seed'],
                                       rank=D.rank(), world_size=models_per_batch(config))
        self.saved = []

    def interest_points(self):
        return self.model.pretrain_interest_points(self.dataset.tables, self.config['train_batch_size'])

    def last_good(self):
        return self.saved[-1] if self.saved else 'none yet'

    def checkpoint_path(self, epoch):
        suffix = f"-{self.config['ckpt_suffix']}" if self.config['ckpt_suffix'] else ''
        return os.path.join(self.config['checkpoint_dir'], f"MISSRec-{self.config['dataset']}-{epoch + 1}{suffix}.pth")

    def existing_checkpoints(self, first_epoch=0):
        """The checkpoints this run's settings name from `first_epoch` on that exist, in epoch order."""
        paths = (self.checkpoint_path(e) for e in range(first_epoch, self.epochs) if (e + 1) % self.save_step == 0)
        return [p for p in paths if os.path.exists(p)]

    def newest_checkpoint(self):
        """The checkpoint of the latest epoch this run's settings name that exists, or ''."""
        return (self.existing_checkpoints() or [''])[-1]

    def save(self, epoch):
        """`epoch` is the last finished epoch (0-based; the file name says epoch + 1)."""
        path = self.checkpoint_path(epoch)
        save_checkpoint(path, self.config, epoch, self.model, self.optimizer)
        logger.info(f'Saving current: {path}')
        self.saved.append(path)

    def resume(self, path):
        return super().resume(path, 'a pre-training checkpoint of this project')

    def check_overwrite(self, resumed):
        """Stop before training when a checkpoint this run would write already exists (another
        run's, e.g. the same corpus with other settings), unless `overwrite` or resuming."""
        if self.config['overwrite'] or resumed:
            return
        existing = self.existing_checkpoints(self.start_epoch)
        if existing:
            raise FileExistsError(f'{existing[0]}: exists (written by another run); set ckpt_suffix to name this '
                                  f"run's checkpoints apart, or --overwrite=True to replace them")

    def fit(self):
        """Interest discovery and one training epoch per epoch; returns the epoch losses."""
        losses = []
        for epoch in range(self.start_epoch, self.epochs):
            losses.append(self._fit_epoch(self.batches, epoch))
            if (epoch + 1) % self.save_step == 0:
                self.save(epoch)
            self._end_epoch()
        return losses
