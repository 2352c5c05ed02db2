"""The real Scientific_mini data (CLIP features) beside the repository: reading it and
the packed model on it (skipped where ../shared/datasets is absent)."""
import os

import pytest
import torch

from config import Config, stage_files
from data.dataset import SeqDataset
from data.loader import SeqBatches
from missrec import MISSRec
from trainer import Trainer

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '..', 'shared',
                    'datasets', 'downstream')
pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, 'Scientific_mini')),
                                reason='../shared/datasets/downstream/Scientific_mini not found')


def config(**overrides):
    return Config('Scientific_mini', stage_files('finetune'), {'data_path': ROOT, **overrides})


@pytest.fixture(scope='module')
def mini():
    return SeqDataset(config())


def test_scientific_mini_is_read_as_described(mini):
    ds = mini
    assert ds.n_items == 1586 and ds.n_users == 2929            # PAD counted, as RecBole does
    assert [len(ds.splits[s]['item_id']) for s in ('train', 'valid', 'test')] == [10928, 2928, 2928]
    assert int(ds.splits['train']['item_seq_len'].max()) == 33
    assert ds.pad_len == 35                                      # the longest valid/test history
    assert abs(float(ds.splits['train']['item_seq_len'].float().mean()) - 3.4) < 0.05
    assert ds.plm_table.shape == ds.img_table.shape == (1586, 512)
    assert not ds.plm_table[1:].sum(-1).eq(0).any()             # every item has text and image
    assert not ds.img_table[1:].sum(-1).eq(0).any()


def test_packed_model_equals_the_plain_path_on_real_features(mini, plain):
    ds = mini
    torch.manual_seed(0)
    cfg = config(kmeans_mode='lloyd')                             # real, varied interest tokens
    model = MISSRec(cfg, ds.n_items, ds.plm_table, ds.img_table).eval()
    Trainer(cfg, model, torch.device('cpu')).discover(0)
    batch = next(iter(SeqBatches(ds.splits['valid'], 256, pad_len=ds.pad_len)))
    with torch.no_grad():
        s, reg = model(batch['item_seq'], batch['item_seq_len'], pad_len=ds.pad_len)
        padded = torch.zeros(len(batch['item_seq']), ds.pad_len, dtype=torch.long)
        padded[:, :batch['item_seq'].shape[1]] = batch['item_seq']
        s_ref, reg_ref = plain(model, lambda: model(padded, batch['item_seq_len']))
    assert torch.allclose(s, s_ref, atol=1e-5)
    assert torch.allclose(reg, reg_ref, rtol=1e-4)


def test_original_clustering_collapses_as_the_original_did(mini):
    """SPEC 3.1 / docs/original-on-mini.md: the original k-means maps every item to one zero interest."""
    ds = mini
    torch.manual_seed(2020)
    model = MISSRec(config(), ds.n_items, ds.plm_table, ds.img_table)
    Trainer(config(), model, torch.device('cpu')).discover(0)
    used = torch.cat([model.plm_interest_lookup_table[1:], model.img_interest_lookup_table[1:]]).unique()
    assert len(used) <= 2
    assert all(float(model.interest_embeddings[i].abs().sum()) == 0 for i in used)
