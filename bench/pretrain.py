"""Pre-training throughput: sequences/s, seconds per batch and peak memory.

    python bench/pretrain.py                         # real corpus BTG_text, batch 4096, both kmeans modes
    python bench/pretrain.py --baseline c0f10eb      # ... and the code of another commit, in the same run
    python bench/pretrain.py --data demo [--setups 1x1,1x2,2x1] [--batch 512]   # processes x threads

`--data btg` reads `../shared/datasets/pretrain/BTG_text` (docs/data.md; 440,714 sequences,
384-d text, no images) and times `--steps` full batches of the paper's global
batch 4096 after one warm-up batch, each setting in a fresh process (peak RSS
is that process's). `kmeans_mode=original` collapses the interests at the
start of training (few interests per row, like epoch 0); `lloyd` gives each
row its real distinct interests (about 6 per row, like later epochs), which
costs more. The projected epoch is 108 batches plus one interest discovery.
With `--baseline REV` the same measurement runs on `git archive REV` of this
repository, so the ratio is measured on one machine in one run; REV must have the
pre-training loop in trainer.py (94cae89 or later). The figures against c0f10eb in
docs/performance.md were taken by this benchmark while it also read that older layout.
`--reg_pad_draws independent,shared` (the default) times the regulariser with the
original's own dropout draw per padded interest slot and with one shared draw, and
`--init CKPT` starts from a pre-training checkpoint (the loss level of a trained model).

`--data demo` times 1 or 2 processes (gloo) on the generated demo corpus. Both
modes end with one line `RESULT key=value ...`.
"""
import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

from baseline import extract_revision

ROOT = pathlib.Path(__file__).resolve().parents[1]
BTG_BATCHES = 108          # ceil(440,714 / 4096)
# measured before this benchmark existed (2 cores, one process): issue 13 of the tracker
BTG_FIRST_MEASURED = {'epoch0_s': 797, 'epoch1_s': 1236, 's_per_batch': 7.2, 'peak_rss_gb': 6.65}


# --------------------------------------------------------------- BTG_text, one process
def btg_worker(root, data_path, kmeans_mode, steps, batch, reg_pad_draws=None, init=''):
    """Runs in a fresh process with `root` first on sys.path; prints one JSON line."""
    sys.path.insert(0, root)
    import torch
    from config import Config, stage_files
    from data.pretrain import PretrainDataset
    from trainer import Pretrainer
    start = time.perf_counter()
    config = Config('BTG_text', stage_files('pretrain'), {
        'data_path': data_path, 'train_stage': 'pretrain', 'use_gpu': False, 'show_progress': False,
        'modal_type': 'text', 'plm_size': 384, 'kmeans_mode': kmeans_mode, 'train_batch_size': batch,
        **({'reg_pad_draws': reg_pad_draws} if reg_pad_draws else {})})
    dataset = PretrainDataset(config)
    load_s = time.perf_counter() - start
    trainer = Pretrainer(config, dataset, torch.device('cpu'))
    if init:   # the weights of a pre-training checkpoint (its interests are discovered again below)
        from checkpoints import load_checkpoint
        trainer.model.load_state_dict(load_checkpoint(init)['state_dict'])
    start = time.perf_counter()
    trainer.discover(0)
    discovery_s = time.perf_counter() - start
    trainer.model.train()
    trainer.batches.set_epoch(0)
    batches = iter(trainer.batches)
    trainer.step(next(batches))                                        # warm-up
    data_s = step_s = 0.0
    losses = []
    for _ in range(steps):
        t0 = time.perf_counter()
        b = next(batches)
        t1 = time.perf_counter()
        losses.append(trainer.step(b))
        data_s += t1 - t0
        step_s += time.perf_counter() - t1
    print(json.dumps({'load_s': load_s, 'discovery_s': discovery_s, 's_per_batch': (data_s + step_s) / steps,
                      'data_s_per_batch': data_s / steps, 'losses': losses,
                      'peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}))


def run_btg(a):
    data_path = os.path.abspath(a.data_path)
    if not os.path.isdir(os.path.join(data_path, 'BTG_text')):
        sys.exit(f'error: {data_path}/BTG_text not found (--data_path)')
    # (label, source tree, reg_pad_draws): the PAD slots' own dropout draws (the default)
    # cost more than one shared draw per row; both are timed
    draws = a.reg_pad_draws.split(',')
    trees = [('this tree' + ('' if d == draws[0] else f' ({d} PAD draws)'), str(ROOT), d) for d in draws]
    with tempfile.TemporaryDirectory() as tmp:
        if a.baseline:
            base = extract_revision(ROOT, a.baseline, os.path.join(tmp, 'baseline'))
            trees = [(f'baseline {a.baseline}', base, '')] + trees
        results = {}
        print(f'BTG_text, batch {a.batch}, {a.steps} timed batches after one warm-up, one process, '
              f'{os.environ.get("OMP_NUM_THREADS", "default")} threads' + (f', from {a.init}' if a.init else ''))
        print('| code | kmeans_mode | s per batch | sequences/s | projected epoch s | discovery s | '
              'peak RSS GB | first losses |')
        print('|---|---|---|---|---|---|---|---|')
        for mode in a.modes.split(','):
            for name, root, draw in trees:
                out = subprocess.run([sys.executable, __file__, '--worker', root, '--data_path', data_path,
                                      '--modes', mode, '--steps', str(a.steps), '--batch', str(a.batch),
                                      '--reg_pad_draws', draw, '--init', a.init],
                                     check=True, capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                results[name, mode] = r
                epoch = BTG_BATCHES * r['s_per_batch'] + r['discovery_s']
                print(f"| {name} | {mode} | {r['s_per_batch']:.2f} | {a.batch / r['s_per_batch']:.0f} | "
                      f"{epoch:.0f} | {r['discovery_s']:.1f} | {r['peak_rss_gb']:.2f} | "
                      f"{', '.join(f'{x:.4f}' for x in r['losses'][:3])} |", flush=True)
    print(f"first measured on this machine kind (before this benchmark): {BTG_FIRST_MEASURED}")
    parts = []
    for mode in a.modes.split(','):
        r = results['this tree', mode]
        parts += [f's_per_batch_{mode}={r["s_per_batch"]:.2f}', f'seq_per_s_{mode}={a.batch / r["s_per_batch"]:.0f}',
                  f'epoch_s_{mode}={BTG_BATCHES * r["s_per_batch"] + r["discovery_s"]:.0f}',
                  f'peak_rss_gb_{mode}={r["peak_rss_gb"]:.2f}']
        if a.baseline:
            b = results[f'baseline {a.baseline}', mode]
            parts.append(f'speedup_{mode}={b["s_per_batch"] / r["s_per_batch"]:.2f}')
        for name, _, draw in trees[1 + bool(a.baseline):]:
            parts.append(f'cost_of_{draws[0]}_over_{draw}_{mode}='
                         f'{r["s_per_batch"] / results[name, mode]["s_per_batch"]:.2f}')
    print('RESULT data=BTG_text ' + ' '.join(parts))


# ---------------------------------------------------- demo corpus, 1 or 2 processes
def _demo_worker(index, nproc, port, root, a, out):
    import torch
    import distributed as D
    from config import Config, stage_files
    from data.pretrain import PretrainDataset
    from trainer import Pretrainer
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(a.threads)
    D.init_from_env(use_gpu=False)
    try:
        cfg = Config('DemoPT', stage_files('pretrain'), {
            'data_path': root, 'train_stage': 'pretrain', 'use_gpu': False, 'show_progress': False,
            'hidden_size': a.hidden, 'inner_size': 256, 'train_batch_size': a.batch})
        trainer = Pretrainer(cfg, PretrainDataset(cfg), torch.device('cpu'))
        trainer.discover(0)
        trainer.model.train()
        batches = iter(trainer.batches)
        trainer.step(next(batches))                                    # warm-up
        D.barrier()
        start = time.perf_counter()
        for _ in range(a.steps):
            trainer.step(next(batches))
        D.barrier()
        if D.is_main_process():
            pathlib.Path(out).write_text(str(time.perf_counter() - start))
    finally:
        D.teardown()


def run_demo(a):
    sys.path.insert(0, str(ROOT))
    import distributed as D
    from tools.make_demo_data import write_pretrain
    with tempfile.TemporaryDirectory() as tmp:
        write_pretrain(tmp, name='DemoPT')                             # 3 domains x 600 users, 512-d features
        rates = {}
        print('| processes x threads | sequences/s | seconds |\n|---|---|---|')
        for setup in a.setups.split(','):
            n, a.threads = (int(v) for v in setup.split('x'))
            out = os.path.join(tmp, f'time{setup}')
            D.spawn(_demo_worker, n, tmp, a, out)
            seconds = float(pathlib.Path(out).read_text())
            rates[setup] = a.steps * a.batch / seconds
            print(f'| {setup} | {rates[setup]:.1f} | {seconds:.2f} |', flush=True)
    parts = [f'seq_per_s_{k}={r:.1f}' for k, r in rates.items()]
    # scaling of the distributed code (the same thread per process), and what a second
    # process adds on this machine over one process that already uses every core
    for base in ('1x1', '1x2'):
        if base in rates and '2x1' in rates:
            parts.append(f'speedup_2x1_over_{base}={rates["2x1"] / rates[base]:.2f}')
    print('RESULT data=demo ' + ' '.join(parts + [f'batch={a.batch}', f'hidden={a.hidden}', f'steps={a.steps}']))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data', choices=['btg', 'demo'], default='btg')
    ap.add_argument('--data_path', default=str(ROOT.parent / 'shared' / 'datasets' / 'pretrain'))
    ap.add_argument('--modes', default='original,lloyd', help='btg: kmeans modes, comma-separated')
    ap.add_argument('--baseline', default='', help='btg: also time this git revision (e.g. a commit id)')
    ap.add_argument('--steps', type=int, default=None, help='timed batches (btg 4, demo 6)')
    ap.add_argument('--batch', type=int, default=None, help='global batch (btg 4096, demo 512)')
    ap.add_argument('--hidden', type=int, default=300, help='demo: hidden size')
    ap.add_argument('--setups', default='1x1,1x2,2x1', help='demo: processes x threads, comma-separated')
    ap.add_argument('--reg_pad_draws', default='independent,shared',
                    help='btg: regulariser PAD draws to time, comma-separated, the first one is reported')
    ap.add_argument('--init', default='', help='btg: start from the weights of this pre-training checkpoint')
    ap.add_argument('--worker', default='', help=argparse.SUPPRESS)
    a = ap.parse_args()
    btg = a.data == 'btg'
    a.steps = a.steps or (4 if btg else 6)
    a.batch = a.batch or (4096 if btg else 512)
    if a.worker:
        btg_worker(a.worker, a.data_path, a.modes, a.steps, a.batch, a.reg_pad_draws, a.init)
    elif btg:
        run_btg(a)
    else:
        run_demo(a)


if __name__ == '__main__':
    main()
