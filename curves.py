"""Training curves of a run: `{log_dir}/{run}.csv` next to its `.log`, one row per epoch, and, with
`--tensorboard=True` where the optional `tensorboard` package is installed, TensorBoard event files in
`{log_dir}/{run}.tb/` (`tensorboard --logdir log/`).

Columns (empty where the run has no such figure: pre-training has no validation, the baselines
no interest discovery):

    epoch                 0-based, as in the log lines
    train_loss            sum of the batch losses (the log's `train loss`)
    train_time_s          the log's `epoch N training [time: ...]`
    discovery_time_s      interest discovery before the epoch (the log's `interest discovery [time: ...]`)
    interests_used        ... `interests used: U of K`
    interests             ... K
    discovery_objective   ... `objective`
    valid_time_s          the log's `epoch N evaluating [time: ...]`
    valid_score           ... `valid_score` (valid_metric)
    valid_{metric}@{k}    the `valid result:` line (the convention of the log lines)
    loss_seq_item, loss_lambda_seq_seq, loss_gamma_reg
                          pre-training: the log's `epoch N loss terms [...]` (they sum to train_loss)
    elapsed_s             seconds since the run started, at the end of the epoch

Rows are appended line by line and flushed at the end of each epoch, so a run killed at any moment
leaves every finished epoch; a resumed run appends to the same file when its header matches.
Values are full precision (the log lines round them).
"""
import csv
import logging
import os
import time

logger = logging.getLogger(__name__)

BASE_COLUMNS = ['epoch', 'train_loss', 'train_time_s', 'discovery_time_s', 'interests_used', 'interests',
                'discovery_objective', 'valid_time_s', 'valid_score']


def csv_path(log_path):
    """`log/{run}.log` -> `log/{run}.csv`."""
    return os.path.splitext(log_path)[0] + '.csv'


PRETRAIN_TERMS = ['seq_item', 'lambda*seq_seq', 'gamma*reg']   # MISSRec.calculate_loss(parts=True)


def term_column(term):
    return 'loss_' + term.replace('*', '_')


def columns(config, validation=True):
    if validation:
        extra = [f'valid_{m.lower()}@{k}' for m in config['metrics'] for k in config['topk']]
    else:
        extra = [term_column(t) for t in PRETRAIN_TERMS]
    return BASE_COLUMNS + extra + ['elapsed_s']


class EpochCurves:
    """Collects one epoch's figures (`add`) and writes them as one row (`end_epoch`).

    Args:
        path: the CSV file.
        names: its columns.
        tensorboard_dir: where to write TensorBoard event files, or None.
    """

    def __init__(self, path, names, tensorboard_dir=None):
        self.path, self.names, self.row = path, list(names), {}
        self.start = time.time()
        fresh = not os.path.exists(path) or os.path.getsize(path) == 0
        if not fresh:
            with open(path, newline='') as f:
                header = next(csv.reader(f), None)
            if header != self.names:   # another layout: keep it, write beside it
                base, n = os.path.splitext(path)[0], 1
                while os.path.exists(f'{base}.{n}.csv'):
                    n += 1
                self.path, fresh = f'{base}.{n}.csv', True
        if fresh:
            with open(self.path, 'w', newline='') as f:
                csv.writer(f).writerow(self.names)
        self.writer = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(tensorboard_dir)

    def add(self, **figures):
        unknown = set(figures) - set(self.names)
        if unknown:
            raise KeyError(f'not a column of {self.path}: {sorted(unknown)}')
        self.row.update(figures)

    def end_epoch(self):
        """Append the epoch's row (and its TensorBoard scalars)."""
        if not self.row:
            return
        self.row['elapsed_s'] = round(time.time() - self.start, 3)
        with open(self.path, 'a', newline='') as f:
            csv.writer(f).writerow(['' if self.row.get(k) is None else self.row[k] for k in self.names])
            f.flush()
        if self.writer is not None and self.row.get('epoch') is not None:
            for k, v in self.row.items():
                if k != 'epoch' and isinstance(v, (int, float)):
                    tag = k.replace('valid_', 'valid/', 1) if k.startswith('valid_') else f'train/{k}'
                    self.writer.add_scalar(tag, v, self.row['epoch'])
            self.writer.flush()
        self.row = {}

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def open_curves(config, log_path, validation=True):
    """The run's `EpochCurves` (None where no log is written: ranks other than 0)."""
    if not log_path:
        return None
    tb = None
    if config['tensorboard']:
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
            tb = os.path.splitext(log_path)[0] + '.tb'
        except ImportError:
            logger.warning('tensorboard = True but the tensorboard package is not installed '
                           '(pip install tensorboard): writing the CSV only')
    return EpochCurves(csv_path(log_path), columns(config, validation), tb)


def read_curves(path):
    """[{column: float or None}, ...] of a curves CSV, one dict per row."""
    out = []
    with open(path, newline='') as f:
        for row in csv.DictReader(f):
            out.append({k: (float(v) if v not in ('', None) else None) for k, v in row.items()})
    return out
