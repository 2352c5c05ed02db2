"""tools/export_embeddings.py: exported vectors reproduce full_sort_predict's ranking (dot-product fusions),
the exact rescoring of dynamic fusion, and new items' vectors from their features alone."""
import json
import os

import numpy as np
import pytest
import torch

from inference import load_model
from quick_start import build_config, finetune, parse_args
from tools import export_embeddings as X

TINY = ['--hidden_size=32', '--inner_size=32', '--plm_size=32', '--img_size=32', '--epochs=1',
        '--show_progress=False', '--use_gpu=False']


def train(demo, root, *extra):
    args = ['-d', 'Demo', f'--data_path={demo}', f'--checkpoint_dir={root}/saved', f'--log_dir={root}/log',
            *TINY, *extra]
    return finetune(build_config('finetune', *parse_args('finetune', args)))['checkpoint']


def model_scores(ckpt, demo):
    config, data, model = load_model(ckpt, data_path=str(demo))
    batch = {k: v for k, v in data.splits['test'].items()}
    with torch.no_grad():
        scores = model.full_sort_predict(dict(batch, pad_len=data.pad_len)) * config['temperature']
    return config, data, model, scores


@pytest.mark.parametrize('extra', [['--item_mm_fusion=static'], ['--item_mm_fusion=static', '-mode', 'inductive'],
                                   ['--modal_type=text'], ['--modal_type=img', '-mode', 'inductive']])
def test_dot_product_topk_equals_full_sort_predict(demo, tmp_path, extra):
    ckpt = train(demo, tmp_path, *extra)
    out = tmp_path / 'emb'
    assert X.main(['--checkpoint', ckpt, '--out', str(out), '--data_path', str(demo), '--split', 'test']) == 0
    assert json.load(open(out / 'fusion.json'))['exact'] is True
    _, data, _, scores = model_scores(ckpt, demo)
    s, v = np.load(out / 'seq_test.npy'), np.load(out / 'items_fused.npy')
    dot = torch.from_numpy(s @ v.T)
    assert dot.shape == scores.shape == (len(data.splits['test']['item_id']), data.n_items)
    assert torch.allclose(dot, scores, atol=1e-5)
    dot[:, 0] = scores[:, 0] = -float('inf')
    # the same top-K, up to the order of items whose scores tie within float rounding
    top_dot, top = dot.topk(10).indices, scores.topk(10)
    assert torch.allclose(scores.gather(1, top_dot), top.values, atol=1e-5)
    assert (top_dot == top.indices).float().mean() > 0.95
    ids = open(out / 'item_ids.tsv').read().splitlines()
    assert len(ids) == data.n_items + 1 and ids[2].split('\t')[1] == data.item_tokens[0]


def test_dynamic_fusion_is_flagged_and_rescored_exactly(finetuned, tmp_path):
    demo, ckpt = finetuned['data_path'], finetuned['checkpoint']
    out = tmp_path / 'emb'
    assert X.main(['--checkpoint', ckpt, '--out', str(out), '--data_path', demo, '--split', 'test']) == 0
    meta = json.load(open(out / 'fusion.json'))
    assert meta['exact'] is False and meta['item_mm_fusion'] == 'dynamic_shared'
    _, _, _, scores = model_scores(ckpt, demo)
    s = torch.from_numpy(np.load(out / 'seq_test.npy'))
    a = s @ torch.from_numpy(np.load(out / 'items_text.npy')).T
    b = s @ torch.from_numpy(np.load(out / 'items_img.npy')).T
    d = s @ torch.from_numpy(np.load(out / 'items_id.npy')).T
    fused = b + (a - b) * torch.sigmoid((a - b) * meta['fusion_factor'])
    assert torch.allclose((d + 2 * fused) / 3, scores, atol=1e-5)


def test_histories_equal_split_rows(finetuned, tmp_path):
    demo, ckpt = finetuned['data_path'], finetuned['checkpoint']
    _, data, _ = load_model(ckpt, data_path=demo)
    rows = data.splits['test']
    hist = [' '.join(data.item_tokens[i - 1] for i in rows['item_seq'][r, :rows['item_seq_len'][r]].tolist())
            for r in (0, 3)]
    out = tmp_path / 'emb'
    args = ['--checkpoint', ckpt, '--out', str(out), '--data_path', demo, '--split', 'test']
    assert X.main(args + [a for h in hist for a in ('--history', h)]) == 0
    assert np.allclose(np.load(out / 'seq_history.npy'), np.load(out / 'seq_test.npy')[[0, 3]], atol=1e-6)


def test_new_items_from_their_features(demo, tmp_path):
    """Items given as new feature rows get the vectors the model computes from those features: here
    the rows of known items, whose vectors the model already has (inductive: no ID term)."""
    ckpt = train(demo, tmp_path, '--item_mm_fusion=static', '-mode', 'inductive')
    _, data, _ = load_model(ckpt, data_path=str(demo))
    pick = [1, 5, 7]
    files = []
    for table, suffix in ((data.plm_table, 'feat1CLS'), (data.img_table, 'feat3CLS')):
        path = tmp_path / f'new.{suffix}'
        table[pick].numpy().astype('<f4').tofile(path)
        files.append(str(path))
    out = tmp_path / 'emb'
    assert X.main(['--checkpoint', ckpt, '--out', str(out), '--data_path', str(demo), '--items', *files]) == 0
    for name in ('fused', 'text', 'img'):
        assert np.allclose(np.load(out / f'new_items_{name}.npy'), np.load(out / f'items_{name}.npy')[pick], atol=1e-6)
    # one modality missing: a one-line error
    assert X.main(['--checkpoint', ckpt, '--out', str(out), '--data_path', str(demo), '--items', files[0]]) == 2
