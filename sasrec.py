"""Baselines in MISSRec's harness: SASRec, most-popular and text similarity.

SASRec: Self-Attentive Sequential Recommendation (Kang and McAuley, ICDM 2018,
arXiv 1808.09781), as RecBole implements it (`recbole/model/sequential_recommender/
sasrec.py` and `recbole/model/layers.py`, v1.1): ID embeddings plus learned
position embeddings, LayerNorm and dropout, a stack of post-norm Transformer
layers with causal self-attention (a position sees itself and earlier items, and
no padding), the output at the last item, and cross-entropy over all items (PAD
column included). Its hyper-parameters are in props/SASRec.yaml.

Pop: every item scored by its count as a training target (RecBole's Pop counts
the item field of the training interactions), the same for every user.

TextSim: every item scored by the cosine similarity of its text feature to a
recency-weighted mean of the history's text features (weight decay**j for the
item j steps before the last one; decay 0: the last item alone); the history's
own items are scored below every other item. No training.

All have MISSRec's API: `calculate_loss(batch, gather=None)` and
`full_sort_predict(batch) -> [B, N]`; none has interests to discover.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class SelfAttention(nn.Module):
    """RecBole's MultiHeadAttention: Q/K/V projections, scaled dot product with an
    additive mask, dropout on the probabilities, output projection, dropout,
    residual and LayerNorm."""

    def __init__(self, n_heads, hidden_size, hidden_dropout_prob, attn_dropout_prob, layer_norm_eps):
        super().__init__()
        if hidden_size % n_heads:
            raise ValueError(f'hidden_size {hidden_size} is not a multiple of n_heads {n_heads}')
        self.n_heads, self.head_size = n_heads, hidden_size // n_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout = nn.Dropout(attn_dropout_prob)
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.out_dropout = nn.Dropout(hidden_dropout_prob)

    def _heads(self, x):
        b, l, _ = x.shape
        return x.view(b, l, self.n_heads, self.head_size).permute(0, 2, 1, 3)   # [B, nh, L, d]

    def forward(self, x, mask):
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_size) + mask   # [B, nh, L, L]
        probs = self.attn_dropout(scores.softmax(-1))
        ctx = torch.matmul(probs, v).permute(0, 2, 1, 3).reshape(x.shape)               # [B, L, H]
        return self.LayerNorm(self.out_dropout(self.dense(ctx)) + x)


class FeedForward(nn.Module):
    """RecBole's FeedForward: dense, activation, dense, dropout, residual and LayerNorm."""

    def __init__(self, hidden_size, inner_size, hidden_dropout_prob, hidden_act, layer_norm_eps):
        super().__init__()
        if hidden_act not in ('gelu', 'relu'):
            raise ValueError(f"hidden_act {hidden_act!r}: SASRec supports 'gelu' or 'relu'")
        self.dense_1 = nn.Linear(hidden_size, inner_size)
        self.dense_2 = nn.Linear(inner_size, hidden_size)
        self.act = F.gelu if hidden_act == 'gelu' else F.relu            # RecBole's gelu is the erf form
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(hidden_dropout_prob)

    def forward(self, x):
        return self.LayerNorm(self.dropout(self.dense_2(self.act(self.dense_1(x)))) + x)


class SASRec(nn.Module):
    """SASRec (ID only) for `transductive_ft`.

    Args:
        config: `config.Config` with n_layers, n_heads, hidden_size, inner_size,
            hidden_dropout_prob, attn_dropout_prob, hidden_act, layer_norm_eps,
            initializer_range, MAX_ITEM_LIST_LENGTH.
        n_items: item rows N including PAD row 0.
    """

    def __init__(self, config, n_items):
        super().__init__()
        self.n_items = n_items
        hidden = config['hidden_size']
        self.item_embedding = nn.Embedding(n_items, hidden, padding_idx=0)
        self.position_embedding = nn.Embedding(config['MAX_ITEM_LIST_LENGTH'], hidden)
        self.layers = nn.ModuleList([
            nn.ModuleDict({
                'attention': SelfAttention(config['n_heads'], hidden, config['hidden_dropout_prob'],
                                           config['attn_dropout_prob'], config['layer_norm_eps']),
                'feed_forward': FeedForward(hidden, config['inner_size'], config['hidden_dropout_prob'],
                                            config['hidden_act'], config['layer_norm_eps'])})
            for _ in range(config['n_layers'])])
        self.LayerNorm = nn.LayerNorm(hidden, eps=config['layer_norm_eps'])
        self.dropout = nn.Dropout(config['hidden_dropout_prob'])
        self.initializer_range = config['initializer_range']
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # as RecBole: the PAD row of the item embedding is drawn too (not zeroed)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    @staticmethod
    def causal_mask(item_seq):
        """[B, 1, L, L] additive mask: 0 where position i may attend to j (j <= i, j not PAD), else -10000."""
        allowed = (item_seq != 0)[:, None, None, :]                              # [B, 1, 1, L]
        allowed = torch.tril(allowed.expand(-1, -1, item_seq.shape[1], -1))
        return torch.where(allowed, 0.0, -10000.0)

    def forward(self, item_seq, item_seq_len):
        """[B, H] output at the last item of each (left-aligned) history."""
        positions = torch.arange(item_seq.shape[1], device=item_seq.device)
        x = self.dropout(self.LayerNorm(self.item_embedding(item_seq) + self.position_embedding(positions)))
        mask = self.causal_mask(item_seq)
        for layer in self.layers:
            x = layer['feed_forward'](layer['attention'](x, mask))
        return x[torch.arange(len(x), device=x.device), item_seq_len - 1]

    def calculate_loss(self, batch, gather=None):
        """Cross-entropy over all N items (mean over the global batch when `gather` is given)."""
        logits = self.full_sort_predict(batch)
        loss = F.cross_entropy(logits, batch['item_id'], reduction='sum')
        n = len(batch['item_id']) if gather is None else batch['global_rows']
        return loss / n

    def full_sort_predict(self, batch):
        return self.forward(batch['item_seq'], batch['item_seq_len']) @ self.item_embedding.weight.t()


class Pop(nn.Module):
    """Most-popular: scores = how often each item is a training target."""

    def __init__(self, train_targets, n_items):
        super().__init__()
        self.register_buffer('counts', torch.bincount(torch.as_tensor(train_targets), minlength=n_items).float())
        self.dummy = nn.Parameter(torch.zeros(1))    # RecBole's Pop has one too: the trainer needs a parameter

    def calculate_loss(self, batch, gather=None):
        return self.dummy.sum() * 0.0                 # nothing to learn: the counts are the model

    def full_sort_predict(self, batch):
        return self.counts.repeat(len(batch['item_id']), 1)   # a copy: evaluation writes the PAD column


class TextSim(nn.Module):
    """Text similarity: scores = cosine(text feature of each item, decay-weighted mean of the
    history's text features); items of the history score -inf (they would be the nearest).

    Args:
        plm_table: float [N, plm_size] text features (row 0 PAD; zero rows: no text, score 0).
        decay: weight factor per step back from the last item, >= 0.
    """

    def __init__(self, plm_table, decay):
        super().__init__()
        self.register_buffer('plm_embedding', torch.as_tensor(plm_table, dtype=torch.float))
        self.decay = float(decay)
        self.dummy = nn.Parameter(torch.zeros(1))    # as Pop's: the trainer needs a parameter

    def calculate_loss(self, batch, gather=None):
        return self.dummy.sum() * 0.0                 # nothing to learn

    def full_sort_predict(self, batch):
        seq, lens = batch['item_seq'], batch['item_seq_len']
        back = lens[:, None] - 1 - torch.arange(seq.shape[1], device=seq.device)       # [B, L] steps back
        weight = torch.where(back >= 0, self.decay ** back.clamp(min=0).float(), 0.0)  # 0 ** 0 = 1
        query = (weight[..., None] * self.plm_embedding[seq]).sum(1)                    # [B, D]
        scores = F.normalize(query, dim=-1) @ F.normalize(self.plm_embedding, dim=-1).t()
        return scores.scatter_(1, seq, -float('inf'))
