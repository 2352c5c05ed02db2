"""Bad input stops finetune.py (quick_start.main) before anything is written, with one line that
names the file (row or key) and what was expected."""
import os

import numpy as np
import pytest
import torch

import quick_start
from config import Config
from missrec import MISSRec

DIM = 32


@pytest.fixture
def data(tmp_path, demo):
    """A fresh copy of the demo dataset that a case may damage."""
    folder = tmp_path / 'data' / 'Demo'
    folder.mkdir(parents=True)
    for f in (demo / 'Demo').iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def run(tmp_path, *args):
    argv = ['-d', 'Demo', f'--data_path={tmp_path}/data', f'--checkpoint_dir={tmp_path}/saved',
            f'--log_dir={tmp_path}/log', '--epochs=1', '--hidden_size=16', '--inner_size=16',
            f'--plm_size={DIM}', f'--img_size={DIM}', '--show_progress=False', '--use_gpu=False', *args]
    return quick_start.main('finetune', argv)


def edit_line(path, n, fn):
    lines = path.read_text().split('\n')
    lines[n] = fn(lines[n])
    path.write_text('\n'.join(lines))


def feat(path, dim=DIM):
    return np.fromfile(path, dtype='<f4').reshape(-1, dim)


def first_token(data):
    return (data / 'Demo.train.inter').read_text().split('\n')[1].split('\t')[2]


CASES = {
    'missing dataset folder': (lambda d: os.rename(d, d.parent / 'Other'), [], 'dataset folder not found'),
    'missing split file': (lambda d: os.remove(d / 'Demo.valid.inter'), [], 'Demo.valid.inter: file not found'),
    'wrong header': (lambda d: edit_line(d / 'Demo.train.inter', 0, lambda s: 'user\titems\titem'), [],
                     'Demo.train.inter: line 1: expected header'),
    'two columns': (lambda d: edit_line(d / 'Demo.test.inter', 2, lambda s: s.rsplit('\t', 1)[0]), [],
                    'Demo.test.inter: line 3: expected 3 tab-separated columns, got 2'),
    'empty history': (lambda d: edit_line(d / 'Demo.train.inter', 1, lambda s: s.split('\t')[0] + '\t\t3'), [],
                      'Demo.train.inter: line 2: empty history'),
    'empty line': (lambda d: edit_line(d / 'Demo.valid.inter', 2, lambda s: ''), [],
                   'Demo.valid.inter: line 3: empty line'),
    'token not an integer': (lambda d: edit_line(d / 'Demo.train.inter', 1, lambda s: s[:-1] + 'x'), [],
                             "is not a non-negative integer"),
    'negative token': (lambda d: edit_line(d / 'Demo.train.inter', 1,
                                           lambda s: s.rsplit('\t', 1)[0] + '\t-3'), [],
                       "Demo.train.inter: line 2: item token '-3' is not a non-negative integer"),
    'token without feature row': (lambda d: edit_line(d / 'Demo.train.inter', 1,
                                                      lambda s: s.rsplit('\t', 1)[0] + '\t999'), [],
                                  'Demo.feat1CLS: item token 999 has no feature row'),
    'missing feature file': (lambda d: os.remove(d / 'Demo.feat3CLS'), [],
                             'Demo.feat3CLS: image feature file not found'),
    'feature size not a multiple': (lambda d: (d / 'Demo.feat1CLS').write_bytes(
        (d / 'Demo.feat1CLS').read_bytes()[:-4]), [], f'is not a multiple of {DIM} float32 columns'),
    'feature width differs from plm_size': (lambda d: None, [f'--plm_size={DIM // 2}'],
                                            'but Demo.item2index lists 60 items; check plm_size'),
    'NaN feature': (lambda d: _poke(d / 'Demo.feat1CLS', np.nan), [], 'holds NaN or infinite values'),
    'infinite feature': (lambda d: _poke(d / 'Demo.feat3CLS', np.inf), [], 'holds NaN or infinite values'),
    'unknown key': (lambda d: None, ['--hiden_size=8'], "unknown config key 'hiden_size'; did you mean 'hidden_size'"),
    'wrong type': (lambda d: None, ['--train_batch_size=big'], "train_batch_size = 'big'; expected a positive integer"),
    'number expected': (lambda d: None, ['--learning_rate=fast'], 'learning_rate = '),
    'train_stage outside its set': (lambda d: None, ['--train_stage=finetune'], 'train_stage'),
    'seq_mm_fusion outside its set': (lambda d: None, ['--seq_mm_fusion=concat'], 'expected one of add, contextual'),
    'item_mm_fusion outside its set': (lambda d: None, ['--item_mm_fusion=max'], 'expected one of static'),
    'modal_type outside its set': (lambda d: None, ['--modal_type=audio'], 'modal_type'),
    'odd n_layers': (lambda d: None, ['--n_layers=3'], 'even integer'),
    'interest_ratio zero': (lambda d: None, ['--interest_ratio=0'], 'interest_ratio = 0; expected a number in (0, 1]'),
    'interest_ratio above one': (lambda d: None, ['--interest_ratio=1.5'], 'expected a number in (0, 1]'),
    'heads do not divide hidden size': (lambda d: None, ['--n_heads=3'], 'not divisible by n_heads'),
    'valid_metric malformed': (lambda d: None, ['--valid_metric=NDCG'], 'expected e.g. NDCG@10'),
    'missing props file': (lambda d: None, ['-props', 'nowhere.yaml'], 'nowhere.yaml: config file not found'),
    'missing pre-trained file': (lambda d: None, ['-p', 'nowhere.pth'], 'nowhere.pth: pre-trained checkpoint not found'),
    'missing resume file': (lambda d: None, ['--resume', 'nowhere-last.pth'], 'checkpoint to resume from not found'),
}


def _poke(path, value):
    x = feat(path)
    x[3, 7] = value
    x.tofile(path)


@pytest.mark.parametrize('name', list(CASES))
def test_bad_input_is_named_and_nothing_is_written(tmp_path, data, capsys, name):
    damage, args, message = CASES[name]
    damage(data)
    assert run(tmp_path, *args) == 2
    err = capsys.readouterr().err.strip().split('\n')
    assert len(err) == 1 and err[0].startswith('error: ') and message in err[0], err
    assert not (tmp_path / 'saved').exists() and not (tmp_path / 'log').exists()


def test_bad_props_yaml(tmp_path, data, capsys):
    bad = tmp_path / 'bad.yaml'
    bad.write_text('hidden_size: [1, 2\n')
    assert run(tmp_path, '-props', str(bad)) == 2
    assert 'bad.yaml: not valid YAML' in capsys.readouterr().err


def test_incompatible_pretrained_checkpoint_names_the_keys(tmp_path, data, capsys):
    other = MISSRec(Config(overrides={'train_stage': 'pretrain', 'hidden_size': 32, 'inner_size': 16}), 10)
    path = tmp_path / 'pt.pth'
    torch.save({'state_dict': other.state_dict()}, path)
    assert run(tmp_path, '-p', str(path)) == 2
    err = capsys.readouterr().err
    assert 'parameter shapes differ from the model' in err and 'position_embedding.weight (50, 32) vs (50, 16)' in err
    assert not (tmp_path / 'saved').exists()


def test_a_file_that_is_no_checkpoint(tmp_path, data, capsys):
    path = tmp_path / 'junk.pth'
    path.write_bytes(b'not a checkpoint')
    assert run(tmp_path, '-p', str(path)) == 2
    assert 'junk.pth' in capsys.readouterr().err


DEMO_DATA = 'python tools/make_demo_data.py --out datasets/downstream --pretrain-out datasets/pretrain'


@pytest.mark.parametrize('stage, what, demo_name', [('pretrain', 'pre-training dataset', 'DemoPT'),
                                                    ('finetune', 'dataset', 'Demo')])
def test_a_missing_dataset_stops_before_any_process_starts(tmp_path, monkeypatch, capsys, stage, what, demo_name):
    import distributed as D

    def no_process(*args, **kwargs):
        raise AssertionError('a process was started')
    monkeypatch.setattr(D, 'spawn', no_process)
    argv = ['--nproc', '2', '--use_gpu=False', f'--data_path={tmp_path}/nowhere',
            f'--checkpoint_dir={tmp_path}/saved', f'--log_dir={tmp_path}/log']
    assert quick_start.main(stage, argv) == 2
    err = capsys.readouterr().err.strip().split('\n')
    dataset = 'FHCKM_mm_full' if stage == 'pretrain' else 'Scientific_mm_full'
    assert len(err) == 1, err
    assert err[0].startswith(f'error: {tmp_path}/nowhere/{dataset}: {what} folder not found'), err
    assert f'make the demo data with `{DEMO_DATA}` and run -d {demo_name}' in err[0]
    assert not (tmp_path / 'saved').exists() and not (tmp_path / 'log').exists()


def test_ddp_pretrain_on_two_processes_without_data_fails_in_one_line(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, 'ddp_pretrain.py', '--nproc', '2', f'--data_path={tmp_path}/nowhere'],
                         cwd=root, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1'))
    assert out.returncode == 2 and out.stderr.count('\n') == 1, out.stderr
    assert out.stderr.startswith(f'error: {tmp_path}/nowhere/FHCKM_mm_full: pre-training dataset folder not found')
    assert DEMO_DATA in out.stderr and 'Traceback' not in out.stderr


def test_a_gpu_command_without_cuda_says_once_how_many_cpu_processes_run(demo_pretrain, monkeypatch, capsys):
    import distributed as D
    monkeypatch.setattr(D, 'visible_gpus', lambda use_gpu=True: 0)
    launched = []

    def launch(entry, nproc, *args):      # what was printed when the processes would start
        launched.append((nproc, capsys.readouterr().err))
        return 0
    monkeypatch.setattr(D, 'launch', launch)
    data = ['-d', 'DemoPT', f'--data_path={demo_pretrain}']
    assert quick_start.main('pretrain', ['--nproc', '2', *data]) == 0
    assert quick_start.main('pretrain', data, nproc=0) == 0                    # ddp_pretrain.py's default
    assert quick_start.main('pretrain', ['--use_gpu=False', '--nproc', '2', *data]) == 0
    assert launched == [(2, 'no CUDA device found: running on the CPU, 2 processes\n'),
                        (1, 'no CUDA device found: running on the CPU, 1 process\n'), (2, '')]
    for rank, expected in (('0', 'no CUDA device found: running on the CPU, 3 processes\n'), ('2', '')):
        monkeypatch.setenv('RANK', rank)                                       # under torchrun: rank 0 says it
        monkeypatch.setenv('LOCAL_RANK', rank)
        monkeypatch.setenv('WORLD_SIZE', '3')
        assert quick_start.main('pretrain', data) == 0
        assert launched[-1] == (1, expected)
