"""Device placement on the CPU: what CUDA and nccl would refuse, seen without a GPU.

nccl refuses CPU tensors ("No backend type associated with device type cpu"), and a
tensor made without a device lands on the CPU whatever the model's device. So during
a training step of each stage, with the path of a global batch shared by processes,
no tensor may be made in this repository's code without naming its device; and the
helpers of distributed.py hand every collective tensors of the group's device.
"""
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import distributed as D
import quick_start
from config import Config, stage_files
from data.loader import SeqBatches
from data.pretrain import PretrainDataset
from run_log import init_seed
from trainer import Pretrainer, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {'plm_size': 32, 'img_size': 32, 'hidden_size': 32, 'inner_size': 32, 'n_heads': 2,
        'show_progress': False, 'use_gpu': False}
HOST_DIRS = ('tests', 'data')
FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
             torch.randperm, torch.rand, torch.randn, torch.randint, torch.linspace, torch.eye}


class DevicelessFactories(TorchFunctionMode):
    """Records 'file:line' of each tensor factory called from this repository's library code
    without a device. Not counted: torch.as_tensor of a tensor (it keeps its device), and data/,
    whose batches are made on the host and moved by `to_device`."""

    def __init__(self):
        super().__init__()
        self.sites = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get('device') is None \
                and not (func is torch.as_tensor and args and torch.is_tensor(args[0])):
            caller = sys._getframe(1)
            path = os.path.abspath(caller.f_code.co_filename)
            if path.startswith(ROOT + os.sep) and not path.startswith(tuple(os.path.join(ROOT, d) for d in HOST_DIRS)):
                self.sites.append(f'{os.path.relpath(path, ROOT)}:{caller.f_lineno}')
        return func(*args, **kwargs)


def shared_batch_gather(x, sizes=None):
    """What `distributed.all_gather_with_grad` returns to the only process of a group."""
    return x, 0


def step_sites(trainer, batch):
    trainer.gather = shared_batch_gather           # the code path of a global batch shared by processes
    trainer.model.train()
    with DevicelessFactories() as mode:
        trainer.step(batch)
    return mode.sites


@pytest.mark.parametrize('kmeans_mode', ['original', 'lloyd'])
def test_a_finetuning_step_makes_no_tensor_without_a_device(demo, tmp_path, kmeans_mode):
    config = Config('Demo', stage_files('finetune'), {'data_path': str(demo), 'checkpoint_dir': str(tmp_path),
                                                      'kmeans_mode': kmeans_mode, **TINY})
    init_seed(config['seed'])
    dataset, model, _ = quick_start.build_finetune(config, torch.device('cpu'))
    trainer = Trainer(config, model, torch.device('cpu'))
    trainer.discover(0)
    train = SeqBatches(dataset.splits['train'], 64, shuffle=True, seed=1, pad_len=dataset.pad_len)
    assert step_sites(trainer, next(iter(train))) == []
    with DevicelessFactories() as mode:   # and evaluation
        trainer.evaluate(SeqBatches(dataset.splits['valid'], 64, pad_len=dataset.pad_len))
    assert mode.sites == []


def test_a_pretraining_step_makes_no_tensor_without_a_device(demo_pretrain):
    config = Config('DemoPT', stage_files('pretrain'), {'data_path': str(demo_pretrain), 'train_stage': 'pretrain',
                                                        'train_batch_size': 64, 'kmeans_mode': 'lloyd', **TINY})
    trainer = Pretrainer(config, PretrainDataset(config), torch.device('cpu'))
    trainer.discover(0)
    assert step_sites(trainer, next(iter(trainer.batches))) == []


def test_the_check_sees_a_tensor_made_without_a_device():
    with DevicelessFactories() as mode:
        D.all_reduce_sum(torch.tensor([3]))       # (here, in tests/, not recorded)
        exec(compile('import torch\ntorch.tensor([1])', os.path.join(ROOT, 'missrec.py'), 'exec'))
    assert mode.sites == ['missrec.py:2']


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA (nccl)')
def test_nccl_collectives_take_tensors_of_any_device(monkeypatch):
    """A group of one nccl rank: the helpers accept CPU tensors (a size, a loss) and CUDA ones,
    and hand results back on the caller's device."""
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('LOCAL_RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '1')
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(D.free_port()))
    device = D.init_from_env(group_of_one=True)
    try:
        assert D.group_device() == device and device.type == 'cuda'
        assert D.max_over_ranks(5) == 5
        for x in (torch.arange(4.0), torch.arange(4.0, device=device)):
            assert D.all_reduce_sum(x).device == x.device
            assert D.broadcast_(x.clone()).device == x.device
            out, offset = D.all_gather_with_grad(x.clone().requires_grad_())
            assert out.device == x.device and offset == 0
            out.sum().backward()
    finally:
        D.teardown()
