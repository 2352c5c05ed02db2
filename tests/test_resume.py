"""A fine-tuning run killed with SIGKILL and resumed from its `-last.pth` ends
exactly where the uninterrupted run ends (same seed, CPU)."""
import glob
import os
import random
import signal
import subprocess
import sys
import time

import torch

import quick_start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(demo, out, *extra):
    return [sys.executable, 'finetune.py', *arguments(demo, out, *extra)]


def arguments(demo, out, *extra):
    return ['-d', 'Demo', f'--data_path={demo}', f'--checkpoint_dir={out}/saved', f'--log_dir={out}/log',
            '--epochs=5', '--stopping_step=50', '--hidden_size=32', '--inner_size=32', '--plm_size=32',
            '--img_size=32', '--show_progress=False', '--use_gpu=False', *extra]


ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')


def finish(cmd):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout[out.stdout.index('| run |'):out.stdout.index('run id:')]   # the metrics table


def best_state(out):
    best = [p for p in glob.glob(f'{out}/saved/*.pth') if not p.endswith('-last.pth')]
    assert len(best) == 1
    return torch.load(best[0], weights_only=True)


def kill_after_last_epoch(cmd, saved, epoch, delay):
    """Start `cmd`, SIGKILL it `delay` s after the -last.pth it writes into `saved` records `epoch`;
    returns that file."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        last = glob.glob(f'{saved}/*-last.pth')
        if last:
            try:
                if torch.load(last[0], weights_only=False)['epoch'] >= epoch:
                    break
            except Exception:        # replaced while reading: try again
                pass
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
    return glob.glob(f'{saved}/*-last.pth')[0]


def test_killed_and_resumed_runs_match_the_uninterrupted_run(demo, tmp_path):
    reference = finish(command(demo, tmp_path / 'full'))
    ref_state = best_state(tmp_path / 'full')['state_dict']
    rng = random.Random(2020)
    for point, epoch in enumerate((0, 2)):
        out = tmp_path / f'killed{point}'
        last = kill_after_last_epoch(command(demo, out), out / 'saved', epoch, delay=rng.uniform(0.0, 0.6))
        assert torch.load(last, weights_only=False)['epoch'] >= epoch
        resumed = finish(command(demo, out, '--resume', last))
        assert resumed == reference
        state = best_state(out)['state_dict']
        assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(demo, tmp_path, monkeypatch, capsys):
    from missrec import MISSRec
    calls = {'n': 0}
    real = MISSRec.calculate_loss

    def nan_in_second_epoch(self, batch, *args):
        calls['n'] += 1
        loss = real(self, batch, *args)
        return loss * float('nan') if calls['n'] == n_batches + 2 else loss

    n_batches = -(-len(open(f'{demo}/Demo/Demo.train.inter').readlines()[1:]) // 512)
    monkeypatch.setattr(MISSRec, 'calculate_loss', nan_in_second_epoch)
    assert quick_start.main('finetune', arguments(demo, tmp_path)) == 2
    err = capsys.readouterr().err
    best_file = [p for p in glob.glob(f'{tmp_path}/saved/*.pth') if not p.endswith('-last.pth')][0]
    assert f'error: training loss is nan at epoch 1, batch 1; the last good checkpoint is {best_file}\n' in err
    best = best_state(tmp_path)
    assert best['epoch'] == 0 and all(torch.isfinite(v).all() for v in best['state_dict'].values()
                                      if v.is_floating_point())


def test_killed_and_resumed_pretraining_matches_the_uninterrupted_run(demo_pretrain, tmp_path):
    def cmd(out, *extra):
        return [sys.executable, 'ddp_pretrain.py', '-d', 'DemoPT', f'--data_path={demo_pretrain}',
                f'--checkpoint_dir={out}/saved', f'--log_dir={out}/log', '--plm_size=32', '--img_size=32',
                '--hidden_size=32', '--inner_size=32', '--n_heads=2', '--show_progress=False', '--use_gpu=False',
                '--pretrain_epochs=4', '--save_step=1', '--train_batch_size=64', *extra]

    full = subprocess.run(cmd(tmp_path / 'full'), cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    final = torch.load(tmp_path / 'full' / 'saved' / 'MISSRec-DemoPT-4.pth', weights_only=True)
    rng = random.Random(7)
    for point, epoch in enumerate((1, 2)):
        out = tmp_path / f'killed{point}'
        saved = out / 'saved'
        proc = subprocess.Popen(cmd(out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        deadline = time.time() + 300
        while not (saved / f'MISSRec-DemoPT-{epoch}.pth').exists() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
        assert not (saved / 'MISSRec-DemoPT-4.pth').exists()
        # a kill may leave a hidden temporary file behind, never a partial checkpoint under its real name:
        # what is there are the checkpoints of every epoch up to the kill, each the uninterrupted run's
        done_files = [p for p in os.listdir(saved) if not p.startswith('.')]
        number = {p: int(p.split('-')[2].split('.')[0]) for p in done_files}
        assert sorted(number.values()) == list(range(1, len(done_files) + 1)) and len(done_files) >= epoch
        for p in done_files:
            ckpt = torch.load(saved / p, weights_only=True)
            uninterrupted = torch.load(tmp_path / 'full' / 'saved' / p, weights_only=True)
            assert ckpt['epoch'] == uninterrupted['epoch'] == number[p] - 1
            assert ckpt['state_dict'].keys() == uninterrupted['state_dict'].keys()
            assert all(torch.equal(v, uninterrupted['state_dict'][k]) for k, v in ckpt['state_dict'].items()), p
            moments, expected = ckpt['optimizer']['state'], uninterrupted['optimizer']['state']
            assert moments.keys() == expected.keys() and all(
                torch.equal(v, expected[i][name]) for i in moments for name, v in moments[i].items()), p
        latest = max(done_files, key=number.get)
        done = subprocess.run(cmd(out, '--resume', str(saved / latest)), cwd=ROOT, capture_output=True,
                              text=True, env=ENV, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        resumed = torch.load(saved / 'MISSRec-DemoPT-4.pth', weights_only=True)
        for k, v in final['state_dict'].items():
            assert torch.equal(v, resumed['state_dict'][k]), k


def test_nan_item_features_stop_fine_tuning_at_interest_discovery(demo, tmp_path, monkeypatch, capsys):
    from missrec import MISSRec
    real = MISSRec.interest_points
    calls = {'n': 0}

    def nan_before_second_epoch(self):
        calls['n'] += 1
        points = real(self)
        if calls['n'] == 2:
            points[3, 0] = float('nan')
        return points

    monkeypatch.setattr(MISSRec, 'interest_points', nan_before_second_epoch)
    assert quick_start.main('finetune', arguments(demo, tmp_path)) == 2
    err = capsys.readouterr().err
    best_file = [p for p in glob.glob(f'{tmp_path}/saved/*.pth') if not p.endswith('-last.pth')][0]
    assert (f'error: interest discovery before epoch 1: 1 of 120 points are not finite (NaN or inf); '
            f'the last good checkpoint is {best_file}\n') in err
