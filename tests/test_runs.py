"""Runs never write or reload each other's files (run ids, pre-training checkpoints that exist), and bad
input stops a run in one line with earlier files intact."""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from checkpoints import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
TINY = ['--hidden_size=32', '--inner_size=32', '--plm_size=32', '--img_size=32', '--n_heads=2',
        '--show_progress=False', '--use_gpu=False']


def test_three_finetunings_started_together_keep_their_own_files(demo, tmp_path):
    """Same second, same folders: three run ids, three logs, three best and -last checkpoints,
    and each run's best checkpoint is the model its own log reloaded."""
    cmd = [sys.executable, 'finetune.py', '-d', 'Demo', f'--data_path={demo}', f'--checkpoint_dir={tmp_path}/saved',
           f'--log_dir={tmp_path}/log', '--epochs=2', *TINY]
    procs = [subprocess.Popen(cmd + [f'--seed={s}'], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in (1, 2, 3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    ids = [re.search(r'^run id: (\S+)$', out, re.M).group(1) for out, _ in outs]
    assert len(set(ids)) == 3
    logs = sorted(glob.glob(f'{tmp_path}/log/*.log'))
    assert len(logs) == 3
    for run_id, (out, _) in zip(ids, outs):
        log = [p for p in logs if p.endswith(f'-{run_id}.log')]
        assert len(log) == 1
        text = open(log[0]).read()
        assert f'run id: {run_id}' in text
        best = os.path.join(tmp_path, 'saved', f'MISSRec-{run_id}.pth')
        assert f'Loading model structure and parameters from {best}' in text
        assert os.path.exists(best) and os.path.exists(best[:-len('.pth')] + '-last.pth')
        assert f'best checkpoint: {best}' in out
        # each run's best checkpoint holds its own seed's model
        seed = int(re.search(r'--seed=(\d)', ' '.join(procs[ids.index(run_id)].args)).group(1))
        assert load_checkpoint(best)['config']['seed'] == seed
    assert len(glob.glob(f'{tmp_path}/saved/*.pth')) == 6


def pretrain(data, tmp_path, *extra, **run):
    cmd = [sys.executable, 'ddp_pretrain.py', '-d', 'DemoPT', f'--data_path={data}',
           f'--checkpoint_dir={tmp_path}/saved', f'--log_dir={tmp_path}/log', '--pretrain_epochs=1', '--save_step=1',
           *TINY, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600, **run)


def test_a_second_pretraining_does_not_replace_the_first_ones_checkpoints(demo_pretrain, tmp_path):
    first = pretrain(demo_pretrain, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    path = f'{tmp_path}/saved/MISSRec-DemoPT-1.pth'
    before = load_checkpoint(path)['state_dict']

    second = pretrain(demo_pretrain, tmp_path, '--learning_rate=0.01')
    assert second.returncode == 2
    err = second.stderr.strip()
    assert err == (f"error: {path}: exists (written by another run); set ckpt_suffix to name this run's "
                   f"checkpoints apart, or --overwrite=True to replace them")
    after = load_checkpoint(path)['state_dict']
    assert all(torch.equal(before[k], after[k]) for k in before)

    third = pretrain(demo_pretrain, tmp_path, '--learning_rate=0.01', '--overwrite=True')
    assert third.returncode == 0, third.stderr[-2000:]
    replaced = load_checkpoint(path)
    assert replaced['config']['learning_rate'] == 0.01


def _copy_corpus(src, tmp_path):
    dst = tmp_path / 'data'
    shutil.copytree(src, dst)
    return dst


PRETRAIN_FAILURES = {
    'malformed .pt_datasets': (lambda d: (d / 'DemoPT' / 'DemoPT.pt_datasets').write_text('DemoA,,DemoC\n'),
                               'DemoPT.pt_datasets: expected one line of comma-separated domain names'),
    'domain without its files': (lambda d: (d / 'DemoPT' / 'DemoB.feat1CLS').unlink(),
                                 "DemoB.feat1CLS: feature file of domain 'DemoB' (listed in .pt_datasets) not found"),
    'token of a domain beyond the list': (
        lambda d: (d / 'DemoPT' / 'DemoPT.pt_datasets').write_text('DemoA,DemoB\n'),
        "names domain 2, but the .pt_datasets file lists 2 domains"),
    # 40 rows of 32 columns read as 80 rows of 16; no .item2index: the token range tells
    'feature width differs from plm_size': (
        lambda d: None, "DemoA.feat1CLS: 80 rows of 16 columns, but the item tokens use 40 rows: it looks like "
                        "40 rows of 32 columns; check plm_size/img_size", '--plm_size=16'),
}


@pytest.mark.parametrize('case', list(PRETRAIN_FAILURES))
def test_bad_pretraining_corpus_stops_in_one_line_before_writing(demo_pretrain, tmp_path, case):
    data = _copy_corpus(demo_pretrain, tmp_path)
    break_it, expected, *args = PRETRAIN_FAILURES[case]
    break_it(data)
    out = pretrain(data, tmp_path, *args)
    err = out.stderr.strip()
    assert out.returncode == 2 and err.startswith('error: ') and '\n' not in err and expected in err, err
    assert not os.path.exists(tmp_path / 'saved')


@pytest.mark.parametrize('flag', ['-p', '--resume'])
def test_truncated_checkpoint_is_one_line_and_earlier_files_stay(demo, demo_pretrain, tmp_path, flag):
    first = pretrain(demo_pretrain, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    good = tmp_path / 'saved' / 'MISSRec-DemoPT-1.pth'
    bad = tmp_path / 'truncated.pth'
    bad.write_bytes(good.read_bytes()[:1000])
    if flag == '-p':
        cmd = [sys.executable, 'finetune.py', '-d', 'Demo', f'--data_path={demo}', '-p', str(bad), *TINY]
        out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    else:
        out = pretrain(demo_pretrain, tmp_path, '--resume', str(bad), '--pretrain_epochs=2')
    lines = [l for l in out.stderr.strip().splitlines() if not l.startswith('no CUDA')]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(f'error: {bad}: not a readable checkpoint')
    assert load_checkpoint(str(good))['epoch'] == 0


def test_unwritable_checkpoint_folder_stops_before_training(demo_pretrain, tmp_path):
    (tmp_path / 'file').write_text('a file where the folder would be')
    out = pretrain(demo_pretrain, tmp_path, f'--checkpoint_dir={tmp_path}/file/saved')
    err = out.stderr.strip()
    assert out.returncode == 2 and err == f'error: {tmp_path}/file/saved: checkpoint folder cannot be written ' \
                                          f'(Not a directory)', err
    assert not os.path.exists(tmp_path / 'log')                   # stopped before the run's log


def _file_size_limit(limit):
    """In the child: writes beyond `limit` bytes fail with EFBIG (a full disk, for one process)."""
    def apply():
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)             # an error, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_disk_full_during_a_save_keeps_the_earlier_checkpoints(demo_pretrain, tmp_path):
    first = pretrain(demo_pretrain, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    good = tmp_path / 'saved' / 'MISSRec-DemoPT-1.pth'
    size = good.stat().st_size
    out = pretrain(demo_pretrain, tmp_path, '--pretrain_epochs=2', '--resume', str(good),
                   preexec_fn=_file_size_limit(size // 2))
    lines = [l for l in out.stderr.strip().splitlines() if not l.startswith('no CUDA')]
    assert out.returncode == 2 and lines == [
        f'error: {tmp_path}/saved/MISSRec-DemoPT-2.pth: could not be written (File too large); '
        f'the checkpoints written before are kept'], out.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / 'saved')) == ['MISSRec-DemoPT-1.pth']     # no partial file
    assert load_checkpoint(str(good))['epoch'] == 0
