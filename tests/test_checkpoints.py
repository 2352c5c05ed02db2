"""checkpoints.py and original_pickle.py: original-code checkpoints open without recbole and without running
pickled code; our one format is written and resumed from; pre-trained weights load into a fine-tuning model."""
import collections
import io
import os
import pickle
import random
import re
import sys

import numpy as np
import pytest
import torch
import yaml

import checkpoints
import original_pickle
from checkpoints import (CheckpointError, UnsafeCheckpointError, atomic_save, load_checkpoint, load_pretrained,
                         resume_from, save_checkpoint, state_dict_of)
from config import Config
from missrec import MISSRec
from original_pickle import UnsafePickleError

@pytest.fixture
def original_checkpoint(tmp_path, fake_recbole):
    """A .pth shaped like the original code's: a pickled recbole Config, enums, device, numpy scalars."""
    install, remove = fake_recbole
    Config, ModelType, InputType = install()
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
        remove()
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


def test_config_without_final_dict_gives_its_recorded_state(tmp_path, fake_recbole):
    install, remove = fake_recbole
    Config_, ModelType, _ = install()
    try:
        c = Config_.__new__(Config_)
        c.seed = 3
        c.kind = ModelType.GENERAL
        torch.save({'config': c, 'state_dict': {}}, tmp_path / 'c.pth')
    finally:
        remove()
    assert load_checkpoint(tmp_path / 'c.pth')['config'] == {'seed': 3, 'kind': 'ModelType.GENERAL'}


def test_our_checkpoint_loads_with_weights_only(tmp_path):
    state = {'position_embedding.weight': torch.randn(50, 8)}
    atomic_save({'config': {'dataset': 'Demo', 'hidden_size': 8}, 'epoch': 2, 'state_dict': state},
                str(tmp_path / 'o.pth'))
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
    ref = original_pickle.GlobalRef('missrec', 'MISSRec')
    with pytest.raises(UnsafePickleError):
        ref()
    up = original_pickle.RestrictedUnpickler
    for module, name in [('builtins', 'eval'), ('subprocess', 'Popen'), ('torch', 'load'),
                         ('recbole.trainer', 'Trainer')]:
        with pytest.raises(UnsafePickleError, match=f'{module}.{name}'):
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


def test_load_pretrained_reads_original_checkpoints(tmp_path, fake_recbole):
    """load_pretrained (-p) goes through load_checkpoint, so original pre-trained files load."""
    install, remove = fake_recbole
    cfg = Config(overrides={'train_stage': 'pretrain', 'hidden_size': 16, 'inner_size': 16,
                            'plm_size': 8, 'img_size': 8})
    torch.manual_seed(0)
    source = MISSRec(cfg, 10)
    Config_, ModelType, _ = install()
    try:
        path = tmp_path / 'MISSRec-FHCKM_mm_full-100.pth'
        torch.save({'config': Config_({'dataset': 'FHCKM_mm_full', 'MODEL_TYPE': ModelType.SEQUENTIAL}),
                    'epoch': 99, 'state_dict': source.state_dict(), 'optimizer': {}}, path)
    finally:
        remove()
    torch.manual_seed(1)
    target = MISSRec(cfg, 10)
    load_pretrained(target, str(path), freeze=True)
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    assert not any(p.requires_grad for p in target.trm_model.parameters())


def test_state_cannot_be_set_on_classes():
    """BUILD on an allowed class (monkey-patching it) is refused; on plain objects it works."""
    patch = b'\x80\x02ccollections\nOrderedDict\n}X\x01\x00\x00\x00aK\x01sb.'
    with pytest.raises(UnsafePickleError, match='refusing to set the state'):
        original_pickle.restricted_pickle.loads(patch)
    assert not hasattr(collections.OrderedDict, 'a')
    ok = pickle.dumps({'s': {1, 2}, 'b': bytearray(b'x'), 'o': collections.OrderedDict(a=1),
                       'd': torch.device('cpu'), 'x': np.float32(2.5), 'arr': np.arange(3)}, protocol=2)
    out = original_pickle.restricted_pickle.loads(ok)
    assert out['s'] == {1, 2} and out['o'] == {'a': 1} and out['x'] == np.float32(2.5)
    assert out['arr'].tolist() == [0, 1, 2]


def test_legacy_torch_format(tmp_path, fake_recbole):
    install, remove = fake_recbole
    Config_, ModelType, _ = install()
    try:
        sd = collections.OrderedDict([('w', torch.randn(3, 2)), ('b', torch.arange(4))])
        path = tmp_path / 'legacy.pth'
        torch.save({'config': Config_({'dataset': 'X', 'MODEL_TYPE': ModelType.SEQUENTIAL}), 'state_dict': sd},
                   path, _use_new_zipfile_serialization=False)
    finally:
        remove()
    ckpt = load_checkpoint(path)
    assert ckpt['config'] == {'dataset': 'X', 'MODEL_TYPE': 'ModelType.SEQUENTIAL'}
    assert all(torch.equal(ckpt['state_dict'][k], v) for k, v in sd.items())


def test_inspect_checkpoint_on_a_pretraining_checkpoint(tmp_path, capsys):
    """The one format, as pre-training writes it (no early-stopping state)."""
    from tools import inspect_checkpoint
    cfg = Config(dataset='FHCKM_mm_full', overrides={'train_stage': 'pretrain', 'hidden_size': 16,
                                                     'inner_size': 16, 'plm_size': 8, 'img_size': 8})
    model = MISSRec(cfg, 10)
    path = str(tmp_path / 'MISSRec-FHCKM_mm_full-10.pth')
    save_checkpoint(path, cfg, 9, model, torch.optim.Adam(model.parameters()))
    assert inspect_checkpoint.main([path]) == 0
    out = capsys.readouterr().out
    assert 'epoch: 9' in out
    assert re.search(r'\n  train_stage += pretrain\n', out) and 'other entries: optimizer, rng_states' in out
    n = sum(v.numel() for v in model.state_dict().values())
    assert f'parameters: {n:,} values' in out and 'buffers 0)' in out


def test_inspect_checkpoint_on_a_finetuned_checkpoint(finetuned, capsys):
    from tools import inspect_checkpoint
    assert inspect_checkpoint.main([finetuned['checkpoint'], '--keys']) == 0
    out = capsys.readouterr().out
    assert 'written by: this project' in out and 'epoch: 0' in out
    assert re.search(r'\n  dataset += Demo\n', out) and re.search(r'\n  hidden_size += 32\n', out)
    assert 'interests: ' in out and 'item rows (incl. PAD): ' in out
    assert 'interest_embeddings' in out and 'text_adaptor.weight' in out and '[32, 32]' in out
    ckpt = torch.load(finetuned['checkpoint'], weights_only=True)
    total = sum(v.numel() for v in ckpt['state_dict'].values())
    assert f'parameters: {total:,} values in {len(ckpt["state_dict"])} tensors' in out


# ------------------------------------------------------------------ our format
def tiny_model(seed, **overrides):
    torch.manual_seed(seed)
    cfg = Config(dataset='Demo', overrides={'train_stage': 'pretrain', 'hidden_size': 16, 'inner_size': 16,
                                            'n_heads': 2, 'plm_size': 8, 'img_size': 8, **overrides})
    model = MISSRec(cfg, 10)
    return cfg, model, torch.optim.Adam(model.parameters(), lr=0.1)


def test_a_checkpoint_resumes_model_optimizer_random_states_and_extra_state(tmp_path):
    cfg, model, opt = tiny_model(0)
    model.text_adaptor(torch.randn(3, 8)).sum().backward()
    opt.step()                                                   # optimizer state to restore
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    path = tmp_path / 'c.pth'
    save_checkpoint(path, cfg, 4, model, opt, cur_step=2, best_valid_score=0.5)
    after = (random.random(), float(np.random.rand()), torch.rand(3))   # what the run draws next
    assert not [p for p in os.listdir(tmp_path) if p != 'c.pth']  # the temporary file is gone

    _, other, other_opt = tiny_model(1)
    ckpt = resume_from(path, other, other_opt, 'a test checkpoint')
    assert ckpt['epoch'] == 4 and ckpt['cur_step'] == 2 and ckpt['best_valid_score'] == 0.5
    assert ckpt['config']['hidden_size'] == 16 and len(ckpt['rng_states']) == 1
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    moments = opt.state_dict()['state']
    assert moments and all(torch.equal(other_opt.state_dict()['state'][i]['exp_avg'], m['exp_avg'])
                           for i, m in moments.items())
    assert (random.random(), float(np.random.rand())) == after[:2] and torch.equal(torch.rand(3), after[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_resuming_on_a_gpu_keeps_adam_step_counters_on_the_host(tmp_path):
    """Read on the CPU: the moments go to the parameters' GPU, the step counters stay on the host
    (on the GPU, Adam would read each of them back every step)."""
    cfg, model, opt = tiny_model(0)
    model.text_adaptor(torch.randn(3, 8)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / 'c.pth', cfg, 0, model, opt)
    _, other, _ = tiny_model(1)
    other = other.cuda()
    other_opt = torch.optim.Adam(other.parameters(), lr=0.1)
    resume_from(tmp_path / 'c.pth', other, other_opt, 'a test checkpoint')
    state = list(other_opt.state.values())
    assert state and all(s['step'].device.type == 'cpu' and s['exp_avg'].is_cuda for s in state)


def test_resuming_from_what_is_no_checkpoint_of_the_stage_is_named(tmp_path):
    cfg, model, opt = tiny_model(0)
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'weights.pth')
    with pytest.raises(CheckpointError, match=r'weights\.pth: not a checkpoint to resume from \(expected X\)'):
        resume_from(tmp_path / 'weights.pth', model, opt, 'X')
    save_checkpoint(tmp_path / 'pre.pth', cfg, 0, model, opt)
    with pytest.raises(CheckpointError, match='expected a fine-tuning one'):
        resume_from(tmp_path / 'pre.pth', model, opt, 'a fine-tuning one',
                    required=('best_model_file',))


def test_random_states_of_another_number_of_processes_are_not_restored(tmp_path, caplog):
    cfg, model, opt = tiny_model(0)
    save_checkpoint(tmp_path / 'c.pth', cfg, 0, model, opt)
    ckpt = torch.load(tmp_path / 'c.pth', weights_only=True)
    ckpt['rng_states'] = ckpt['rng_states'] * 2                   # as if written by 2 processes
    torch.save(ckpt, tmp_path / 'two.pth')
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    with caplog.at_level('WARNING'):
        resume_from(tmp_path / 'two.pth', model, opt, 'X')
    assert torch.equal(torch.rand(2), expected)                   # this process's stream kept
    assert 'written by 2 processes, now 1: random states not restored' in caplog.text


def test_cuda_random_states_of_another_gpu_count_restore_what_fits(monkeypatch, caplog):
    """A checkpoint written where 3 GPUs were visible, resumed with 1: the first state is
    restored, as a CPU tensor, and one warning says so (set_rng_state_all raised IndexError)."""
    calls = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state, device: calls.append((state, device)))
    monkeypatch.setattr(checkpoints, '_WARNED_GPU_COUNT', False)
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(3)]
    monkeypatch.setattr(torch.cuda, 'get_rng_state_all', lambda: saved)
    state = checkpoints.rng_state()
    caplog.set_level('WARNING')
    checkpoints.set_rng_state(state)
    checkpoints.set_rng_state(state)
    assert [(int(s[0]), d) for s, d in calls] == [(0, 0), (0, 0)] and all(s.device.type == 'cpu' for s, _ in calls)
    warnings = [r.message for r in caplog.records if 'random states of 3 GPUs' in r.message]
    assert warnings == ['the checkpoint holds the random states of 3 GPUs, 1 visible now: restoring 1']


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_random_states_restore_after_a_cuda_map_location(tmp_path):
    """--resume on a GPU loads with map_location=cuda, which moves the saved generator states there."""
    torch.save({'rng': checkpoints.rng_state()}, tmp_path / 'state.pth')
    state = torch.load(tmp_path / 'state.pth', map_location='cuda', weights_only=True)['rng']
    assert state['cuda'][0].is_cuda
    checkpoints.set_rng_state(state)
    a = torch.rand(5, device='cuda')
    checkpoints.set_rng_state(state)
    assert torch.equal(a, torch.rand(5, device='cuda'))


# ------------------------------------------------------------- pre-trained
def test_scientific_sized_frozen_model_has_1624201_trainable_parameters(tmp_path):
    n_items = 4386
    pretrain = MISSRec(Config(overrides={'train_stage': 'pretrain'}), n_items)
    path = tmp_path / 'pt.pth'
    torch.save({'state_dict': pretrain.state_dict()}, path)
    plm = torch.randn(n_items, 512)
    model = MISSRec(Config(), n_items, plm, plm.clone())
    load_pretrained(model, str(path), freeze=True)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1_624_201
    assert torch.equal(model.trm_model.encoder.layers[0].linear1.weight,
                       pretrain.trm_model.encoder.layers[0].linear1.weight)
    unfrozen = MISSRec(Config(), n_items, plm, plm.clone())
    load_pretrained(unfrozen, str(path), freeze=False)               # finetune.py -p ... --no-freeze
    assert all(p.requires_grad for n, p in unfrozen.named_parameters() if 'plm_embedding' not in n
               and 'img_embedding' not in n)
    # the original's log of run01 on Scientific_mm_full: "Trainable parameters: 3035313.0"
    assert sum(p.numel() for p in unfrozen.parameters() if p.requires_grad) == 3_035_313


def test_interest_tables_of_the_pretrained_checkpoint_are_not_loaded(tmp_path):
    """The pre-training model holds its interest tables (its own items, interest_ratio 0.02) but does
    not save them; a checkpoint that holds tables of other sizes still loads, without them."""
    cfg = dict(hidden_size=16, inner_size=16, n_heads=2, plm_size=8, img_size=8)
    source = MISSRec(Config(overrides={'train_stage': 'pretrain', 'interest_ratio': 0.02, **cfg}), 40)
    assert source.interest_embeddings.shape == (3, 16) and 'interest_embeddings' not in source.state_dict()
    state = dict(source.state_dict(), interest_embeddings=torch.ones(3, 16),
                 plm_interest_lookup_table=torch.ones(40, dtype=torch.long))
    torch.save({'state_dict': state}, tmp_path / 'pt.pth')
    table = torch.randn(12, 8)
    target = MISSRec(Config(overrides=cfg), 12, table, table.clone())
    assert target.interest_embeddings.shape == (12, 16)              # ceil(2 * 11 * 0.5) + 1
    lines = load_pretrained(target, str(tmp_path / 'pt.pth'), freeze=True)
    assert not target.interest_embeddings.any() and not target.plm_interest_lookup_table.any()
    assert torch.equal(target.text_adaptor.weight, source.text_adaptor.weight)
    assert lines[-1] == ("interest tables of the checkpoint (rebuilt by interest discovery): "
                         "['interest_embeddings', 'plm_interest_lookup_table']")


# --- original checkpoints pickled by other Pythons: Enum members by value or by name (getattr)
# ModelType.SEQUENTIAL as Debian 12's Python 3.11.2 pickles it (pickle.dumps, protocols 2 and 4); Python
# 3.10 and earlier, 3.11.7 and 3.12 write `ModelType(2)` instead
PY3112_SEQUENTIAL = {
    2: b'\x80\x02c__builtin__\ngetattr\nq\x00crecbole.utils.enum_type\nModelType\nq\x01X\n\x00\x00\x00SEQUENTIAL'
       b'q\x02\x86q\x03Rq\x04.',
    4: b'\x80\x04\x95Q\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x07getattr\x94\x93\x94\x8c\x17'
       b'recbole.utils.enum_type\x94\x8c\tModelType\x94\x93\x94\x8c\nSEQUENTIAL\x94\x86\x94R\x94.',
}
BY_VALUE_SEQUENTIAL = {2: b'\x80\x02crecbole.utils.enum_type\nModelType\nq\x00K\x02\x85q\x01Rq\x02.'}


def _by_name(self, proto):                   # Enum.__reduce_ex__ of Python 3.11.0 .. 3.11.2 (at least)
    return getattr, (self.__class__, self._name_)


def _by_value(self, proto):                  # Enum.__reduce_ex__ of Python <= 3.10, 3.11.7, 3.12
    return self.__class__, (self._value_,)


@pytest.mark.filterwarnings('ignore:Detected pickle protocol')
@pytest.mark.parametrize('protocol', [2, 4])
@pytest.mark.parametrize('python', ['3.10 / 3.11.7 / 3.12 (by value)', '3.11.2 (by name)'])
def test_original_checkpoints_pickled_by_other_pythons_open(tmp_path, fake_recbole, python, protocol):
    """An original checkpoint as each Python writes it: Enum members (by value or, as early 3.11 releases
    do, by name through builtins.getattr) and the other standard types of the original's checkpoints."""
    import enum
    install, remove = fake_recbole
    Config_, ModelType, InputType = install()
    try:
        EvaluatorType = enum.Enum('EvaluatorType', [('RANKING', 1), ('VALUE', 2)],
                                  module='recbole.utils.enum_type')
        sys.modules['recbole.utils.enum_type'].EvaluatorType = EvaluatorType
        reduce = _by_name if 'by name' in python else _by_value
        for cls in (ModelType, InputType, EvaluatorType):
            cls.__reduce_ex__ = reduce
        expected = (PY3112_SEQUENTIAL if 'by name' in python else BY_VALUE_SEQUENTIAL).get(protocol)
        if expected:                         # the emulation writes exactly what that Python writes
            assert pickle.dumps(ModelType.SEQUENTIAL, protocol=protocol) == expected
        import missrec
        state = collections.OrderedDict([('w', torch.randn(3, 2)), ('b', torch.arange(4))])
        final = {'dataset': 'Scientific_mm_full', 'model': 'MISSRec', 'seed': 2020, 'reproducibility': True,
                 'learning_rate': 0.001, 'topk': [10, 50], 'metrics': ['Recall', 'NDCG'],
                 'valid_metric': 'NDCG@10',
                 'eval_args': {'split': {'RS': [0.8, 0.1, 0.1]}, 'order': 'TO', 'mode': 'full'},
                 'MODEL_TYPE': ModelType.SEQUENTIAL, 'MODEL_INPUT_TYPE': InputType.POINTWISE,
                 'eval_type': EvaluatorType.RANKING, 'kinds': [ModelType.SEQUENTIAL, ModelType.GENERAL],
                 'device': torch.device('cpu'), 'gpu_device': torch.device('cuda', 0),
                 'interest_ratio': np.float64(0.5), 'n_items': np.int64(5), 'ids': np.arange(3),
                 'weights': collections.OrderedDict(a=1), 'tags': {'x', 'y'}, 'pair': (1, 'a'),
                 'raw': b'\x00\xffbytes', 'buf': bytearray(b'ab'), 'z': complex(1, 2), 'inf': float('inf'),
                 'none': None, 'user_inter_num_interval': '[0,inf)'}
        config = Config_(final)
        config.model_class = missrec.MISSRec
        config.yaml_loader = yaml.FullLoader
        path = tmp_path / 'MISSRec-Scientific.pth'
        torch.save({'config': config, 'epoch': 7, 'cur_step': 2, 'best_valid_score': np.float64(0.0671),
                    'best_valid_result': collections.OrderedDict([('ndcg@10', np.float64(0.0671))]),
                    'state_dict': state, 'other_parameter': None,
                    'optimizer': {'state': {}, 'param_groups': [{'lr': 0.001, 'params': [0, 1]}]}},
                   path, pickle_protocol=protocol)
    finally:
        remove()
    ckpt = load_checkpoint(path)
    assert 'recbole' not in sys.modules
    cfg = ckpt['config']
    assert cfg['MODEL_TYPE'] == 'ModelType.SEQUENTIAL' and cfg['MODEL_INPUT_TYPE'] == 'InputType.POINTWISE'
    assert cfg['eval_type'] == 'EvaluatorType.RANKING'
    assert cfg['kinds'] == ['ModelType.SEQUENTIAL', 'ModelType.GENERAL']
    assert cfg['device'] == torch.device('cpu') and cfg['gpu_device'] == torch.device('cuda', 0)
    assert float(cfg['interest_ratio']) == 0.5 and int(cfg['n_items']) == 5 and cfg['ids'].tolist() == [0, 1, 2]
    assert cfg['weights'] == {'a': 1} and cfg['tags'] == {'x', 'y'} and cfg['pair'] == (1, 'a')
    assert cfg['raw'] == b'\x00\xffbytes' and cfg['buf'] == bytearray(b'ab') and cfg['z'] == complex(1, 2)
    assert cfg['inf'] == float('inf') and cfg['none'] is None and cfg['reproducibility'] is True
    assert cfg['eval_args'] == final['eval_args'] and cfg['topk'] == [10, 50] and cfg['seed'] == 2020
    assert ckpt['epoch'] == 7 and float(ckpt['best_valid_result']['ndcg@10']) == pytest.approx(0.0671)
    assert all(torch.equal(ckpt['state_dict'][k], v) for k, v in state.items())


@pytest.mark.parametrize('protocol', [2, 4])
def test_enum_members_pickled_by_name_equal_those_pickled_by_value(protocol):
    by_name = original_pickle.restricted_pickle.loads(PY3112_SEQUENTIAL[protocol])
    by_value = original_pickle.restricted_pickle.loads(BY_VALUE_SEQUENTIAL[2])
    assert isinstance(by_name, original_pickle.EnumStandIn)
    assert by_name == by_value and (by_name.name, by_name.value) == ('SEQUENTIAL', 2)
    assert str(by_name) == 'ModelType.SEQUENTIAL'
    # a member the table does not know (a later RecBole) keeps its name
    newer = PY3112_SEQUENTIAL[2].replace(b'X\n\x00\x00\x00SEQUENTIAL', b'X\x05\x00\x00\x00NEWER')
    assert str(original_pickle.restricted_pickle.loads(newer)) == 'ModelType.NEWER'


def _u(text):
    data = text.encode()
    return b'X' + len(data).to_bytes(4, 'little') + data


class _GetattrOnAnAllowedClass:
    def __reduce__(self):
        return getattr, (collections.OrderedDict, 'fromkeys')


@pytest.mark.parametrize('target, args', [
    (b'ccollections\nOrderedDict\n', _u('fromkeys') + b'\x86'),            # an allowed non-enum class
    (b'ctorch\ndevice\n', _u('__init__') + b'\x86'),
    (b'cmissrec\nMISSRec\n', _u('from_pretrained') + b'\x86'),             # a reference-only class
    (b'crecbole.config.configurator\nConfig\n', _u('x') + b'\x86'),        # the recorded Config
    (b'crecbole.utils.enum_type\nModelType\n', _u('__class__') + b'\x86'),   # private / dunder names
    (b'crecbole.utils.enum_type\nModelType\n', _u('_from_name') + b'\x86'),
    (b'crecbole.utils.enum_type\nModelType\n', b'K\x02\x86'),               # not a str
    (b'crecbole.utils.enum_type\nModelType\n', _u('GENERAL') + _u('GENERAL') + b'\x87'),   # a default
    (b'crecbole.utils.enum_type\nModelType\n', b'\x85'),                    # one argument
    (_u('ModelType'), _u('GENERAL') + b'\x86'),                              # a str, not the class
])
def test_getattr_on_anything_else_is_refused(target, args):
    data = b'\x80\x02c__builtin__\ngetattr\n' + target + args + b'R.'
    with pytest.raises(UnsafePickleError, match="refusing to load global 'builtins.getattr'"):
        original_pickle.restricted_pickle.loads(data)
    assert not hasattr(collections.OrderedDict, 'GENERAL')


def test_a_checkpoint_with_getattr_on_anything_else_is_refused_in_one_line(tmp_path):
    path = tmp_path / 'getattr.pth'
    torch.save({'config': {}, 'payload': _GetattrOnAnAllowedClass()}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: refusing to load global 'builtins.getattr'") and '\n' not in msg
    assert 'collections.OrderedDict' in msg and "'fromkeys'" in msg
