"""Ctrl-C (SIGINT) stops finetune.py and ddp_pretrain.py with one line naming where the run stopped and
the checkpoint that --resume continues from, exit code 130 and no traceback (quick_start.process_main,
quick_start.main)."""
import glob
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import quick_start
import trainer
from data.dataset import SeqDataset
from missrec import MISSRec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
TINY = ['--hidden_size=32', '--inner_size=32', '--plm_size=32', '--img_size=32', '--show_progress=False']
# where: the batch, or a phase between batches (validation, saving a checkpoint, ...)
LINE = re.compile(r'interrupted at epoch (\d+)(?:, batch \d+| \([a-z ]+\))?; resume with --resume (\S+)')


def finetune_args(demo, out, *extra):
    return ['-d', 'Demo', f'--data_path={demo}', f'--checkpoint_dir={out}/saved', f'--log_dir={out}/log',
            '--stopping_step=100', '--use_gpu=False', *TINY, *extra]


def pretrain_args(data, out, *extra):
    return ['-d', 'DemoPT', f'--data_path={data}', f'--checkpoint_dir={out}/saved', f'--log_dir={out}/log',
            '--n_heads=2', '--train_batch_size=64', '--use_gpu=False', *TINY, *extra]


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)   # a test run in the background inherits 'ignore'


def start(script, args, out, env=ENV, **popen):
    """`python script args` with its output in files under `out`."""
    os.makedirs(out, exist_ok=True)
    stdout, stderr = open(f'{out}/stdout', 'w'), open(f'{out}/stderr', 'w')
    proc = subprocess.Popen([sys.executable, script, *args], cwd=ROOT, stdout=stdout, stderr=stderr, env=env,
                            preexec_fn=_default_sigint, **popen)
    proc.files = (stdout, stderr)
    return proc


def wait_for(proc, pattern, timeout=300):
    deadline = time.time() + timeout
    while not glob.glob(pattern):
        assert proc.poll() is None, f'the run ended before {pattern} was written'
        assert time.time() < deadline, f'{pattern} not written within {timeout} s'
        time.sleep(0.05)


def finished(proc, out, timeout=120):
    proc.wait(timeout)
    for f in proc.files:
        f.close()
    return open(f'{out}/stdout').read(), open(f'{out}/stderr').read()


def test_ctrl_c_after_the_first_epoch_stops_in_one_line_and_resume_continues(demo, tmp_path):
    out = tmp_path / 'run'
    proc = start('finetune.py', finetune_args(demo, out, '--epochs=200'), out)
    wait_for(proc, f'{out}/saved/*-last.pth')                           # the first epoch has finished
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = finished(proc, out)
    assert proc.returncode == 130, stderr[-3000:]
    assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr
    lines = stderr.strip().split('\n')
    assert len(lines) == 1 and LINE.fullmatch(lines[0]), lines
    epoch, last = LINE.fullmatch(lines[0]).groups()
    assert last.endswith('-last.pth') and last == glob.glob(f'{out}/saved/*-last.pth')[0]
    done = torch.load(last, weights_only=True)['epoch']                  # the last finished epoch
    assert done in (int(epoch) - 1, int(epoch))                           # (stopped in its save, or after it)

    resumed = subprocess.run([sys.executable, 'finetune.py', *finetune_args(demo, out, f'--epochs={done + 2}'),
                              '--resume', last], cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f'Loading checkpoint {last}: resuming at epoch {done + 1}' in resumed.stdout
    assert f'epoch {done + 1} training' in resumed.stdout and f'epoch {done} training' not in resumed.stdout
    assert '| run |' in resumed.stdout                                    # the metrics table


def test_ctrl_c_on_multi_process_pretraining_names_the_newest_checkpoint(demo_pretrain, tmp_path):
    """Ctrl-C reaches the launcher and both spawned processes (the terminal's process group): one line
    from rank 0, after the one line of the CPU fall-back (no CUDA: use_gpu left on)."""
    out = tmp_path / 'run'
    args = [a for a in pretrain_args(demo_pretrain, out, '--nproc', '2', '--pretrain_epochs=200', '--save_step=1')
            if a != '--use_gpu=False']
    proc = start('ddp_pretrain.py', args, out, env=dict(ENV, CUDA_VISIBLE_DEVICES=''), start_new_session=True)
    wait_for(proc, f'{out}/saved/MISSRec-DemoPT-1.pth')
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)                                   # as Ctrl-C in a terminal does
    stdout, stderr = finished(proc, out)
    assert proc.returncode == 130, stderr[-3000:]
    assert 'Traceback' not in stderr and 'error' not in stderr
    lines = stderr.strip().split('\n')
    assert len(lines) == 2 and lines[0] == 'no CUDA device found: running on the CPU, 2 processes', lines
    epoch, path = LINE.fullmatch(lines[1]).groups()
    newest = max(glob.glob(f'{out}/saved/MISSRec-DemoPT-*.pth'), key=lambda p: int(p.split('-')[-1][:-4]))
    assert path == newest and torch.load(path, weights_only=True)['epoch'] in (int(epoch) - 1, int(epoch))


# ------------------------------------------------------- in one process: where the line says the run stopped
@pytest.fixture
def interrupt_at(monkeypatch):
    """interrupt_at(epoch, batch): Ctrl-C in the training step of that batch (0-based, as in the log)."""
    discover, loss = trainer._Loop.discover, MISSRec.calculate_loss

    def arm(epoch, batch):
        where = {'epoch': None, 'batch': 0}

        def discover_and_count(self, e):
            where['epoch'], where['batch'] = e, 0
            return discover(self, e)

        def calculate_loss(self, *args, **kwargs):
            if (where['epoch'], where['batch']) == (epoch, batch):
                raise KeyboardInterrupt
            where['batch'] += 1
            return loss(self, *args, **kwargs)
        monkeypatch.setattr(trainer._Loop, 'discover', discover_and_count)
        monkeypatch.setattr(MISSRec, 'calculate_loss', calculate_loss)
    return arm


def test_before_the_first_epoch_has_finished_there_is_nothing_to_resume(demo, tmp_path, interrupt_at, capsys):
    interrupt_at(0, 1)
    args = finetune_args(demo, tmp_path, '--epochs=3', '--train_batch_size=64')
    assert quick_start.main('finetune', args) == 130
    assert capsys.readouterr().err == ('interrupted at epoch 0, batch 1; no epoch has finished yet: '
                                       'nothing to resume from\n')


def test_fine_tuning_names_the_last_checkpoint(demo, tmp_path, interrupt_at, capsys):
    interrupt_at(2, 3)
    args = finetune_args(demo, tmp_path, '--epochs=5', '--train_batch_size=64')
    assert quick_start.main('finetune', args) == 130
    last = glob.glob(f'{tmp_path}/saved/*-last.pth')
    assert len(last) == 1 and torch.load(last[0], weights_only=True)['epoch'] == 1
    assert capsys.readouterr().err == f'interrupted at epoch 2, batch 3; resume with --resume {last[0]}\n'


def test_pre_training_names_the_newest_checkpoint_or_none(demo_pretrain, tmp_path, interrupt_at, capsys):
    interrupt_at(1, 2)
    args = pretrain_args(demo_pretrain, tmp_path / 'a', '--pretrain_epochs=6', '--save_step=2')
    assert quick_start.main('pretrain', args) == 130
    assert capsys.readouterr().err == ('interrupted at epoch 1, batch 2; no checkpoint saved yet '
                                       '(one every 2 epochs): nothing to resume from\n')
    interrupt_at(4, 0)
    args = pretrain_args(demo_pretrain, tmp_path / 'b', '--pretrain_epochs=6', '--save_step=2')
    assert quick_start.main('pretrain', args) == 130
    path = tmp_path / 'b' / 'saved' / 'MISSRec-DemoPT-4.pth'
    assert capsys.readouterr().err == f'interrupted at epoch 4, batch 0; resume with --resume {path}\n'


def test_interrupted_before_training_or_in_validation(demo, tmp_path, monkeypatch, capsys):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(SeqDataset, '__init__', ctrl_c)                  # while reading the data
    assert quick_start.main('finetune', finetune_args(demo, tmp_path / 'a', '--epochs=2')) == 130
    assert capsys.readouterr().err == 'interrupted before training started: nothing to resume from\n'
    monkeypatch.undo()
    monkeypatch.setattr(trainer.Trainer, 'evaluate', ctrl_c)
    assert quick_start.main('finetune', finetune_args(demo, tmp_path / 'b', '--epochs=2')) == 130
    assert capsys.readouterr().err == ('interrupted at epoch 0 (validation); no epoch has finished yet: '
                                       'nothing to resume from\n')


@pytest.mark.skipif(signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
                    reason='SIGINT is ignored in this test process (started in the background)')
def test_a_second_ctrl_c_while_stopping_is_only_counted():
    ctrl_c = quick_start.CtrlC()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(500):                                          # interrupted at once
                time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)                               # a second one: no exception
        for _ in range(500):
            if ctrl_c.count == 2:
                break
            time.sleep(0.01)
        assert ctrl_c.received() and ctrl_c.count == 2
    finally:
        ctrl_c.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    fresh = quick_start.CtrlC()
    try:
        assert not fresh.received()
    finally:
        fresh.restore()
