"""tools/show_interests.py on the demo data: the report renders, its top-K is recommend.py's, its attention
weights are probabilities, the interests shown are the model's lookup tables, a collapsed discovery is
flagged, zero-shot reuses quick_start's discovery, and bad input writes nothing."""
import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import inference
import quick_start
from tests.conftest import FINETUNED_ARGS
from tools import show_interests as si

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USERS = ['0', '74', '149']


pytestmark = pytest.mark.usefixtures('one_thread')   # (conftest.py)


@pytest.fixture(scope='module')
def lloyd(demo, tmp_path_factory):
    """The `finetuned` fixture's run with --kmeans_mode=lloyd: its checkpoint."""
    root = tmp_path_factory.mktemp('lloyd')
    config = quick_start.build_config('finetune', *quick_start.parse_args('finetune', [
        '-d', 'Demo', f'--data_path={demo}', f'--checkpoint_dir={root}/saved', f'--log_dir={root}/log',
        *FINETUNED_ARGS, '--kmeans_mode=lloyd']))
    return quick_start.finetune(config)['checkpoint']


def run(capsys, *argv):
    rc = si.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def rows(folder, name):
    with open(os.path.join(folder, name), encoding='utf-8', newline='') as f:
        return list(csv.DictReader(f))


def lookups(checkpoint):
    state = torch.load(checkpoint, map_location='cpu', weights_only=True)['state_dict']
    return {m: state[f'{p}_interest_lookup_table'] for m, p in (('text', 'plm'), ('img', 'img'))}


@pytest.fixture(scope='module')
def original_report(finetuned, tmp_path_factory):
    """The report of the `finetuned` checkpoint (kmeans_mode original) for USERS."""
    out = tmp_path_factory.mktemp('report') / 'original'
    result = si.report(['-d', 'Demo', '-p', finetuned['checkpoint'], '--data_path', finetuned['data_path'],
                        '--users', ','.join(USERS), '--out', str(out)])
    return {'out': str(out), 'result': result}


def test_report_renders(original_report):
    out = original_report['out']
    page = open(os.path.join(out, 'report.html'), encoding='utf-8').read()
    for name in ('summary.csv', 'interests.csv', 'items.csv', 'map.csv', 'users.csv', 'history.csv',
                 'attention.csv', 'recommendations.csv'):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    for user in USERS:
        assert f'<h2>User {user}</h2>' in page
    assert '<h2>Interests</h2>' in page and '<h2>Map of the item rows</h2>' in page
    assert 'items nearest the centre' in page and 'interest 3 item' in page      # the demo's item texts
    pngs = [n for n in os.listdir(out) if n.endswith('.png')]
    assert page.count('src="data:image/png;base64,') == len(pngs)               # every figure embedded
    if si.pyplot() is not None:
        assert sorted(pngs) == sorted(['sizes.png', 'map.png', *[f'user-{u}.png' for u in USERS]])
    assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith('.')]   # no temporary folder left


def test_top_k_equals_recommend_py(original_report, finetuned):
    out = original_report['out']
    history, recs = rows(out, 'history.csv'), rows(out, 'recommendations.csv')
    for user in USERS:
        tokens = [r['token'] for r in history if r['user'] == user]
        expected = inference.recommend(finetuned['checkpoint'], [' '.join(tokens)], topk=10)[0]['items']
        got = [r for r in recs if r['user'] == user]
        assert [r['token'] for r in got] == [it['token'] for it in expected]
        assert [float(r['score']) for r in got] == pytest.approx([it['score'] for it in expected], abs=1e-5)
        assert [int(r['rank']) for r in got] == list(range(1, 11))


def test_held_out_item_is_the_test_target_with_its_rank(original_report, finetuned):
    out = original_report['out']
    test = {}
    with open(os.path.join(finetuned['data_path'], 'Demo', 'Demo.test.inter'), encoding='utf-8') as f:
        next(f)
        for line in f:
            user, hist, target = line.rstrip('\n').split('\t')
            test[user] = (hist.split(), target)
    recs = rows(out, 'recommendations.csv')
    for row in rows(out, 'users.csv'):
        hist, target = test[row['user']]
        assert row['held_out_token'] == target
        assert [r['token'] for r in rows(out, 'history.csv') if r['user'] == row['user']] == hist
        # its rank in the scores of recommend.py: 1 + the items scored higher
        scores = inference.score_histories(*_model_and_history(finetuned, hist))[0]
        tid = int(row['held_out_item'])
        assert int(row['held_out_rank']) == 1 + int((scores > scores[tid]).sum())
        marked = [int(r['rank']) for r in recs if r['user'] == row['user'] and r['held_out'] == '1']
        assert marked == ([int(row['held_out_rank'])] if int(row['held_out_rank']) <= 10 else [])


def _model_and_history(finetuned, tokens):
    config, data, model = inference.load_model(finetuned['checkpoint'])
    index = {t: i + 1 for i, t in enumerate(data.item_tokens)}
    return model, [np.array([index[t] for t in tokens])], data.pad_len


def test_attention_weights_are_probabilities(original_report, finetuned):
    out = original_report['out']
    table = lookups(finetuned['checkpoint'])
    att = rows(out, 'attention.csv')
    heads = [k for k in att[0] if k.startswith('head_')]
    assert len(heads) == 4
    history = rows(out, 'history.csv')
    for user in USERS:
        mine = [r for r in att if r['user'] == user]
        for h in heads + ['mean']:
            values = [float(r[h]) for r in mine]
            assert all(0 <= v <= 1 for v in values) and sum(values) == pytest.approx(1, abs=1e-4)
        # the slots are the distinct interests of the history's items and modalities
        items = [int(r['item_id']) for r in history if r['user'] == user]
        assert sorted(int(r['interest']) for r in mine) == sorted({int(t[i]) for t in table.values() for i in items})
        top = next(r for r in rows(out, 'users.csv') if r['user'] == user)['top_interest']
        assert top == max(mine, key=lambda r: float(r['mean']))['interest']


def test_interests_shown_are_the_models_lookup_tables(original_report, finetuned):
    out = original_report['out']
    table = lookups(finetuned['checkpoint'])
    for name in ('items.csv', 'history.csv', 'recommendations.csv'):
        shown = rows(out, name)
        assert shown
        for r in shown:
            for m in ('text', 'img'):
                assert int(r[f'interest_{m}']) == int(table[m][int(r['item_id'])]), (name, r)
    n_items = len(rows(out, 'items.csv'))
    for r in rows(out, 'map.csv'):
        assert int(r['interest']) == int(table[r['modality']][int(r['item_id'])])
    sizes = {int(r['interest']): int(r['size']) for r in rows(out, 'interests.csv')}
    labels = torch.cat([table['text'][1:], table['img'][1:]])
    assert sizes == {int(k): int((labels == k).sum()) for k in labels.unique()}
    assert sum(sizes.values()) == 2 * n_items


def test_a_collapsed_discovery_is_flagged_and_lloyd_is_not(original_report, lloyd, demo, tmp_path, capsys):
    summary = {r['key']: r['value'] for r in rows(original_report['out'], 'summary.csv')}
    assert summary['collapsed'] == '1' and int(summary['interests_used']) < 0.25 * int(summary['interests_asked'])
    page = open(os.path.join(original_report['out'], 'report.html'), encoding='utf-8').read()
    assert page.index('class="warn"') < page.index('<h2>Interests</h2>') and '--kmeans_mode=lloyd' in page

    rc, out, err = run(capsys, '-d', 'Demo', '-p', lloyd, '--data_path', demo, '--out', tmp_path / 'lloyd',
                       '--users', '5,17', '--exclude-history')
    assert rc == 0 and 'warning' not in err
    summary = {r['key']: r['value'] for r in rows(tmp_path / 'lloyd', 'summary.csv')}
    assert summary['collapsed'] == '0' and int(summary['interests_used']) > 0.9 * int(summary['interests_asked'])
    assert 'class="warn"' not in open(tmp_path / 'lloyd' / 'report.html', encoding='utf-8').read()
    # --exclude-history as recommend.py's
    history, recs = rows(tmp_path / 'lloyd', 'history.csv'), rows(tmp_path / 'lloyd', 'recommendations.csv')
    tokens = [r['token'] for r in history if r['user'] == '5']
    expected = inference.recommend(lloyd, [' '.join(tokens)], topk=10, exclude_history=True)[0]['items']
    assert [r['token'] for r in recs if r['user'] == '5'] == [it['token'] for it in expected]
    assert all(r['in_history'] == '0' for r in recs)


def test_without_matplotlib_tables_only(finetuned, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(si, 'pyplot', lambda: None)
    rc, out, err = run(capsys, '-p', finetuned['checkpoint'], '--data_path', finetuned['data_path'],
                       '--out', tmp_path / 'r', '--n_users', 2, '--top', 5)
    assert rc == 0
    assert [line for line in err.splitlines() if 'matplotlib' in line] == [
        'matplotlib is not installed: no figures, tables only (pip install matplotlib, see requirements-tools.txt)']
    files = os.listdir(tmp_path / 'r')
    assert not [n for n in files if n.endswith('.png')] and 'recommendations.csv' in files
    page = open(tmp_path / 'r' / 'report.html', encoding='utf-8').read()
    assert '<img' not in page and 'matplotlib is not installed' in page and '<table>' in page
    assert len(rows(tmp_path / 'r', 'users.csv')) == 2
    assert {len([r for r in rows(tmp_path / 'r', 'recommendations.csv') if r['user'] == u['user']])
            for u in rows(tmp_path / 'r', 'users.csv')} == {5}


def test_zero_shot_discovers_interests_as_eval_only(demo, demo_pretrain, tmp_path, capsys):
    """A pre-training checkpoint: the model and interests of `finetune.py --eval_only -p` (quick_start)."""
    tiny = ['--plm_size=32', '--img_size=32', '--hidden_size=32', '--inner_size=32', '--show_progress=False',
            '--use_gpu=False']
    config = quick_start.build_config('pretrain', *quick_start.parse_args('pretrain', [
        '-d', 'DemoPT', f'--data_path={demo_pretrain}', f'--checkpoint_dir={tmp_path}/saved',
        f'--log_dir={tmp_path}/log', *tiny, '--pretrain_epochs=1', '--save_step=1', '--train_batch_size=64']))
    checkpoint = quick_start.pretrain(config)['checkpoints'][-1]
    flags = ['-mode', 'inductive', '--kmeans_mode=lloyd']
    rc, out, err = run(capsys, '-d', 'Demo', '-p', checkpoint, '--data_path', demo, *flags, '--out', tmp_path / 'zs')
    assert rc == 0, err
    page = open(tmp_path / 'zs' / 'report.html', encoding='utf-8').read()
    assert 'zero-shot (inductive_ft)' in page and 'kmeans_mode lloyd' in page
    config = quick_start.build_config('finetune', *quick_start.parse_args('finetune', [
        '-d', 'Demo', '-p', checkpoint, f'--data_path={demo}', *flags, '--use_gpu=False']))
    _, _, model, _, zero_shot = quick_start.checkpoint_model(config, checkpoint)
    assert zero_shot
    for r in rows(tmp_path / 'zs', 'items.csv'):
        assert int(r['interest_text']) == int(model.plm_interest_lookup_table[int(r['item_id'])])
        assert int(r['interest_img']) == int(model.img_interest_lookup_table[int(r['item_id'])])


@pytest.fixture(scope='module')
def other(make_demo):
    """Another demo dataset (45 items): a checkpoint of Demo does not fit it."""
    return make_demo(name='Other', n_users=60, n_items=45, dim=32, seed=3)[0]


def test_bad_input_gives_one_line_and_writes_nothing(finetuned, other, tmp_path, capsys):
    ckpt, data_path = finetuned['checkpoint'], finetuned['data_path']
    no_text = tmp_path / 'no_text'
    shutil.copytree(os.path.join(data_path, 'Demo'), no_text / 'Demo')
    os.remove(no_text / 'Demo' / 'Demo.text')
    cases = {
        'unknown user': (['-p', ckpt, '--data_path', data_path, '--users', '0,nobody'], "user 'nobody'"),
        'other dataset': (['-d', 'Other', '-p', ckpt, '--data_path', data_path], 'a checkpoint of dataset Demo'),
        'shapes': (['-p', ckpt, '--data_path', other, '-d', 'Other'], 'a checkpoint of dataset Demo'),
        'no text': (['-p', ckpt, '--data_path', no_text], 'Demo.text: item text file not found'),
        'no checkpoint': (['-p', tmp_path / 'missing.pth', '-d', 'Demo', '--data_path', data_path], 'missing.pth'),
    }
    os.makedirs(tmp_path / 'reports')
    for name, (argv, message) in cases.items():
        out = tmp_path / 'reports' / name.replace(' ', '_')
        rc, stdout, err = run(capsys, *argv, '--out', out)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], (name, err)
        assert not os.path.exists(out) and os.listdir(tmp_path / 'reports') == [], name


def test_shapes_of_another_dataset_under_its_name(finetuned, other, tmp_path, capsys):
    """A Demo checkpoint whose stored dataset name is Other's: caught by the parameter shapes."""
    ckpt = torch.load(finetuned['checkpoint'], map_location='cpu', weights_only=False)
    ckpt['config'] = dict(ckpt['config'], dataset='Other')
    path = tmp_path / 'renamed.pth'
    torch.save(ckpt, path)
    rc, _, err = run(capsys, '-p', path, '--data_path', other, '--out', tmp_path / 'r')
    assert rc == 2 and err.count('\n') == 1 and err.startswith('error: ') and 'do not fit dataset Other' in err
    assert not os.path.exists(tmp_path / 'r')


def test_command_line(finetuned, tmp_path):
    """As a script: one line and exit code 2 for an unknown user."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'tools', 'show_interests.py'), '-p',
                           finetuned['checkpoint'], '--data_path', finetuned['data_path'], '--users', '999',
                           '--out', str(tmp_path / 'r')], capture_output=True, text=True, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 2 and proc.stderr.count('\n') == 1 and "user '999'" in proc.stderr
    assert not os.path.exists(tmp_path / 'r') and not os.path.exists(tmp_path / 'log')
