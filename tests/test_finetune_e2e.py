"""End to end on generated demo data: fine-tuning (quick_start.finetune, what finetune.py runs)
learns, beats most-popular, and logs what the original logs."""
import re

import pytest

from quick_start import build_config, finetune, parse_args


@pytest.fixture(scope='module')
def demo_large(make_demo):
    return make_demo(name='Demo', n_users=400, n_items=120, seed=7)[0]


def run(data, tmp_path, *extra):
    args = ['-d', 'Demo', f'--data_path={data}', f'--checkpoint_dir={tmp_path}/saved',
            f'--log_dir={tmp_path}/log', '--show_progress=False', '--hidden_size=64', '--inner_size=64',
            '--epochs=6', '--stopping_step=2', '--use_gpu=False', *extra]
    out = finetune(build_config('finetune', *parse_args('finetune', args)))
    log = open(out['log']).read()
    losses = [float(x) for x in re.findall(r'epoch \d+ training \[time: [\d.]+s, train loss: ([\d.]+)\]', log)]
    return out, log, losses


def test_finetune_learns_and_beats_most_popular(demo_large, tmp_path):
    out, log, losses = run(demo_large, tmp_path)
    assert len(losses) >= 3 and losses[-1] < losses[0]
    assert out['test'][0]['ndcg@10'] > 1.5 * out['popularity']['ndcg@10']
    # SPEC 5 log lines
    assert re.search(r'epoch 0 evaluating \[time: [\d.]+s, valid_score: 0\.\d{6}\]', log)
    assert re.search(r'valid result: \nhit@10 : [\d.]+    hit@50 : [\d.]+    ndcg@10 : [\d.]+    ndcg@50 : [\d.]+', log)
    assert re.search(r"best valid : OrderedDict\(\[\('hit@10', [\d.]+\), \('hit@50'", log)
    assert re.search(r"test result: OrderedDict\(\[\('hit@10', [\d.]+\)", log)
    assert 'test result (original top-K+1): OrderedDict' in log
    assert out['test'][1]['hit@10'] >= out['test'][0]['hit@10']


def test_inductive_lloyd_and_contextual_variants_learn(demo_large, tmp_path):
    """Without item IDs the model ranks from the features and interests alone; Lloyd's k-means
    spreads the items over many interests (the original's k-means collapses them)."""
    out, log, losses = run(demo_large, tmp_path, '-mode', 'inductive', '--kmeans_mode=lloyd',
                           '--seq_mm_fusion=contextual', '--epochs=3')
    assert 'train_stage = inductive_ft' in log and 'item_embedding' not in log.split('Trainable parameters: [')[1]
    assert len(losses) == 3 and losses[-1] < losses[0]
    used = [int(n) for n in re.findall(r'interests used: (\d+) of', log)]
    assert len(used) == 3 and min(used) > 10
    assert out['test'][0]['ndcg@10'] > 3 * out['popularity']['ndcg@10']
    assert out['best_valid'][0]['ndcg@10'] == max(
        float(x) for x in re.findall(r'ndcg@10 : ([\d.]+)', log.split('best valid :')[0]))
