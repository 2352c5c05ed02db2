"""Full-sort ranking metrics as small pure functions (one target item per row).

`rank` is 1-based: 1 + the number of items scored higher than the target,
+ the number of items scored equal to it with a smaller item id (ties are
broken by item id, as a stable sort would). With one relevant item per row:

    hit@K    = 1 if rank <= K                    (= recall@K here)
    ndcg@K   = 1 / log2(rank + 1) if rank <= K
    mrr@K    = 1 / rank if rank <= K

The original code's evaluator (SPEC 4, QUIRK) reads the K+1-th cumulative
value of a top-(K+1) list, i.e. uses the cut-off K+1 under the name @K:
`cutoff(K, original=True) == K + 1`.
"""
from collections import OrderedDict

import torch


def ranks(scores, target):
    """1-based rank of `target` [B] in `scores` [B, N] (ties: smaller id first)."""
    t = scores.gather(1, target[:, None])                              # [B, 1]
    higher = (scores > t).sum(1)
    ids = torch.arange(scores.shape[1], device=scores.device)
    tied_before = ((scores == t) & (ids[None, :] < target[:, None])).sum(1)
    return higher + tied_before + 1


def hit(rank, k):
    return (rank <= k).float()


def recall(rank, k):
    return hit(rank, k)


def ndcg(rank, k):
    return torch.where(rank <= k, 1.0 / torch.log2(rank.float() + 1), torch.zeros_like(rank, dtype=torch.float))


def mrr(rank, k):
    return torch.where(rank <= k, 1.0 / rank.float(), torch.zeros_like(rank, dtype=torch.float))


METRICS = {'hit': hit, 'recall': recall, 'ndcg': ndcg, 'mrr': mrr}


def cutoff(k, original=False):
    return k + 1 if original else k


def metric_sums(rank, metrics, topk, original=False):
    """{'hit@10': sum over rows, ...} for the metric names and cut-offs given."""
    return OrderedDict((f'{m.lower()}@{k}', float(METRICS[m.lower()](rank, cutoff(k, original)).sum()))
                       for m in metrics for k in topk)


def average(sums, count, decimals=4):
    return OrderedDict((k, round(v / count, decimals)) for k, v in sums.items())


def result_str(result):
    """'hit@10 : 0.127    hit@50 : 0.2507' (RecBole's dict2str)."""
    return '    '.join(f'{k} : {v}' for k, v in result.items())


def ordered_repr(result):
    """`OrderedDict([('hit@10', 0.1416), ...])` as Python 3.11 prints it, on every Python."""
    return 'OrderedDict([' + ', '.join(f'({k!r}, {v!r})' for k, v in result.items()) + '])'
