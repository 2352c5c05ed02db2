"""Checkpoints: the one format that both training stages write and resume from, loading a
pre-trained state dict, and opening checkpoints safely, ours and those of the original code.

    from checkpoints import load_checkpoint
    ckpt = load_checkpoint('saved/MISSRec-FHCKM_mm_full-100.pth')
    ckpt['config']['hidden_size'], ckpt['state_dict'], ckpt.get('epoch')

Our format (`save_checkpoint`, read back by `resume_from`): one dict with `config`,
`epoch` (the last finished epoch, 0-based), `state_dict` (buffers included),
`optimizer`, `rng_states` (the random states of every process, in rank order) and,
in fine-tuning, the early-stopping state (`cur_step`, `best_valid_score`,
`best_valid_result`, `best_valid_epoch`, `best_model_file`). Files are written
atomically (a temporary file renamed over the name), so a kill never leaves a
partial checkpoint.

Our checkpoints hold only plain values and open with `torch.load(...,
weights_only=True)`. The original code's checkpoints hold a pickled RecBole
`Config` that `weights_only` refuses; they open with the restricted unpickler of
original_pickle.py, which resolves only an allow-list of globals and never
imports recbole or runs pickled code (a global outside it raises
`UnsafeCheckpointError`, naming it). The returned dict has `config` as a plain
dict: the Config's `final_config_dict` (enum members become strings like
'ModelType.SEQUENTIAL', class references strings like 'missrec.MISSRec').
"""
import collections
import io
import logging
import os
import pickle
import random
import tempfile

import numpy as np
import torch

import distributed as D
import original_pickle
from config import DEFAULTS, MODELS, Config, ConfigError
from data.dataset import SeqDataset
from io_utils import atomic_open
from missrec import MISSRec
from run_log import init_seed
from sasrec import Pop, SASRec, TextSim

__all__ = ['load_checkpoint', 'state_dict_of', 'save_checkpoint', 'resume_from', 'load_pretrained',
           'shape_mismatches', 'CheckpointError', 'UnsafeCheckpointError', 'check_writable', 'build_model',
           'model_from_checkpoint', 'STRUCTURE_KEYS']

logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file and what was expected."""


class UnsafeCheckpointError(CheckpointError, original_pickle.UnsafePickleError):
    """The checkpoint references a global that is not on the allow-list (original_pickle.py)."""


# ------------------------------------------------------------------- loading
def load_checkpoint(path, map_location='cpu'):
    """Read a `.pth` checkpoint without running pickled code; returns its dict with a plain `config`.

    Raises:
        CheckpointError: missing or unreadable file (message: file and what was expected).
        UnsafeCheckpointError: the file references a global outside the allow-list.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'{path}: checkpoint file not found')
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # unknown globals (e.g. the original's recbole Config): the restricted unpickler
        try:
            ckpt = original_pickle.load(path, map_location)
        except original_pickle.UnsafePickleError as e:
            raise UnsafeCheckpointError(f'{path}: {e}') from None
        except Exception as e:
            raise CheckpointError(f'{path}: not a readable checkpoint (expected a file written by '
                                  f'torch.save): {type(e).__name__}: {e}') from None
    except Exception as e:
        raise CheckpointError(f'{path}: not a readable checkpoint (expected a file written by torch.save): '
                              f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path}: expected a dict (config, epoch, state_dict, ...), '
                              f'got {type(ckpt).__name__}')
    if 'config' in ckpt:
        ckpt = dict(ckpt)
        ckpt['config'] = original_pickle.config_dict(ckpt['config'])
    return ckpt


def state_dict_of(ckpt, path='checkpoint'):
    """The model state dict of a loaded checkpoint (a bare state dict is accepted;
    a DDP `module.` prefix on every key is removed)."""
    state = ckpt.get('state_dict', ckpt)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path}: expected 'state_dict' to map parameter names to tensors")
    if state and all(k.startswith('module.') for k in state):
        state = collections.OrderedDict((k[len('module.'):], v) for k, v in state.items())
    return state


def shape_mismatches(model, state):
    """['name (checkpoint shape) vs (model shape)', ...] of the entries of `state` that the model
    holds with another shape."""
    own = model.state_dict()
    return [f'{k} {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in state.items()
            if k in own and own[k].shape != v.shape]


# ---------------------------------------------------------------- our format
def atomic_save(obj, path):
    """torch.save through a temporary file renamed over `path` (io_utils.py): a kill at any
    moment leaves either the old file or the new one, never a partial one. The bytes are made
    in memory first, so that a failing write (disk full) raises the OSError itself, not
    torch's writer error, and becomes one line."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    try:
        with atomic_open(path, 'wb') as f:
            f.write(buf.getbuffer())
    except OSError as e:
        raise CheckpointError(f'{path}: could not be written ({e.strerror or e}); '
                              f'the checkpoints written before are kept') from e


def check_writable(folder):
    """Create `folder` if needed and write a probe file there, so that a run that could not save
    its checkpoints stops before training."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix='.write-probe-', dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f'{folder}: checkpoint folder cannot be written ({e.strerror or e})') from e


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
    """Restore saved CUDA generator states (CPU ByteTensors); a checkpoint written where more (or fewer)
    GPUs were visible restores those it has for the GPUs visible now."""
    global _WARNED_GPU_COUNT
    count = torch.cuda.device_count()
    if len(states) != count and not _WARNED_GPU_COUNT:
        logger.warning(f'the checkpoint holds the random states of {len(states)} GPUs, {count} visible now: '
                       f'restoring {min(len(states), count)}')
        _WARNED_GPU_COUNT = True
    for i, s in enumerate(states[:count]):
        torch.cuda.set_rng_state(s.cpu(), i)


def save_checkpoint(path, config, epoch, model, optimizer, **state):
    """Write a checkpoint of the one format (module docstring). Every process calls it: the random
    states of all are gathered, rank 0 writes, and the others wait until the file is there.

    Args:
        epoch: the last finished epoch (0-based).
        state: further entries (fine-tuning: the early-stopping state).
    """
    states = D.all_gather_object(rng_state())
    if D.is_main_process():
        atomic_save({'config': config.to_dict(), 'epoch': epoch, 'state_dict': model.state_dict(),
                     'optimizer': optimizer.state_dict(), 'rng_states': states, **state}, path)
    D.barrier()


def resume_from(path, model, optimizer, expected, required=()):
    """Load a checkpoint of `save_checkpoint` into model and optimizer and restore this process's
    random states; returns the checkpoint (its `epoch` and any further entries).

    The file is read onto the CPU: the model's and the optimiser's `load_state_dict` copy each
    tensor to its parameter's device, except Adam's step counters, which stay on the host as in a
    fresh run (on a GPU, reading a step counter there would stall every step once per parameter).

    Args:
        expected: what the checkpoint should be, for the message when it is not.
        required: further entries the checkpoint must hold.
    """
    ckpt = load_checkpoint(path)
    if any(k not in ckpt for k in ('state_dict', 'optimizer', 'epoch', 'rng_states', *required)):
        raise CheckpointError(f'{path}: not a checkpoint to resume from (expected {expected})')
    model.load_state_dict(ckpt['state_dict'])
    optimizer.load_state_dict(ckpt['optimizer'])
    states = ckpt['rng_states']
    if len(states) == D.world_size():
        set_rng_state(states[D.rank()])
    else:
        logger.warning(f'{path} was written by {len(states)} processes, now {D.world_size()}: '
                       'random states not restored')
    return ckpt


# ------------------------------------------------------------- pre-trained
def load_pretrained(model, path, freeze):
    """Load a pre-trained state dict non-strictly (SPEC 4); with `freeze`, freeze the position
    embedding and the Transformer. The checkpoint's interest tables, if any, are not loaded:
    they belong to its own items, and interest discovery rebuilds the model's before the first
    epoch (which keys those are, the model says: the names of its `interest_tables()`; a table
    of a modality the model lacks is an unexpected key, ignored too). Returns the lines to log
    (missing and unexpected keys)."""
    if not os.path.exists(path):
        raise CheckpointError(f'{path}: pre-trained checkpoint not found')
    state = state_dict_of(load_checkpoint(path), path)
    tables = {id(t) for t in model.interest_tables()}                  # the model's names for them
    interest = {name for name, buffer in model.named_buffers() if id(buffer) in tables}
    skipped = sorted(k for k in state if k in interest)
    state = {k: v for k, v in state.items() if k not in interest}
    mismatched = shape_mismatches(model, state)
    if mismatched:
        raise CheckpointError(f'{path}: parameter shapes differ from the model: ' + '; '.join(mismatched))
    result = model.load_state_dict(state, strict=False)
    if freeze:
        model.freeze_transformer()
    lines = [f'Loading pre-trained model from {path}',
             f'missing keys (kept as initialised): {result.missing_keys}',
             f'unexpected keys (ignored): {result.unexpected_keys}']
    if skipped:
        lines.append(f'interest tables of the checkpoint (rebuilt by interest discovery): {skipped}')
    return lines


# --------------------------------------------------- a model from a checkpoint
# The one rule of what a checkpoint's stored config decides over the caller's: the keys that give the
# model its parameters' shapes or its evaluation forward. Everything else (the data: dataset, data_path,
# feature files; evaluation; devices) is the caller's: finetune.py --eval_only's command line, or, for
# recommend.py and the tools, which take no such flags, the rest of the checkpoint's own config.
STRUCTURE_KEYS = ('model', 'train_stage', 'n_layers', 'n_heads', 'hidden_size', 'inner_size', 'hidden_act',
                  'layer_norm_eps', 'plm_size', 'img_size', 'temperature', 'modal_type', 'id_type',
                  'seq_mm_fusion', 'item_mm_fusion', 'contextual_gather_quirk', 'interest_ratio',
                  'MAX_ITEM_LIST_LENGTH')
# what a pre-training checkpoint does not decide: the fine-tuning stage and the downstream interest ratio
STAGE_KEYS = ('train_stage', 'interest_ratio')
# what the checkpoint's own config does not carry over: evaluation and optimiser settings (the original's
# may hold values this project rejects), devices
_NOT_CARRIED = ('dataset', 'metrics', 'topk', 'valid_metric', 'eval_step', 'stopping_step', 'learner',
                'clip_grad_norm', 'metric_decimal_place', 'epochs', 'pretrain_epochs', 'save_step')


def build_model(config, dataset):
    """The model `config['model']` names (MISSRec, or a baseline of sasrec.py) for a `SeqDataset`, on the CPU."""
    name = config['model']
    if name == 'SASRec':
        return SASRec(config, dataset.n_items)
    if name == 'Pop':
        return Pop(dataset.splits['train']['item_id'], dataset.n_items)
    if name == 'TextSim':
        return TextSim(dataset.plm_table, config['textsim_decay'])
    return MISSRec(config, dataset.n_items, dataset.plm_table, dataset.img_table)


def own_config(stored, path, dataset=None, data_path=None):
    """The checkpoint's own config as a `Config` (keys this project does not know, e.g. the original
    RecBole ones, dropped; on the CPU), with `dataset` / `data_path` in place of the stored ones."""
    name = dataset or stored.get('dataset')
    if not name:
        raise CheckpointError(f'{path}: the checkpoint stores no dataset name; pass -d DATASET')
    if stored.get('train_stage') == 'pretrain':
        raise CheckpointError(f'{path}: a pre-training checkpoint (train_stage pretrain); expected a fine-tuned '
                              'one (train_stage transductive_ft or inductive_ft)')
    overrides = {k: v for k, v in stored.items() if k in DEFAULTS and k not in _NOT_CARRIED}
    if data_path:
        overrides['data_path'] = data_path
    else:
        # The original stores data_path joined with the dataset name ('dataset/downstream/D').
        dp = overrides.get('data_path')
        if (isinstance(dp, str) and dp and os.path.basename(os.path.normpath(dp)) == stored.get('dataset')
                and not os.path.isdir(os.path.join(dp, name))):
            overrides['data_path'] = os.path.dirname(os.path.normpath(dp))
    overrides.update(use_gpu=False, show_progress=False)
    try:
        return Config(dataset=name, overrides=overrides)
    except ConfigError as e:
        raise CheckpointError(f'{path}: stored config: {e}') from None


def with_structure(config, stored, path, pretrained=False):
    """`config` with the model structure of the checkpoint's stored config (STRUCTURE_KEYS; for a
    pre-training checkpoint, `pretrained`, but STAGE_KEYS), and the lines saying which values the
    checkpoint changed."""
    values, lines = config.to_dict(), []
    for key in STRUCTURE_KEYS:
        if pretrained and key in STAGE_KEYS:
            continue
        if key in stored and stored[key] != values[key] and not (key == 'model' and stored[key] not in MODELS):
            lines.append(f'{key} = {stored[key]!r} (from the checkpoint; the command line says {values[key]!r})')
            values[key] = stored[key]
    values['pretrained_file'] = path if pretrained else ''
    try:
        return Config(dataset=values.pop('dataset'), overrides=values), lines
    except ConfigError as e:
        raise CheckpointError(f'{path}: stored config: {e}') from None


def model_from_checkpoint(path, config=None, device='cpu', dataset=None, data_path=None):
    """The model a checkpoint describes, and its dataset: the one way finetune.py --eval_only,
    recommend.py and the tools build a model from a checkpoint (ours, or the original code's).

    The caller's `config` (None: the checkpoint's own, `own_config`, with `dataset` / `data_path`)
    takes the checkpoint's STRUCTURE_KEYS. A fine-tuned checkpoint's state dict is then loaded
    strictly, buffers and interest tables included. A pre-training checkpoint (only with a `config`)
    gives a zero-shot model: the fine-tuning model of the caller's stage and interest_ratio, its
    weights loaded as `-p` loads them (`load_pretrained`); its interests are still to be discovered
    on the target items. Weights the checkpoint does not hold start from `config['seed']`.

    Returns:
        (config, SeqDataset, model on `device` in eval mode,
         {'zero_shot': bool, 'epoch': the checkpoint's or None, 'lines': what to log}).
    """
    ckpt = load_checkpoint(path)
    state = state_dict_of(ckpt, path)
    stored = ckpt.get('config') or {}
    zero_shot = config is not None and stored.get('train_stage') == 'pretrain'
    config, lines = with_structure(config or own_config(stored, path, dataset, data_path), stored, path,
                                   pretrained=zero_shot)
    if config['model'] in ('Pop', 'TextSim'):
        raise ConfigError(f'{config["model"]} has no checkpoint: run finetune.py -m {config["model"]}')
    init_seed(config['seed'], config['reproducibility'])              # what is not loaded: as fine-tuning starts
    data = SeqDataset(config)
    try:
        model = build_model(config, data)
    except ValueError as e:
        raise CheckpointError(f'{path}: cannot build the model from the stored config: {e}') from None
    if zero_shot:
        lines += load_pretrained(model, path, config['freeze_trm'])
    else:
        wrong = shape_mismatches(model, state)
        if wrong:
            raise CheckpointError(f'{path}: parameter shapes do not fit dataset {config["dataset"]} '
                                  f'({data.n_items} item rows) at {config["data_path"]}: {wrong[0]}'
                                  + (f' and {len(wrong) - 1} more' if len(wrong) > 1 else '')
                                  + '; the dataset and data flags of its fine-tuning run?')
        result = model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(f'{path}: state dict does not match the {config["model"]} model built from its '
                                  f'config (missing: {result.missing_keys[:5]}; unexpected: '
                                  f'{result.unexpected_keys[:5]})')
    return config, data, model.to(device).eval(), {'zero_shot': zero_shot, 'epoch': ckpt.get('epoch'),
                                                   'lines': lines}
