"""SASRec and Pop baselines (sasrec.py)."""
import torch

from config import Config
from sasrec import Pop, SASRec


def sasrec(n_items=30, **overrides):
    cfg = Config(config_files=['props/SASRec.yaml'], overrides=overrides)
    torch.manual_seed(0)
    return SASRec(cfg, n_items).eval()


def test_recbole_defaults_from_props():
    cfg = Config(config_files=['props/SASRec.yaml'])
    got = {k: cfg[k] for k in ('n_layers', 'n_heads', 'hidden_size', 'inner_size', 'hidden_dropout_prob',
                               'attn_dropout_prob', 'hidden_act', 'layer_norm_eps', 'initializer_range')}
    assert got == {'n_layers': 2, 'n_heads': 2, 'hidden_size': 64, 'inner_size': 256, 'hidden_dropout_prob': 0.5,
                   'attn_dropout_prob': 0.5, 'hidden_act': 'gelu', 'layer_norm_eps': 1e-12,
                   'initializer_range': 0.02}


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
