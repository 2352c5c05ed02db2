"""Reading the distributed format (SPEC 1) from tiny files written here."""
import logging

import numpy as np
import pytest
import torch

from config import Config
from data import INTER_HEADER
from data.dataset import DataError, SeqDataset, read_item2index, read_texts
from data.loader import SeqBatches

HEADER = INTER_HEADER + '\n'


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


def test_batches_trim_padding():
    split = {'item_seq': torch.tensor([[1, 2, 3], [4, 0, 0], [5, 6, 0], [7, 0, 0]]),
             'item_seq_len': torch.tensor([3, 1, 2, 1]), 'item_id': torch.tensor([1, 2, 3, 4])}
    ordered = list(SeqBatches(split, 2))
    assert ordered[0]['item_seq'].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert ordered[1]['item_seq'].tolist() == [[5, 6], [7, 0]]
    shards = [torch.cat([b['item_id'] for b in SeqBatches(split, 4, rank=r, world_size=2)]) for r in (0, 1)]
    assert shards[0].tolist() == [1, 3] and shards[1].tolist() == [2, 4]


def test_training_batches_are_shuffled_anew_each_epoch_and_reproducibly():
    """Epoch e draws its order from seed + e: a new order each epoch, the same order whenever
    epoch e is run again (a resumed run), whatever ran before."""
    n = 20
    split = {'item_seq': torch.arange(1, n + 1).view(n, 1), 'item_seq_len': torch.ones(n, dtype=torch.long),
             'item_id': torch.arange(1, n + 1)}

    def epoch_order(batches, epoch):
        batches.set_epoch(epoch)
        return [int(i) for b in batches for i in b['item_id']]

    train = SeqBatches(split, 6, shuffle=True, seed=1)
    first, second = epoch_order(train, 0), epoch_order(train, 1)
    assert sorted(first) == sorted(second) == list(range(1, n + 1))
    assert first != list(range(1, n + 1))                              # shuffled ...
    assert second != first                                             # ... anew each epoch
    assert epoch_order(train, 1) == second and epoch_order(train, 0) == first
    assert epoch_order(SeqBatches(split, 6, shuffle=True, seed=1), 1) == second   # nothing carried over
    assert epoch_order(SeqBatches(split, 6, shuffle=True, seed=2), 1) != second   # the seed counts
    assert epoch_order(SeqBatches(split, 6), 1) == list(range(1, n + 1))          # evaluation: file order


def test_item2index_and_texts_are_read_strictly(tmp_path):
    """The one reader of `.item2index` and `.text` (recommend.py, the tools): raw id or index keys, items
    filtered out skipped, an absent file {} unless required, and every malformed file a DataError naming it."""
    item2index, text = tmp_path / 'T.item2index', tmp_path / 'T.text'
    item2index.write_text('B1\t1\nB0\t0\n\nB2\t2\n')
    text.write_text('item_id:token\ttext:token_seq\nB0\tfirst\n2\tby index\nGONE\tfiltered out\n9\tno row\n')
    assert read_item2index(str(item2index)) == {'B1': 1, 'B0': 0, 'B2': 2}
    assert read_texts(str(text), read_item2index(str(item2index))) == {0: 'first', 2: 'by index'}
    assert read_item2index(str(tmp_path / 'none')) == read_texts(str(tmp_path / 'none'), {}) == {}
    for bad, message in (('B0\t0\nB1\t2\n', 'expected the indices 0..1, each once'),
                         ('B0\t0\nB1\t0\n', 'expected the indices 0..1, each once'),
                         ('B0\t-1\n', "line 1: expected 'raw_id<TAB>index'"), ('B0 0\n', 'line 1: expected')):
        item2index.write_text(bad)
        with pytest.raises(DataError, match=message):
            read_item2index(str(item2index))
    for bad, message in (('B0\tno header\n', 'line 1: expected the header'),
                         ('item_id:token\ttext:token_seq\nB0\ta\tb\n', 'line 2: expected 2 tab-separated fields')):
        text.write_text(bad)
        with pytest.raises(DataError, match=message):
            read_texts(str(text), {'B0': 0})
    with pytest.raises(DataError, match='item2index file not found'):
        read_item2index(str(tmp_path / 'none'), required=True)
    with pytest.raises(DataError, match='item text file not found'):
        read_texts(str(tmp_path / 'none'), {}, required=True)
