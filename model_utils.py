"""The Transformer base of MISSRec and small helpers shared by its two forward paths.

`SeqTransformer` owns the modules of the original base model with the same names
(`item_embedding`, `position_embedding`, `trm_model`, `LayerNorm`, `dropout`), so
checkpoints of the original code load unchanged. `missrec.py` runs them plainly on padded
tensors; `packed.py` runs the same layers on packed tokens.
"""
import torch
import torch.nn as nn


def to_device(x, device):
    """An index tensor made on the host, on `device` (without waiting for the device's queue)."""
    return x.to(device, non_blocking=True)


def unique_interests(ids):
    """Per-row sorted distinct non-zero ids, left-aligned and right-padded with 0.

    Args:
        ids: long [B, X] interest ids (0 = none).
    Returns:
        (long [B, Qv] distinct non-zero ids, long [B] their counts), Qv >= 1.
    """
    s, _ = ids.sort(dim=1)                                             # [B, X]
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    keep = first & (s != 0)
    counts = keep.sum(1)                                               # [B]
    width = max(int(counts.max()), 1) if len(counts) else 1
    slot = keep.cumsum(1) - 1                                          # target column of kept ids
    out = s.new_zeros(s.shape[0], width + 1)
    rows = torch.arange(s.shape[0], device=s.device)[:, None].expand_as(s)
    out[rows[keep], slot[keep]] = s[keep]
    return out[:, :width], counts


class SeqTransformer(nn.Module):
    """The original `model_utils.Transformer` base: modules, names and initialisation."""

    def __init__(self, config, n_items):
        super().__init__()
        self.n_items = n_items
        self.n_layers = config['n_layers']
        self.hidden_size = config['hidden_size']
        self.initializer_range = config['initializer_range']
        self.max_seq_length = config['MAX_ITEM_LIST_LENGTH']

        self.item_embedding = nn.Embedding(n_items, self.hidden_size, padding_idx=0)
        self.position_embedding = nn.Embedding(self.max_seq_length, self.hidden_size)
        self.trm_model = nn.Transformer(
            d_model=self.hidden_size, nhead=config['n_heads'],
            num_encoder_layers=self.n_layers // 2, num_decoder_layers=self.n_layers // 2,
            dim_feedforward=config['inner_size'], dropout=config['hidden_dropout_prob'],
            activation=config['hidden_act'], layer_norm_eps=config['layer_norm_eps'],
            batch_first=True, norm_first=False)
        self.LayerNorm = nn.LayerNorm(self.hidden_size, eps=config['layer_norm_eps'])
        self.dropout = nn.Dropout(config['hidden_dropout_prob'])
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # The attention in_proj_weight is not a Linear and keeps torch's xavier init.
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
