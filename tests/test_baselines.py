"""Baselines in MISSRec's harness (quick_start -m SASRec | Pop | TextSim): same data, evaluator, early stopping,
log lines."""
import math
import os
import re

import numpy as np
import pytest
import torch

from quick_start import build_config, finetune, parse_args
from sasrec import TextSim
from tools.make_demo_data import _inter_bytes, split_rows


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
    """-m SASRec reads props/SASRec.yaml, and its run says so: the log and the checkpoint are named after
    SASRec, the log's config and model are SASRec's, and so is the checkpoint's stored config."""
    config, out, log = run(demo, tmp_path, 'SASRec', '--epochs=1', '-note', 'base')
    assert (config['model'], config['hidden_size'], config['n_heads'], config['modal_type']) == ('SASRec', 64, 2, 'none')
    assert (config['train_batch_size'], config['learning_rate'], config['stopping_step']) == (512, 0.001, 10)
    run_id = out['run_id']
    assert os.path.basename(out['log']) == f'SASRec-Demo-base-transductive_ft-{run_id}.log'
    assert os.path.basename(out['checkpoint']) == f'SASRec-{run_id}.pth'
    assert f'run id: {run_id}' in log
    for line in ('model = SASRec', 'hidden_size = 64', 'n_heads = 2', 'modal_type = none'):
        assert f'\n{line}\n' in log, line
    assert re.search(r'INFO  SASRec\(\n', log) and 'MISSRec(' not in log and 'Discovering' not in log
    assert torch.load(out['checkpoint'], weights_only=True)['config']['model'] == 'SASRec'


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
    with pytest.raises(ConfigError, match='TextSim: a training-free text baseline; it takes no -p'):
        run(demo, tmp_path, 'TextSim', '-p', 'pretrained.pth', '--plm_size=32')


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


# ------------------------------------------------------------------ TextSim
def test_textsim_scores_by_hand():
    """Items 1 (1, 0), 2 (0, 1), 3 (3, 4). History [1, 2], decay 0.5: query 0.5 * (1, 0) + (0, 1); the
    history's items score -inf. History [3]: the cosine to item 3 alone."""
    table = torch.tensor([[0., 0.], [1., 0.], [0., 1.], [3., 4.]])
    batch = {'item_seq': torch.tensor([[1, 2], [3, 0]]), 'item_seq_len': torch.tensor([2, 1]),
             'item_id': torch.tensor([3, 2])}
    scores = TextSim(table, 0.5).full_sort_predict(batch)
    inf = -float('inf')
    assert scores[0, 1:].tolist() == pytest.approx([inf, inf, (0.5 * 3 + 4) / (math.sqrt(1.25) * 5)])
    assert scores[1, 1:].tolist() == pytest.approx([3 / 5, 4 / 5, inf])
    assert TextSim(table, 0).full_sort_predict(batch)[0, 3] == pytest.approx(4 / 5)      # the last item alone


def test_textsim_props_and_log(demo, tmp_path, pop):
    config, out, log = run(demo, tmp_path, 'TextSim', '--plm_size=32')
    assert (config['modal_type'], config['plm_suffix'], config['textsim_decay']) == ('text', 'feat1CLS', 0.5)
    assert os.path.basename(out['log']).startswith('TextSim-Demo-')
    assert out['checkpoint'] is None and 'epoch 0 training' not in log and 'Discovering' not in log
    for line in ('best valid : OrderedDict', 'test result: OrderedDict', 'best valid (original top-K+1) : OrderedDict',
                 'test result (original top-K+1): OrderedDict', 'test result (exact top-K): OrderedDict'):
        assert line in log
    # Demo's users mostly stay in the interest of their last item, whose items have close texts
    assert out['test'][0]['ndcg@10'] > pop[1]['test'][0]['ndcg@10']


def test_textsim_ranks_the_text_nearest_item_first(tmp_path):
    """20 items on an arc of 2-d text features with shrinking gaps; every user walks up the arc: the
    next item is the nearest one outside the history, so TextSim with decay 0 ranks every target first."""
    folder = tmp_path / 'Chain'
    folder.mkdir()
    angles = np.cumsum([0.0] + [0.1 * 0.97 ** i for i in range(19)])
    np.stack([np.cos(angles), np.sin(angles)], 1).astype('<f4').tofile(folder / 'Chain.feat1CLS')
    seqs = [list(range(s, s + 6 + s % 3)) for s in range(12)]
    for split, rows in zip(('train', 'valid', 'test'), split_rows([str(u) for u in range(12)], seqs)):
        (folder / f'Chain.{split}.inter').write_bytes(_inter_bytes(rows))
    args = ['-d', 'Chain', '-m', 'TextSim', f'--data_path={tmp_path}', f'--log_dir={tmp_path}/log',
            '--show_progress=False', '--use_gpu=False', '--plm_size=2', '--textsim_decay=0', '--topk=[1,10]']
    out = finetune(build_config('finetune', *parse_args('finetune', args)))
    for res in (out['best_valid'][0], out['test'][0]):
        assert res['hit@1'] == 1.0 and res['ndcg@1'] == 1.0
