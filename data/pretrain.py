"""Multi-domain pre-training data and the per-batch augmentation (SPEC 1, 3.4).

`PretrainDataset(config)` reads `{data_path}/{dataset}/`:

* `{dataset}.train.inter`: item tokens `"{domain}-{row}"`, domain = 0-based
  position in `{dataset}.pt_datasets` (one line, comma-separated names);
* per domain `{name}.{plm_suffix}`, `{name}.{plm_suffix_aug}` (text with words
  dropped) and `{name}.{img_suffix}` in the same folder.

Items are numbered globally over the whole corpus as the original's RecBole
remapping does (order of first appearance, targets first; PAD = 0), and the
per-domain feature files are gathered into one table per suffix ([N, D], row 0
zeros).

`PretrainBatches` yields the local rows of each global batch of
`train_batch_size` sequences, with the augmented copy drawn once per global
batch (SPEC 3.4). The random draws depend only on (seed, epoch, batch index),
so 1 process with batch B and W processes with B/W rows each see the same
augmentations, and a resumed run sees the same ones as an uninterrupted run.

Batches carry item features only for the distinct items of the batch (`uniq`)
plus index tensors into them, so the model adapts R distinct rows instead of
B*L padded positions. The interest tables are the model's (as in fine-tuning):
batches carry item ids, and the model looks their interests up.
"""
import os
import re

import numpy as np
import torch

from data.dataset import DataError, check_feature_file, dataset_folder, number_tokens, read_inter, split_tensors
from data.loader import SeqBatches

MODALITIES = ('text', 'img')


PRETRAIN_TOKEN = (re.compile(r'[0-9]+-[0-9]+'), "of the form '{domain}-{row}'")


def read_domains(path):
    if not os.path.exists(path):
        raise DataError(f'{path}: file not found (one line of comma-separated domain names)')
    with open(path, encoding='utf-8') as f:
        names = [n.strip() for n in f.read().strip().split(',')]
    if not names or any(not n for n in names):
        raise DataError(f'{path}: expected one line of comma-separated domain names, got {names!r}')
    return names


def parse_tokens(tokens, domains, source):
    """'d-r' tokens -> (domain long [n], row long [n]); one-line errors for bad tokens."""
    dom, row = np.empty(len(tokens), np.int64), np.empty(len(tokens), np.int64)
    for i, tok in enumerate(tokens):
        d, sep, r = tok.partition('-')
        if not sep or not d.isdigit() or not r.isdigit():
            raise DataError(f"{source}: item token {tok!r} is not of the form '{{domain}}-{{row}}'")
        if int(d) >= len(domains):
            raise DataError(f"{source}: item token {tok!r} names domain {d}, but the .pt_datasets file "
                            f"lists {len(domains)} domains ({','.join(domains)})")
        dom[i], row[i] = int(d), int(r)
    return dom, row


def load_domain_table(folder, domains, suffix, dim, dom, row, tokens):
    """[n+1, dim] float32: row i = feature row row[i-1] of domain dom[i-1]'s `.{suffix}` file."""
    table = np.zeros((len(dom) + 1, dim), dtype=np.float32)
    for d, name in enumerate(domains):
        path = os.path.join(folder, f'{name}.{suffix}')
        sel = np.nonzero(dom == d)[0]
        check_feature_file(path, dim, f'feature file of domain {name!r} (listed in .pt_datasets)',
                           os.path.join(folder, f'{name}.item2index'), int(row[sel].max()) + 1 if len(sel) else None)
        if not len(sel):
            continue
        feat = np.memmap(path, dtype='<f4', mode='r').reshape(-1, dim)
        bad = sel[row[sel] >= len(feat)]
        if len(bad):
            raise DataError(f'{path}: item token {tokens[bad[0]]!r} has no feature row '
                            f'(the file has {len(feat)} rows)')
        table[sel + 1] = feat[row[sel]]
    if not np.isfinite(table).all():
        r = int(np.nonzero(~np.isfinite(table).all(1))[0][0])
        raise DataError(f'{folder}: .{suffix} row of item {tokens[r - 1]} holds NaN or infinite values')
    return torch.from_numpy(table)


class PretrainDataset:
    """The multi-domain pre-training corpus, read once.

    Attributes:
        n_items: N including PAD; domains: names in domain order.
        split: {'item_seq' [R, L], 'item_seq_len' [R], 'item_id' [R]} (the train rows).
        tables: {'text', 'text_aug', 'img'} float [N, D] (only those the modal_type uses).
        empty: {modality: bool [N]} True where the feature row sums to 0 (row 0 included).
        pad_len: longest history (<= MAX_ITEM_LIST_LENGTH).
    """

    def __init__(self, config):
        self.name, self.path = dataset_folder(config, 'pre-training dataset')
        inter = os.path.join(self.path, f'{self.name}.train.inter')
        rows = read_inter(inter, PRETRAIN_TOKEN)
        self.domains = read_domains(os.path.join(self.path, f'{self.name}.pt_datasets'))
        tokens, [(hist_ids, target_ids)] = number_tokens([rows])
        self.item_tokens = [str(t) for t in tokens]
        self.n_items = len(tokens) + 1
        dom, row = parse_tokens(self.item_tokens, self.domains, inter)

        self.split = split_tensors(hist_ids, rows.offsets, target_ids, config['MAX_ITEM_LIST_LENGTH'])
        del rows
        self.pad_len = self.split['item_seq'].shape[1]

        self.modalities = [m for m in MODALITIES if m in config['modal_type']]
        if not self.modalities:
            raise DataError("pre-training needs modal_type text, img or img_text (it has no item IDs)")
        files = {'text': (config['plm_suffix'], config['plm_size']),
                 'text_aug': (config['plm_suffix_aug'], config['plm_size']),
                 'img': (config['img_suffix'], config['img_size'])}
        wanted = ['text', 'text_aug'] if 'text' in self.modalities else []
        wanted += ['img'] if 'img' in self.modalities else []
        self.tables = {k: load_domain_table(self.path, self.domains, files[k][0], files[k][1], dom, row,
                                            self.item_tokens) for k in wanted}
        self.empty = {m: ~self.tables[m].sum(-1).bool() for m in self.modalities}

    def to(self, device):
        """Move the feature tables to `device` (the rows and the modality-missing masks stay on the
        host, where batches are planned)."""
        self.tables = {k: t.to(device) for k, t in self.tables.items()}
        return self

    def __str__(self):
        return '\n'.join([
            f'{self.name} (pre-training): domains {",".join(self.domains)}',
            f'The number of items: {self.n_items}',
            f'The number of sequences: {len(self.split["item_id"])}',
            f'Longest history: {self.pad_len}'])


# ------------------------------------------------------------ augmentation
def item_drop(item_seq, item_seq_len, keep, quirk):
    """Drop items where `keep` is False and compact the kept items to the left.

    Args:
        item_seq: long [B, L]; item_seq_len: long [B]; keep: bool [B, L] (padding and
            position 0 already forced True).
        quirk: reproduce the original's scatter, where a dropped item overwrites the
            kept item before it (duplicate scatter indices, last write wins).
    Returns:
        (item_seq_aug long [B, L], item_seq_len_aug long [B]).
    """
    b, l = item_seq.shape
    slot = keep.long().cumsum(1) - 1                                   # [B, L] target column
    pos = torch.arange(l, device=item_seq.device).expand(b, l)
    # per target column: the first (kept) or, for the quirk, the last position written to it
    src = torch.full_like(item_seq, -1 if quirk else l)
    src = src.scatter_reduce(1, slot, pos, reduce='amax' if quirk else 'amin', include_self=False)
    written = (src >= 0) & (src < l)
    aug = torch.where(written, item_seq.gather(1, src.clamp(0, l - 1)), torch.zeros_like(item_seq))
    aug_len = slot.gather(1, (item_seq_len - 1).unsqueeze(1)).squeeze(1) + 1
    return aug, aug_len


def draw_augmentation(item_seq, item_seq_len, drop_ratio, coefficient, quirk, generator):
    """One augmentation for a whole (global) batch (SPEC 3.4).

    Returns dict: mode 'item' | 'word', item_seq_aug [B, L], item_seq_len_aug [B],
    word_mask bool [B, L] (True = take the feat2CLS text; word drop only).
    """
    raw_keep = torch.rand(item_seq.shape, generator=generator) < 1 - drop_ratio   # [B, L]
    if float(torch.rand((), generator=generator)) < coefficient:
        keep = raw_keep | (item_seq == 0)
        keep[:, 0] = True
        aug, aug_len = item_drop(item_seq, item_seq_len, keep, quirk)
        return {'mode': 'item', 'item_seq_aug': aug, 'item_seq_len_aug': aug_len, 'word_mask': None}
    return {'mode': 'word', 'item_seq_aug': item_seq, 'item_seq_len_aug': item_seq_len,
            'word_mask': ~raw_keep}


def batch_seed(seed, epoch, index):
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1)[0])


class PretrainBatches(SeqBatches):
    """Global batches of `batch_size` shuffled rows; yields this rank's rows r::W of each.

    Args:
        dataset: `PretrainDataset`. config: needs item_drop_ratio, item_drop_coefficient,
            item_drop_quirk.
    """

    def __init__(self, dataset, batch_size, config, seed=0, rank=0, world_size=1):
        super().__init__(dataset.split, batch_size, shuffle=True, seed=seed, pad_len=dataset.pad_len,
                         rank=rank, world_size=world_size)
        self.dataset = dataset
        self.drop_ratio = config['item_drop_ratio']
        self.coefficient = config['item_drop_coefficient']
        self.quirk = config['item_drop_quirk']

    def __iter__(self):
        for k, rows in self.global_batches():
            yield self.global_batch(rows, k)

    def global_batch(self, rows, index):
        """Augment the global batch `rows`, then keep this rank's share."""
        lengths = self.split['item_seq_len'][rows]
        seq = self.split['item_seq'][rows, :int(lengths.max())]
        g = torch.Generator().manual_seed(batch_seed(self.seed, self.epoch, index))
        aug = draw_augmentation(seq, lengths, self.drop_ratio, self.coefficient, self.quirk, g)
        mine = slice(self.rank, None, self.world_size)
        local = {'item_seq': seq[mine], 'item_seq_len': lengths[mine],
                 'item_id': self.split['item_id'][rows][mine],
                 'item_seq_aug': aug['item_seq_aug'][mine], 'item_seq_len_aug': aug['item_seq_len_aug'][mine],
                 'word_mask': None if aug['word_mask'] is None else aug['word_mask'][mine]}
        return dict(build_batch(self.dataset, local, aug['mode'], self.quirk), global_rows=len(rows))


def build_batch(dataset, b, mode, quirk):
    """Model inputs of a batch: features of its distinct items and indices into them.

    Returns a dict with item_seq/_len, item_seq_aug/_len_aug, item_id [B], pad_len,
    (PretrainBatches adds global_rows, the rows of the global batch),
    feat {m: [R, D]} (+ 'text_aug' for word drop), index / index_aug {m: long [B, L]}
    into the adapted tables (word drop: text rows >= R are the feat2CLS rows),
    target_index [B], empty / empty_aug {m: bool [B, L]}, and modal_seq_aug {m: long
    [B, L]}: the item sequence of each modality's augmented side, whose interests the
    model looks up.

    Everything but the features is made on the host (the trainer moves it); the features are
    gathered where the dataset's tables are.
    """
    dev = next(iter(dataset.tables.values())).device
    seq, seq_aug, target = (b[k].contiguous() for k in ('item_seq', 'item_seq_aug', 'item_id'))
    uniq = torch.unique(torch.cat([seq.reshape(-1), seq_aug.reshape(-1), target,
                                   torch.zeros(1, dtype=torch.long, device='cpu')]))   # [R] sorted
    r = len(uniq)
    rows = uniq.to(dev, non_blocking=True)
    idx, idx_aug = torch.searchsorted(uniq, seq), torch.searchsorted(uniq, seq_aug)   # [B, L]
    # the original keeps the un-augmented image side after an item drop (QUIRK)
    img_seq_aug = seq if (mode == 'item' and quirk) else seq_aug
    out = {'item_seq': seq, 'item_seq_len': b['item_seq_len'], 'item_id': target,
           'item_seq_aug': seq_aug, 'item_seq_len_aug': b['item_seq_len_aug'],
           'pad_len': dataset.pad_len, 'target_index': torch.searchsorted(uniq, target),
           'feat': {m: dataset.tables[m][rows] for m in dataset.modalities},
           'index': {}, 'index_aug': {}, 'empty': {}, 'empty_aug': {}, 'modal_seq_aug': {}}
    for m in dataset.modalities:
        out['index'][m] = idx
        out['empty'][m] = dataset.empty[m][seq]
        if m == 'text':
            if mode == 'word':
                out['feat']['text_aug'] = dataset.tables['text_aug'][rows]
                out['index_aug'][m] = idx + r * b['word_mask'].long()
            else:
                out['index_aug'][m] = idx_aug
            out['empty_aug'][m] = dataset.empty[m][seq_aug]
        else:
            out['index_aug'][m] = idx if img_seq_aug is seq else idx_aug
            out['empty_aug'][m] = dataset.empty[m][img_seq_aug]
        out['modal_seq_aug'][m] = seq_aug if m == 'text' else img_seq_aug
    return out
