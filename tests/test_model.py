"""The model of SPEC 3: the packed fast path (the default) against the plain padded code of
missrec.py (`forward_path: plain`), the scores against a literal statement of SPEC 3.3, the
interest tables, the original's state-dict names and initialisation, the regulariser's draws."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from config import Config
from missrec import MISSRec
from model_utils import unique_interests
from packed import query_only_sums

N = 40


def tables(seed=0, n=N, dim=512):
    g = torch.Generator().manual_seed(seed)
    plm, img = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    plm[0] = img[0] = 0
    plm[5] = 0            # item 5 has no text
    img[7] = 0            # item 7 has no image
    return plm, img


def small_model(seed=0, **overrides):
    cfg = Config(overrides=dict(dict(hidden_size=64, inner_size=32, n_heads=4), **overrides))
    torch.manual_seed(seed)
    plm, img = tables(seed)
    model = MISSRec(cfg, N, plm, img).eval()
    if hasattr(model, 'fusion_factor'):
        with torch.no_grad():
            model.fusion_factor.add_(torch.randn_like(model.fusion_factor))
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, 6, (len(model.modalities) * (N - 1),), generator=g)
    model.set_interests(labels, torch.randn(model.num_interest, 64, generator=g))
    return model


def batch(seed=0, lengths=(1, 3, 9, 2, 5, 9, 4), width=9):
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    seq = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        seq[i, :n] = torch.randint(1, N, (n,), generator=g)
    seq[1, 0], seq[2, 3] = 5, 7          # missing modalities inside histories
    return seq, lens


def literal_scores(model, s):
    """SPEC 3.3 written literally: [B, N] logits / temperature, a two-way softmax for the fusion."""
    t = {m: model.adaptor(m)(getattr(model, model._table_name(m)).weight) for m in model.modalities}
    if len(t) == 2:
        x = torch.stack([s @ F.normalize(t[m], dim=1).t() for m in ('text', 'img')], -1)
        if model.item_mm_fusion == 'static':
            fused = x.mean(-1)
        else:
            fused = (x * F.softmax(x * model.fusion_factor.unsqueeze(-1), -1)).sum(-1)
        if model.use_id:
            fused = (s @ F.normalize(model.item_embedding.weight, dim=1).t() + 2 * fused) / 3
    else:
        emb = sum(t.values()) if t else 0
        if model.use_id:
            emb = emb + model.item_embedding.weight
        fused = s @ F.normalize(emb, dim=1).t()
    return fused / model.temperature


CASES = list(itertools.product(['transductive_ft', 'inductive_ft'],
                               ['static', 'dynamic_shared', 'dynamic_instance'],
                               ['add', 'contextual'], ['img_text', 'text', 'img']))


@pytest.mark.parametrize('stage,item_fusion,seq_fusion,modal', CASES)
def test_packed_forward_equals_the_plain_path(stage, item_fusion, seq_fusion, modal, plain):
    model = small_model(train_stage=stage, item_mm_fusion=item_fusion, seq_mm_fusion=seq_fusion,
                        modal_type=modal)
    seq, lens = batch()
    with torch.no_grad():
        s, reg = model(seq, lens)
        s_ref, reg_ref = plain(model, lambda: model(seq, lens))
        scores = model.full_sort_predict({'item_seq': seq, 'item_seq_len': lens})
        scores_ref = literal_scores(model, s_ref)
    assert torch.allclose(s, s_ref, atol=1e-5)
    assert torch.allclose(reg, reg_ref, rtol=1e-5)
    assert torch.allclose(scores, scores_ref, atol=1e-4)


def test_rows_with_many_distinct_interests_match_the_plain_path(plain):
    """Up to 18 distinct interests per row: several encoder buckets of different widths."""
    model = small_model()
    n = N - 1
    labels = torch.randperm(2 * n, generator=torch.Generator().manual_seed(0)) % model.num_interest
    model.set_interests(labels, torch.randn(model.num_interest, 64))
    seq, lens = batch(lengths=(1, 9, 2, 5, 9, 3, 7, 8), width=9)
    distinct = [len(set(r.tolist()) - {0}) for r in model.interest_ids(seq)]
    assert max(distinct) > 8 and min(distinct) <= 2
    with torch.no_grad():
        s, reg = model(seq, lens)
        s_ref, reg_ref = plain(model, lambda: model(seq, lens))
    assert torch.allclose(s, s_ref, atol=1e-5) and torch.allclose(reg, reg_ref, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_packed_forward_on_cuda_equals_the_cpu():
    model = small_model(seq_mm_fusion='contextual')
    seq, lens = batch()
    with torch.no_grad():
        cpu = model.full_sort_predict({'item_seq': seq, 'item_seq_len': lens})
        gpu = model.cuda().full_sort_predict({'item_seq': seq.cuda(), 'item_seq_len': lens.cuda()})
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-3)


def test_loss_equals_literal_cross_entropy_plus_regulariser(plain):
    model = small_model()
    seq, lens = batch()
    target = torch.tensor([3, 1, 8, 0, 12, 39, 2])      # PAD column 0 is a valid class in training
    with torch.no_grad():
        loss = model.calculate_loss({'item_seq': seq, 'item_seq_len': lens, 'item_id': target})
        s_ref, reg_ref = plain(model, lambda: model(seq, lens))
        expected = F.cross_entropy(literal_scores(model, s_ref), target) + model.gamma * reg_ref
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_trailing_padding_does_not_change_the_representation():
    model = small_model()
    seq, lens = batch()
    wide = torch.cat([seq, torch.zeros(seq.shape[0], 20, dtype=torch.long)], dim=1)
    with torch.no_grad():
        s, _ = model(seq, lens)
        s_wide, _ = model(wide, lens)
    assert torch.allclose(s, s_wide, atol=1e-6)


def test_regulariser_in_the_original_padded_layout(plain):
    """With pad_len, reg equals the padded original exactly; without it the
    difference (one PAD slot more or less per row) stays small."""
    model = small_model()
    seq, lens = batch()
    pad_len = 30
    padded = torch.cat([seq, torch.zeros(seq.shape[0], pad_len - seq.shape[1], dtype=torch.long)], 1)
    with torch.no_grad():
        _, reg_orig = plain(model, lambda: model(padded, lens))
        _, reg = model(seq, lens, pad_len=pad_len)
        _, reg_trimmed = model(seq, lens)
    assert torch.allclose(reg, reg_orig, rtol=1e-5)
    assert abs(float(reg_trimmed - reg_orig)) / float(reg_orig) < 0.25
    # weighted by gamma = 1e-4 in the loss, the difference is negligible
    assert model.gamma * abs(float(reg_trimmed - reg_orig)) < 1e-2


def test_unique_interests_equals_per_row_unique():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 9, (50, 14), generator=g)
    ids[4] = 0
    ids[4, 2] = 5
    out, counts = unique_interests(ids)
    for row, o, c in zip(ids, out, counts):
        expected = [v for v in row.unique().tolist() if v != 0]
        assert o[:c].tolist() == expected and c == len(expected)
        assert (o[c:] == 0).all()


def test_interest_tables_are_written_as_spec():
    model = small_model()
    n = N - 1
    labels = torch.arange(2 * n) % model.num_interest
    centroids = torch.randn(model.num_interest, 64)
    model.set_interests(labels, centroids)
    assert model.plm_interest_lookup_table[0] == 0 and model.img_interest_lookup_table[0] == 0
    assert torch.equal(model.plm_interest_lookup_table[1:], labels[:n] + 1)
    assert torch.equal(model.img_interest_lookup_table[1:], labels[n:] + 1)
    assert torch.equal(model.interest_embeddings[0], torch.zeros(64))
    assert torch.equal(model.interest_embeddings[1:], centroids)
    assert model.num_interest == 2 * n * 0.5 // 1


def test_empty_modality_masks():
    model = small_model()
    assert model.plm_embedding_empty_mask.tolist() == [i in (0, 5) for i in range(N)]
    assert model.img_embedding_empty_mask.tolist() == [i in (0, 7) for i in range(N)]


ORIGINAL_KEYS = (
    ['item_embedding.weight', 'position_embedding.weight'] +
    [f'trm_model.encoder.layers.0.{p}' for p in (
        'self_attn.in_proj_weight', 'self_attn.in_proj_bias', 'self_attn.out_proj.weight',
        'self_attn.out_proj.bias', 'linear1.weight', 'linear1.bias', 'linear2.weight', 'linear2.bias',
        'norm1.weight', 'norm1.bias', 'norm2.weight', 'norm2.bias')] +
    ['trm_model.encoder.norm.weight', 'trm_model.encoder.norm.bias'] +
    [f'trm_model.decoder.layers.0.{p}' for p in (
        'self_attn.in_proj_weight', 'self_attn.in_proj_bias', 'self_attn.out_proj.weight',
        'self_attn.out_proj.bias', 'multihead_attn.in_proj_weight', 'multihead_attn.in_proj_bias',
        'multihead_attn.out_proj.weight', 'multihead_attn.out_proj.bias', 'linear1.weight',
        'linear1.bias', 'linear2.weight', 'linear2.bias', 'norm1.weight', 'norm1.bias',
        'norm2.weight', 'norm2.bias', 'norm3.weight', 'norm3.bias')] +
    ['trm_model.decoder.norm.weight', 'trm_model.decoder.norm.bias', 'LayerNorm.weight',
     'LayerNorm.bias', 'fusion_factor', 'plm_embedding.weight', 'img_embedding.weight',
     'text_adaptor.weight', 'text_adaptor.bias', 'img_adaptor.weight', 'img_adaptor.bias',
     'plm_embedding_empty_mask', 'img_embedding_empty_mask', 'plm_interest_lookup_table',
     'img_interest_lookup_table', 'interest_embeddings'])


def test_state_dict_with_the_original_names_loads_strictly():
    model = small_model()
    assert set(model.state_dict()) == set(ORIGINAL_KEYS)
    other = small_model(seed=5)
    result = model.load_state_dict({k: other.state_dict()[k] for k in ORIGINAL_KEYS}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_initialisation_follows_the_original_base():
    model = MISSRec(Config(), N, *tables())
    assert torch.equal(model.item_embedding.weight[0], torch.zeros(300))
    assert abs(float(model.item_embedding.weight[1:].detach().std()) - 0.02) < 0.003
    lin = model.trm_model.encoder.layers[0].linear1
    assert abs(float(lin.weight.detach().std()) - 0.02) < 0.003 and torch.equal(lin.bias, torch.zeros_like(lin.bias))
    # adaptors are created after the base initialisation: torch's default Linear init
    bound = 1 / 512 ** 0.5
    w, b = model.text_adaptor.weight.detach(), model.text_adaptor.bias.detach()
    assert float(w.abs().max()) <= bound and float(b.abs().max()) > 0
    assert float(model.fusion_factor.detach()) == 0.0


def test_training_step_reaches_every_trainable_parameter():
    model = small_model().train()
    seq, lens = batch()
    loss = model.calculate_loss({'item_seq': seq, 'item_seq_len': lens, 'item_id': torch.arange(7)})
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_modal_type_none_uses_ids_only():
    model = small_model(modal_type='none')
    seq, lens = batch()
    with torch.no_grad():
        scores = model.full_sort_predict({'item_seq': seq, 'item_seq_len': lens})
    assert scores.shape == (7, N) and torch.isfinite(scores).all()
    assert not hasattr(model, 'text_adaptor') and not hasattr(model, 'img_adaptor')


def test_regulariser_of_batch_shares_adds_up_with_the_global_width():
    """Under DDP each process holds a share of the global batch; with the global padded width
    (`width_max`) the shares' regularisers add up to the whole batch's, as with one process."""
    model = small_model()
    seq, lens = batch()
    tables = model.adapted_tables()
    with torch.no_grad():
        _, whole = model(seq, lens, pad_len=9, tables=tables)
        # the original's padded width: distinct interests + 1 for a padded item (a history shorter than 9)
        widths = [int((unique_interests(model.interest_ids(seq[p]))[1] + (lens[p] < 9).long()).max())
                  for p in (slice(0, 2), slice(2, None))]
        assert widths[0] != widths[1]          # the shares' own widths differ: the check below can fail
        shares, local = 0, 0
        for part in (slice(0, 2), slice(2, None)):
            shares += model(seq[part], lens[part], pad_len=9, tables=tables, width_max=lambda x: max(x, *widths))[1]
            local += model(seq[part], lens[part], pad_len=9, tables=tables)[1]
    assert torch.allclose(shares, whole, rtol=1e-5)
    assert not torch.allclose(local, whole, rtol=1e-3)


def _reg_draws(fn, n=300):
    """reg and the norm of its gradient on the encoder's FFN, over n dropout draws."""
    values, grads = [], []
    for i in range(n):
        torch.manual_seed(1000 + i)
        reg = fn()
        values.append(float(reg.detach()))
        grads.append(float(torch.autograd.grad(reg, fn.weight)[0].norm()))
    return torch.tensor(values), torch.tensor(grads)


@pytest.mark.parametrize('draws,n_layers', [('independent', 2), ('independent', 4), ('shared', 2)])
def test_training_regulariser_is_distributed_as_the_padded_original(draws, n_layers, plain):
    """In training every PAD slot of the original's padded layout has its own dropout draw:
    mean and spread of reg and of its gradient over many draws match the plain padded path
    (`forward_path: plain`), with one encoder layer (the dedicated pass) and with two (padded slots as
    query tokens of the rows); one shared draw per row (`reg_pad_draws: shared`) does not."""
    model = small_model(reg_pad_draws=draws, n_layers=n_layers).train()
    seq, lens = batch(lengths=(1, 3, 9, 2, 1, 9, 1, 2))
    model.set_interests(torch.arange(2 * (N - 1)) % model.num_interest, torch.randn(model.num_interest, 64))
    tables = model.adapted_tables()

    def ours():
        return model(seq, lens, tables=tables)[1]

    def literal():
        return plain(model, lambda: model(seq, lens))[1]

    ours.weight = literal.weight = model.trm_model.encoder.layers[0].linear1.weight
    (v, g), (v_ref, g_ref) = _reg_draws(ours), _reg_draws(literal)
    matches = []
    for a, b in ((v, v_ref), (g, g_ref)):
        se = (a.var() / len(a) + b.var() / len(b)).sqrt()
        matches += [abs(float(a.mean() - b.mean())) < 4 * se, 0.8 < float(a.std() / b.std()) < 1.25]
    assert all(matches) == (draws == 'independent'), matches


def _query_only_case(seed=0, **overrides):
    """A one-layer encoder, a PAD token, and 5 rows of 1-4 keys among 6 interest tokens."""
    model = small_model(seed, **overrides)
    layer, norm = model.trm_model.encoder.layers[0], model.trm_model.encoder.norm
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(6, 64, generator=g)
    tokens[0] = 0                                                      # the PAD interest
    n_keys = torch.tensor([1, 4, 2, 3, 1])
    key_index = torch.randint(1, 6, (5, 4), generator=g)
    key_mask = torch.arange(4)[None, :] >= n_keys[:, None]
    return model, layer, norm, tokens, key_index, key_mask


def test_query_only_sums_equal_the_encoder_at_a_padded_slot():
    """Without dropout each draw is the encoder's output at a PAD slot that is a masked key."""
    model, layer, norm, tokens, key_index, key_mask = _query_only_case(hidden_dropout_prob=0.0)
    model.train()                                                      # nn.Transformer's padded path
    counts = torch.tensor([3, 1, 2, 5, 1])
    qkv = F.linear(tokens, layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias)
    with torch.no_grad():
        sums = query_only_sums(layer, norm, tokens[0], qkv, key_index, key_mask, counts, training=False, chunk=4)
        # the padded encoder: each row's keys, then one PAD slot masked as a key
        x = torch.cat([tokens[key_index], tokens[:1].expand(5, 1, 64)], dim=1)          # [5, 5, H]
        mask = torch.cat([key_mask, torch.ones(5, 1, dtype=torch.bool)], dim=1)
        out = model.trm_model.encoder(x, src_key_padding_mask=mask)[:, -1]               # [5, H]
    assert torch.allclose(sums, counts[:, None] * out, atol=1e-5)


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs CUDA'))])
def test_query_only_sums_recompute_the_same_draws_in_backward(device):
    """Chunks recomputed in backward draw the same dropout masks: values and gradients
    equal those of one pass that keeps its activations."""
    model, layer, norm, tokens, key_index, key_mask = _query_only_case(1)
    model.to(device)
    tokens, key_index, key_mask = tokens.to(device), key_index.to(device), key_mask.to(device)
    counts = torch.tensor([3, 1, 2, 5, 1], device=device)
    results = []
    for recompute in (True, False):
        torch.manual_seed(7)
        model.zero_grad()
        qkv = F.linear(tokens, layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias)
        sums = query_only_sums(layer, norm, tokens[0], qkv, key_index, key_mask, counts, training=True, chunk=4,
                               recompute=recompute)
        (sums * torch.arange(64., device=device)).sum().backward()
        results.append([sums.detach(), layer.linear1.weight.grad.clone(), layer.self_attn.in_proj_weight.grad.clone(),
                        layer.self_attn.out_proj.weight.grad.clone()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    # and the draws are random: another seed gives other sums
    torch.manual_seed(8)
    with torch.no_grad():
        other = query_only_sums(layer, norm, tokens[0], qkv, key_index, key_mask, counts, training=True, chunk=4)
    assert not torch.allclose(other, results[0][0], atol=1e-3)
