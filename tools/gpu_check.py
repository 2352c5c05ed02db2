"""One check of every GPU path, with one verdict table (scripts/gpu_check.sh runs it).

    python tools/gpu_check.py                 # on a GPU machine: under 4 minutes on one H200
    python tools/gpu_check.py --dry-run       # here: every step on the CPU (gloo, tiny sizes)
    python tools/gpu_check.py --dry-run --no-suite --out /tmp/check

Steps (each asserts its result; each but the suite runs in its own process, so
that a crash of one, e.g. an illegal memory access, fails that step alone):

* suite: the whole test suite (CUDA tests included: on a GPU, none may skip for
  want of CUDA or CuPy); started first, it runs beside the other steps;
* kernels: CuPy kernels against the torch path on the same GPU, k-means in both
  modes and DPC-KNN, and a sampled comparison at FHCKM size (894,000 x 17,900 x
  300: every row assigned by the kernel, 20,000 sampled rows by torch); counts
  the kernel calls, so that a silent fall-back to torch fails; times both modes
  of a FHCKM-size discovery;
* finetune: finetune.py on CUDA for a few epochs (checkpoint, best reload,
  test), --resume from its -last.pth, recommend.py --device cuda;
* bench: bench/finetune.py, seconds per training epoch and peak GPU memory;
* pretrain: ddp_pretrain.py on CUDA with interest discovery, save, --resume;
* nccl: a process group of one rank (nccl): DDP pre-training steps with the
  gathered negatives, the discovery broadcast, a save (all_gather_object), and
  one ddp_finetune.py epoch with sharded evaluation.

Data: Scientific_mini from ../shared/datasets/downstream (or --data) when
present, else generated demo data; the pre-training data is always generated.
With --dry-run the same steps run on the CPU at tiny sizes; what only a GPU can
show (CuPy ran, no CUDA test skipped, nccl) is marked SKIPPED. Exit status 1
if a step fails.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MINI = os.path.join(ROOT, '..', 'shared', 'datasets', 'downstream')
FHCKM = (894000, 17900, 300)          # pre-training interest discovery: points, clusters, dimension
TINY = ['--plm_size=32', '--img_size=32', '--hidden_size=32', '--inner_size=32', '--n_heads=2']
# step -> timeout on a GPU (s); the whole check stops at --limit-s
STEPS = {'kernels': 100, 'finetune': 100, 'bench': 60, 'pretrain': 70, 'nccl': 60}


class Skip(Exception):
    """A part that only a GPU can show."""


# --------------------------------------------------------------------------- helpers
def row(step, status, detail='', seconds=None, **metrics):
    return {'step': step, 'status': status, 'detail': detail, 'seconds': seconds, **metrics}


def run(cmd, log, timeout, env=None):
    """Run a command from the repository root, output appended to `log`; returns (rc, output)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))
    with open(log, 'a') as f:
        f.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}[rc {proc.returncode}, "
                f"{time.perf_counter() - start:.1f}s]\n\n")
    return proc.returncode, proc.stdout + proc.stderr


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
    from bench.kmeans import used_path
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
    path = used_path(device)                  # as bench/kmeans.py reports it

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
        expect(not gpu or used > 0, 'no CuPy kernel ran (torch fall-back)')
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
        expect(not gpu or used > 0, 'no CuPy kernel ran (torch fall-back)')
        expect(agree >= 0.999, f'sampled assignments agree on {agree:.4%} < 99.9%')
        expect(worst <= 1e-4, f'a differing row is no tie (relative distance gap {worst:.1e})')
        return (f'{n}x{k}x{d}: all rows in {t_kernel:.2f}s on the {path} path; {len(sample)} sampled rows agree '
                f'{agree:.4%} with torch ({len(diff)} differ, largest distance gap {worst:.1e})')
    part('kernels: FHCKM-size assignment, sampled', sampled)

    if gpu:
        def ran():
            what = f"path={path}, {calls['kernel']} kernel calls, cupy {'imported' if cupy is not None else 'missing'}"
            expect(path == 'cupy' and calls['kernel'] > 0, what)
            return what
        part('kernels: CuPy path ran', ran)
    else:
        rows.append(row('kernels: CuPy path ran', 'SKIPPED', f'no GPU (path={path})'))

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


# ------------------------------------------------------------------------ orchestration
def run_step(name, ctx, timeout):
    """One step in a process of its own; returns its rows (a FAIL row if it failed or died)."""
    result = os.path.join(ctx['out'], f'{name}.json')
    cmd = [sys.executable, os.path.abspath(__file__), '--step', name, '--out', ctx['out'], '--result', result]
    cmd += ['--dry-run'] if ctx['dry'] else []
    cmd += ['--data', ctx['data']] if ctx['data'] else []
    start = time.perf_counter()
    try:
        rc, text = run(cmd, os.path.join(ctx['out'], f'{name}.out'), timeout)
    except subprocess.TimeoutExpired:
        return [row(name, 'FAIL', f'timed out after {timeout:.0f}s', time.perf_counter() - start)]
    if os.path.exists(result):
        with open(result) as f:
            return json.load(f)
    return [row(name, 'FAIL', f'died (rc {rc}): {tail(text)}', time.perf_counter() - start)]


def step_main(name, ctx, result):
    """Body of a step's process: run it, write its rows (a FAIL row with the message on an error)."""
    import torch
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


def suite_rows(proc, log, dry):
    """Verdict of the test suite: it passed, and on a GPU no test skipped for want of CUDA/CuPy/nvcc."""
    text = open(log).read()
    summary = tail(text)
    if proc.returncode != 0:
        return [row('suite: all tests', 'FAIL', summary)]
    skips = re.findall(r'^SKIPPED \[(\d+)\] [^:]+:\d+: (.*)$', text, re.M)
    gpu_skips = [reason for _, reason in skips if re.search(r'CUDA|cupy|CuPy', reason)]
    if not dry and gpu_skips:
        return [row('suite: all tests', 'FAIL', f'{summary}; skipped on a GPU: {sorted(set(gpu_skips))}')]
    rows = [row('suite: all tests', 'PASS', summary)]
    n_gpu = sum(int(n) for n, reason in skips if reason in gpu_skips)
    if dry:
        rows.append(row('suite: CUDA tests', 'SKIPPED', f'{n_gpu} skipped without CUDA/CuPy'))
    else:
        rows.append(row('suite: CUDA tests', 'PASS', 'none skipped'))
    return rows


def print_table(rows, total_s):
    print('\n## GPU check verdict\n')
    print('| step | status | s | detail |')
    print('|---|---|---|---|')
    for r in rows:
        s = '' if r.get('seconds') is None else f"{r['seconds']:.1f}"
        print(f"| {r['step']} | {r['status']} | {s} | {r['detail']} |")
    fails = sum(r['status'] == 'FAIL' for r in rows)
    skipped = sum(r['status'] == 'SKIPPED' for r in rows)
    print(f'\n{len(rows) - fails - skipped} passed, {fails} failed, {skipped} skipped; {total_s:.0f}s in all')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dry-run', action='store_true', help='the CPU steps only (CPU, gloo, tiny sizes)')
    parser.add_argument('--no-suite', action='store_true', help='skip the test suite')
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

    start = time.perf_counter()
    deadline = start + (args.limit_s if not args.dry_run else 3600)
    import torch
    rows = []
    if not args.dry_run and not torch.cuda.is_available():
        print('error: no CUDA device visible; use --dry-run for the CPU steps', file=sys.stderr)
        return 2
    try:
        import cupy
        cupy_version = cupy.__version__
    except Exception as e:
        cupy_version = f'missing ({type(e).__name__})'
    env = (f"torch {torch.__version__}, CUDA {torch.version.cuda}, cupy {cupy_version}, "
           + (torch.cuda.get_device_name(0) if not args.dry_run else 'dry run on the CPU'))
    rows.append(row('environment', 'PASS' if not args.dry_run else 'SKIPPED', env))
    print(f'gpu_check: {env}; output in {ctx["out"]}', flush=True)
    write_data(ctx)                                     # once here; the steps find it in place
    data_paths(ctx)
    print(f"data: fine-tuning on {ctx['ft'][0]} ({ctx['ft'][1]}), generated DemoPT for pre-training", flush=True)
    suite, suite_log = None, os.path.join(ctx['out'], 'suite.log')
    if not args.no_suite:   # beside the other steps: it is mostly CPU work, they are mostly GPU work
        suite = subprocess.Popen([sys.executable, '-m', 'pytest', '-q', '-x', '-rs', 'tests'], cwd=ROOT,
                                 stdout=open(suite_log, 'w'), stderr=subprocess.STDOUT,
                                 env=dict(os.environ, OMP_NUM_THREADS='1'))
    for name, timeout in STEPS.items():
        if name not in args.steps.split(','):
            continue
        left = deadline - time.perf_counter()
        if left < 10:
            rows.append(row(name, 'FAIL', f'not started: the {args.limit_s:.0f}s limit was reached'))
            continue
        step_rows = run_step(name, ctx, min(timeout if not args.dry_run else 1200, left))
        rows += step_rows
        for r in step_rows:
            print(f"  {r['status']:<7} {r['step']}: {r['detail']}", flush=True)
    if suite is None:
        rows.append(row('suite: all tests', 'SKIPPED', '--no-suite'))
    else:
        try:
            suite.wait(timeout=max(deadline - time.perf_counter(), 1))
            rows += suite_rows(suite, suite_log, args.dry_run)
        except subprocess.TimeoutExpired:
            suite.kill()
            suite.wait()
            rows.append(row('suite: all tests', 'FAIL', f'still running at the {args.limit_s:.0f}s limit; '
                            f'last line: {tail(open(suite_log).read())}'))
    peaks = {r['source']: r['peak_mb'] for r in rows if r.get('peak_mb')}   # one per step process
    if peaks and not args.dry_run:
        names = {'kernels': 'k-means at FHCKM size', 'bench': f"{ctx['ft'][0]} fine-tuning", 'nccl': 'nccl step'}
        rows.append(row('timing: GPU memory', 'PASS', 'peak allocated: ' + ', '.join(
            f'{names.get(k, k)} {v:.0f} MB' for k, v in peaks.items())))
    total = time.perf_counter() - start
    if not args.dry_run and total > 240:
        rows.append(row('total time', 'FAIL', f'{total:.0f}s > 240s'))
    print_table(rows, total)
    return 1 if any(r['status'] == 'FAIL' for r in rows) else 0


if __name__ == '__main__':
    sys.exit(main())
