"""Batches of a split: dicts of tensors, histories cut to the longest row of the batch."""
import math

import torch


class SeqBatches:
    """Iterates a split in batches of `batch_size` rows.

    Training batches are shuffled with a permutation drawn from `seed + epoch`
    (call `set_epoch` before each epoch), so an epoch's order does not depend on
    what ran before it; evaluation batches keep the file order. `rank` and
    `world_size` shard each batch's rows (row r goes to rank r % world_size),
    so the global batch is `batch_size` rows whatever the number of processes.

    No process is handed an empty shard: training skips a last batch with fewer
    rows than processes on every process alike (a process without rows would skip
    the step's collectives while the others wait in them); evaluation gives such a
    process one dummy row, marked `dummy`, whose rank the trainer drops.
    """

    def __init__(self, split, batch_size, shuffle=False, seed=0, pad_len=None, rank=0, world_size=1):
        self.split = split
        self.n = len(split['item_id'])
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.pad_len = pad_len
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return math.ceil(self.n / self.batch_size)

    def order(self):
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g)

    def global_batches(self):
        """(index, rows of the global batch) of this epoch, every process alike."""
        order = self.order()
        for k, start in enumerate(range(0, self.n, self.batch_size)):
            rows = order[start:start + self.batch_size]
            if len(rows) >= self.world_size or not self.shuffle:
                yield k, rows

    def __iter__(self):
        for _, rows in self.global_batches():
            mine = rows[self.rank::self.world_size]
            yield self.batch(mine, len(rows)) if len(mine) else dict(self.batch(rows[:1], len(rows)), dummy=True)

    def batch(self, rows, global_rows=None):
        """The batch of `rows`; `global_rows` (int) counts the rows of the global batch they belong to."""
        lengths = self.split['item_seq_len'][rows]
        width = max(int(lengths.max()), 1) if len(rows) else 1
        out = {'item_seq': self.split['item_seq'][rows, :width],
               'item_seq_len': lengths,
               'item_id': self.split['item_id'][rows],
               'global_rows': len(rows) if global_rows is None else global_rows}
        if self.pad_len is not None:
            out['pad_len'] = self.pad_len
        return out


def to_device(batch, device):
    """A batch (a dict of tensors, nested dicts included) on `device`. Off the CPU the batch as it
    was stays under 'host': the model plans its shapes and positions from it without waiting
    for the device."""
    out = _moved(batch, device)
    if isinstance(batch, dict) and torch.device(device).type != 'cpu':
        out['host'] = batch
    return out


def _moved(x, device):
    if torch.is_tensor(x):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: _moved(v, device) for k, v in x.items()}
    return x
