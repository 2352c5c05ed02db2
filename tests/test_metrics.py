"""Metrics against hand-computed ranks (ties included) and the original K+1 convention."""
import math

import torch

import metrics as M


def test_ranks_with_ties_broken_by_item_id():
    scores = torch.tensor([[0.0, 0.9, 0.5, 0.9, 0.1],
                           [0.0, 0.2, 0.2, 0.2, 0.9],
                           [0.0, 0.1, 0.2, 0.3, 0.4]])
    target = torch.tensor([3, 2, 4])
    # row 0: item 1 ties with 3 and has a smaller id -> rank 2
    # row 1: item 4 is higher, item 1 ties before 2 -> rank 3
    # row 2: highest -> rank 1
    assert M.ranks(scores, target).tolist() == [2, 3, 1]


def test_hit_ndcg_mrr_by_hand():
    rank = torch.tensor([1, 2, 10, 11, 51])
    assert M.hit(rank, 10).tolist() == [1, 1, 1, 0, 0]
    assert M.recall(rank, 10).tolist() == M.hit(rank, 10).tolist()
    expected = [1.0, 1 / math.log2(3), 1 / math.log2(11), 0.0, 0.0]
    assert torch.allclose(M.ndcg(rank, 10), torch.tensor(expected))
    assert torch.allclose(M.mrr(rank, 10), torch.tensor([1.0, 0.5, 0.1, 0.0, 0.0]))


def test_original_convention_counts_rank_k_plus_one():
    rank = torch.tensor([1, 11, 12, 51])
    exact = M.average(M.metric_sums(rank, ['HIT', 'NDCG'], [10, 50]), 4)
    orig = M.average(M.metric_sums(rank, ['HIT', 'NDCG'], [10, 50], original=True), 4)
    assert exact['hit@10'] == 0.25 and orig['hit@10'] == 0.5
    assert orig['ndcg@10'] == round((1 + 1 / math.log2(12)) / 4, 4)
    assert exact['hit@50'] == 0.75 and orig['hit@50'] == 1.0


def test_log_formats_match_the_original():
    result = M.average({'hit@10': 0.127 * 3, 'ndcg@10': 0.067 * 3}, 3)
    assert M.result_str(result) == 'hit@10 : 0.127    ndcg@10 : 0.067'
    assert M.ordered_repr(result) == "OrderedDict([('hit@10', 0.127), ('ndcg@10', 0.067)])"
