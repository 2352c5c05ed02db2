"""Pre-training throughput (sequences/s) with 1 and 2 CPU processes on the demo pre-training set.

    python bench/pretrain.py [--steps 6] [--batch 512] [--hidden 300] [--setups 1x1,1x2,2x1]

Same global batch and steps for every setup (processes x torch threads per
process). Timing covers training steps only (after one
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--steps', type=int, default=6)
    ap.add_argument('--batch', type=int, default=512)
    ap.add_argument('--hidden', type=int, default=300)
    ap.add_argument('--setups', default='1x1,1x2,2x1', help='processes x threads per process, comma-separated')
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_pretrain(tmp, name='DemoPT')                             # 3 domains x 600 users, 512-d features
        rates = {}
        print('| processes x threads | sequences/s | seconds |\n|---|---|---|')
        for setup in a.setups.split(','):
            n, a.threads = (int(v) for v in setup.split('x'))
            out = os.path.join(tmp, f'time{setup}')
            D.spawn(_worker, n, tmp, a, out)
            seconds = float(pathlib.Path(out).read_text())
            rates[setup] = a.steps * a.batch / seconds
            print(f'| {setup} | {rates[setup]:.1f} | {seconds:.2f} |', flush=True)
    parts = [f'seq_per_s_{k}={r:.1f}' for k, r in rates.items()]
    # scaling of the distributed code (the same thread per process), and what a second
    # process adds on this machine over one process that already uses every core
    for base in ('1x1', '1x2'):
        if base in rates and '2x1' in rates:
            parts.append(f'speedup_2x1_over_{base}={rates["2x1"] / rates[base]:.2f}')
    print('RESULT ' + ' '.join(parts + [f'batch={a.batch}', f'hidden={a.hidden}', f'steps={a.steps}']))


if __name__ == '__main__':
    main()
