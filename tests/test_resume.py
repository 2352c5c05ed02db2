"""A fine-tuning run killed with SIGKILL and resumed from its `-last.pth` ends
exactly where the uninterrupted run ends (same seed, CPU)."""
import glob
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from tools.make_demo_data import write_downstream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    write_downstream(root, name='Demo', n_users=150, n_items=50, seed=11)
    return root


def command(demo, out, *extra):
    return [sys.executable, 'finetune.py', '-d', 'Demo', f'--data_path={demo}', f'--checkpoint_dir={out}/saved',
            f'--log_dir={out}/log', '--epochs=5', '--stopping_step=50', '--hidden_size=32', '--inner_size=32',
            '--show_progress=False', '--use_gpu=False', *extra]


ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')


def finish(cmd):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout[out.stdout.index('| run |'):out.stdout.index('log:')]   # the metrics table


def best_state(out):
    best = [p for p in glob.glob(f'{out}/saved/*.pth') if not p.endswith('-last.pth')]
    assert len(best) == 1
    return torch.load(best[0], weights_only=True)


def kill_after_last_epoch(cmd, epoch, delay):
    """Start `cmd`, SIGKILL it `delay` s after its -last.pth records `epoch`; returns that file."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    saved = cmd[5].split('=', 1)[1]
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
        last = kill_after_last_epoch(command(demo, out), epoch, delay=rng.uniform(0.0, 0.6))
        assert torch.load(last, weights_only=False)['epoch'] >= epoch
        resumed = finish(command(demo, out, '--resume', last))
        assert resumed == reference
        state = best_state(out)['state_dict']
        assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(demo, tmp_path, monkeypatch, capsys):
    import finetune
    from missrec import MISSRec
    calls = {'n': 0}
    real = MISSRec.calculate_loss

    def nan_in_second_epoch(self, batch):
        calls['n'] += 1
        loss = real(self, batch)
        return loss * float('nan') if calls['n'] == n_batches + 2 else loss

    n_batches = -(-len(open(f'{demo}/Demo/Demo.train.inter').readlines()[1:]) // 512)
    monkeypatch.setattr(MISSRec, 'calculate_loss', nan_in_second_epoch)
    assert finetune.main(command(demo, tmp_path)[2:]) == 2
    err = capsys.readouterr().err
    assert 'error: training loss is nan at epoch 1, batch 1; the last good checkpoint is' in err
    best = best_state(tmp_path)
    assert best['epoch'] == 0 and all(torch.isfinite(v).all() for v in best['state_dict'].values()
                                      if v.is_floating_point())


def test_killed_and_resumed_pretraining_matches_the_uninterrupted_run(tmp_path):
    from tools.make_demo_data import write_pretrain
    write_pretrain(tmp_path / 'pre', name='DemoPT', n_users_per_domain=40, n_items_per_domain=40, dim=32, seed=7)

    def cmd(out, *extra):
        return [sys.executable, 'ddp_pretrain.py', '-d', 'DemoPT', f'--data_path={tmp_path}/pre',
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
        # a kill may leave a .tmp-* file behind, never a partial checkpoint under its real name
        done_files = [p for p in os.listdir(saved) if not p.startswith('.tmp-')]
        for p in done_files:
            assert torch.load(saved / p, weights_only=True)['epoch'] >= 0
        latest = max(done_files, key=lambda p: int(p.split('-')[2].split('.')[0]))
        done = subprocess.run(cmd(out, '--resume', str(saved / latest)), cwd=ROOT, capture_output=True,
                              text=True, env=ENV, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        resumed = torch.load(saved / 'MISSRec-DemoPT-4.pth', weights_only=True)
        for k, v in final['state_dict'].items():
            assert torch.equal(v, resumed['state_dict'][k]), k


def test_cuda_random_states_of_another_gpu_count_restore_what_fits(monkeypatch, caplog):
    """A checkpoint written where 3 GPUs were visible, resumed with 1: the first state is
    restored, as a CPU tensor, and one warning says so (set_rng_state_all raised IndexError)."""
    import trainer
    calls = []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state, device: calls.append((state, device)))
    monkeypatch.setattr(trainer, '_WARNED_GPU_COUNT', False)
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(3)]
    state = dict(trainer.rng_state(), cuda=saved)
    caplog.set_level('WARNING', logger='missrec')
    trainer.logger.propagate = True                      # (init_logger turns it off)
    try:
        trainer.set_rng_state(state)
        trainer.set_rng_state(state)
    finally:
        trainer.logger.propagate = False
    assert [(int(s[0]), d) for s, d in calls] == [(0, 0), (0, 0)] and all(s.device.type == 'cpu' for s, _ in calls)
    warnings = [r.message for r in caplog.records if 'random states of 3 GPUs' in r.message]
    assert warnings == ['the checkpoint holds the random states of 3 GPUs, 1 visible now: restoring 1']


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_random_states_restore_after_a_cuda_map_location(tmp_path):
    """--resume on a GPU loads with map_location=cuda, which moves the saved generator states there."""
    from trainer import rng_state, set_rng_state
    torch.save({'rng': rng_state()}, tmp_path / 'state.pth')
    state = torch.load(tmp_path / 'state.pth', map_location='cuda', weights_only=True)['rng']
    assert state['cuda'][0].is_cuda
    set_rng_state(state)
    a = torch.rand(5, device='cuda')
    set_rng_state(state)
    assert torch.equal(a, torch.rand(5, device='cuda'))


def test_nan_item_features_stop_fine_tuning_at_interest_discovery(demo, tmp_path, monkeypatch, capsys):
    import finetune
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
    assert finetune.main(command(demo, tmp_path)[2:]) == 2
    err = capsys.readouterr().err
    assert 'error: interest discovery before epoch 1: 1 of 100 points are not finite (NaN or inf)\n' in err
