"""Reading the distributed format (SPEC 1) from tiny files written here."""
import logging

import numpy as np
import pytest
import torch

from config import Config
from data.dataset import DataError, SeqDataset
from data.loader import SeqBatches

HEADER = 'user_id:token\titem_id_list:token_seq\titem_id:token\n'


def write_dataset(root, name='Tiny', train=(), valid=(), test=(), n_rows=10, dim=4, empty_text=(), empty_img=()):
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (('train', train), ('valid', valid), ('test', test)):
        lines = ''.join(f'{u}\t{" ".join(h)}\t{t}\n' for u, h, t in rows)
        (folder / f'{name}.{split}.inter').write_text(HEADER + lines)
    text = np.arange(n_rows * dim, dtype='<f4').reshape(n_rows, dim) + 1
    img = -text
    text[list(empty_text)] = 0
    img[list(empty_img)] = 0
    text.tofile(folder / f'{name}.feat1CLS')
    img.tofile(folder / f'{name}.feat3CLS')
    return Config(name, overrides={'data_path': str(root), 'plm_size': dim, 'img_size': dim})


def test_tokens_are_numbered_targets_first_then_histories(tmp_path):
    cfg = write_dataset(tmp_path, train=[('0', ['5', '3'], '7'), ('1', ['2'], '5')],
                        valid=[('0', ['5', '3', '7'], '9')], test=[('0', ['5', '3', '7', '9'], '4')])
    ds = SeqDataset(cfg)
    # targets in split order: 7 5 9 4, then history items: 3 2
    assert ds.item_tokens == ['7', '5', '9', '4', '3', '2']
    assert ds.n_items == 7
    assert ds.splits['train']['item_seq'].tolist() == [[2, 5], [6, 0]]
    assert ds.splits['train']['item_seq_len'].tolist() == [2, 1]
    assert ds.splits['test']['item_id'].tolist() == [4]


def test_feature_rows_follow_tokens_and_pad_row_is_zero(tmp_path):
    cfg = write_dataset(tmp_path, train=[('0', ['5'], '7')], valid=[('0', ['5', '7'], '2')],
                        test=[('0', ['5', '7', '2'], '3')], empty_img=[2])
    ds = SeqDataset(cfg)
    raw = np.fromfile(tmp_path / 'Tiny' / 'Tiny.feat1CLS', dtype='<f4').reshape(-1, 4)
    assert torch.equal(ds.plm_table[0], torch.zeros(4))
    for i, tok in enumerate(ds.item_tokens, start=1):
        assert np.array_equal(ds.plm_table[i].numpy(), raw[int(tok)])
    empty = ~ds.img_table.sum(-1).bool()
    assert empty.tolist() == [True] + [tok == '2' for tok in ds.item_tokens]


def test_histories_keep_the_last_50_items_with_one_warning(tmp_path, caplog):
    long_hist = [str(i % 9 + 1) for i in range(60)]
    cfg = write_dataset(tmp_path, train=[('0', long_hist, '1'), ('1', long_hist[:3], '2')],
                        valid=[('0', ['1'], '2')], test=[('0', ['1', '2'], '3')])
    with caplog.at_level(logging.WARNING):
        ds = SeqDataset(cfg)
    assert '1 histories are longer than MAX_ITEM_LIST_LENGTH = 50' in caplog.text
    ids = {t: i + 1 for i, t in enumerate(ds.item_tokens)}
    assert ds.splits['train']['item_seq'][0].tolist() == [ids[t] for t in long_hist[-50:]]
    assert ds.pad_len == 50


@pytest.mark.parametrize('content,message', [
    ('user\titems\titem\n', 'line 1: expected header'),
    (HEADER + '0\t1 2\n', 'line 2: expected 3 tab-separated columns, got 2'),
    (HEADER + '0\t\t3\n', 'line 2: empty history'),
])
def test_malformed_inter_files_are_named(tmp_path, content, message):
    cfg = write_dataset(tmp_path, train=[('0', ['1'], '2')], valid=[('0', ['1'], '2')], test=[('0', ['1'], '2')])
    (tmp_path / 'Tiny' / 'Tiny.train.inter').write_text(content)
    with pytest.raises(DataError, match=message) as err:
        SeqDataset(cfg)
    assert 'Tiny.train.inter' in str(err.value)


def test_feature_file_of_the_wrong_width_is_named(tmp_path):
    cfg = write_dataset(tmp_path, train=[('0', ['1'], '2')], valid=[('0', ['1'], '2')], test=[('0', ['1'], '2')])
    cfg['plm_size'] = 3
    with pytest.raises(DataError, match=r'Tiny.feat1CLS: size 160 bytes is not a multiple of 3'):
        SeqDataset(cfg)


def test_batches_trim_padding_and_shuffle_by_epoch(tmp_path):
    split = {'item_seq': torch.tensor([[1, 2, 3], [4, 0, 0], [5, 6, 0], [7, 0, 0]]),
             'item_seq_len': torch.tensor([3, 1, 2, 1]), 'item_id': torch.tensor([1, 2, 3, 4])}
    ordered = list(SeqBatches(split, 2))
    assert ordered[1]['item_seq'].tolist() == [[5, 6], [7, 0]]
    shuffled = SeqBatches(split, 2, shuffle=True, seed=1)
    shuffled.set_epoch(0)
    a = torch.cat([b['item_id'] for b in shuffled])
    assert sorted(a.tolist()) == [1, 2, 3, 4]
    shuffled.set_epoch(0)
    assert torch.equal(a, torch.cat([b['item_id'] for b in shuffled]))
    shards = [torch.cat([b['item_id'] for b in SeqBatches(split, 4, rank=r, world_size=2)]) for r in (0, 1)]
    assert shards[0].tolist() == [1, 3] and shards[1].tolist() == [2, 4]
