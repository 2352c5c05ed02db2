"""tools/compare.py with our runs' curves CSVs (--plot, the per-epoch tables) and the --table mode."""
import os
import shutil

import pytest

from curves import csv_path, read_curves
from quick_start import build_config, finetune, parse_args
from tools import compare


@pytest.fixture(scope='module')
def runs(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp('runs')
    out = {}
    for model, extra in (('Pop', []), ('SASRec', ['--epochs=2']), ('SASRec', ['--epochs=2', '--seed=7']),
                         ('MISSRec', ['--epochs=2', '--hidden_size=32', '--inner_size=32', '--plm_size=32',
                                      '--img_size=32'])):
        args = ['-d', 'Demo', '-m', model, f'--data_path={demo}', f'--checkpoint_dir={root}/saved',
                f'--log_dir={root}/log', '--show_progress=False', '--use_gpu=False', *extra]
        out.setdefault(model, []).append(finetune(build_config('finetune', *parse_args('finetune', args))))
    return root, out


def test_curves_come_from_the_csv_at_full_precision(runs, tmp_path):
    root, out = runs
    log = out['MISSRec'][0]['log']
    run = compare.parse_log(log)
    assert len(run.train_curve) == 2 and len(run.valid_curve) == 2
    loss = run.train_curve[0][2]
    assert f'{loss:.4f}' in open(log).read() and loss != round(loss, 4)
    # without the CSV: the log lines alone, rounded
    alone = tmp_path / os.path.basename(log)
    shutil.copy(log, alone)
    rounded = compare.parse_log(str(alone))
    assert [e for e, _, _ in rounded.train_curve] == [0, 1] and rounded.train_curve[0][2] == round(loss, 4)
    # (epochs exactly, values to rounding: pytest 9.2's approx takes no nested tuples)
    assert [e for e, _ in rounded.valid_ndcg10()] == [e for e, _ in run.valid_ndcg10()]
    assert [v for _, v in rounded.valid_ndcg10()] == pytest.approx([v for _, v in run.valid_ndcg10()], abs=1e-4)


def test_plot_reads_the_csvs(runs, tmp_path, capsys, monkeypatch):
    """--plot draws one training-loss and one validation-NDCG@10 line per trained run, each the values of
    its curves CSV at full precision over its epochs, and none for Pop (nothing trained, no curves)."""
    pytest.importorskip('matplotlib')
    from matplotlib.figure import Figure
    saved, real_savefig = [], Figure.savefig

    def keep(fig, *args, **kwargs):
        saved.append(fig)
        return real_savefig(fig, *args, **kwargs)
    monkeypatch.setattr(Figure, 'savefig', keep)
    root, out = runs
    png = tmp_path / 'curves.png'
    assert compare.main(['--logs', f'{root}/log', '--plot', str(png), '--original', '']) == 0
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert 'plotted training loss and validation NDCG@10 of 3 logs, with 0 of' in capsys.readouterr().out
    loss_axes, valid_axes = saved[0].axes
    expected = {'train_loss': [], 'valid_ndcg@10': []}
    for run in out['SASRec'] + out['MISSRec']:
        rows = read_curves(csv_path(run['log']))
        assert [r['epoch'] for r in rows] == [0, 1]
        for column, lines in expected.items():
            lines.append(([0, 1], [r[column] for r in rows]))
    for axes, column in ((loss_axes, 'train_loss'), (valid_axes, 'valid_ndcg@10')):
        drawn = [([int(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()]) for line in axes.lines]
        assert sorted(drawn) == sorted(expected[column]), column
    assert any(v != round(v, 4) for _, values in expected['train_loss'] for v in values)   # not the log's rounding


def test_table_of_baselines(runs, capsys):
    root, out = runs
    assert compare.main(['--logs', f'{root}/log', '--table']) == 0
    text = capsys.readouterr().out
    rows = [l for l in text.splitlines() if l.startswith('| ') and not l.startswith('| model')]
    assert len(rows) == 6                                   # 3 models x 2 conventions
    pop = next(l for l in rows if l.startswith('| Pop ') and 'exact top-K' in l)
    assert f"{out['Pop'][0]['test'][0]['ndcg@10']:.4f}" in pop and '| 1 |' in pop
    sasrec = next(l for l in rows if l.startswith('| SASRec ') and 'original top-K+1' in l)
    assert '| 2 |' in sasrec and '±' in sasrec              # two seeds: mean ± spread


def test_baselines_get_no_missrec_reference_row(runs, capsys):
    root, out = runs
    assert compare.main(['--logs', out['SASRec'][0]['log'], out['Pop'][0]['log'], '--original', '']) == 0
    text = capsys.readouterr().out
    assert text.count('no reference row') == 2
