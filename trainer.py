"""RecBole-like training loop: interest discovery, epochs, full-sort evaluation,
early stopping, best checkpoint, reload and test (SPEC sections 4 and 5).

The log lines follow the original's, so logs compare line by line:

    epoch 3 training [time: 3.67s, train loss: 464.6397]
    epoch 3 evaluating [time: 0.70s, valid_score: 0.067000]
    valid result:
    hit@10 : 0.127    hit@50 : 0.2507    ndcg@10 : 0.067    ndcg@50 : 0.0934
"""
import logging
import os
import random
import sys
import tempfile
import time

import numpy as np
import torch
from tqdm import tqdm

import metrics as M
from cluster_utils import discover_interests
from data.loader import to_device

logger = logging.getLogger('missrec')


# ----------------------------------------------------------------- utilities
def init_seed(seed, reproducibility=True):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.benchmark = not reproducibility
    torch.backends.cudnn.deterministic = reproducibility


def init_logger(config, name_parts, main_process=True):
    """Console + `log/{name}.log` handlers in the original's format; returns the log path."""
    logger.handlers.clear()
    logger.setLevel(logging.INFO if main_process else logging.WARNING)
    logger.propagate = False
    fmt = logging.Formatter('%(asctime)s %(levelname)s  %(message)s', datefmt='%a %d %b %Y %H:%M:%S')
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if not main_process:
        return None
    os.makedirs(config['log_dir'], exist_ok=True)
    path = os.path.join(config['log_dir'], '-'.join(p for p in name_parts if p) + '.log')
    handler = logging.FileHandler(path)
    handler.setFormatter(fmt)
    logger.addHandler(handler)
    return path


def local_time():
    return time.strftime('%b-%d-%Y_%H-%M-%S')


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`:
    a kill at any moment leaves either the old file or the new one, never a partial one."""
    folder = os.path.dirname(path) or '.'
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.tmp-', suffix='.pth')
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def rng_state():
    """Random states as tensors and plain types, so that `torch.load(weights_only=True)` reads them."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {'torch': torch.get_rng_state(), 'python': random.getstate(),
            'numpy': [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state['torch'].cpu())
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    if state.get('cuda') is not None and torch.cuda.is_available():
        set_cuda_rng_states(state['cuda'])


_WARNED_GPU_COUNT = False


def set_cuda_rng_states(states):
    """Restore saved CUDA generator states. torch.load with a CUDA map_location puts them on the
    GPU, but the generators take CPU ByteTensors; a checkpoint written where more (or fewer)
    GPUs were visible restores those it has for the GPUs visible now."""
    global _WARNED_GPU_COUNT
    count = torch.cuda.device_count()
    if len(states) != count and not _WARNED_GPU_COUNT:
        logger.warning(f'the checkpoint holds the random states of {len(states)} GPUs, {count} visible now: '
                       f'restoring {min(len(states), count)}')
        _WARNED_GPU_COUNT = True
    for i, s in enumerate(states[:count]):
        torch.cuda.set_rng_state(s.cpu(), i)


def run_interest_discovery(model, config, epoch):
    """Cluster the adapted item rows of every modality and write the interest tables (SPEC 3.1)."""
    if not model.modalities:
        return
    logger.info(f'Discovering multi-modal user interest before {epoch}-th epoch')
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    points = model.interest_points()                                   # [M*(N-1), H]
    local = max(int(np.ceil(len(points) * config['knn_local_ratio'])), 1)
    try:
        labels, centroids, info = discover_interests(
            points, model.num_interest, algorithm=config['interest_clustering'],
            kmeans_mode=config['kmeans_mode'], seed=config['seed'] + epoch, local_size=local,
            memory_budget_mb=config['cluster_memory_mb'])
    except FloatingPointError as e:   # NaN/inf item rows: stop like a NaN loss
        raise FloatingPointError(f'interest discovery before epoch {epoch}: {e}') from None
    model.set_interests(labels, centroids)
    model.train(was_training)
    logger.info(f'Finish multi-modal interest discovery before {epoch}-th epoch')
    logger.info(f"interest discovery [time: {time.perf_counter() - start:.2f}s, "
                f"interests used: {info['n_used']} of {model.num_interest}, "
                f"objective: {info['objective']:.4f}]")


# -------------------------------------------------------------------- trainer
class Trainer:
    """Fits a fine-tuning model with early stopping on `valid_metric`.

    Args:
        config: resolved `Config`.
        model: the MISSRec module (already on `device`).
        device: torch device of the model and batches.
    """

    def __init__(self, config, model, device):
        self.config = config
        self.model = model
        self.device = device
        self.epochs = config['epochs']
        self.eval_step = config['eval_step']
        self.stopping_step = config['stopping_step']
        self.show_progress = config['show_progress']
        self.clip_grad_norm = config['clip_grad_norm']
        self.original_metrics = config['eval_topk_plus_one']
        self.valid_metric = config['valid_metric'].lower()
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=config['learning_rate'],
                                          weight_decay=config['weight_decay'])
        self.saved_model_file = os.path.join(config['checkpoint_dir'], f'MISSRec-{local_time()}.pth')
        self.start_epoch = 0
        self.cur_step = 0
        self.best_valid_score = -np.inf
        self.best_valid_result = None
        self.best_valid_epoch = -1
        # hooks for ddp_finetune.py: the training forward (a DDP-wrapped loss) and the
        # collection of every process's ranks of a sharded evaluation batch
        self.loss_fn = model.calculate_loss
        self.gather_ranks = None

    # ------------------------------------------------------------- one epoch
    def _train_epoch(self, batches, epoch):
        self.model.train()
        total = 0.0
        it = tqdm(batches, desc=f'Train {epoch:>5}', ncols=100) if self.show_progress else batches
        for i, batch in enumerate(it):
            batch = to_device(batch, self.device)
            # forward
            loss = self.loss_fn(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f'training loss is {loss.item()} at epoch {epoch}, batch {i}; '
                                         f'the last good checkpoint is {self.saved_model_file}')
            # step
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), **self.clip_grad_norm)
            self.optimizer.step()
            total += loss.item()
        return total

    @torch.no_grad()
    def evaluate(self, batches, desc='Evaluate'):
        """Full-sort metrics over a split: (exact top-K, original top-K+1) OrderedDicts."""
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
            if self.gather_ranks is not None:
                rank = self.gather_ranks(rank, batch)
            for j, original in enumerate((False, True)):
                part = M.metric_sums(rank, metrics, topk, original)
                sums[j] = part if sums[j] is None else {k: sums[j][k] + v for k, v in part.items()}
            count += len(rank)
        return tuple(M.average(s, count, self.config['metric_decimal_place']) for s in sums)

    def primary(self, results):
        """The result in the convention used for model selection and the log lines."""
        return results[1] if self.original_metrics else results[0]

    # ------------------------------------------------------------- the loop
    def fit(self, train_batches, valid_batches):
        """Train until early stopping; returns (best valid score, best valid results)."""
        for epoch in range(self.start_epoch, self.epochs):
            run_interest_discovery(self.model, self.config, epoch)
            train_batches.set_epoch(epoch)
            start = time.time()
            loss = self._train_epoch(train_batches, epoch)
            logger.info(f'epoch {epoch} training [time: {time.time() - start:.2f}s, train loss: {loss:.4f}]')
            stop = self.eval_step > 0 and (epoch + 1) % self.eval_step == 0 and self._validate(valid_batches, epoch)
            self.save_last(epoch)
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
        logger.info(f'epoch {epoch} evaluating [time: {time.time() - start:.2f}s, valid_score: {score:f}]')
        logger.info('valid result: \n' + M.result_str(result))
        if score >= self.best_valid_score:                             # ties count as improvement
            self.best_valid_score, self.best_valid_result = score, results
            self.best_valid_epoch, self.cur_step = epoch, 0
            self.save_checkpoint(epoch)
            logger.info(f'Saving current: {self.saved_model_file}')
            return False
        self.cur_step += 1
        return self.cur_step > self.stopping_step

    # ---------------------------------------------------------- checkpoints
    def save_checkpoint(self, epoch):
        """The best model so far (the original's checkpoint format)."""
        atomic_save({
            'config': self.config.to_dict(),
            'epoch': epoch,
            'cur_step': self.cur_step,
            'best_valid_score': self.best_valid_score,
            'state_dict': self.model.state_dict(),
            'optimizer': self.optimizer.state_dict(),
        }, self.saved_model_file)

    @property
    def last_model_file(self):
        return self.saved_model_file[:-len('.pth')] + '-last.pth'

    def save_last(self, epoch):
        """Everything needed to continue after `epoch` (the last finished epoch), RNG states included."""
        atomic_save({
            'config': self.config.to_dict(),
            'epoch': epoch,
            'cur_step': self.cur_step,
            'best_valid_score': self.best_valid_score,
            'best_valid_result': self.best_valid_result,
            'best_valid_epoch': self.best_valid_epoch,
            'best_model_file': self.saved_model_file,
            'state_dict': self.model.state_dict(),
            'optimizer': self.optimizer.state_dict(),
            'rng': rng_state(),
        }, self.last_model_file)

    def resume(self, path):
        """Continue from a checkpoint written by `save_last`."""
        ckpt = torch.load(path, map_location=self.device, weights_only=True)
        if 'rng' not in ckpt:
            raise ValueError(f'{path}: not a resumable checkpoint (expected the *-last.pth file of a run)')
        self.model.load_state_dict(ckpt['state_dict'])
        self.optimizer.load_state_dict(ckpt['optimizer'])
        self.start_epoch = ckpt['epoch'] + 1
        self.cur_step = ckpt['cur_step']
        self.best_valid_score = ckpt['best_valid_score']
        self.best_valid_result = ckpt['best_valid_result']
        self.best_valid_epoch = ckpt['best_valid_epoch']
        self.saved_model_file = ckpt['best_model_file']
        set_rng_state(ckpt['rng'])
        logger.info(f'Resuming from {path} at epoch {self.start_epoch}')

    def load_best(self):
        """Reload the best checkpoint, buffers included (no new interest discovery)."""
        ckpt = torch.load(self.saved_model_file, map_location=self.device, weights_only=True)
        self.model.load_state_dict(ckpt['state_dict'])
        logger.info(f'Loading model structure and parameters from {self.saved_model_file}')
