"""End to end on generated demo data: finetune.py learns and beats most-popular."""
import re

import pytest

import finetune
from tools.make_demo_data import write_downstream


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    write_downstream(root, name='Demo', n_users=400, n_items=120, seed=7)
    return root


def run(demo, tmp_path, *extra):
    args = ['-d', 'Demo', f'--data_path={demo}', f'--checkpoint_dir={tmp_path}/saved',
            f'--log_dir={tmp_path}/log', '--show_progress=False', '--hidden_size=64', '--inner_size=64',
            '--epochs=6', '--stopping_step=2', *extra]
    args, rest = finetune.parse_args(args)
    return finetune.run(finetune.build_config(args, rest))


def test_finetune_learns_and_beats_most_popular(demo, tmp_path):
    out = run(demo, tmp_path)
    log = open(out['log']).read()
    losses = [float(x) for x in re.findall(r'epoch \d+ training \[time: [\d.]+s, train loss: ([\d.]+)\]', log)]
    assert len(losses) >= 3 and losses[-1] < losses[0]
    assert out['test'][0]['ndcg@10'] > 1.5 * out['popularity']['ndcg@10']
    # SPEC 5 log lines
    assert re.search(r'epoch 0 evaluating \[time: [\d.]+s, valid_score: 0\.\d{6}\]', log)
    assert re.search(r'valid result: \nhit@10 : [\d.]+    hit@50 : [\d.]+    ndcg@10 : [\d.]+    ndcg@50 : [\d.]+', log)
    assert re.search(r"best valid : OrderedDict\(\[\('hit@10', [\d.]+\), \('hit@50'", log)
    assert re.search(r"test result: OrderedDict\(\[\('hit@10', [\d.]+\)", log)
    assert 'test result (original top-K+1): OrderedDict' in log
    assert out['test'][1]['hit@10'] >= out['test'][0]['hit@10']


def test_inductive_lloyd_and_contextual_variants_run(demo, tmp_path):
    out = run(demo, tmp_path, '-mode', 'inductive', '--kmeans_mode=lloyd', '--seq_mm_fusion=contextual',
              '--epochs=2')
    assert out['test'][0]['ndcg@10'] > 0
    assert 'interests used' in open(out['log']).read()
