"""Training curves (curves.py): log/{run}.csv next to each run's .log, one row per epoch matching its lines."""
import os
import re

import pytest

import quick_start
from curves import EpochCurves, read_curves
from tests.conftest import FINETUNED_ARGS

NUM = r'([-\d.]+)'


def log_epochs(log):
    train = [(int(e), float(t), float(l)) for e, t, l in
             re.findall(rf'epoch (\d+) training \[time: {NUM}s, train loss: {NUM}\]', log)]
    valid = [(int(e), float(t), float(s)) for e, t, s in
             re.findall(rf'epoch (\d+) evaluating \[time: {NUM}s, valid_score: {NUM}\]', log)]
    results = re.findall(r'valid result: \n(.*)', log)
    discovery = [(float(t), int(u), int(k), float(o)) for t, u, k, o in
                 re.findall(rf'interest discovery \[time: {NUM}s, interests used: (\d+) of (\d+), objective: {NUM}\]', log)]
    return train, valid, results, discovery


def test_finetune_csv_one_row_per_epoch_matching_the_log(demo, tmp_path):
    args = ['-d', 'Demo', f'--data_path={demo}', f'--checkpoint_dir={tmp_path}/saved', f'--log_dir={tmp_path}/log',
            *FINETUNED_ARGS, '--epochs=3']
    out = quick_start.finetune(quick_start.build_config('finetune', *quick_start.parse_args('finetune', args)))
    path = out['log'][:-len('.log')] + '.csv'
    assert os.path.exists(path)
    rows = read_curves(path)
    train, valid, results, discovery = log_epochs(open(out['log']).read())
    assert len(rows) == len(train) == len(valid) == len(discovery) == 3
    for row, (e, t, loss), (_, vt, score), res, (dt, used, k, obj) in zip(rows, train, valid, results, discovery):
        assert row['epoch'] == e
        assert f"{row['train_loss']:.4f}" == f'{loss:.4f}' and f"{row['train_time_s']:.2f}" == f'{t:.2f}'
        assert f"{row['valid_score']:f}" == f'{score:f}' and f"{row['valid_time_s']:.2f}" == f'{vt:.2f}'
        assert '    '.join(f"{name[len('valid_'):]} : {row[name]}" for name in
                           ('valid_hit@10', 'valid_hit@50', 'valid_ndcg@10', 'valid_ndcg@50')) == res
        assert (row['interests_used'], row['interests']) == (used, k)
        assert f"{row['discovery_objective']:.4f}" == f'{obj:.4f}' and f"{row['discovery_time_s']:.2f}" == f'{dt:.2f}'
        assert row['elapsed_s'] > 0


def test_sasrec_csv_has_no_discovery_figures(demo, tmp_path):
    args = ['-d', 'Demo', '-m', 'SASRec', f'--data_path={demo}', f'--checkpoint_dir={tmp_path}/saved',
            f'--log_dir={tmp_path}/log', '--show_progress=False', '--use_gpu=False', '--epochs=2']
    out = quick_start.finetune(quick_start.build_config('finetune', *quick_start.parse_args('finetune', args)))
    rows = read_curves(out['log'][:-len('.log')] + '.csv')
    assert [r['epoch'] for r in rows] == [0, 1]
    assert all(r['interests_used'] is None and r['valid_ndcg@10'] is not None for r in rows)


def test_pretrain_csv(demo_pretrain, tmp_path):
    args = ['-d', 'DemoPT', f'--data_path={demo_pretrain}', f'--checkpoint_dir={tmp_path}/saved',
            f'--log_dir={tmp_path}/log', '--plm_size=32', '--img_size=32', '--hidden_size=32', '--inner_size=32',
            '--n_heads=2', '--show_progress=False', '--use_gpu=False', '--pretrain_epochs=2', '--save_step=1',
            '--train_batch_size=128']
    out = quick_start.pretrain(quick_start.build_config('pretrain', *quick_start.parse_args('pretrain', args)))
    rows = read_curves(out['log'][:-len('.log')] + '.csv')
    train, _, _, discovery = log_epochs(open(out['log']).read())
    assert [r['epoch'] for r in rows] == [0, 1] and len(train) == len(discovery) == 2
    assert [f"{r['train_loss']:.4f}" for r in rows] == [f'{l:.4f}' for _, _, l in train]
    assert [r['train_loss'] for r in rows] == pytest.approx(out['losses'])
    assert all(r['valid_score'] is None for r in rows)


def test_appends_when_the_header_matches(tmp_path):
    path = str(tmp_path / 'run.csv')
    for epoch in (0, 1):
        c = EpochCurves(path, ['epoch', 'train_loss', 'elapsed_s'])
        c.add(epoch=epoch, train_loss=1.5)
        c.end_epoch()
    assert [r['epoch'] for r in read_curves(path)] == [0, 1]
    EpochCurves(path, ['epoch', 'elapsed_s'])       # another layout: a new file beside it
    assert os.path.exists(str(tmp_path / 'run.1.csv'))


def test_tensorboard_events(tmp_path):
    pytest.importorskip('tensorboard')
    c = EpochCurves(str(tmp_path / 'run.csv'), ['epoch', 'train_loss', 'elapsed_s'], str(tmp_path / 'run.tb'))
    c.add(epoch=0, train_loss=2.0)
    c.end_epoch()
    c.close()
    assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path / 'run.tb'))


def test_tensorboard_flag_without_the_package_warns_and_writes_the_csv(tmp_path, monkeypatch, caplog):
    import builtins

    from config import Config
    from curves import open_curves
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == 'tensorboard':
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, '__import__', no_tensorboard)
    curves = open_curves(Config(overrides={'tensorboard': True}), str(tmp_path / 'run.log'))
    assert curves.writer is None and os.path.exists(tmp_path / 'run.csv')
    assert 'tensorboard package is not installed' in caplog.text
