"""Fine-tuning speed on a real dataset: seconds per training epoch, per interest
discovery and per full validation, and peak memory (host RSS on the CPU, allocated GPU
memory on CUDA).

    python bench/finetune.py                                   # Scientific_mini, run01 setting
    python bench/finetune.py --epochs 3 -- --train_stage=inductive_ft --kmeans_mode=lloyd
    python bench/finetune.py --scientific-size --baseline c0f10eb   # whole runs, two trees

`--scientific-size` generates a set of Scientific_mm_full's shape (8,442 users,
4,385 items, 512-d text and image features, histories of 5-10 items) and times
whole `finetune.py` runs (run01 setting, `--epochs`) of this tree and, with
`--baseline REV`, of `git archive REV` in the same run: seconds per training
epoch from the log lines, and each run's peak RSS (whole process).

Prints a table and ends with one line `RESULT key=value ...`. The original
code's figures on the same data and machine kind (docs/original-on-mini.md): a
median training epoch of 63.1 s (run01) and a median validation of 5.1 s.
"""
import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from config import Config, parse_overrides, stage_files  # noqa: E402
from data.dataset import SeqDataset  # noqa: E402
from data.loader import SeqBatches  # noqa: E402
from missrec import MISSRec  # noqa: E402
from run_log import init_seed  # noqa: E402
from trainer import Trainer  # noqa: E402

from baseline import extract_revision  # noqa: E402  (bench/ is on the path of a bench script)

ORIGINAL_EPOCH_S = 63.1
ORIGINAL_VALID_S = 5.1


def timed(fn):
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# measured before this mode existed, on a set of this shape with 384-d text (issue 13 of the tracker)
SCIENTIFIC_FIRST_MEASURED = {'epoch_s': 24.5, 'peak_rss_gb_2_epochs': 2.26, 'peak_rss_gb_full_run': 3.07}


def run_cli(tree, data_path, epochs, out_dir):
    """One `finetune.py` run in `tree`; returns (epoch seconds, losses, peak RSS GB)."""
    cmd = [sys.executable, 'finetune.py', '-d', 'SciLike', '-mode', 'transductive', f'--data_path={data_path}',
           f'--epochs={epochs}', f'--checkpoint_dir={out_dir}', '--show_progress=False']
    proc = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status:
        sys.exit(f'error: {tree}: finetune.py failed:\n{log[-2000:]}')
    found = re.findall(r'epoch \d+ training \[time: ([0-9.]+)s, train loss: ([0-9.]+)\]', log)
    return [float(t) for t, _ in found], [float(v) for _, v in found], usage.ru_maxrss / 2 ** 20


def scientific_size(args):
    sys.path.insert(0, ROOT)
    from tools.make_demo_data import write_downstream
    with tempfile.TemporaryDirectory() as tmp:
        write_downstream(tmp, name='SciLike', n_users=8442, n_items=4385, dim=512, seed=0, min_len=5, max_len=10)
        trees = {'this tree': ROOT}
        if args.baseline:
            base = extract_revision(ROOT, args.baseline, os.path.join(tmp, 'baseline'))
            trees = {f'baseline {args.baseline}': base, **trees}
        print(f'Scientific-sized set (8,442 users, 4,385 items, 512-d text + image), run01 setting, '
              f'{args.epochs} epochs, whole finetune.py runs')
        print('| code | median epoch s | epochs s | train losses | peak RSS GB |\n|---|---|---|---|---|')
        results = {}
        for name, tree in trees.items():
            times, losses, rss = run_cli(tree, tmp, args.epochs, os.path.join(tmp, 'saved-' + name[:4]))
            results[name] = (statistics.median(times), rss)
            print(f"| {name} | {results[name][0]:.2f} | {', '.join(f'{t:.2f}' for t in times)} | "
                  f"{', '.join(f'{v:.4f}' for v in losses)} | {rss:.2f} |", flush=True)
    print(f'first measured on this machine kind (before this mode): {SCIENTIFIC_FIRST_MEASURED}')
    epoch_s, rss = results['this tree']
    parts = [f'epoch_s={epoch_s:.2f}', f'peak_rss_gb={rss:.2f}']
    if args.baseline:
        base_s, base_rss = results[f'baseline {args.baseline}']
        parts += [f'speedup={base_s / epoch_s:.2f}', f'rss_ratio={rss / base_rss:.2f}']
    print('RESULT dataset=scientific_size ' + ' '.join(parts))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('-d', default='Scientific_mini')
    parser.add_argument('--data_path', default=os.path.join('..', 'shared', 'datasets', 'downstream'))
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--scientific-size', action='store_true', help='whole runs on a generated set of '
                        "Scientific_mm_full's shape (see above)")
    parser.add_argument('--baseline', default='', help='with --scientific-size: also run this git revision')
    parser.add_argument('overrides', nargs='*', help='--key=value config overrides (after --)')
    args = parser.parse_args()
    if args.scientific_size:
        return scientific_size(args)
    overrides = dict(parse_overrides(args.overrides), data_path=args.data_path, show_progress=False)
    config = Config(args.d, stage_files('finetune'), overrides)
    init_seed(config['seed'])
    dataset = SeqDataset(config)
    device = torch.device(args.device)
    model = MISSRec(config, dataset.n_items, dataset.plm_table, dataset.img_table).to(device)
    trainer = Trainer(config, model, device)
    train = SeqBatches(dataset.splits['train'], config['train_batch_size'], True, config['seed'], dataset.pad_len)
    valid = SeqBatches(dataset.splits['valid'], config['eval_batch_size'], pad_len=dataset.pad_len)

    disc, epochs, evals, losses = [], [], [], []
    for epoch in range(args.epochs):
        disc.append(timed(lambda: trainer.discover(epoch))[0])
        t, loss = timed(lambda: trainer.train_epoch(train, epoch))
        epochs.append(t)
        losses.append(loss)
        evals.append(timed(lambda: trainer.evaluate(valid))[0])
    if device.type == 'cuda':   # the host process's RSS says nothing about the GPU
        peak_mb, peak_what = torch.cuda.max_memory_allocated(device) / 2 ** 20, 'peak GPU memory (allocated)'
    else:
        peak_mb, peak_what = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'peak memory (RSS)'

    med = {k: statistics.median(v) for k, v in (('epoch', epochs), ('discovery', disc), ('valid', evals))}
    print(f"\n{args.d}, train_stage {config['train_stage']}, kmeans_mode {config['kmeans_mode']}, "
          f"{args.device} ({torch.get_num_threads()} CPU threads), {args.epochs} epochs")
    print('| step | median s | min s | original s | speed-up |')
    print('|---|---|---|---|---|')
    print(f"| training epoch | {med['epoch']:.2f} | {min(epochs):.2f} | {ORIGINAL_EPOCH_S} | "
          f"{ORIGINAL_EPOCH_S / med['epoch']:.1f}x |")
    print(f"| interest discovery | {med['discovery']:.3f} | {min(disc):.3f} | 0.37 | |")
    print(f"| full validation | {med['valid']:.2f} | {min(evals):.2f} | {ORIGINAL_VALID_S} | "
          f"{ORIGINAL_VALID_S / med['valid']:.1f}x |")
    print(f'train loss by epoch: {", ".join(f"{x:.4f}" for x in losses)}; {peak_what} {peak_mb:.0f} MB')
    print(f"RESULT dataset={args.d} epoch_s={med['epoch']:.2f} discovery_s={med['discovery']:.3f} "
          f"valid_s={med['valid']:.2f} device={args.device} peak_mb={peak_mb:.0f} speedup_vs_original={ORIGINAL_EPOCH_S / med['epoch']:.2f}")


if __name__ == '__main__':
    main()
