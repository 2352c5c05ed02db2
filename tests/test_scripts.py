"""scripts/run01..20.sh match reference_log/reference_metrics.csv and run from anywhere."""
import csv
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_script(name):
    with open(os.path.join(ROOT, 'scripts', name)) as f:
        return f.read()


def test_twenty_scripts_match_the_reference_rows():
    with open(os.path.join(ROOT, 'reference_log', 'reference_metrics.csv')) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20
    for row in rows:
        text = read_script(row['script'])
        assert f"-d {row['dataset']}_mm_full" in text
        assert ('-mode transductive' in text) == (row['with_id'] == '1')
        assert ('-mode inductive' in text) == (row['with_id'] == '0')
        assert ('-p saved/MISSRec-FHCKM_mm_full-100.pth' in text) == (row['pretrained'] == '1')
        office_transductive = row['dataset'] == 'Office' and row['with_id'] == '1'
        assert ('--interest_ratio=0.3 --train_batch_size=1024 --eval_batch_size=2048' in text) == office_transductive
        assert f"--script={row['script']}" in text
        assert '--eval_topk_plus_one=True' in text          # the reference table's selection key


@pytest.mark.parametrize('cwd', ['.', 'scripts'])
def test_run_script_works_from_root_and_scripts_dir_on_cpu(demo, tmp_path, cwd):
    """No GPU id first: the inherited CUDA_VISIBLE_DEVICES='' stays (a CPU run) and every
    argument reaches finetune.py."""
    cmd = ['bash', 'scripts/run01.sh' if cwd == '.' else 'run01.sh', '-d', 'Demo',
           f'--data_path={demo}', f'--checkpoint_dir={tmp_path}/saved', f'--log_dir={tmp_path}/log',
           '--epochs=1', '--hidden_size=16', '--inner_size=16', '--plm_size=32', '--img_size=32',
           '--show_progress=False']
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='')
    out = subprocess.run(cmd, cwd=os.path.join(ROOT, cwd), capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert 'no CUDA device found: running on the CPU' in out.stderr
    log = open(re.search(r'log: (\S+)', out.stdout).group(1)).read()
    assert 'script = run01.sh' in log and 'eval_topk_plus_one = True' in log
    # selection and the first lines in the original's convention, the exact top-K logged too
    first = re.search(r'test result: (OrderedDict.*)', log).group(1)
    assert re.search(r'test result \(original top-K\+1\): (OrderedDict.*)', log).group(1) == first
    assert 'test result (exact top-K): OrderedDict' in log
    assert 'epochs = 1\n' in log and 'hidden_size = 16\n' in log


@pytest.mark.parametrize('args,inherited,gpus,passed', [
    (['3', '--epochs=2'], '5', '3', ['--epochs=2']),          # a GPU id selects the GPU
    (['0,1'], None, '0,1', []),                                # several GPUs
    (['--epochs=2'], '5', '5', ['--epochs=2']),                # no GPU id: the scheduler's choice stays
    (['-d', 'Demo'], None, 'unset', ['-d', 'Demo']),
    ([], '2,3', '2,3', []),
])
def test_run_scripts_take_a_gpu_id_only_when_it_is_one(tmp_path, args, inherited, gpus, passed):
    fake = tmp_path / 'python'                                 # stands in for python: shows what it got
    fake.write_text('#!/bin/bash\necho "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}"\n'
                    'printf "ARG %s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != 'CUDA_VISIBLE_DEVICES'}
    env['PATH'] = f"{tmp_path}:{env['PATH']}"
    if inherited is not None:
        env['CUDA_VISIBLE_DEVICES'] = inherited
    for n in range(1, 21):
        name = f'run{n:02d}.sh'
        out = subprocess.run(['bash', f'scripts/{name}', *args], cwd=ROOT, capture_output=True, text=True,
                             env=env, timeout=30)
        lines = out.stdout.splitlines()
        assert lines[0] == f'CUDA_VISIBLE_DEVICES={gpus}', (name, lines)
        got = [line[4:] for line in lines[1:]]
        assert got[0] == 'finetune.py' and f'--script={name}' in got, (name, got)
        assert got[got.index(f'--script={name}') + 1:] == passed, (name, got)


def test_demo_pretrain_script_pretrains_then_finetunes_from_its_checkpoint(tmp_path):
    """scripts/demo_pretrain.sh: demo data made once, pre-training on DemoPT, fine-tuning Demo with -p."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='', EPOCHS='1', DEMO_DATA=str(tmp_path / 'data'),
               DEMO_SAVED=str(tmp_path / 'saved'))
    cmd = ['bash', 'scripts/demo_pretrain.sh', '--hidden_size=16', '--inner_size=16', '--n_heads=2', '--epochs=1',
           f'--log_dir={tmp_path}/log']
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / 'data' / 'pretrain' / 'DemoPT' / 'DemoPT.train.inter').is_file()
    assert (tmp_path / 'saved' / 'MISSRec-DemoPT-1-demo.pth').is_file()
    finetune_log = next((tmp_path / 'log').glob('MISSRec-Demo-transductive_ft-*.log')).read_text()
    assert f"Loading pre-trained model from {tmp_path / 'saved' / 'MISSRec-DemoPT-1-demo.pth'}" in finetune_log
    assert 'test result' in finetune_log


def test_transfer_script_skips_the_runs_its_log_folder_already_finished(tmp_path):
    """scripts/transfer_btg.sh completes an interrupted protocol: a (note, stage, seed) with a log
    that reached its test result is not run again; an unfinished log or another seed is."""
    fake = tmp_path / 'python'                                 # stands in for python: one line per call
    fake.write_text('#!/bin/bash\necho "CALL $*"\n')
    fake.chmod(0o755)
    ckpt = tmp_path / 'MISSRec-X-10.pth'
    ckpt.write_bytes(b'')
    logs = tmp_path / 'logs'
    logs.mkdir()
    (logs / 'MISSRec-Scientific_mini-scratch-lloyd-transductive_ft-Dec-02-2026_10-00-00-aaaaaa.log').write_text(
        'seed = 2020\nkmeans_mode = lloyd\n... INFO  test result: OrderedDict()\n')
    (logs / 'MISSRec-Scientific_mini-X-10-lloyd-transductive_ft-Dec-02-2026_10-05-00-bbbbbb.log').write_text(
        'seed = 2020\n... INFO  epoch 3 training\n')           # interrupted: run again
    (logs / 'MISSRec-Scientific_mini-scratch-lloyd-inductive_ft-Dec-02-2026_10-09-00-cccccc.log').write_text(
        'seed = 2021\n... INFO  test result: OrderedDict()\n')  # another seed: run this one
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", CKPTS=str(ckpt), SEEDS='2020',
               MODES='lloyd', TRANSFER_LOG_DIR=str(logs))
    out = subprocess.run(['bash', 'scripts/transfer_btg.sh', '--epochs=2'], cwd=ROOT, capture_output=True,
                         text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    calls = [line for line in out.stdout.splitlines() if line.startswith('CALL finetune.py')]
    runs = [re.search(r'-mode (\S+) -note (\S+) --seed=(\d+)', line).groups() for line in calls]
    assert runs == [('transductive', 'X-10-lloyd', '2020'), ('inductive', 'scratch-lloyd', '2020'),
                    ('inductive', 'X-10-lloyd', '2020')]
    assert 'done before: scratch-lloyd transductive seed 2020' in out.stdout
    assert all(line.endswith('--kmeans_mode=lloyd --epochs=2') for line in calls)
    assert all(f'-p {ckpt}' in line for line in calls if '-note X-10' in line)
