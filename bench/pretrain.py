"""Pre-training throughput (sequences/s) with 1 and 2 CPU processes on the demo pre-training set.

    python bench/pretrain.py [--steps 6] [--batch 512] [--hidden 300] [--nprocs 1,2]

Same global batch and steps for every process count; each process uses
cores // nproc torch threads. Timing covers training steps only (after one
warm-up step), not start-up, data loading or interest discovery. Ends with one
line `RESULT key=value ...`.
"""
import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import distributed as D  # noqa: E402
from config import Config, stage_files  # noqa: E402
from data.pretrain import PretrainDataset  # noqa: E402
from ddp_pretrain import Pretrainer  # noqa: E402
from tools.make_demo_data import write_pretrain  # noqa: E402


def _worker(index, nproc, port, root, a, out):
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(nproc),
                      LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(a.threads or D.cpu_threads())
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--steps', type=int, default=6)
    ap.add_argument('--batch', type=int, default=512)
    ap.add_argument('--hidden', type=int, default=300)
    ap.add_argument('--nprocs', default='1,2')
    ap.add_argument('--threads', type=int, default=0, help='threads per process (default cores // nproc)')
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_pretrain(tmp, name='DemoPT')                             # 3 domains x 600 users, 512-d features
        rates = {}
        for n in (int(x) for x in a.nprocs.split(',')):
            out = os.path.join(tmp, f'time{n}')
            D.spawn(_worker, n, tmp, a, out)
            seconds = float(pathlib.Path(out).read_text())
            rates[n] = a.steps * a.batch / seconds
            threads = a.threads or max(1, (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                              else os.cpu_count()) // n)
            print(f'{n} process(es) x {threads} thread(s): {rates[n]:.1f} sequences/s ({seconds:.2f}s '
                  f'for {a.steps} steps of {a.batch})', flush=True)
    parts = [f'seq_per_s_{n}proc={r:.1f}' for n, r in rates.items()]
    if 1 in rates and len(rates) > 1:
        top = max(rates)
        parts.append(f'speedup_{top}proc={rates[top] / rates[1]:.2f}')
    print('RESULT ' + ' '.join(parts + [f'batch={a.batch}', f'hidden={a.hidden}', f'steps={a.steps}']))


if __name__ == '__main__':
    main()
