"""checkpoints.load_checkpoint: original-code checkpoints open without recbole and without running pickled code."""
import collections
import enum
import io
import os
import re
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import yaml

import checkpoints
from checkpoints import CheckpointError, UnsafeCheckpointError, load_checkpoint, state_dict_of

FAKE_MODULES = ('recbole', 'recbole.config', 'recbole.config.configurator', 'recbole.utils',
                'recbole.utils.enum_type')


def _install_fake_recbole():
    """Throwaway stand-ins for the original's recbole classes, registered in sys.modules."""
    mods = {name: types.ModuleType(name) for name in FAKE_MODULES}

    class Config:
        def __init__(self, final):
            self.final_config_dict = final
            self.parameters = {'General': ['seed']}
            self.dataset = final['dataset']

    Config.__module__ = 'recbole.config.configurator'
    Config.__qualname__ = 'Config'

    ModelType = enum.Enum('ModelType', [('GENERAL', 1), ('SEQUENTIAL', 2)], module='recbole.utils.enum_type')
    InputType = enum.Enum('InputType', [('POINTWISE', 1), ('PAIRWISE', 2)], module='recbole.utils.enum_type')
    mods['recbole.config.configurator'].Config = Config
    mods['recbole.utils.enum_type'].ModelType = ModelType
    mods['recbole.utils.enum_type'].InputType = InputType
    for name, mod in mods.items():
        assert name not in sys.modules
        sys.modules[name] = mod
    return Config, ModelType, InputType


def _remove_fake_recbole():
    for name in FAKE_MODULES:
        sys.modules.pop(name, None)


@pytest.fixture
def original_checkpoint(tmp_path):
    """A .pth shaped like the original code's: a pickled recbole Config, enums, device, numpy scalars."""
    Config, ModelType, InputType = _install_fake_recbole()
    try:
        import missrec
        state = collections.OrderedDict([('text_adaptor.weight', torch.randn(4, 6)),
                                         ('text_adaptor.bias', torch.zeros(4)),
                                         ('plm_interest_lookup_table', torch.arange(5))])
        final = {'dataset': 'Scientific_mm_full', 'model': 'MISSRec', 'hidden_size': 300, 'n_layers': 2,
                 'train_stage': 'transductive_ft', 'modal_type': 'img_text', 'topk': [10, 50],
                 'MODEL_TYPE': ModelType.SEQUENTIAL, 'MODEL_INPUT_TYPE': InputType.POINTWISE,
                 'device': torch.device('cpu'), 'interest_ratio': np.float64(0.5),
                 'data_path': 'dataset/downstream/Scientific_mm_full'}
        config = Config(final)
        config.model_class = missrec.MISSRec        # class objects stored by reference, as the original does
        config.yaml_loader = yaml.FullLoader
        path = tmp_path / 'MISSRec-Scientific.pth'
        torch.save({'config': config, 'epoch': 7, 'cur_step': 0, 'best_valid_score': np.float64(0.0671),
                    'state_dict': state, 'other_parameter': None,
                    'optimizer': {'state': {}, 'param_groups': [{'lr': 0.001, 'params': [0, 1]}]}}, path)
    finally:
        _remove_fake_recbole()
    return path, state


def test_original_checkpoint_opens_without_recbole(original_checkpoint):
    path, state = original_checkpoint
    assert 'recbole' not in sys.modules and 'recbole.config.configurator' not in sys.modules
    with pytest.raises(pickle.UnpicklingError):                       # what plain torch.load does
        torch.load(path, weights_only=True)
    ckpt = load_checkpoint(path)
    assert 'recbole' not in sys.modules                                # nothing was imported
    assert ckpt['epoch'] == 7
    assert float(ckpt['best_valid_score']) == pytest.approx(0.0671)
    assert list(ckpt['state_dict']) == list(state)
    for k, v in state.items():
        assert torch.equal(ckpt['state_dict'][k], v)
    cfg = ckpt['config']
    assert type(cfg) is dict
    assert cfg['dataset'] == 'Scientific_mm_full' and cfg['hidden_size'] == 300
    assert cfg['topk'] == [10, 50] and cfg['train_stage'] == 'transductive_ft'
    assert cfg['MODEL_TYPE'] == 'ModelType.SEQUENTIAL' and cfg['MODEL_INPUT_TYPE'] == 'InputType.POINTWISE'
    assert cfg['device'] == torch.device('cpu')
    assert float(cfg['interest_ratio']) == 0.5
    assert ckpt['optimizer']['param_groups'][0]['lr'] == 0.001
    assert state_dict_of(ckpt) is ckpt['state_dict']


def test_config_without_final_dict_gives_its_recorded_state(tmp_path):
    Config, ModelType, _ = _install_fake_recbole()
    try:
        c = Config.__new__(Config)
        c.seed = 3
        c.kind = ModelType.GENERAL
        torch.save({'config': c, 'state_dict': {}}, tmp_path / 'c.pth')
    finally:
        _remove_fake_recbole()
    assert load_checkpoint(tmp_path / 'c.pth')['config'] == {'seed': 3, 'kind': 'ModelType.GENERAL'}


def test_our_checkpoint_loads_with_weights_only(tmp_path):
    from trainer import atomic_save
    state = {'position_embedding.weight': torch.randn(50, 8)}
    atomic_save({'config': {'dataset': 'Demo', 'hidden_size': 8}, 'epoch': 2, 'state_dict': state}, str(tmp_path / 'o.pth'))
    ckpt = load_checkpoint(tmp_path / 'o.pth')
    assert ckpt['config'] == {'dataset': 'Demo', 'hidden_size': 8} and ckpt['epoch'] == 2
    assert torch.equal(ckpt['state_dict']['position_embedding.weight'], state['position_embedding.weight'])


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, (f'touch {self.target}',)


def test_arbitrary_globals_are_refused(tmp_path):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'config': {}, 'payload': _Evil(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and 'system' in msg and 'allow-list' in msg and '\n' not in msg
    assert isinstance(err.value, pickle.UnpicklingError)
    assert not marker.exists()


def test_reference_only_globals_cannot_be_called():
    ref = checkpoints.GlobalRef('missrec', 'MISSRec')
    with pytest.raises(UnsafeCheckpointError):
        ref()
    up = checkpoints.RestrictedUnpickler
    for module, name in [('builtins', 'eval'), ('subprocess', 'Popen'), ('torch', 'load'),
                         ('recbole.trainer', 'Trainer')]:
        with pytest.raises(UnsafeCheckpointError, match=f'{module}.{name}'):
            up(io.BytesIO()).find_class(module, name)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(CheckpointError, match='checkpoint file not found'):
        load_checkpoint(tmp_path / 'nope.pth')
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint at all')
    with pytest.raises(CheckpointError, match='not a readable checkpoint'):
        load_checkpoint(bad)


def test_inspect_checkpoint_on_an_original_checkpoint(original_checkpoint, capsys):
    from tools import inspect_checkpoint
    path, state = original_checkpoint
    assert inspect_checkpoint.main([str(path), '--keys']) == 0
    out = capsys.readouterr().out
    assert 'written by: original code (RecBole Config)' in out and 'epoch: 7' in out
    assert re.search(r'\n  dataset += Scientific_mm_full\n', out) and re.search(r'\n  hidden_size += 300\n', out)
    assert f'parameters: {sum(v.numel() for v in state.values()):,} values in 3 tensors' in out
    assert 'text_adaptor.weight' in out and '[4, 6]' in out


def test_inspect_checkpoint_refuses_unsafe_file_in_one_line(tmp_path, capsys):
    from tools import inspect_checkpoint
    path = tmp_path / 'evil.pth'
    torch.save({'payload': _Evil(tmp_path / 'pwned')}, path)
    assert inspect_checkpoint.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {path}: refusing to load global') and err.count('\n') == 1
    assert not (tmp_path / 'pwned').exists()


def test_finetune_load_pretrained_reads_original_checkpoints(tmp_path):
    """finetune.load_pretrained (-p) goes through load_checkpoint, so original pre-trained files load."""
    import finetune
    from config import Config
    from missrec import MISSRec
    cfg = Config(overrides={'train_stage': 'pretrain', 'hidden_size': 16, 'inner_size': 16,
                            'plm_size': 8, 'img_size': 8})
    torch.manual_seed(0)
    source = MISSRec(cfg, 10)
    Config_, ModelType, _ = _install_fake_recbole()
    try:
        path = tmp_path / 'MISSRec-FHCKM_mm_full-100.pth'
        torch.save({'config': Config_({'dataset': 'FHCKM_mm_full', 'MODEL_TYPE': ModelType.SEQUENTIAL}),
                    'epoch': 99, 'state_dict': source.state_dict(), 'optimizer': {}}, path)
    finally:
        _remove_fake_recbole()
    torch.manual_seed(1)
    target = MISSRec(cfg, 10)
    finetune.load_pretrained(target, str(path), freeze=True)
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    assert not any(p.requires_grad for p in target.trm_model.parameters())


def test_state_cannot_be_set_on_classes():
    """BUILD on an allowed class (monkey-patching it) is refused; on plain objects it works."""
    patch = b'\x80\x02ccollections\nOrderedDict\n}X\x01\x00\x00\x00aK\x01sb.'
    with pytest.raises(UnsafeCheckpointError, match='refusing to set the state'):
        checkpoints.restricted_pickle.loads(patch)
    assert not hasattr(collections.OrderedDict, 'a')
    ok = pickle.dumps({'s': {1, 2}, 'b': bytearray(b'x'), 'o': collections.OrderedDict(a=1),
                       'd': torch.device('cpu'), 'x': np.float32(2.5), 'arr': np.arange(3)}, protocol=2)
    out = checkpoints.restricted_pickle.loads(ok)
    assert out['s'] == {1, 2} and out['o'] == {'a': 1} and out['x'] == np.float32(2.5)
    assert out['arr'].tolist() == [0, 1, 2]


def test_legacy_torch_format(tmp_path):
    Config_, ModelType, _ = _install_fake_recbole()
    try:
        sd = collections.OrderedDict([('w', torch.randn(3, 2)), ('b', torch.arange(4))])
        path = tmp_path / 'legacy.pth'
        torch.save({'config': Config_({'dataset': 'X', 'MODEL_TYPE': ModelType.SEQUENTIAL}), 'state_dict': sd},
                   path, _use_new_zipfile_serialization=False)
    finally:
        _remove_fake_recbole()
    ckpt = load_checkpoint(path)
    assert ckpt['config'] == {'dataset': 'X', 'MODEL_TYPE': 'ModelType.SEQUENTIAL'}
    assert all(torch.equal(ckpt['state_dict'][k], v) for k, v in sd.items())


def test_inspect_checkpoint_on_a_pretraining_checkpoint(tmp_path, capsys):
    """The layout ddp_pretrain.py saves: config dict, epoch, next_epoch, world_size, rng_states."""
    from config import Config
    from missrec import MISSRec
    from tools import inspect_checkpoint
    from trainer import atomic_save
    cfg = Config(dataset='FHCKM_mm_full', overrides={'train_stage': 'pretrain', 'hidden_size': 16,
                                                     'inner_size': 16, 'plm_size': 8, 'img_size': 8})
    model = MISSRec(cfg, 10)
    path = str(tmp_path / 'MISSRec-FHCKM_mm_full-10.pth')
    atomic_save({'config': cfg.to_dict(), 'epoch': 9, 'next_epoch': 10, 'world_size': 2,
                 'state_dict': model.state_dict(), 'optimizer': {'state': {}, 'param_groups': [{'lr': 1e-3}]},
                 'rng_states': {'torch': torch.get_rng_state()}}, path)
    assert inspect_checkpoint.main([path]) == 0
    out = capsys.readouterr().out
    assert 'epoch: 9' in out and 'next_epoch: 10' in out and 'world_size: 2' in out
    assert re.search(r'\n  train_stage += pretrain\n', out) and 'other entries: optimizer, rng_states' in out
    n = sum(v.numel() for v in model.state_dict().values())
    assert f'parameters: {n:,} values' in out and 'buffers 0)' in out
