"""One check of every GPU path, with one verdict table (scripts/gpu_check.sh runs it).

    python3 tools/gpu_check.py                 # on a GPU machine: under 4 minutes on one H200
    python3 tools/gpu_check.py --dry-run       # here: every step on the CPU (gloo, tiny sizes)
    python3 tools/gpu_check.py --dry-run --no-suite --out /tmp/check

Steps (each asserts its result; each but the suite runs in its own process, so
that a crash of one, e.g. an illegal memory access, fails that step alone; a
step that runs past its time is killed with every process it started, and
fails with "timed out after N s"; kernels, finetune and bench, which time
things, run one after the other, then pretrain, nccl and gloo side by side):

* suite: the tests that skip without CUDA or CuPy (selected by their skipif
  marker; on a GPU none may skip for want of them), and a short CPU subset
  beside them, in parallel (pytest-xdist, where installed); no -x. The whole suite is CI's (`python -m pytest -q tests`);
  started first, both run beside the other steps;
* kernels: CuPy kernels against the torch path on the same GPU, k-means in both
  modes and DPC-KNN, and a sampled comparison at FHCKM size (894,000 x 17,900 x
  300: every row assigned by the kernel, 20,000 sampled rows by torch); counts
  the kernel calls, so that a silent fall-back to torch fails (the row names
  why: cupy missing, or the kernels did not compile); times both modes of a
  FHCKM-size discovery;
* finetune: finetune.py on CUDA for a few epochs (checkpoint, best reload,
  test), --resume from its -last.pth, recommend.py --device cuda;
* bench: bench/finetune.py, seconds per training epoch and peak GPU memory;
* pretrain: ddp_pretrain.py on CUDA with interest discovery, save, --resume;
* nccl: a process group of one rank (nccl): DDP pre-training steps with the
  gathered negatives, the discovery broadcast, a save (all_gather_object), and
  one ddp_finetune.py epoch with sharded evaluation;
* gloo: two ranks sharing the one GPU (two NCCL ranks cannot), torchrun with
  MISSREC_BACKEND=gloo, models and batches on CUDA: a DDP pre-training epoch
  and a fine-tuning epoch with odd batch sizes, so that the gathers are uneven;
  the row names the device of the tensors each collective was handed.

The verdict names the python, torch, CUDA, CuPy and numpy it ran with, in the
table and in OUT/verdict.json.

Data: Scientific_mini from ../shared/datasets/downstream (or --data) when
present, else generated demo data; the pre-training data is always generated.
With --dry-run the same steps run on the CPU at tiny sizes; what only a GPU can
show (CuPy ran, no CUDA test skipped, nccl) is marked SKIPPED. Exit status 1
if a step fails.
"""
import argparse
import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MINI = os.path.join(ROOT, '..', 'shared', 'datasets', 'downstream')
FHCKM = (894000, 17900, 300)          # pre-training interest discovery: points, clusters, dimension
TINY = ['--plm_size=32', '--img_size=32', '--hidden_size=32', '--inner_size=32', '--n_heads=2']
# step -> timeout on a GPU (s); the whole check stops at --limit-s
STEPS = {'kernels': 100, 'finetune': 100, 'bench': 60, 'pretrain': 70, 'nccl': 60, 'gloo': 80}
# The suite's part of the check: every test that skips without CUDA or CuPy (found by its skipif
# marker: this module is also the pytest plugin that selects them, pytest_collection_modifyitems),
# and a short CPU subset beside them (CI runs the whole suite).
# (about 150 s of one core here; its longest test about 35 s)
CPU_SUBSET = ('tests/test_cluster.py', 'tests/test_model.py', 'tests/test_packed.py', 'tests/test_metrics.py',
              'tests/test_checkpoints.py', 'tests/test_config.py', 'tests/test_data.py', 'tests/test_trainer.py',
              'tests/test_sasrec.py', 'tests/test_bad_input.py', 'tests/test_finetune_e2e.py', 'tests/test_recommend.py',
              'tests/test_eval_only.py')
# steps without timings: once the timing steps are done they run side by side (a step's own timeout
# still applies), which keeps the check within its 4 minutes
CONCURRENT = {'pretrain', 'nccl', 'gloo'}
KILL_GRACE_S = 8        # SIGTERM to a timed-out process group, then SIGKILL after this


class Skip(Exception):
    """A part that only a GPU can show."""


# --------------------------------------------------------------------------- helpers
def row(step, status, detail='', seconds=None, **metrics):
    return {'step': step, 'status': status, 'detail': detail, 'seconds': seconds, **metrics}


class TimedOut(AssertionError):
    """A command ran past its time; it and every process it started were killed."""


_GROUPS = set()         # process groups of the commands running now (killed if this process is told to stop)


def kill_group(proc, grace=KILL_GRACE_S):
    """End the process group (session) of `proc`: SIGTERM, up to `grace` s for it to go, then SIGKILL
    whatever is left of it (children included, e.g. torchrun's or pytest-xdist's workers)."""
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    end = time.monotonic() + grace
    while time.monotonic() < end:
        proc.poll()                              # reap the leader, so that an empty group reads as gone
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    _GROUPS.discard(pgid)


def start(cmd, out, env=None):
    """Popen of `cmd` from the repository root in a session (process group) of its own, its output to
    the open file `out`."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, **(env or {})))
    _GROUPS.add(proc.pid)
    return proc


def _stop_on_term(signum, frame):
    """A step process told to stop (its own timeout in the orchestrator) ends its commands first:
    they run in sessions of their own, out of reach of the signal to its group."""
    for pgid in list(_GROUPS):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(128 + signum)


def run(cmd, log, timeout, env=None):
    """Run a command from the repository root, output appended to `log`; returns (rc, output).
    Past `timeout` s its whole process group is killed and TimedOut raised."""
    start_s = time.perf_counter()
    with tempfile.TemporaryFile('w+', errors='replace') as out:   # a file, not a pipe: no child blocks a read
        proc = start(cmd, out, env)
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            kill_group(proc)
            timed_out = True
        _GROUPS.discard(proc.pid)
        out.seek(0)
        text = out.read()
    status = f'timed out after {timeout:.0f} s, killed' if timed_out else f'rc {proc.returncode}'
    with open(log, 'a') as f:
        f.write(f"$ {' '.join(cmd)}\n{text}[{status}, {time.perf_counter() - start_s:.1f}s]\n\n")
    if timed_out:
        raise TimedOut(f'timed out after {timeout:.0f} s: {" ".join(os.path.basename(c) for c in cmd[:3])}')
    return proc.returncode, text


def expect(cond, message):
    if not cond:
        raise AssertionError(message)


def tail(text, n=1):
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return ' / '.join(lines[-n:]) if lines else ''


def write_data(ctx):
    """Generated demo data: downstream (fine-tuning where Scientific_mini is absent, and the nccl
    step) and pre-training (tiny in a dry run)."""
    from tools.make_demo_data import write_downstream, write_pretrain
    data = os.path.join(ctx['out'], 'data')
    small = dict(n_users=150, n_items=60, dim=32) if ctx['dry'] else {}
    write_downstream(os.path.join(data, 'down'), name='Demo', seed=7, **small)
    write_pretrain(os.path.join(data, 'pre'), name='DemoPT', seed=7,
                   **(dict(n_users_per_domain=40, n_items_per_domain=40, dim=32) if ctx['dry'] else {}))


def data_paths(ctx):
    """ctx['ft'] = (name, data_path) of the fine-tuning runs: Scientific_mini if present, else Demo."""
    data = os.path.join(ctx['out'], 'data')
    mini = ctx['data'] or MINI
    if not ctx['dry'] and os.path.isfile(os.path.join(mini, 'Scientific_mini', 'Scientific_mini.train.inter')):
        ctx['ft'] = ('Scientific_mini', os.path.abspath(mini))
    else:
        ctx['ft'] = ('Demo', os.path.join(data, 'down'))
    ctx['demo'] = ('Demo', os.path.join(data, 'down'))
    ctx['pre'] = os.path.join(data, 'pre')


# ----------------------------------------------------------------------------- steps
def step_kernels(ctx):
    """CuPy against torch on one GPU (dry run: the torch path on the CPU against itself)."""
    import torch
    import cluster_utils as cu
    gpu = not ctx['dry']
    device = torch.device('cuda' if gpu else 'cpu')
    rows = []
    calls = {'kernel': 0}
    for name in ('_cupy_nearest', '_cupy_sums'):
        real = getattr(cu, name)

        def counted(*a, _real=real):
            calls['kernel'] += 1
            return _real(*a)
        setattr(cu, name, counted)
    cupy = cu._cp
    path = cu.kernel_path(device)             # as bench/kmeans.py reports it

    def torch_path(fn):
        cu._cp = None
        try:
            return fn()
        finally:
            cu._cp = cupy

    def randn(n, d, seed):
        return torch.randn(n, d, generator=torch.Generator(device=device).manual_seed(seed), device=device)

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def part(name, fn):
        """One row per part; a failing part does not stop the others."""
        start = time.perf_counter()
        try:
            rows.append(row(name, 'PASS', fn(), time.perf_counter() - start))
        except Exception as e:
            rows.append(row(name, 'FAIL', str(e) if isinstance(e, AssertionError) else f'{type(e).__name__}: {e}',
                            time.perf_counter() - start))

    # k-means in both modes and DPC-KNN on planted clusters (no near ties: labels agree up to rare
    # rounding flips; CuPy's atomic sums add in another order than index_add)
    n, k, d = (20000, 5000, 300) if gpu else (3000, 300, 40)
    g = torch.Generator().manual_seed(1)
    planted = (torch.randn(k // 2, d, generator=g)[torch.randint(0, k // 2, (n,), generator=g)]
               + 0.3 * torch.randn(n, d, generator=g)).to(device)

    def compare(kw, n_case, k_case, min_agree, max_rel):
        xs = planted[:n_case]
        before = calls['kernel']
        lab_k, _, info_k = cu.discover_interests(xs, k_case, **kw)
        used = calls['kernel'] - before
        lab_t, _, info_t = torch_path(lambda: cu.discover_interests(xs, k_case, **kw))
        expect(calls['kernel'] == before + used, 'the torch reference called a CuPy kernel')
        agree = float((lab_k == lab_t).float().mean())
        rel = abs(info_k['objective'] - info_t['objective']) / max(abs(info_t['objective']), 1e-12)
        expect(not gpu or used > 0, f'no CuPy kernel ran (torch fall-back: {cu.cupy_unavailable(device)})')
        expect(agree >= min_agree, f'labels agree on {agree:.4%} < {min_agree:.1%}')
        expect(rel <= max_rel, f'objectives differ by {rel:.2e} > {max_rel:.0e}')
        return (f"{n_case}x{d}, K {k_case} ({info_k['n_used']} used): labels agree {agree:.4%}, objective "
                f"rel. diff {rel:.1e}; {used} kernel calls")
    part('kernels: k-means original', lambda: compare(dict(kmeans_mode='original'), n, k, 0.995, 1e-3))
    part('kernels: k-means lloyd', lambda: compare(dict(kmeans_mode='lloyd'), n, k, 0.99, 1e-3))
    part('kernels: DPC-KNN', lambda: compare(dict(algorithm='dpc_knn', local_size=n // 400), n // 4, k // 8,
                                             0.999, 1e-4))

    # FHCKM size: every row by the kernel, a sample of rows by torch; a differing row must be a near tie
    n, k, d = FHCKM if gpu else (FHCKM[0] // 100, FHCKM[1] // 100, FHCKM[2])
    x = randn(n, d, 2)
    c = x[torch.randperm(n, generator=torch.Generator().manual_seed(3))[:k].to(device)] + 0.1 * randn(k, d, 4)

    def sampled():
        sync()
        t0 = time.perf_counter()
        before = calls['kernel']
        _, idx_k = cu.pairwise_nearest(x, c)
        sync()
        t_kernel, used = time.perf_counter() - t0, calls['kernel'] - before
        sample = torch.randperm(n, generator=torch.Generator().manual_seed(5))[:20000].to(device)
        _, idx_t = torch_path(lambda: cu.pairwise_nearest(x[sample], c))
        mine = idx_k[sample]
        agree = float((mine == idx_t).float().mean())
        diff = (mine != idx_t).nonzero().flatten()
        xs = x[sample[diff]].double()
        d_k = ((xs - c[mine[diff]].double()) ** 2).sum(1)
        d_t = ((xs - c[idx_t[diff]].double()) ** 2).sum(1)
        worst = float(((d_k - d_t).abs() / d_t.clamp(min=1e-12)).max()) if len(diff) else 0.0
        expect(not gpu or used > 0, f'no CuPy kernel ran (torch fall-back: {cu.cupy_unavailable(device)})')
        expect(agree >= 0.999, f'sampled assignments agree on {agree:.4%} < 99.9%')
        expect(worst <= 1e-4, f'a differing row is no tie (relative distance gap {worst:.1e})')
        return (f'{n}x{k}x{d}: all rows in {t_kernel:.2f}s on the {path} path; {len(sample)} sampled rows agree '
                f'{agree:.4%} with torch ({len(diff)} differ, largest distance gap {worst:.1e})')
    part('kernels: FHCKM-size assignment, sampled', sampled)

    rows.append(cupy_row(gpu, path, calls['kernel'], cu.cupy_unavailable(device) if gpu else None))

    # timings: a FHCKM-size discovery in both modes
    def discovery(mode):
        if mode == 'original':
            _, _, info = cu.discover_interests(x, k, kmeans_mode='original')
            what = f"objective {info['objective']:.4f}, {info['n_used']} used"
        else:   # 5 Lloyd updates, as bench/kmeans.py times it (the default runs to convergence, <= 50)
            km = cu.KMeans(d, k, mode='lloyd', niter=5)
            km.train(x)
            what = f'{km.n_iter} iterations, objective {km.obj[-1]:.4f}'
        sync()
        return f'{n}x{k}x{d}, {path} path: {what}'
    for mode in ('original', 'lloyd'):
        sync()
        part(f'timing: FHCKM-size discovery, {mode}', lambda: discovery(mode))
    return rows


def cupy_row(gpu, path, kernel_calls, reason):
    """The 'CuPy path ran' row: on a GPU it FAILs, naming why, when the CuPy kernels did not run
    (cupy missing, or cluster_kernels.cu did not compile: cluster_utils then took the torch path)."""
    name = 'kernels: CuPy path ran'
    if not gpu:
        return row(name, 'SKIPPED', f'no GPU (path={path})')
    what = f'path={path}, {kernel_calls} kernel calls'
    if reason is not None or path != 'cupy' or kernel_calls == 0:
        return row(name, 'FAIL', f"{what}; torch fall-back: {reason or 'the kernels were not called'}")
    return row(name, 'PASS', what)


def step_finetune(ctx):
    """finetune.py on CUDA: epochs, checkpoints, best reload, test; --resume; recommend.py on CUDA."""
    import torch
    gpu = not ctx['dry']
    name, path = ctx['ft']
    out = os.path.join(ctx['out'], 'finetune')
    log = os.path.join(ctx['out'], 'finetune.log')
    base = [sys.executable, 'finetune.py', '-d', name, f'--data_path={path}', f'--checkpoint_dir={out}/saved',
            f'--log_dir={out}/log', '--show_progress=False', f'--use_gpu={gpu}', '--stopping_step=50']
    if not gpu:
        base += TINY
    start = time.perf_counter()
    rc, text = run(base + ['--epochs=3'], log, 300)
    expect(rc == 0, f'finetune.py failed: {tail(text)}')
    run_log = open(re.search(r'log: (\S+)', text).group(1)).read()
    best = re.search(r'best checkpoint: (\S+) \(epoch', text).group(1)
    for line in ('epoch 2 training', 'Saving current:', 'Loading model structure and parameters from',
                 'test result: OrderedDict'):
        expect(line in run_log, f'finetune.py log lacks {line!r}')
    state = torch.load(best, weights_only=True)['state_dict']       # tensors come back where they were saved
    on = {t.device.type for t in state.values()}
    expect(on == {'cuda' if gpu else 'cpu'}, f'the checkpoint holds tensors on {on}')
    epoch_s = [float(s) for s in re.findall(r'epoch \d+ training \[time: ([\d.]+)s', run_log)]
    rows = [row('finetune: 3 epochs, best reload, test', 'PASS',
                f"{name}, tensors on {on.pop()}, best {os.path.basename(best)}; epochs {', '.join(f'{s:.2f}' for s in epoch_s)} s",
                time.perf_counter() - start)]

    start = time.perf_counter()
    last = best[:-len('.pth')] + '-last.pth'
    rc, text = run(base + ['--epochs=4', '--resume', last], log, 300)
    expect(rc == 0, f'finetune.py --resume failed: {tail(text)}')
    resumed = open(re.search(r'log: (\S+)', text).group(1)).read()
    expect(f'Loading checkpoint {last}: resuming at epoch 3' in resumed and 'epoch 3 training' in resumed
           and 'epoch 0 training' not in resumed, 'the resumed run did not continue at epoch 3')
    rows.append(row('finetune: --resume', 'PASS', 'epoch 3 trained after resuming from -last.pth',
                    time.perf_counter() - start))

    start = time.perf_counter()
    with open(os.path.join(path, name, f'{name}.test.inter')) as f:
        history = f.readlines()[1].split('\t')[1]
    device = 'cuda' if gpu else 'cpu'
    rc, text = run([sys.executable, 'recommend.py', '--checkpoint', best, '-d', name, f'--data_path={path}',
                    '--history', history, '--topk', '5', '--device', device], log, 120)
    expect(rc == 0, f'recommend.py failed: {tail(text)}')
    ranks = re.findall(r'^\s+([1-5])\s', text, re.M)
    expect(ranks == ['1', '2', '3', '4', '5'], f'recommend.py printed no top-5 table: {tail(text, 3)}')
    rows.append(row(f'finetune: recommend.py --device {device}', 'PASS', 'top-5 table for a test history',
                    time.perf_counter() - start))
    return rows


def step_bench(ctx):
    """Seconds per training epoch (Scientific_mini where present) and peak memory, bench/finetune.py."""
    gpu = not ctx['dry']
    name, path = ctx['ft']
    cmd = [sys.executable, 'bench/finetune.py', '-d', name, '--data_path', path, '--epochs', '2',
           '--device', 'cuda' if gpu else 'cpu']
    if not gpu:
        cmd += ['--', *TINY]
    start = time.perf_counter()
    rc, text = run(cmd, os.path.join(ctx['out'], 'bench.log'), 240)
    expect(rc == 0, f'bench/finetune.py failed: {tail(text)}')
    res = dict(kv.split('=', 1) for kv in re.search(r'^RESULT (.*)$', text, re.M).group(1).split())
    what = 'peak GPU memory (allocated)' if gpu else 'peak memory (RSS)'
    expect(what in text, f'bench/finetune.py does not report {what}')
    return [row(f'timing: {name} training epoch', 'PASS',
                f"median {res['epoch_s']} s/epoch (discovery {res['discovery_s']} s, validation {res['valid_s']} s), "
                f"{what} {res['peak_mb']} MB", time.perf_counter() - start, peak_mb=float(res['peak_mb']))]


def step_pretrain(ctx):
    """ddp_pretrain.py on CUDA: discovery, steps, save every epoch, --resume."""
    import torch
    gpu = not ctx['dry']
    out = os.path.join(ctx['out'], 'pretrain')
    log = os.path.join(ctx['out'], 'pretrain.log')
    base = [sys.executable, 'ddp_pretrain.py', '-d', 'DemoPT', f"--data_path={ctx['pre']}", f'--use_gpu={gpu}',
            f'--checkpoint_dir={out}/saved', f'--log_dir={out}/log', '--show_progress=False', '--save_step=1',
            f"--train_batch_size={512 if gpu else 64}"] + ([] if gpu else TINY)
    start = time.perf_counter()
    rc, text = run(base + ['--pretrain_epochs=2'], log, 300)
    expect(rc == 0, f'ddp_pretrain.py failed: {tail(text)}')
    device = 'cuda:0' if gpu else 'cpu'
    expect(f'device: {device}' in text and text.count('interests used') == 2,
           f'ddp_pretrain.py did not run 2 discoveries on {device}')
    second = os.path.join(out, 'saved', 'MISSRec-DemoPT-2.pth')
    ckpt = torch.load(second, weights_only=True)
    on = {t.device.type for t in ckpt['state_dict'].values()}
    expect(ckpt['epoch'] == 1 and on == {device[:4] if gpu else 'cpu'}, f'checkpoint epoch {ckpt["epoch"]}, on {on}')
    rc, text = run(base + ['--pretrain_epochs=3', '--resume', second], log, 300)
    expect(rc == 0, f'ddp_pretrain.py --resume failed: {tail(text)}')
    expect('resuming at epoch 2' in text and 'epoch 2 training' in text and 'epoch 1 training' not in text
           and os.path.exists(os.path.join(out, 'saved', 'MISSRec-DemoPT-3.pth')), 'the resumed run did not continue')
    losses = re.findall(r'train loss: ([\d.]+)', text)
    return [row('pretrain: discovery, steps, save, --resume', 'PASS',
                f'on {device}; 2 epochs, then epoch 2 after resuming (loss {losses[-1]})', time.perf_counter() - start)]


def step_nccl(ctx):
    """A process group of one rank: DDP pre-training steps (gathered negatives), discovery broadcast,
    save, and one ddp_finetune epoch with sharded evaluation."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    import distributed as D
    import quick_start
    from config import Config, parse_overrides, stage_files
    from data.pretrain import PretrainDataset
    from trainer import Pretrainer
    gpu = not ctx['dry']
    os.environ.update(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', LOCAL_WORLD_SIZE='1',
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(D.free_port()))
    calls = {}
    for name in ('all_gather_with_grad', 'broadcast_', 'gather_rows_interleaved'):
        real = getattr(D, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*a, **kw)
        setattr(D, name, counted)
    out = os.path.join(ctx['out'], 'nccl')
    start = time.perf_counter()
    device = D.init_from_env(use_gpu=gpu, group_of_one=True)
    try:
        backend = dist.get_backend() if D.is_dist() else None
        expect(backend == ('nccl' if gpu else 'gloo'), f'process group backend {backend}')
        tiny = parse_overrides(TINY) if not gpu else {}
        common = dict(use_gpu=gpu, show_progress=False, checkpoint_dir=f'{out}/saved', log_dir=f'{out}/log', **tiny)
        cfg = Config('DemoPT', stage_files('pretrain'), dict(data_path=ctx['pre'], train_stage='pretrain',
                                                             train_batch_size=256 if gpu else 64, **common))
        trainer = Pretrainer(cfg, PretrainDataset(cfg).to(device), device)
        expect(isinstance(trainer.loss, DistributedDataParallel), 'the pre-training forward is not DDP-wrapped')
        trainer.discover(0)
        expect(calls.get('broadcast_', 0) >= 2, 'the interest tables were not broadcast')
        before = [p.detach().clone() for p in trainer.model.parameters()]
        trainer.model.train()
        batches = iter(trainer.batches)
        losses = [trainer.step(next(batches)) for _ in range(3)]
        expect(all(map(lambda v: v == v and abs(v) < float('inf'), losses)), f'losses {losses}')
        expect(calls.get('all_gather_with_grad', 0) >= 3, 'the contrastive negatives were not gathered')
        moved = sum(not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
        expect(moved > 0, 'no parameter changed')
        trainer.save(0)
        expect(os.path.exists(trainer.saved[-1]), 'no checkpoint saved')
        rows = [row(f'{backend}: DDP pre-training, 1 rank', 'PASS',
                    f"3 steps (loss {losses[0]:.3f} -> {losses[-1]:.3f}), {calls['all_gather_with_grad']} gathers, "
                    f"{calls['broadcast_']} broadcasts, save", time.perf_counter() - start)]

        start = time.perf_counter()
        name, path = ctx['demo']
        cfg = Config(name, stage_files('finetune'), dict(data_path=path, epochs=1, **common))
        res = quick_start.finetune(cfg)
        expect(calls.get('gather_rows_interleaved', 0) > 0, 'evaluation ranks were not gathered')
        expect(res['test'][0]['ndcg@10'] > 0, f"test NDCG@10 {res['test'][0]['ndcg@10']}")
        rows.append(row(f'{backend}: ddp_finetune epoch, sharded evaluation', 'PASS',
                        f"{calls['gather_rows_interleaved']} gathered evaluation batches, test NDCG@10 "
                        f"{res['test'][0]['ndcg@10']:.4f}", time.perf_counter() - start))
    finally:
        D.teardown()
    if not gpu:
        rows.append(row('nccl: the backend itself', 'SKIPPED', 'no GPU: gloo ran the same code'))
    return rows


# the tensor collectives of distributed.py; gloo takes CPU and CUDA tensors for each (torch's backend
# table), and the row names the device of the tensors each was handed
GLOO_COLLECTIVES = ('all_gather', 'all_reduce', 'broadcast')


def step_gloo(ctx):
    """Two gloo ranks sharing the one GPU, models and batches on CUDA (two NCCL ranks cannot share a
    GPU): torchrun, MISSREC_BACKEND=gloo, a DDP pre-training epoch and a fine-tuning epoch with odd
    batch sizes, so that the feature gathers and sharded evaluation batches are uneven across the
    ranks. Dry run: the same on the CPU."""
    gpu = not ctx['dry']
    out = os.path.join(ctx['out'], 'gloo')
    log = os.path.join(ctx['out'], 'gloo.log')
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    common = [f'--use_gpu={gpu}', '--show_progress=False', f'--checkpoint_dir={out}/saved', f'--log_dir={out}/log']
    common += [] if gpu else TINY
    name, path = ctx['demo']
    jobs = {'pretrain': ['-d', 'DemoPT', f"--data_path={ctx['pre']}", '--pretrain_epochs=1', '--save_step=1',
                         f"--train_batch_size={255 if gpu else 63}"],
            'finetune': ['-d', name, f'--data_path={path}', '--epochs=1', '--stopping_step=50',
                         f"--train_batch_size={255 if gpu else 31}", f"--eval_batch_size={127 if gpu else 13}"]}
    rows = []
    for stage, args in jobs.items():
        start_s = time.perf_counter()
        prefix = os.path.join(out, stage)
        os.makedirs(out, exist_ok=True)
        rc, text = run(torchrun + [os.path.abspath(__file__), '--ddp-entry', stage, prefix, '--'] + args + common,
                       log, 150, env={'MISSREC_BACKEND': 'gloo'})
        ranks = [f'{prefix}-rank{r}.json' for r in range(2)]
        ranks = [json.load(open(f)) for f in ranks if os.path.exists(f)]
        failed = [f"rank {r['rank']}: {r['error']}" for r in ranks if r.get('error')]
        expect(rc == 0 and len(ranks) == 2 and not failed,
               f"{stage}: torchrun rc {rc}, {len(ranks)} rank reports; {'; '.join(failed) or tail(text, 2)}")
        device = 'cuda:0' if gpu else 'cpu'
        for r in ranks:
            expect(r['backend'] == 'gloo' and r['world_size'] == 2 and r['device'] == device,
                   f"rank {r['rank']}: backend {r['backend']}, world {r['world_size']}, device {r['device']}")
        seen = ranks[0]['collectives']           # {name: {device type of the tensor handed to it: calls}}
        used = {c: sum(seen.get(c, {}).values()) for c in GLOO_COLLECTIVES}
        uneven = min(r['uneven_gathers'] for r in ranks)
        expect(uneven > 0, f'{stage}: no uneven gather in {ranks[0]["gathers"]} (sizes {ranks[0]["sizes"][:5]})')
        if stage == 'pretrain':
            expect(used['all_gather'] > 0 and used['broadcast'] > 0 and used['all_reduce'] > 0,
                   f'pretrain: collectives {used}')
            expect(ranks[0]['params'] == ranks[1]['params'], f"parameters differ between the ranks: "
                   f"{ranks[0]['params']} vs {ranks[1]['params']}")
            what = f"1 epoch (discovery, steps, save), loss {ranks[0]['loss']:.3f}, parameters equal on both ranks"
        else:
            expect(used['all_gather'] > 0, f'finetune: collectives {used}')
            expect(ranks[0]['test'] == ranks[1]['test'] and ranks[0]['test']['ndcg@10'] > 0,
                   f"test results: {ranks[0]['test']} vs {ranks[1]['test']}")
            what = f"sharded evaluation, test NDCG@10 {ranks[0]['test']['ndcg@10']:.4f} on both ranks"
        forced = ' (gloo forced by gpu_check: distributed.init_from_env ignores MISSREC_BACKEND)' \
            if any(r['forced'] for r in ranks) else ''
        calls = ', '.join(f"{c} {n} ({'/'.join(sorted(seen.get(c, {}))) or '-'} tensors)" for c, n in used.items())
        rows.append(row(f'gloo: 2 ranks on one {"GPU" if gpu else "CPU"}, DDP {stage}', 'PASS',
                        f'{what}; model on {device}; {uneven} of {ranks[0]["gathers"]} gathers uneven; {calls}; '
                        f'object collectives and barriers on the CPU{forced}', time.perf_counter() - start_s))
    return rows


def ddp_entry(stage, prefix, argv):
    """Body of one torchrun rank of the gloo step: quick_start.main(stage, argv) with the collectives
    counted by tensor device, the first-dimension sizes of every gather, the backend checked, and a
    report in {prefix}-rank{RANK}.json."""
    import torch.distributed as dist
    import distributed as D
    import quick_start
    want = os.environ.get('MISSREC_BACKEND', '')
    report = {'rank': int(os.environ.get('RANK', 0)), 'backend': None, 'forced': False, 'world_size': None,
              'device': None, 'collectives': {}, 'sizes': [], 'gathers': 0, 'uneven_gathers': 0, 'error': None}

    def backend_of(real):
        def call(*a, **kw):
            positional = 'backend' not in kw and bool(a)
            backend = a[0] if positional else kw.get('backend')
            if want and backend not in (None, want):   # distributed.py does not honour MISSREC_BACKEND
                report['forced'] = True
                a = a[1:] if positional else a
                kw = dict(kw, backend=want)
                kw.pop('device_id', None)
            return real(*a, **kw)
        return call
    dist.init_process_group = backend_of(dist.init_process_group)
    dist.new_group = backend_of(dist.new_group)

    def counted(real, name):
        def call(*a, **kw):
            t = a[1] if name == 'all_gather' else a[0]
            per = report['collectives'].setdefault(name, {})
            per[t.device.type] = per.get(t.device.type, 0) + 1
            return real(*a, **kw)
        return call
    for name in GLOO_COLLECTIVES:
        setattr(dist, name, counted(getattr(dist, name), name))
    real_gather = D._gather_padded          # every gather of rows: (x, sizes of every rank, group)

    def gather(x, sizes, *a, **kw):
        report['sizes'].append(list(sizes))
        report['gathers'] += 1
        report['uneven_gathers'] += len(set(sizes)) > 1
        return real_gather(x, sizes, *a, **kw)
    D._gather_padded = gather
    run = getattr(quick_start, stage)

    def observed(config, resume=''):
        out = run(config, resume)
        report.update(backend=dist.get_backend(), world_size=D.world_size(),
                      device=str(D.process_device(config['use_gpu'])))
        if stage == 'pretrain':
            model = out['trainer'].model
            report['params'] = repr(sum(float(p.detach().double().sum()) for p in model.parameters()))
            report['loss'] = float(out['losses'][-1]) if out['losses'] else float('nan')
        else:
            report['test'] = {k: float(v) for k, v in out['test'][0].items()}
        return out
    setattr(quick_start, stage, observed)
    code = 1
    try:
        code = quick_start.main(stage, argv, nproc=0)
    except BaseException as e:
        report['error'] = f'{type(e).__name__}: {e}'[:400]
        raise
    finally:
        report['sizes'] = report['sizes'][:20]
        with open(f"{prefix}-rank{report['rank']}.json", 'w') as f:
            json.dump(report, f)
    if code and not report['error']:
        report['error'] = f'exit status {code}'
        with open(f"{prefix}-rank{report['rank']}.json", 'w') as f:
            json.dump(report, f)
    return code


# ------------------------------------------------------------------------ orchestration
def step_cmd(name, ctx, result):
    cmd = [sys.executable, os.path.abspath(__file__), '--step', name, '--out', ctx['out'], '--result', result]
    cmd += ['--dry-run'] if ctx['dry'] else []
    cmd += ['--data', ctx['data']] if ctx['data'] else []
    return cmd


def run_step(name, ctx, timeout):
    """One step in a process (group) of its own; returns its rows (a FAIL row if it failed, died or
    timed out: then its whole process group is killed, children included)."""
    result = os.path.join(ctx['out'], f'{name}.json')
    start_s = time.perf_counter()
    try:
        rc, text = run(step_cmd(name, ctx, result), os.path.join(ctx['out'], f'{name}.out'), timeout)
    except TimedOut:
        return [row(name, 'FAIL', f'timed out after {timeout:.0f} s', time.perf_counter() - start_s)]
    if os.path.exists(result):
        with open(result) as f:
            return json.load(f)
    return [row(name, 'FAIL', f'died (rc {rc}): {tail(text)}', time.perf_counter() - start_s)]


def step_main(name, ctx, result):
    """Body of a step's process: run it, write its rows (a FAIL row with the message on an error)."""
    import torch
    signal.signal(signal.SIGTERM, _stop_on_term)
    start = time.perf_counter()
    data_paths(ctx)
    try:
        rows = globals()[f'step_{name}'](ctx)
    except Exception as e:
        detail = f'{type(e).__name__}: {e}' if not isinstance(e, AssertionError) else str(e)
        rows = [row(name, 'FAIL', tail(detail), time.perf_counter() - start)]
        import traceback
        traceback.print_exc()
    for r in rows:
        r['source'] = name
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            r.setdefault('peak_mb', torch.cuda.max_memory_allocated() / 2 ** 20)
    with open(result, 'w') as f:
        json.dump(rows, f)


def suite_cmds():
    """{part: (pytest command, environment)} of the suite's part of the check: the tests that skip
    without CUDA/CuPy (serial: they share the GPU with the steps), and the CPU subset less those, in
    parallel where pytest-xdist is installed (half the cores, at most 8: the steps run beside it)."""
    base = [sys.executable, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider', '-p', 'tools.gpu_check']
    workers = min(8, max((os.cpu_count() or 1) // 2, 1))
    xdist = ['-n', str(workers)] if importlib.util.find_spec('xdist') and workers > 1 else []
    return {'suite: CUDA/CuPy tests': (base + ['tests'], {SELECT: 'cuda'}),
            'suite: CPU subset': (base + xdist + list(CPU_SUBSET), {SELECT: 'cpu'})}


SELECT = 'GPU_CHECK_TESTS'     # cuda | cpu: which tests pytest_collection_modifyitems keeps


def needs_gpu(item):
    """A test item that skips without CUDA or CuPy: a skipif marker (of the test, its parameter or
    its module) whose reason names CUDA or CuPy."""
    return any(re.search(r'CUDA|cupy|CuPy', str(m.kwargs.get('reason', ''))) for m in item.iter_markers('skipif'))


def pytest_collection_modifyitems(config, items):
    """pytest hook, with `pytest -p tools.gpu_check` and GPU_CHECK_TESTS=cuda (the tests that skip
    without CUDA/CuPy) or cpu (the others); without the variable it selects nothing."""
    part = os.environ.get(SELECT)
    if part not in ('cuda', 'cpu'):
        return
    keep = [item for item in items if needs_gpu(item) == (part == 'cuda')]
    dropped = [item for item in items if needs_gpu(item) != (part == 'cuda')]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def suite_rows(part, returncode, log, dry):
    """Verdict of one part of the suite: it passed; in the CUDA part on a GPU, tests ran and none
    skipped for want of CUDA/CuPy."""
    text = open(log).read()
    summary = tail(text)
    if returncode != 0:
        return [row(part, 'FAIL', f'pytest exit status {returncode}: {summary}')]
    if 'CUDA' not in part:
        return [row(part, 'PASS', summary)]
    skips = re.findall(r'^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$', text, re.M)
    gpu_skips = [reason for _, reason in skips if re.search(r'CUDA|cupy|CuPy', reason)]
    n_gpu = sum(int(n) for n, reason in skips if reason in gpu_skips)
    if dry:
        return [row(part, 'SKIPPED', f'{n_gpu} skipped without CUDA/CuPy ({summary})')]
    if gpu_skips:
        return [row(part, 'FAIL', f'{summary}; skipped on a GPU: {sorted(set(gpu_skips))}')]
    if not re.search(r'\b[1-9]\d* passed', summary):
        return [row(part, 'FAIL', f'no CUDA test ran: {summary}')]
    return [row(part, 'PASS', f'{summary}; none skipped for want of CUDA/CuPy')]


def environment(dry):
    """What the check runs with: python, torch, CUDA, CuPy, numpy, pytest-xdist, the device."""
    import numpy
    import torch
    env = {'python': f'{platform.python_version()} ({sys.executable})', 'torch': torch.__version__,
           'cuda': torch.version.cuda or 'none (a CPU build of torch)', 'numpy': numpy.__version__}
    try:
        import cupy
        env['cupy'] = cupy.__version__
        if not dry:
            v = cupy.cuda.runtime.runtimeGetVersion()
            env['cupy'] += f' (CUDA runtime {v // 1000}.{v % 1000 // 10})'
    except Exception as e:
        env['cupy'] = f'missing ({type(e).__name__}: {e})'
    xdist = importlib.util.find_spec('xdist')
    env['pytest-xdist'] = 'installed' if xdist else 'missing (the CPU subset runs serially)'
    env['device'] = torch.cuda.get_device_name(0) if not dry else 'dry run on the CPU'
    return env


def env_line(env):
    return (f"python {env['python']}, torch {env['torch']}, CUDA {env['cuda']}, cupy {env['cupy']}, "
            f"numpy {env['numpy']}, pytest-xdist {env['pytest-xdist'].split(' ')[0]}; {env['device']}")


def print_table(rows, total_s, env=None):
    print('\n## GPU check verdict\n')
    if env:
        print(f'{env_line(env)}\n')
    print('| step | status | s | detail |')
    print('|---|---|---|---|')
    for r in rows:
        s = '' if r.get('seconds') is None else f"{r['seconds']:.1f}"
        print(f"| {r['step']} | {r['status']} | {s} | {r['detail']} |")
    fails = sum(r['status'] == 'FAIL' for r in rows)
    skipped = sum(r['status'] == 'SKIPPED' for r in rows)
    print(f'\n{len(rows) - fails - skipped} passed, {fails} failed, {skipped} skipped; {total_s:.0f}s in all')


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ['--ddp-entry']:                     # one rank of the gloo step, under torchrun
        return ddp_entry(argv[1], argv[2], argv[4:] if argv[3:4] == ['--'] else argv[3:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dry-run', action='store_true', help='the CPU steps only (CPU, gloo, tiny sizes)')
    parser.add_argument('--no-suite', action='store_true', help='skip the suite part (CUDA/CuPy tests, CPU subset)')
    parser.add_argument('--out', default='', help='folder for data, logs and checkpoints (default: a new temporary one)')
    parser.add_argument('--data', default='', help=f'folder holding Scientific_mini/ (default {MINI})')
    parser.add_argument('--steps', default=','.join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument('--limit-s', type=float, default=235, help='stop starting steps after this (GPU run)')
    parser.add_argument('--step', help=argparse.SUPPRESS)
    parser.add_argument('--result', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = set(args.steps.split(',')) - set(STEPS)
    if unknown and not args.step:
        print(f"error: --steps: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(STEPS)}",
              file=sys.stderr)
        return 2
    ctx = {'dry': args.dry_run, 'data': args.data, 'out': os.path.abspath(args.out or tempfile.mkdtemp(prefix='gpu_check-'))}
    os.makedirs(ctx['out'], exist_ok=True)
    if args.step:
        step_main(args.step, ctx, args.result)
        return 0
    signal.signal(signal.SIGTERM, _stop_on_term)       # told to stop: end the suite and the running step too
    try:
        return check(args, ctx)
    finally:
        for pgid in list(_GROUPS):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def check(args, ctx):
    """The orchestrator: environment, data, the suite's part beside the steps, the verdict."""
    start_s = time.perf_counter()
    deadline = start_s + (args.limit_s if not args.dry_run else 3600)
    import torch
    rows = []
    if not args.dry_run and not torch.cuda.is_available():
        print('error: no CUDA device visible; use --dry-run for the CPU steps', file=sys.stderr)
        return 2
    env = environment(args.dry_run)
    rows.append(row('environment', 'PASS' if not args.dry_run else 'SKIPPED', env_line(env)))
    print(f'gpu_check: {env_line(env)}; output in {ctx["out"]}', flush=True)
    write_data(ctx)                                     # once here; the steps find it in place
    data_paths(ctx)
    print(f"data: fine-tuning on {ctx['ft'][0]} ({ctx['ft'][1]}), generated DemoPT for pre-training", flush=True)
    suites = {}
    if not args.no_suite:   # beside the other steps: the CPU subset is CPU work, they are mostly GPU work
        for i, (part, (cmd, env_part)) in enumerate(suite_cmds().items()):
            log = os.path.join(ctx['out'], f'suite{i}.log')
            shown = ' '.join(f'{k}={v}' for k, v in env_part.items()) + ' ' + ' '.join(cmd)
            with open(log, 'w') as out:
                out.write(f'$ {shown}\n')
                out.flush()
                suites[part] = (start(cmd, out, env=dict(env_part, OMP_NUM_THREADS='1')), log)
            print(f'started {part}: {shown}', flush=True)
    # the timing steps one after the other; then the others side by side (each its own processes)
    pool, results = ThreadPoolExecutor(max_workers=len(STEPS)), {}
    for name, timeout in STEPS.items():
        if name not in args.steps.split(','):
            continue
        left = deadline - time.perf_counter()
        if left < 10:
            results[name] = [row(name, 'FAIL', f'not started: the {args.limit_s:.0f}s limit was reached')]
            continue
        limit = min(timeout if not args.dry_run else 1200, left)
        if name in CONCURRENT:
            results[name] = pool.submit(run_step, name, ctx, limit)
            continue
        results[name] = run_step(name, ctx, limit)
        for r in results[name]:
            print(f"  {r['status']:<7} {r['step']}: {r['detail']}", flush=True)
    for name, got in results.items():
        if not isinstance(got, list):
            got = got.result()
            for r in got:
                print(f"  {r['status']:<7} {r['step']}: {r['detail']}", flush=True)
        rows += got
    pool.shutdown()
    if not suites:
        rows.append(row('suite: CUDA/CuPy tests, CPU subset', 'SKIPPED', '--no-suite'))
    for part, (proc, log) in suites.items():
        try:
            proc.wait(timeout=max(deadline - time.perf_counter(), 1))
            _GROUPS.discard(proc.pid)
            rows += suite_rows(part, proc.returncode, log, args.dry_run)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            rows.append(row(part, 'FAIL', f'still running at the {args.limit_s:.0f}s limit, killed; '
                            f'last line: {tail(open(log).read())}'))
    peaks = {r['source']: r['peak_mb'] for r in rows if r.get('peak_mb')}   # one per step process
    if peaks and not args.dry_run:
        names = {'kernels': 'k-means at FHCKM size', 'bench': f"{ctx['ft'][0]} fine-tuning", 'nccl': 'nccl step'}
        rows.append(row('timing: GPU memory', 'PASS', 'peak allocated: ' + ', '.join(
            f'{names.get(k, k)} {v:.0f} MB' for k, v in peaks.items())))
    total = time.perf_counter() - start_s
    if not args.dry_run and total > 240:
        rows.append(row('total time', 'FAIL', f'{total:.0f}s > 240s'))
    print_table(rows, total, env)
    verdict = os.path.join(ctx['out'], 'verdict.json')
    counts = {s: sum(r['status'] == s for r in rows) for s in ('PASS', 'FAIL', 'SKIPPED')}
    with open(verdict, 'w') as f:
        json.dump({'environment': env, 'dry_run': args.dry_run, 'total_s': total, 'counts': counts, 'rows': rows},
                  f, indent=1)
    print(f'verdict as JSON: {verdict}')
    return 1 if counts['FAIL'] else 0


if __name__ == '__main__':
    sys.exit(main())
