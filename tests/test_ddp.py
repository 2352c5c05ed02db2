"""Multi-process training on the CPU: 2 gloo workers compared with one process (STYLE, "Distributed training").

Workers are started with `torch.multiprocessing.spawn` (as `python ddp_pretrain.py --nproc 2` does);
each writes its values to a file that the test compares. Also distributed.py's device and launch helpers.
"""
import glob
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import distributed as D
import quick_start
from config import Config, ConfigError, parse_overrides, stage_files
from data.loader import SeqBatches
from data.pretrain import PretrainDataset
from distributed import spawn
from run_log import init_seed
from trainer import Pretrainer, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {'plm_size': 32, 'img_size': 32, 'hidden_size': 32, 'inner_size': 32, 'n_heads': 2,
        'show_progress': False, 'use_gpu': False, 'hidden_dropout_prob': 0.0}


@pytest.fixture(scope='module')
def data(demo, demo_pretrain):
    """{'pre': pre-training data_path, 'down': fine-tuning data_path}."""
    return {'pre': demo_pretrain, 'down': demo}


def pretrain_config(data, **kw):
    return Config('DemoPT', stage_files('pretrain'), {'data_path': str(data['pre']), 'train_stage': 'pretrain',
                                                      'train_batch_size': 63, **TINY, **kw})


def finetune_config(data, tmp, **kw):
    return Config('Demo', stage_files('finetune'), {'data_path': str(data['down']), 'eval_batch_size': 49,
                                                    'train_batch_size': 101, 'checkpoint_dir': str(tmp),
                                                    **TINY, **kw})


def _start(index, nproc, port):
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    D.init_from_env(use_gpu=False)


# ------------------------------------------------------------ what each process computes
def pretrain_steps(cfg, n_steps=3):
    """Loss and gradients of the first step, parameters after `n_steps` steps."""
    trainer = Pretrainer(cfg, PretrainDataset(cfg), torch.device('cpu'))
    trainer.discover(0)
    trainer.model.train()
    batches = iter(trainer.batches)
    out = {'loss': trainer.step(next(batches))}
    out['grads'] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    for _ in range(n_steps - 1):
        trainer.step(next(batches))
    out['params'] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return out


def finetune_eval_and_epoch(cfg):
    """Valid metrics of the initial model (after interest discovery), the loss and gradients of the first
    training step, then the loss of one epoch and the parameters after it (one process or this one's share)."""
    device = torch.device('cpu')
    init_seed(cfg['seed'])
    dataset, model, _ = quick_start.build_finetune(cfg, device)
    trainer = Trainer(cfg, model, device)
    shard = dict(pad_len=dataset.pad_len, rank=D.rank(), world_size=D.world_size())
    valid = SeqBatches(dataset.splits['valid'], cfg['eval_batch_size'], **shard)
    train = SeqBatches(dataset.splits['train'], cfg['train_batch_size'], shuffle=True, seed=cfg['seed'], **shard)
    trainer.discover(0)
    out = {'valid': trainer.evaluate(valid)}
    trainer.model.train()
    out['first_loss'] = trainer.step(next(iter(train)))               # first batch: loss and gradients
    out['grads'] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    out['loss'] = trainer.train_epoch(train, 0)
    out['params'] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return out


def _worker(index, nproc, port, data, out_dir):
    _start(index, nproc, port)
    try:
        res = {'pretrain': pretrain_steps(pretrain_config(data)),
               'pretrain_reg': pretrain_steps(pretrain_config(data, gamma=1.0), 1),
               'finetune_reg': finetune_eval_and_epoch(finetune_config(data, out_dir, gamma=1.0)),
               'pretrain_local': pretrain_steps(pretrain_config(data, contrastive_negatives='local',
                                                                item_mm_fusion='dynamic_instance'), 2),
               'finetune': finetune_eval_and_epoch(finetune_config(data, out_dir)),
               'pretrain_unsynced': pretrain_steps(pretrain_config(data, sync_gradients=False), 2)}
        torch.save(res, os.path.join(out_dir, f'rank{index}.pt'))
    finally:
        D.teardown()


@pytest.fixture(scope='module')
def two_ranks(data, tmp_path_factory):
    out = tmp_path_factory.mktemp('ranks')
    spawn(_worker, 2, data, str(out))
    return [torch.load(out / f'rank{r}.pt', weights_only=True) for r in (0, 1)]


# ------------------------------------------------------------------------ checks
def test_parameters_identical_on_all_ranks(two_ranks):
    for key in ('pretrain', 'pretrain_local', 'finetune'):
        a, b = two_ranks[0][key]['params'], two_ranks[1][key]['params']
        for n in a:
            assert torch.equal(a[n], b[n]), (key, n)


def test_global_negatives_match_one_process_with_the_whole_batch(two_ranks, data):
    torch.set_num_threads(1)
    single = pretrain_steps(pretrain_config(data))           # 1 process, batch 63 (not divisible by 2)
    multi = two_ranks[0]['pretrain']
    assert multi['loss'] == pytest.approx(single['loss'], rel=1e-5)
    assert set(multi['grads']) == set(single['grads'])
    for n, g in single['grads'].items():
        torch.testing.assert_close(multi['grads'][n], g, rtol=1e-4, atol=1e-6, msg=n)
    # (parameters after several Adam steps are not compared: where the exact gradient is 0, e.g. the
    # attention of an encoder that sees one interest token, Adam turns rounding noise into lr-sized steps)


def test_regulariser_of_shares_matches_one_process(two_ranks, data, tmp_path):
    """With gamma = 1 the regulariser dominates the loss: its padded width must be the global batch's,
    so that 2 processes x B/2 rows give the loss and gradients of 1 process x B rows."""
    torch.set_num_threads(1)
    single = {'pretrain_reg': pretrain_steps(pretrain_config(data, gamma=1.0), 1),
              'finetune_reg': finetune_eval_and_epoch(finetune_config(data, tmp_path, gamma=1.0))}
    for key, loss in (('pretrain_reg', 'loss'), ('finetune_reg', 'first_loss')):
        multi = two_ranks[0][key]
        assert multi[loss] == pytest.approx(single[key][loss], rel=1e-5), key
        for n, g in single[key]['grads'].items():
            torch.testing.assert_close(multi['grads'][n], g, rtol=1e-4, atol=1e-6, msg=f'{key} {n}')


def test_unsynced_processes_train_models_of_their_own(two_ranks, data):
    """sync_gradients False (the original's regime): each rank's model is trained on its own share
    alone, so rank 0's model is the one a single process emulating 2 models per batch trains."""
    torch.set_num_threads(1)
    single = pretrain_steps(pretrain_config(data, sync_gradients=False, models_per_batch=2), 2)
    rank0, rank1 = two_ranks[0]['pretrain_unsynced'], two_ranks[1]['pretrain_unsynced']
    for n, p in single['params'].items():
        assert torch.equal(rank0['params'][n], p), n
    assert not torch.equal(rank0['params']['text_adaptor.weight'], rank1['params']['text_adaptor.weight'])


def test_sharded_evaluation_equals_single_process_exactly(two_ranks, data, tmp_path):
    """150 valid rows in batches of 49: shards of 25/24 rows, and a last batch of 3 rows."""
    torch.set_num_threads(1)
    single = finetune_eval_and_epoch(finetune_config(data, tmp_path))
    for r in (0, 1):
        assert two_ranks[r]['finetune']['valid'] == single['valid']
    # sharded training: the loss and the synchronised gradients of a batch are the single-process ones
    multi = two_ranks[0]['finetune']
    assert multi['first_loss'] == pytest.approx(single['first_loss'], rel=1e-5)
    for n, g in single['grads'].items():
        torch.testing.assert_close(multi['grads'][n], g, rtol=1e-4, atol=1e-6, msg=n)
    # and an epoch follows the same path (Adam amplifies rounding noise a little, see above)
    assert multi['loss'] == pytest.approx(single['loss'], rel=1e-3)


def _fail_on_rank_1(config, resume):
    if D.rank() == 1:
        raise ValueError('rank 1 fails on purpose')
    D.barrier()                                              # rank 0 would wait here forever


def _failing(index, nproc, port):
    config = quick_start.build_config('pretrain', *quick_start.parse_args('pretrain', ['--use_gpu=False']))
    D.run_as_rank(index, nproc, port, quick_start.process_main, _fail_on_rank_1, config)


def test_a_failing_rank_stops_the_job_with_its_error(capfd):
    start = time.time()
    with pytest.raises((mp.ProcessRaisedException, mp.ProcessExitedException)):   # the job stops instead of hanging ...
        spawn(_failing, 2)
    assert time.time() - start < 60
    err = capfd.readouterr().err
    assert 'rank 1 failed:' in err and 'ValueError: rank 1 fails on purpose' in err   # ... and its error shown


def _discovery_fails_on_rank_0(index, nproc, port, data):
    """Rank 0's interest discovery runs out of memory (any error but a FloatingPointError)."""
    import trainer

    def out_of_memory(*args, **kwargs):
        raise RuntimeError('CUDA out of memory (simulated)')
    trainer.discover_interests = out_of_memory
    config = pretrain_config(data)
    D.run_as_rank(index, nproc, port, quick_start.process_main, lambda c, r: Pretrainer(c, PretrainDataset(c),
                  torch.device('cpu')).discover(0), config)


def test_a_failed_interest_discovery_stops_every_rank_at_once(data, capfd):
    """Rank 1 used to wait for rank 0's tables in a broadcast until the timeout (30 minutes);
    now it stops with rank 0's error in one line, and rank 0 shows its traceback."""
    start = time.time()
    with pytest.raises((mp.ProcessRaisedException, mp.ProcessExitedException)):
        spawn(_discovery_fails_on_rank_0, 2, data)
    assert time.time() - start < 60
    err = capfd.readouterr().err
    assert ('error (rank 1): interest discovery before epoch 0 failed on rank 0: RuntimeError: '
            'CUDA out of memory (simulated)') in err
    assert 'rank 0 failed:' in err and 'RuntimeError: CUDA out of memory (simulated)' in err


def test_cli_two_cpu_processes(data, tmp_path):
    cmd = [sys.executable, 'ddp_pretrain.py', '--nproc', '2', '-d', 'DemoPT', f"--data_path={data['pre']}",
           '--use_gpu=False', '--pretrain_epochs=1', '--save_step=1', '--train_batch_size=128',
           f'--checkpoint_dir={tmp_path}/saved', f'--log_dir={tmp_path}/log', '--show_progress=False',
           *[f'--{k}={v}' for k, v in TINY.items() if k not in ('use_gpu', 'show_progress')]]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.exists(tmp_path / 'saved' / 'MISSRec-DemoPT-1.pth')
    assert 'epoch 0 training [time:' in proc.stdout
    assert proc.stdout.count('epoch 0 training') == 1               # rank 0 alone logs


# ---------------------------------------------------------- sharding, devices, launching
@pytest.mark.parametrize('n,batch,w', [(514, 512, 4), (7, 3, 2), (9, 4, 3)])
def test_every_rank_gets_the_same_batches(n, batch, w):
    """A last batch with fewer rows than processes: training skips it on every rank (a rank that
    alone skipped it left the others waiting in its collectives: the run hung); evaluation keeps
    every row, with a dummy row for a rank that has none."""
    split = {'item_id': torch.arange(1, n + 1), 'item_seq': torch.ones(n, 3, dtype=torch.long),
             'item_seq_len': torch.full((n,), 2)}
    train = [list(SeqBatches(split, batch, shuffle=True, seed=1, rank=r, world_size=w)) for r in range(w)]
    assert len({len(b) for b in train}) == 1 and len(train[0]) == n // batch
    assert all(len(b['item_id']) and not b.get('dummy') for rank in train for b in rank)
    evaluation = [list(SeqBatches(split, batch, rank=r, world_size=w)) for r in range(w)]
    assert {len(b) for b in evaluation} == {-(-n // batch)}
    real = torch.cat([b['item_id'] for rank in evaluation for b in rank if not b.get('dummy')])
    assert sorted(real.tolist()) == list(range(1, n + 1))


def _finetune_cli(data, tmp_path, *extra):
    cmd = [sys.executable, 'ddp_finetune.py', '--nproc', '2', '-d', 'Demo', f"--data_path={data['down']}",
           '--use_gpu=False', f'--checkpoint_dir={tmp_path}/saved', f'--log_dir={tmp_path}/log',
           *[f'--{k}={v}' for k, v in TINY.items() if k != 'use_gpu'], *extra]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail('ddp_finetune.py hung')


def test_cli_finetuning_with_a_last_batch_smaller_than_the_processes(data, tmp_path):
    n_train = len(open(data['down'] / 'Demo' / 'Demo.train.inter').readlines()) - 1
    proc = _finetune_cli(data, tmp_path, '--epochs=2', f'--train_batch_size={n_train - 1}',
                         '--eval_batch_size=149')                     # 150 valid rows: a 1-row last batch too
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count('epoch 1 training [time:') == 1 and 'test result: OrderedDict' in proc.stdout


@pytest.mark.parametrize('unused', ['--modal_type=none', '--id_type=none'])
def test_cli_finetuning_with_parameters_that_get_no_gradient(data, tmp_path, unused):
    """modal_type none: the interest encoder gets no gradient; id_type none (transductive): the ID
    embedding. DDP failed at the second step."""
    proc = _finetune_cli(data, tmp_path, '--epochs=1', '--train_batch_size=300', unused)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'epoch 0 training [time:' in proc.stdout


@pytest.fixture
def gpus(monkeypatch):
    """Pretend that `n` GPUs are visible (nothing runs on them)."""
    def set_count(n):
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: n > 0)
        monkeypatch.setattr(torch.cuda, 'device_count', lambda: n)
    return set_count


def test_process_device_wraps_around_the_visible_gpus(gpus, monkeypatch):
    gpus(4)
    monkeypatch.setenv('LOCAL_RANK', '3')
    assert D.process_device() == torch.device('cuda', 3)                # every process sees the node's GPUs
    assert D.process_device(use_gpu=False) == torch.device('cpu')
    gpus(1)                                                             # SLURM --gpus-per-task=1
    assert D.process_device() == torch.device('cuda', 0)
    gpus(0)
    assert D.process_device() == torch.device('cpu')


def test_more_processes_than_gpus_is_refused_in_one_line(gpus, capsys):
    gpus(2)
    assert D.resolve_nproc(0, True) == 2 and D.resolve_nproc(2, True) == 2 and D.resolve_nproc(3, False) == 3
    assert quick_start.main('pretrain', ['--nproc', '3'], nproc=0) == 2       # ddp_pretrain.py --nproc 3
    assert capsys.readouterr().err == ('error: --nproc 3: only 2 GPU(s) visible; use --nproc 2 or fewer, '
                                       'or --use_gpu=False for CPU processes\n')
    assert quick_start.main('finetune', ['--nproc', '4']) == 2
    assert 'error: --nproc 4: only 2 GPU(s) visible' in capsys.readouterr().err


def test_nccl_group_is_bound_to_the_process_gpu(gpus, monkeypatch):
    gpus(2)
    calls = {}
    monkeypatch.setattr(torch.cuda, 'set_device', lambda d: calls.update(set_device=d))
    monkeypatch.setattr(D.dist, 'is_initialized', lambda: False)
    monkeypatch.setattr(D.dist, 'init_process_group', lambda **kw: calls.update(init=kw))
    monkeypatch.setattr(D.dist, 'new_group', lambda **kw: calls.update(group=kw))
    monkeypatch.setattr(D.dist, 'rendezvous', lambda url, timeout: iter([('store', 5, 8)]))
    monkeypatch.setattr(D.dist, 'PrefixStore', lambda prefix, store: f'{prefix}/{store}')
    monkeypatch.setattr(D, '_GATHER_GROUP', None)
    monkeypatch.setattr(D, '_JOB_STORE', None)
    for k, v in dict(RANK='5', LOCAL_RANK='1', WORLD_SIZE='8', LOCAL_WORLD_SIZE='2').items():
        monkeypatch.setenv(k, v)
    assert D.init_from_env() == torch.device('cuda', 1)
    assert calls['set_device'] == torch.device('cuda', 1)
    assert calls['init']['backend'] == 'nccl' and calls['init']['device_id'] == torch.device('cuda', 1)
    assert calls['init']['store'] == 'attempt0/store' and (calls['init']['rank'], calls['init']['world_size']) == (5, 8)
    assert calls['group'] == {'backend': 'nccl'}


def test_gpu_id_selects_the_visible_devices_as_recbole_did(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_initialized', lambda: False)   # (earlier CUDA tests may have started it)
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '5')
    D.select_gpus(Config()['gpu_id'], True)                     # not given: the inherited value stays
    assert os.environ['CUDA_VISIBLE_DEVICES'] == '5'
    D.select_gpus(Config(overrides=parse_overrides(['--gpu_id=1,2']))['gpu_id'], False)   # CPU run: ignored
    assert os.environ['CUDA_VISIBLE_DEVICES'] == '5'
    D.select_gpus(Config(overrides=parse_overrides(['--gpu_id=1,2']))['gpu_id'], True)
    assert os.environ['CUDA_VISIBLE_DEVICES'] == '1,2'
    monkeypatch.setattr(torch.cuda, 'is_initialized', lambda: True)
    with pytest.raises(ConfigError, match='gpu_id = 3: CUDA is already initialised'):
        D.select_gpus(3, True)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_node_rendezvous_equals_one_node_with_two_processes(data, tmp_path):
    """Two torchrun launchers (`--nnodes=2 --nproc_per_node=1`, c10d rendezvous on localhost), as on
    two machines, end with the very checkpoint of one launcher with 2 processes."""
    args = ['ddp_pretrain.py', '-d', 'DemoPT', f"--data_path={data['pre']}", '--pretrain_epochs=2', '--save_step=2',
            '--train_batch_size=64', '--plm_size=32', '--img_size=32', '--hidden_size=32', '--inner_size=32',
            '--n_heads=2', '--show_progress=False', '--use_gpu=False', f'--log_dir={tmp_path}/log']
    torchrun = [sys.executable, '-m', 'torch.distributed.run']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    one = subprocess.run(torchrun + ['--standalone', '--nproc_per_node=2'] + args + [f'--checkpoint_dir={tmp_path}/one'],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    node = torchrun + ['--nnodes=2', '--nproc_per_node=1', '--rdzv_backend=c10d', '--rdzv_id=two-nodes',
                       f'--rdzv_endpoint=127.0.0.1:{_free_port()}'] + args + [f'--checkpoint_dir={tmp_path}/two']
    nodes = [subprocess.Popen(node, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), [err[-3000:] for _, err in outs]
    a = torch.load(tmp_path / 'one' / 'MISSRec-DemoPT-2.pth', weights_only=True)['state_dict']
    b = torch.load(tmp_path / 'two' / 'MISSRec-DemoPT-2.pth', weights_only=True)['state_dict']
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _torchrun_job(args, out, kill_after=None):
    """A `torchrun --max-restarts=2` job of 2 gloo workers writing to `out`; with `kill_after` (a
    glob under out/saved), one worker is SIGKILLed as soon as such a checkpoint exists."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '--max-restarts=2',
           '--monitor-interval=0.2'] + args + [f'--checkpoint_dir={out}/saved', f'--log_dir={out}/log']
    job = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    killed = None
    if kill_after:
        deadline = time.time() + 240
        while not glob.glob(f'{out}/saved/{kill_after}') and time.time() < deadline:
            time.sleep(0.02)
        with open(f'/proc/{job.pid}/task/{job.pid}/children') as f:
            killed = int(f.read().split()[-1])                 # a worker process of the launcher
        os.kill(killed, signal.SIGKILL)
    output = job.communicate(timeout=300)[0]
    assert job.returncode == 0, output[-3000:]
    return output, killed


@pytest.mark.parametrize('stage', ['pretrain', 'finetune'])
def test_torchrun_restart_resumes_and_ends_as_an_uninterrupted_run(data, tmp_path, stage):
    """A worker SIGKILLed after the first checkpoint: torchrun restarts the workers, they continue
    from that checkpoint on their own (same run id and log), and the final checkpoint equals an
    uninterrupted run's in every tensor."""
    common = ['--plm_size=32', '--img_size=32', '--hidden_size=32', '--inner_size=32', '--n_heads=2',
              '--show_progress=False', '--use_gpu=False', '--train_batch_size=16']
    if stage == 'pretrain':
        args = ['ddp_pretrain.py', '-d', 'DemoPT', f"--data_path={data['pre']}", '--pretrain_epochs=4',
                '--save_step=1'] + common
        first, final = 'MISSRec-DemoPT-1.pth', 'MISSRec-DemoPT-4.pth'
    else:
        args = ['ddp_finetune.py', '-d', 'Demo', f"--data_path={data['down']}", '--epochs=4',
                '--stopping_step=100'] + common
        first, final = '*-last.pth', '*-last.pth'
    _torchrun_job(args, tmp_path / 'plain')
    output, killed = _torchrun_job(args, tmp_path / 'killed', kill_after=first)
    assert re.search(rf'failed \(exitcode: -9\) local_rank: \d \(pid: {killed}\)', output), output[-3000:]
    logs = glob.glob(f'{tmp_path}/killed/log/*.log')
    assert len(logs) == 1 and 'torchrun restart 1: resuming from' in open(logs[0]).read()
    a = torch.load(glob.glob(f'{tmp_path}/plain/saved/{final}')[0], weights_only=True)
    b = torch.load(glob.glob(f'{tmp_path}/killed/saved/{final}')[0], weights_only=True)
    assert a['epoch'] == b['epoch'] == 3
    assert all(torch.equal(a['state_dict'][k], b['state_dict'][k]) for k in a['state_dict'])
