"""SASRec and Pop baselines (sasrec.py)."""
import pytest
import torch

from config import Config, stage_files
from sasrec import Pop, SASRec


def sasrec(n_items=30, **overrides):
    cfg = Config(config_files=['props/SASRec.yaml'], overrides=overrides)
    torch.manual_seed(0)
    return SASRec(cfg, n_items).eval()


def test_the_props_build_recboles_default_sasrec():
    """What -m SASRec builds from its props (props/SASRec.yaml, then props/finetune.yaml) is RecBole's
    default SASRec: 50 positions of 64-d, two blocks of 2-head self-attention and a 256-d feed-forward (its
    parameter count) with GELU, weights drawn from N(0, 0.02), dropout 0.5 in training only, LayerNorm eps 1e-12."""
    torch.manual_seed(0)
    n = 2000
    model = SASRec(Config(config_files=stage_files('finetune', 'SASRec')), n)
    block = 4 * (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64) + 2 * 2 * 64   # attention, feed-forward, 2 norms
    assert sum(p.numel() for p in model.parameters()) == n * 64 + 50 * 64 + 2 * block + 2 * 64
    assert [layer['attention'].n_heads for layer in model.layers] == [2, 2]
    assert float(model.item_embedding.weight.detach().std()) == pytest.approx(0.02, abs=5e-4)
    assert float(model.layers[0]['feed_forward'].act(torch.tensor(-1.0))) == pytest.approx(-0.1587, abs=1e-4)
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-12}
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.5}
    seq, lengths = torch.tensor([[3, 9, 4, 11, 5]]), torch.tensor([5])
    with torch.no_grad():
        assert not torch.equal(model.train()(seq, lengths), model(seq, lengths))
        assert torch.equal(model.eval()(seq, lengths), model(seq, lengths))


def test_causal_mask_by_hand():
    seq = torch.tensor([[4, 7, 0]])
    allowed = SASRec.causal_mask(seq)[0, 0] == 0
    assert allowed.tolist() == [[True, False, False],
                                [True, True, False],
                                [True, True, False]]


def test_a_position_never_sees_later_items():
    model = sasrec()
    seq = torch.tensor([[3, 9, 4, 11, 5]])
    changed = seq.clone()
    changed[0, 3:] = torch.tensor([20, 21])
    with torch.no_grad():
        for length in (1, 2, 3):
            a = model(seq, torch.tensor([length]))
            b = model(changed, torch.tensor([length]))
            assert torch.equal(a, b)
        # the output at the last item does see them
        assert not torch.equal(model(seq, torch.tensor([5])), model(changed, torch.tensor([5])))


def test_padding_after_the_history_is_ignored():
    model = sasrec()
    with torch.no_grad():
        short = model(torch.tensor([[3, 9, 4]]), torch.tensor([3]))
        padded = model(torch.tensor([[3, 9, 4, 0, 0, 0]]), torch.tensor([3]))
    assert torch.allclose(short, padded, atol=1e-6)


def test_loss_is_cross_entropy_over_all_items():
    model = sasrec()
    batch = {'item_seq': torch.tensor([[3, 9, 0], [4, 5, 6]]), 'item_seq_len': torch.tensor([2, 3]),
             'item_id': torch.tensor([7, 1])}
    with torch.no_grad():
        logits = model.full_sort_predict(batch)
        assert logits.shape == (2, 30)
        expected = torch.nn.functional.cross_entropy(logits, batch['item_id'])
        assert torch.allclose(model.calculate_loss(batch), expected)


def test_pop_scores_training_target_counts():
    pop = Pop(torch.tensor([3, 3, 5, 3, 1]), n_items=7)
    scores = pop.full_sort_predict({'item_id': torch.tensor([1, 2])})
    assert scores.shape == (2, 7)
    assert scores[0].tolist() == [0, 1, 0, 3, 0, 1, 0]
    assert torch.equal(scores[0], scores[1])
