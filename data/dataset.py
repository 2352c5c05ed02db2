"""Downstream dataset: atomic `.inter` files and raw float32 feature files (SPEC 1).

`SeqDataset(config)` reads `{data_path}/{dataset}/{dataset}.{train,valid,test}.inter`
once, numbers item tokens as the original does, and holds per split the padded
histories, their lengths and the target items as tensors, plus the feature
tables (row 0 = PAD = zeros).
"""
import logging
import os
import re

import numpy as np
import torch

logger = logging.getLogger(__name__)

INTER_HEADER = ['user_id:token', 'item_id_list:token_seq', 'item_id:token']
SPLITS = ('train', 'valid', 'test')


class DataError(ValueError):
    """Bad input data; the message names the file (and row) and what was expected."""


ITEM_TOKEN = (re.compile(r'[0-9]+'), 'a non-negative integer (tokens index rows of the feature files)')


def read_inter(path, token=ITEM_TOKEN):
    """Rows of an atomic `.inter` file as (user token, [history tokens], target token).

    `token` = (compiled pattern every item token must match, its description)."""
    if not os.path.exists(path):
        raise DataError(f'{path}: file not found')
    rows = []
    with open(path, encoding='utf-8') as f:
        header = f.readline().rstrip('\n').split('\t')
        if header != INTER_HEADER:
            raise DataError(f"{path}: line 1: expected header {chr(9).join(INTER_HEADER)!r}, "
                            f"got {chr(9).join(header)!r}")
        for n, line in enumerate(f, start=2):
            line = line.rstrip('\n')
            if not line:
                raise DataError(f'{path}: line {n}: empty line (expected user, history and item)')
            parts = line.split('\t')
            if len(parts) != 3:
                raise DataError(f'{path}: line {n}: expected 3 tab-separated columns, got {len(parts)}')
            user, hist, target = parts
            history = hist.split(' ') if hist.strip() else []
            if not history:
                raise DataError(f'{path}: line {n}: empty history (user {user})')
            for tok in history + [target]:
                if not token[0].fullmatch(tok):
                    raise DataError(f'{path}: line {n}: item token {tok!r} is not {token[1]}')
            rows.append((user, history, target))
    return rows


def number_tokens(split_rows):
    """Token -> internal id (1..n), in order of first appearance over the
    concatenated splits: all target items first, then all history items (as
    RecBole's remapping of the item_id / item_id_list fields does)."""
    ids = {}
    for rows in split_rows:
        for _, _, target in rows:
            ids.setdefault(target, len(ids) + 1)
    for rows in split_rows:
        for _, history, _ in rows:
            for tok in history:
                ids.setdefault(tok, len(ids) + 1)
    return ids


def count_lines(path):
    with open(path, 'rb') as f:
        return sum(1 for line in f if line.strip())


def load_features(path, dim, tokens, what, expected_rows=None):
    """[len(tokens) + 1, dim] float32 table: row i = feature row int(tokens[i-1]); row 0 zeros.

    `expected_rows` (the item count of `.item2index`, when present) catches a
    feature file written with another width whose size happens to fit `dim`."""
    if not os.path.exists(path):
        raise DataError(f'{path}: {what} feature file not found')
    size = os.path.getsize(path)
    if size % (dim * 4):
        raise DataError(f'{path}: size {size} bytes is not a multiple of {dim} float32 columns '
                        f'({dim * 4} bytes per row); check plm_size/img_size')
    if expected_rows is not None and size != expected_rows * dim * 4:
        raise DataError(f'{path}: {size // (dim * 4)} rows of {dim} columns, but the item map lists '
                        f'{expected_rows} items; check plm_size/img_size (the file would have '
                        f'{size / (expected_rows * 4):g} columns)')
    feat = np.fromfile(path, dtype='<f4').reshape(-1, dim)
    rows = np.array([int(t) for t in tokens], dtype=np.int64)
    if len(rows) and rows.max() >= len(feat):
        bad = tokens[int(rows.argmax())]
        raise DataError(f'{path}: item token {bad} has no feature row (the file has {len(feat)} rows)')
    table = np.zeros((len(tokens) + 1, dim), dtype=np.float32)
    table[1:] = feat[rows]
    if not np.isfinite(table).all():
        r = int(np.nonzero(~np.isfinite(table).all(1))[0][0])
        raise DataError(f'{path}: row {tokens[r - 1]} holds NaN or infinite values')
    return torch.from_numpy(table)


def pad_histories(histories, max_len):
    """Left-aligned, 0-padded long [R, L] histories (the most recent max_len items kept, with a warning)."""
    too_long = sum(len(h) > max_len for h in histories)
    if too_long:
        logger.warning(f'{too_long} histories are longer than MAX_ITEM_LIST_LENGTH = {max_len}; '
                       f'kept their most recent {max_len} items')
    lengths = torch.tensor([min(len(h), max_len) for h in histories], dtype=torch.long)
    width = int(lengths.max()) if len(histories) else 1
    seq = torch.zeros(len(histories), width, dtype=torch.long)
    for r, h in enumerate(histories):
        h = h[-max_len:]
        seq[r, :len(h)] = torch.tensor(h, dtype=torch.long)
    return seq, lengths


class SeqDataset:
    """A downstream dataset, read once.

    Attributes:
        n_items: item rows N including PAD.
        splits: {'train'|'valid'|'test': {'item_seq' [R, L], 'item_seq_len' [R], 'item_id' [R]}}.
        pad_len: the padded length of the original code (longest history in the files, <= 50).
        plm_table / img_table: float [N, D] feature tables, or None when the modality is unused.
        item_tokens: list of tokens, index i-1 = internal id i.
    """

    def __init__(self, config):
        self.name = config['dataset']
        self.path = os.path.join(config['data_path'], self.name)
        if not os.path.isdir(self.path):
            raise DataError(f"{self.path}: dataset folder not found (data_path = {config['data_path']!r}, "
                            f"dataset = {self.name!r})")
        max_len = config['MAX_ITEM_LIST_LENGTH']
        raw = [read_inter(self._file(s + '.inter')) for s in SPLITS]
        ids = number_tokens(raw)
        self.item_tokens = list(ids)
        self.n_items = len(ids) + 1
        self.n_users = len({u for rows in raw for u, _, _ in rows}) + 1   # with PAD, as RecBole counts
        self.n_inters = sum(len(rows) for rows in raw)

        self.pad_len = min(max(len(h) for rows in raw for _, h, _ in rows), max_len)
        self.splits = {}
        for split, rows in zip(SPLITS, raw):
            seq, lengths = pad_histories([[ids[t] for t in h] for _, h, _ in rows], max_len)
            target = torch.tensor([ids[t] for _, _, t in rows], dtype=torch.long)
            self.splits[split] = {'item_seq': seq, 'item_seq_len': lengths, 'item_id': target}

        modal = config['modal_type']
        item_map = self._file('item2index')
        expected = count_lines(item_map) if os.path.exists(item_map) else None
        self.plm_table = self.img_table = None
        if 'text' in modal:
            self.plm_table = load_features(self._file(config['plm_suffix']), config['plm_size'],
                                           self.item_tokens, 'text', expected)
        if 'img' in modal:
            self.img_table = load_features(self._file(config['img_suffix']), config['img_size'],
                                           self.item_tokens, 'image', expected)

    def _file(self, suffix):
        return os.path.join(self.path, f'{self.name}.{suffix}')

    def __str__(self):
        n = (self.n_users - 1) * (self.n_items - 1)
        return '\n'.join([
            self.name,
            f'The number of users: {self.n_users}',
            f'The number of items: {self.n_items}',
            f'The number of inters: {self.n_inters}',
            f'The sparsity of the dataset: {100 * (1 - self.n_inters / n) if n else 0}%',
            f'Longest history (padded length of the original code): {self.pad_len}'])
