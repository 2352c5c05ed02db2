"""Host syncs per training step: the operations that make the host wait for the GPU.

    python bench/host_syncs.py                      # Scientific_mini (or demo data) and the demo corpus
    python bench/host_syncs.py --data_path DIR -d NAME

On a GPU every `.item()`, `int(tensor)`, `nonzero()`, boolean-mask indexing or
`torch.unique` copies a result to the host and stalls the host until the GPU has
caught up; with tens of them a step the GPU idles between small kernels. They
are counted here on the CPU, where the same aten operations run: a
`TorchDispatchMode` counts them around one training step (forward, backward,
optimiser step) of each stage and each interest-discovery mode. The counts do
not depend on the device. Prints a table and one line `RESULT key=value ...`.
"""
import argparse
import collections
import os
import sys
import tempfile
import traceback

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from config import Config, stage_files  # noqa: E402
from data.dataset import SeqDataset  # noqa: E402
import trainer as trainer_module  # noqa: E402
from data.loader import SeqBatches  # noqa: E402
from data.pretrain import PretrainDataset  # noqa: E402
from missrec import MISSRec  # noqa: E402
from run_log import init_seed  # noqa: E402
from trainer import Pretrainer, Trainer  # noqa: E402

MINI = os.path.join(ROOT, '..', 'shared', 'datasets', 'downstream')
# aten operations whose result the host must read (a scalar, or an output size that depends on values)
ALWAYS = {'_local_scalar_dense', 'nonzero', 'masked_select', '_unique2', 'unique_dim', 'unique_consecutive',
          'equal', 'is_nonzero', 'item', 'bincount', 'masked_scatter_'}
BOOL_INDEXED = {'index', 'index_put', 'index_put_', '_index_put_impl_'}   # with a bool mask as index


def is_sync(func, args, kwargs):
    name = func._schema.name.split('::')[-1]
    if name in ALWAYS:
        return name
    if name in BOOL_INDEXED and any(t is not None and t.dtype == torch.bool for t in args[1]):
        return f'{name} (bool mask)'
    if name == 'repeat_interleave' and func._overloadname.startswith('Tensor') \
            and kwargs.get('output_size') is None and (len(args) < 3 or args[-1] is None):
        return 'repeat_interleave (no output_size)'
    return None


class SyncCounter(TorchDispatchMode):
    """Counts the host syncs of the code it wraps, by operation: `with SyncCounter(tensors) as c: ...`.

    On the CPU, host and device are one, so the counter follows where each tensor would live
    on a GPU: `device_tensors` start there (the model's parameters and buffers, the optimiser's
    moments, the moved batch), every result of an operation on one of them is a device tensor
    too, and a copy of one to 'cpu' is a device-to-host copy (counted) whose result lives on
    the host. Only sync operations on device tensors count. The tensors are kept alive while
    counting, so that their ids stay theirs."""

    def __init__(self, device_tensors=()):
        super().__init__()
        self.kept = list(device_tensors)
        self.device = {id(t) for t in self.kept}
        self.counts = collections.Counter()
        self.sites = collections.Counter()   # 'file:line' of the innermost frame of this repository

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        on_device = any(torch.is_tensor(t) and id(t) in self.device for t in pytree.tree_leaves((args, kwargs)))
        if not on_device:
            return out
        to_host = func._schema.name.split('::')[-1] == '_to_copy' and kwargs.get('device') == torch.device('cpu')
        name = 'copy to the host' if to_host else is_sync(func, args, kwargs)
        if name:
            self.counts[name] += 1
            frame = next((f for f in reversed(traceback.extract_stack()) if f.filename.startswith(ROOT)
                          and not f.filename.startswith(os.path.join(ROOT, 'bench'))), None)
            self.sites[f'{os.path.relpath(frame.filename, ROOT)}:{frame.lineno}' if frame else '?'] += 1
        if not to_host:
            for t in pytree.tree_leaves(out):
                if torch.is_tensor(t):
                    self.kept.append(t)
                    self.device.add(id(t))
        return out


def count_step(trainer, batch):
    """The host syncs of one training step (`Trainer._step`, as `train_epoch` runs it: the losses
    are read on top once every `loss_read_step` steps)."""
    trainer.model.train()
    trainer.step(batch)                                               # warm-up (lazy state, caches)
    moved = pytree.tree_map(lambda x: x.clone() if torch.is_tensor(x) else x, dict(batch))
    state = [t for st in trainer.optimizer.state.values() for k, t in st.items()
             if torch.is_tensor(t) and k != 'step']                   # Adam's step counters live on the host
    tensors = (list(trainer.model.parameters()) + list(trainer.model.buffers()) + state
               + [t for t in pytree.tree_leaves(moved) if torch.is_tensor(t)])
    real = trainer_module.to_device
    trainer_module.to_device = lambda b, device: dict(moved, host=b)   # what to_device hands over on a GPU
    try:
        with SyncCounter(tensors) as counter:
            getattr(trainer, "_step", trainer.step)(batch)   # (step: code before the loss was read in groups)
    finally:
        trainer_module.to_device = real
    if os.environ.get('SYNC_SITES'):
        print(counter.sites.most_common())
    return counter.counts


def finetune_counts(name, data_path, kmeans_mode):
    config = Config(name, stage_files('finetune'), {'data_path': data_path, 'show_progress': False,
                                                    'use_gpu': False, 'kmeans_mode': kmeans_mode})
    init_seed(config['seed'])
    dataset = SeqDataset(config)
    model = MISSRec(config, dataset.n_items, dataset.plm_table, dataset.img_table)
    trainer = Trainer(config, model, torch.device('cpu'))
    trainer.discover(0)
    train = SeqBatches(dataset.splits['train'], config['train_batch_size'], True, config['seed'], dataset.pad_len)
    return count_step(trainer, next(iter(train)))


def pretrain_counts(data_path, kmeans_mode):
    config = Config('DemoPT', stage_files('pretrain'), {
        'data_path': data_path, 'train_stage': 'pretrain', 'show_progress': False, 'use_gpu': False,
        'kmeans_mode': kmeans_mode, 'train_batch_size': 512, 'interest_ratio': 0.1})
    trainer = Pretrainer(config, PretrainDataset(config), torch.device('cpu'))
    trainer.discover(0)
    trainer.batches.set_epoch(0)
    return count_step(trainer, next(iter(trainer.batches)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-d', default='Scientific_mini')
    parser.add_argument('--data_path', default=MINI)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from tools.make_demo_data import write_downstream, write_pretrain
    with tempfile.TemporaryDirectory() as tmp:
        name, path = args.d, args.data_path
        if not os.path.isdir(os.path.join(path, name)):
            name, path = 'Demo', os.path.join(tmp, 'down')
            write_downstream(path, name='Demo', seed=7)
        write_pretrain(os.path.join(tmp, 'pre'), name='DemoPT', seed=7)
        rows = {}
        for mode in ('original', 'lloyd'):
            rows[f'fine-tuning {name} {mode}'] = finetune_counts(name, path, mode)
            rows[f'pre-training DemoPT {mode}'] = pretrain_counts(os.path.join(tmp, 'pre'), mode)
    print('| step | host syncs | by operation |\n|---|---|---|')
    for step, counts in rows.items():
        ops = ', '.join(f'{k} {v}' for k, v in counts.most_common())
        print(f'| {step} | {sum(counts.values())} | {ops} |')
    worst = {stage: max(sum(c.values()) for s, c in rows.items() if s.startswith(stage))
             for stage in ('fine-tuning', 'pre-training')}
    print(f"RESULT finetune_syncs={worst['fine-tuning']} pretrain_syncs={worst['pre-training']}")


if __name__ == '__main__':
    main()
