"""The two forward paths of MISSRec bound together: the plain padded computation of missrec.py
(`forward_path: plain`, torch's Transformer layers) and the packed fast path of packed.py
(`forward_path: packed`, the default) give the same values in eval mode and the same gradients in
training without dropout; the plain path's cross-attention weights are probabilities over the
interest slots. MISSRec.fusion_weights against `fused_logits`."""
import itertools

import pytest
import torch

from cluster_utils import discover_interests
from config import Config
from missrec import MISSRec, unique_interests

N = 40


pytestmark = pytest.mark.usefixtures('one_thread')   # (conftest.py)


def make_model(kmeans_mode='lloyd', seed=0, **overrides):
    """A small fine-tuning model (48-d features, items 5 and 7 without text / image) whose interest
    tables come from interest discovery on its own item rows."""
    cfg = Config(overrides=dict(dict(hidden_size=32, inner_size=32, n_heads=4, plm_size=48, img_size=48,
                                     interest_ratio=0.5), **overrides))
    g = torch.Generator().manual_seed(seed)
    plm, img = torch.randn(N, 48, generator=g), torch.randn(N, 48, generator=g)
    plm[0] = img[0] = 0
    plm[5] = 0
    img[7] = 0
    torch.manual_seed(seed)
    model = MISSRec(cfg, N, plm, img)
    if hasattr(model, 'fusion_factor'):
        with torch.no_grad():
            model.fusion_factor.add_(torch.randn(model.fusion_factor.shape, generator=g))
    labels, centroids, _ = discover_interests(model.interest_points(), model.num_interest,
                                              kmeans_mode=kmeans_mode, seed=seed)
    model.set_interests(labels, centroids)
    return model


def batch(lengths=(1, 3, 9, 2, 5, 9, 4, 7), width=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        seq[i, :n] = torch.randint(1, N, (n,), generator=g)
    seq[1, 0], seq[2, 3] = 5, 7                                   # missing modalities inside histories
    return seq, torch.tensor(lengths)


SETTINGS = list(itertools.product(['transductive_ft', 'inductive_ft'], ['text', 'img', 'img_text']))


@pytest.mark.parametrize('stage,modal', SETTINGS)
@pytest.mark.parametrize('seq_fusion', ['add', 'contextual'])
def test_forward_equals_the_fast_path_in_eval_mode(stage, modal, seq_fusion, plain):
    model = make_model(train_stage=stage, modal_type=modal, seq_mm_fusion=seq_fusion,
                       item_mm_fusion='dynamic_instance').eval()
    seq, lens = batch()
    distinct = unique_interests(model.interest_ids(seq))[1]
    assert int(distinct.max()) >= 5                                # lloyd: rows hold several interests
    with torch.no_grad():
        fast, reg_fast = model(seq, lens)
        fast30, reg_fast30 = model(seq, lens, pad_len=30)
        s, reg = plain(model, lambda: model(seq, lens))
        s30, reg30 = plain(model, lambda: model(seq, lens, pad_len=30))
    assert torch.allclose(s, fast, atol=1e-5) and torch.allclose(reg, reg_fast, rtol=1e-5)
    assert torch.allclose(s30, fast30, atol=1e-5) and torch.allclose(reg30, reg_fast30, rtol=1e-5)


@pytest.mark.parametrize('stage,modal', SETTINGS)
def test_forward_has_the_gradients_of_the_fast_path_in_training(stage, modal, plain):
    model = make_model(train_stage=stage, modal_type=modal, hidden_dropout_prob=0.0).train()
    seq, lens = batch()
    target = torch.randn(len(lens), model.hidden_size, generator=torch.Generator().manual_seed(1))

    def grads(run):
        model.zero_grad()
        s, reg = run()
        ((s * target).sum() + 10 * reg).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast = grads(lambda: model(seq, lens, pad_len=12))
    slow = grads(lambda: plain(model, lambda: model(seq, lens, pad_len=12)))
    assert fast.keys() == slow.keys() and f'{modal.split("_")[-1]}_adaptor.weight' in fast
    assert any(n.startswith('trm_model.encoder') for n in fast)   # the regulariser reaches the encoder
    for name in fast:
        assert torch.allclose(slow[name], fast[name], atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize('modal', ['text', 'img_text'])
def test_attention_weights_are_probabilities_over_the_interest_slots(modal):
    model = make_model(modal_type=modal).eval()
    seq, lens = batch()
    with torch.no_grad():
        s, reg, info = model(seq, lens, attention=True)
        fast = model(seq, lens)
    assert torch.allclose(s, fast[0], atol=1e-5) and torch.allclose(reg, fast[1], rtol=1e-5)
    interest_seq, weights = info['interest_seq'], info['attention']
    heads = model.trm_model.decoder.layers[-1].multihead_attn.num_heads
    assert weights.shape == (len(lens), heads, interest_seq.shape[1])
    valid = interest_seq != 0
    assert torch.allclose(weights.sum(-1), torch.ones(len(lens), heads), atol=1e-5)
    assert (weights >= 0).all() and (weights[~valid[:, None, :].expand_as(weights)] == 0).all()
    # the slots hold each row's distinct interests of its items, from the model's lookup tables
    lookups = [getattr(model, f'{model._prefix(m)}_interest_lookup_table') for m in model.modalities]
    for r, n in enumerate(lens.tolist()):
        items = seq[r, :n]
        expected = sorted({int(t[i]) for t in lookups for i in items})
        assert interest_seq[r][valid[r]].tolist() == expected


def test_fusion_weights_give_the_fused_scores():
    for fusion in ('dynamic_shared', 'dynamic_instance', 'static'):
        model = make_model(modal_type='img_text', item_mm_fusion=fusion, train_stage='inductive_ft').eval()
        seq, lens = batch()
        with torch.no_grad():
            s, _ = model(seq, lens)
            tables = model.adapted_tables()
            x = [s @ torch.nn.functional.normalize(tables[m], dim=1).t() for m in ('text', 'img')]
            w = model.fusion_weights(*x)
            fused = model.fused_logits(s, tables)
            ids = torch.tensor([3, 9, 4])
            w_some = model.fusion_weights(x[0][:, ids], x[1][:, ids], item_ids=ids)
        assert w.shape == (len(lens), N, 2) and torch.allclose(w.sum(-1), torch.ones(len(lens), N))
        assert torch.allclose(fused, w[..., 0] * x[0] + w[..., 1] * x[1], atol=1e-6)
        assert torch.allclose(w_some, w[:, ids], atol=1e-6)
    with pytest.raises(ValueError, match='one modality'):
        make_model(modal_type='text').fusion_weights(x[0], x[1])
