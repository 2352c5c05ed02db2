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

from data import INTER_HEADER

logger = logging.getLogger(__name__)

SPLITS = ('train', 'valid', 'test')


class DataError(ValueError):
    """Bad input data; the message names the file (and row) and what was expected."""


ITEM_TOKEN = (re.compile(r'[0-9]+'), 'a non-negative integer (tokens index rows of the feature files)')


class InterFile:
    """The rows of an atomic `.inter` file as flat numpy string arrays (no per-row objects).

    Attributes:
        users: str [R]; targets: str [R]; history: str [sum of lengths], the rows'
        histories one after another; offsets: int64 [R+1], row r's history is
        history[offsets[r]:offsets[r+1]].
    Iterating gives (user, [history tokens], target) tuples.
    """

    def __init__(self, users, history, offsets, targets):
        self.users, self.history, self.offsets, self.targets = users, history, offsets, targets

    def __len__(self):
        return len(self.targets)

    def __iter__(self):
        for r in range(len(self)):
            yield self.users[r], list(self.history[self.offsets[r]:self.offsets[r + 1]]), self.targets[r]

    @property
    def lengths(self):
        return np.diff(self.offsets)


def read_inter(path, token=ITEM_TOKEN):
    """Read an atomic `.inter` file into an `InterFile`.

    `token` = (compiled pattern every item token must match, its description).
    Only the distinct tokens are checked against the pattern, and the rows end up
    in numpy arrays: the per-token Python strings are temporary, so a corpus of
    millions of tokens does not leave its memory fragmented behind it."""
    if not os.path.exists(path):
        raise DataError(f'{path}: file not found')
    with open(path, encoding='utf-8') as f:
        header = f.readline().rstrip('\n')
        if header != INTER_HEADER:
            raise DataError(f'{path}: line 1: expected header {INTER_HEADER!r}, got {header!r}')
        lines = f.read().split('\n')
    if lines and lines[-1] == '':
        lines.pop()
    users, hists, targets = [], [], []
    for n, line in enumerate(lines, start=2):
        parts = line.split('\t')
        if len(parts) != 3:
            if not line:
                raise DataError(f'{path}: line {n}: empty line (expected user, history and item)')
            raise DataError(f'{path}: line {n}: expected 3 tab-separated columns, got {len(parts)}')
        if not parts[1].strip():
            raise DataError(f'{path}: line {n}: empty history (user {parts[0]})')
        users.append(parts[0])
        hists.append(parts[1])
        targets.append(parts[2])
    del lines
    counts = np.fromiter((h.count(' ') + 1 for h in hists), dtype=np.int64, count=len(hists))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    history = np.array(' '.join(hists).split(' ')) if hists else np.array([], dtype=str)
    users, targets = np.array(users), np.array(targets)
    del hists
    # check each distinct token once; report the first bad one in file order
    bad = [t for t in np.unique(np.concatenate([history, targets])) if not token[0].fullmatch(t)]
    if bad:
        bad = np.array(bad)
        in_hist = np.nonzero(np.isin(history, bad))[0]
        in_target = np.nonzero(np.isin(targets, bad))[0]
        rows = []
        if len(in_hist):
            rows.append((int(np.searchsorted(offsets, in_hist[0], side='right')) - 1, history[in_hist[0]]))
        if len(in_target):
            rows.append((int(in_target[0]), targets[in_target[0]]))
        row, tok = min(rows, key=lambda x: x[0])
        raise DataError(f'{path}: line {row + 2}: item token {str(tok)!r} is not {token[1]}')
    return InterFile(users, history, offsets, targets)


def number_tokens(files):
    """Number item tokens 1..n in order of first appearance over the concatenated
    files: all target items first, then all history items (as RecBole's remapping
    of the item_id / item_id_list fields does).

    Returns:
        (tokens str [n], token of id i at i-1; [(history ids int64 flat, target ids int64)] per file).
    """
    all_tokens = np.concatenate([f.targets for f in files] + [f.history for f in files])
    uniq, first, inverse = np.unique(all_tokens, return_index=True, return_inverse=True)
    order = np.argsort(first, kind='stable')                            # distinct tokens by first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    ids = rank[inverse.reshape(-1)] + 1
    out, start = [], 0
    n_targets = sum(len(f.targets) for f in files)
    hist_start = n_targets
    for f in files:
        out.append((ids[hist_start:hist_start + len(f.history)], ids[start:start + len(f.targets)]))
        start += len(f.targets)
        hist_start += len(f.history)
    return uniq[order], out


def count_lines(path):
    with open(path, 'rb') as f:
        return sum(1 for line in f if line.strip())


def read_item2index(path, required=False):
    """{raw id: item index (int)} of a `raw_id<TAB>index` file, whose indices are 0..n-1, each once (the
    rows of the feature files; index i is item token str(i)). An absent file gives {} (a DataError
    with `required`), and so does nothing else: a bad line or index raises a DataError naming it."""
    if not os.path.isfile(path):
        if required:
            raise DataError(f'{path}: item2index file not found')
        return {}
    out = {}
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, start=1):
            line = line.rstrip('\r\n')
            if not line:
                continue
            parts = line.split('\t')
            if len(parts) != 2 or not parts[1].isdigit():
                raise DataError(f"{path}: line {n}: expected 'raw_id<TAB>index' with a non-negative integer index")
            out[parts[0]] = int(parts[1])
    if sorted(out.values()) != list(range(len(out))):
        raise DataError(f'{path}: expected the indices 0..{len(out) - 1}, each once')
    return out


TEXT_HEADER = 'item_id:token\ttext:token_seq'


def read_texts(path, item2index, required=False):
    """{item index: text} of a `{D}.text` file: the header `item_id:token<TAB>text:token_seq`, then
    `key<TAB>text` lines, the key a raw id of `item2index` ({raw id: index}, `read_item2index`) or an
    index (below its size, if it has one); other keys (items filtered out of the dataset) are skipped. An absent file
    gives {} (a DataError with `required`); a bad header or line raises a DataError naming it."""
    if not os.path.isfile(path):
        if required:
            raise DataError(f"{path}: item text file not found (expected the header "
                            f"'{TEXT_HEADER.replace(chr(9), '<TAB>')}', then raw id or index<TAB>text lines)")
        return {}
    n = len(item2index)
    texts = {}
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip('\r\n')
            if lineno == 1:
                if not line.startswith('item_id:token\t'):
                    raise DataError(f"{path}: line 1: expected the header '{TEXT_HEADER.replace(chr(9), '<TAB>')}'")
                continue
            if not line:
                continue
            parts = line.split('\t')
            if len(parts) != 2:
                raise DataError(f'{path}: line {lineno}: expected 2 tab-separated fields item_id, text; '
                                f'got {len(parts)}')
            key, text = parts
            if key in item2index:
                texts[item2index[key]] = text
            elif key.isdigit() and (not n or int(key) < n):
                texts[int(key)] = text
    return texts


def check_feature_file(path, dim, what, item_map, used_rows=None):
    """A raw float32 feature file of `dim` columns exists and has a fitting size; the item count
    of `item_map` (an `.item2index` file, when present) catches a file written with another
    width whose size happens to divide by `dim`. Without one, `used_rows` (1 + the highest row
    the tokens use) catches a file that holds exactly `used_rows` rows of another width that
    an encoder would have (a multiple of 16 columns). Raises a DataError that names the file."""
    if not os.path.exists(path):
        raise DataError(f'{path}: {what} not found')
    size = os.path.getsize(path)
    if size % (dim * 4):
        raise DataError(f'{path}: size {size} bytes is not a multiple of {dim} float32 columns '
                        f'({dim * 4} bytes per row); check plm_size/img_size')
    if os.path.exists(item_map):
        expected = count_lines(item_map)
        if size != expected * dim * 4:
            raise DataError(f'{path}: {size // (dim * 4)} rows of {dim} columns, but {os.path.basename(item_map)} '
                            f'lists {expected} items; check plm_size/img_size (the file would have '
                            f'{size / (expected * 4):g} columns)')
    elif used_rows and size > used_rows * dim * 4 and size % (used_rows * 4 * 16) == 0:
        raise DataError(f'{path}: {size // (dim * 4)} rows of {dim} columns, but the item tokens use '
                        f'{used_rows} rows: it looks like {used_rows} rows of {size // (used_rows * 4)} '
                        f'columns; check plm_size/img_size (or add {os.path.basename(item_map)} to '
                        f'list its items)')


def load_features(path, dim, tokens, what, item_map):
    """[len(tokens) + 1, dim] float32 table: row i = feature row int(tokens[i-1]); row 0 zeros."""
    rows = np.array([int(t) for t in tokens], dtype=np.int64)
    check_feature_file(path, dim, f'{what} feature file', item_map, int(rows.max()) + 1 if len(rows) else None)
    feat = np.fromfile(path, dtype='<f4').reshape(-1, dim)
    if len(rows) and rows.max() >= len(feat):
        bad = tokens[int(rows.argmax())]
        raise DataError(f'{path}: item token {bad} has no feature row (the file has {len(feat)} rows)')
    table = np.zeros((len(tokens) + 1, dim), dtype=np.float32)
    table[1:] = feat[rows]
    if not np.isfinite(table).all():
        r = int(np.nonzero(~np.isfinite(table).all(1))[0][0])
        raise DataError(f'{path}: row {tokens[r - 1]} holds NaN or infinite values')
    return torch.from_numpy(table)


def pad_histories(ids, offsets, max_len):
    """Left-aligned, 0-padded long [R, L] histories from flat ids and row offsets
    (the most recent max_len items kept, with a warning)."""
    counts = np.diff(offsets)
    too_long = int((counts > max_len).sum())
    if too_long:
        logger.warning(f'{too_long} histories are longer than MAX_ITEM_LIST_LENGTH = {max_len}; '
                       f'kept their most recent {max_len} items')
    lengths = np.minimum(counts, max_len)
    width = int(lengths.max()) if len(counts) else 1
    row = np.repeat(np.arange(len(counts)), counts)
    col = np.arange(len(ids)) - offsets[:-1][row] - (counts - lengths)[row]   # < 0: cut off
    keep = col >= 0
    seq = torch.zeros(len(counts), width, dtype=torch.long)
    seq[torch.from_numpy(row[keep]), torch.from_numpy(col[keep])] = torch.from_numpy(ids[keep].astype(np.int64))
    return seq, torch.from_numpy(lengths.astype(np.int64))


def dataset_folder(config, what='dataset'):
    """(name, folder) of the config's dataset; a DataError when the folder is missing."""
    name = config['dataset']
    path = os.path.join(config['data_path'], name)
    if not os.path.isdir(path):
        raise DataError(f"{path}: {what} folder not found (data_path = {config['data_path']!r}, dataset = {name!r})")
    return name, path


def split_tensors(hist_ids, offsets, target_ids, max_len):
    """{'item_seq' long [R, L], 'item_seq_len' long [R], 'item_id' long [R]} of a split's rows
    (flat history ids with row offsets, as `number_tokens` gives them)."""
    seq, lengths = pad_histories(hist_ids, offsets, max_len)
    return {'item_seq': seq, 'item_seq_len': lengths, 'item_id': torch.from_numpy(target_ids.astype(np.int64))}


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
        self.name, self.path = dataset_folder(config)
        max_len = config['MAX_ITEM_LIST_LENGTH']
        raw = [read_inter(self._file(s + '.inter')) for s in SPLITS]
        tokens, numbered = number_tokens(raw)
        self.item_tokens = [str(t) for t in tokens]
        self.n_items = len(tokens) + 1
        self.n_users = len(np.unique(np.concatenate([f.users for f in raw]))) + 1   # with PAD, as RecBole counts
        self.n_inters = sum(len(f) for f in raw)

        self.pad_len = min(max(int(f.lengths.max()) for f in raw), max_len)
        self.splits = {split: split_tensors(hist_ids, f.offsets, target_ids, max_len)
                       for split, f, (hist_ids, target_ids) in zip(SPLITS, raw, numbered)}

        modal = config['modal_type']
        self.plm_table = self.img_table = None
        if 'text' in modal:
            self.plm_table = load_features(self._file(config['plm_suffix']), config['plm_size'],
                                           self.item_tokens, 'text', self._file('item2index'))
        if 'img' in modal:
            self.img_table = load_features(self._file(config['img_suffix']), config['img_size'],
                                           self.item_tokens, 'image', self._file('item2index'))

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
