"""A run's log and id, and its seeds: what both training stages (quick_start.py, trainer.py) and
the checkpoint loader (checkpoints.py) share, below all of them.

    start_logging(main_process)            # log to the console, keep the records for the log file
    run_id = claim_run_id(config, name)    # a time and a random suffix no other run has
    init_logger(config, name + [run_id])   # open {log_dir}/{name}-{run_id}.log with the kept records

The log lines follow the original's format (`%(asctime)s %(levelname)s  %(message)s`).
"""
import logging
import logging.handlers
import os
import random
import secrets
import sys
import time

import numpy as np
import torch

import distributed as D

__all__ = ['init_seed', 'start_logging', 'init_logger', 'claim_run_id', 'new_run_id', 'log_file', 'local_time']

_FORMAT = logging.Formatter('%(asctime)s %(levelname)s  %(message)s', datefmt='%a %d %b %Y %H:%M:%S')
_HANDLERS = []   # what start_logging / init_logger added to the root logger


def init_seed(seed, reproducibility=True):
    """Seed Python, numpy and torch (every GPU); `reproducibility`: deterministic cuDNN kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.benchmark = not reproducibility
    torch.backends.cudnn.deterministic = reproducibility


def start_logging(main_process=True):
    """Log in the original's format through the root logger, so that the loggers of every module
    (`logging.getLogger(__name__)`) and Python warnings reach the console and, once `init_logger`
    opens it, the run's log file; until then the records are kept (a run checks its inputs before
    it writes anything, and their warnings belong in its log). Other ranks log warnings only."""
    root = logging.getLogger()
    for handler in _HANDLERS:
        root.removeHandler(handler)
        handler.close()
    _HANDLERS[:] = [logging.StreamHandler(sys.stdout), logging.handlers.BufferingHandler(capacity=10_000)]
    root.setLevel(logging.INFO if main_process else logging.WARNING)
    logging.captureWarnings(True)
    for handler in _HANDLERS:
        handler.setFormatter(_FORMAT)
        root.addHandler(handler)


def init_logger(config, name_parts, main_process=True):
    """Open the run's log file `{log_dir}/{name}.log` (rank 0 only) with the records kept since
    `start_logging` (called here if it was not); returns its path (None on other ranks)."""
    if not _HANDLERS or type(_HANDLERS[-1]) is not logging.handlers.BufferingHandler:
        start_logging(main_process)
    root = logging.getLogger()
    kept = _HANDLERS.pop()
    root.removeHandler(kept)
    records = list(kept.buffer)
    kept.close()                                                       # (closing empties the buffer)
    if not main_process:
        return None
    os.makedirs(config['log_dir'], exist_ok=True)
    path = log_file(config, name_parts)
    handler = logging.FileHandler(path)
    handler.setFormatter(_FORMAT)
    for record in records:
        handler.handle(record)
    _HANDLERS.append(handler)
    root.addHandler(handler)
    return path


def local_time():
    """The time now as run ids and file names show it: 'Nov-28-2026_10-02-38'."""
    return time.strftime('%b-%d-%Y_%H-%M-%S')


def new_run_id():
    """The start time and a random suffix: 'Nov-28-2026_10-02-38-5f3a2c'."""
    return f'{local_time()}-{secrets.token_hex(3)}'


def claim_run_id(config, name_parts):
    """A run id no other run has: the start time and a random suffix, claimed by creating the
    run's log file `{log_dir}/{name_parts}-{id}.log` exclusively (rank 0; every rank gets the id).
    The log, the best checkpoint and `-last.pth` are named after it, so runs started in the same
    second (a sweep, several GPUs of one machine, a shared folder) never write each other's files.
    Processes restarted by torchrun (--max-restarts) get their job's id back, and so its files."""
    def claim():
        os.makedirs(config['log_dir'], exist_ok=True)
        while True:
            candidate = new_run_id()
            try:
                open(log_file(config, name_parts + [candidate]), 'x').close()
                return candidate
            except FileExistsError:
                continue
    return D.job_value('run_id', claim)


def log_file(config, name_parts):
    return os.path.join(config['log_dir'], '-'.join(p for p in name_parts if p) + '.log')

