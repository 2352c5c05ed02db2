"""Baselines in MISSRec's harness (quick_start -m SASRec | Pop): same data, evaluator, early stopping, log lines."""
import os
import re

import pytest

from quick_start import build_config, finetune, parse_args


def run(demo, tmp_path, model, *extra):
    args = ['-d', 'Demo', '-m', model, f'--data_path={demo}', f'--checkpoint_dir={tmp_path}/saved',
            f'--log_dir={tmp_path}/log', '--show_progress=False', '--use_gpu=False', *extra]
    config = build_config('finetune', *parse_args('finetune', args))
    out = finetune(config)
    return config, out, open(out['log']).read()


@pytest.fixture(scope='module')
def pop(demo, tmp_path_factory):
    return run(demo, tmp_path_factory.mktemp('pop'), 'Pop')


def test_sasrec_props_and_log_name(demo, tmp_path):
    config = build_config('finetune', *parse_args('finetune', ['-d', 'Demo', '-m', 'SASRec', '--epochs=3']))
    assert (config['model'], config['hidden_size'], config['n_heads'], config['modal_type']) == ('SASRec', 64, 2, 'none')
    assert (config['train_batch_size'], config['learning_rate'], config['stopping_step']) == (512, 0.001, 10)


def test_sasrec_beats_pop_on_demo_data(demo, tmp_path, pop):
    config, out, log = run(demo, tmp_path, 'SASRec', '--epochs=15', '--stopping_step=3')
    assert os.path.basename(out['log']).startswith('SASRec-Demo-')
    assert os.path.basename(out['checkpoint']).startswith('SASRec-')
    assert 'Discovering' not in log
    losses = [float(x) for x in re.findall(r'epoch \d+ training \[time: [\d.]+s, train loss: ([\d.]+)\]', log)]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    assert re.search(r'epoch 0 evaluating \[time: [\d.]+s, valid_score: 0\.\d{6}\]', log)
    assert 'test result (original top-K+1): OrderedDict' in log
    assert out['test'][0]['ndcg@10'] > pop[1]['test'][0]['ndcg@10']
    assert out['test'][0]['hit@10'] > pop[1]['test'][0]['hit@10']


def test_pop_equals_the_most_popular_line(pop):
    config, out, log = pop
    assert os.path.basename(out['log']).startswith('Pop-Demo-')
    assert out['checkpoint'] is None and 'epoch 0 training' not in log
    assert out['test'][0] == out['popularity']
    line = re.search(r'most-popular baseline, test: (OrderedDict.*)', log).group(1)
    assert re.search(r'test result: (OrderedDict.*)', log).group(1) == line
    assert 'best valid (original top-K+1) : OrderedDict' in log


def test_baselines_refuse_inductive_and_pretrained(demo, tmp_path):
    from config import ConfigError
    with pytest.raises(ConfigError, match='ID-based baseline'):
        run(demo, tmp_path, 'SASRec', '-mode', 'inductive')


@pytest.mark.parametrize('model', ['SASRec', 'Pop'])
def test_two_cpu_processes(demo, tmp_path, model):
    """DDP (gloo): SASRec uses every parameter (no unused-parameter search); Pop trains nothing."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, 'ddp_finetune.py', '--nproc', '2', '-m', model, '-d', 'Demo', f'--data_path={demo}',
           '--use_gpu=False', f'--checkpoint_dir={tmp_path}/saved', f'--log_dir={tmp_path}/log',
           '--show_progress=False', '--epochs=2']
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'processes: 2' in proc.stdout
    assert proc.stdout.count('epoch 1 training [time:') == (model == 'SASRec')
    test = re.search(r'test result: (OrderedDict.*)', proc.stdout).group(1)
    if model == 'Pop':
        assert test == re.search(r'most-popular baseline, test: (OrderedDict.*)', proc.stdout).group(1)
