"""Transformer base of MISSRec and a packed forward pass over its weights.

`SeqTransformer` owns the modules of the original base model with the same
names (`item_embedding`, `position_embedding`, `trm_model`, `LayerNorm`,
`dropout`), so checkpoints of the original code load unchanged.

The forward pass does not call `nn.Transformer` on padded batches. It runs the
same post-norm layers, with the same weights and the same dropout sites, on
packed tokens: linear layers see only the positions whose output can reach the
result (valid positions, plus the positions read at the end), and the last
decoder layer computes its queries only at the output positions. Attention
still uses the padded layout with key-padding masks, so the result equals the
padded computation (tests/test_model.py checks this against `nn.Transformer`).
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


def to_device(x, device):
    """An index tensor made on the host, on `device` (without waiting for the device's queue)."""
    return x.to(device, non_blocking=True)


class Packer:
    """Moves between padded [B, L, C] tensors and packed [T, C] rows of `mask`.

    `mask` lives on the host: the positions are found there (no GPU stall) and copied to
    `device` (default: the mask's). `host_index` / `index`: [T] flat positions on each."""

    def __init__(self, mask, device=None):
        self.shape = mask.shape                                       # (B, L)
        self.host_index = mask.reshape(-1).nonzero().squeeze(1)       # [T]
        self.index = self.host_index if device is None else to_device(self.host_index, device)

    def pack(self, x):
        index = self.index if x.device == self.index.device else self.host_index
        return x.reshape(-1, *x.shape[2:]).index_select(0, index)

    def unpack(self, t):
        b, l = self.shape
        out = t.new_zeros(b * l, *t.shape[1:])
        return out.index_copy(0, self.index, t).view(b, l, *t.shape[1:])


@functools.lru_cache(maxsize=None)
def _uniform_draws_bernoulli():
    """True where torch's CPU `bernoulli_(p)` draws one float64 `uniform_` per element
    and compares it with p (its serial kernel; builds that use MKL's generator differ)."""
    g = torch.Generator()
    for n, p in ((7, 0.5), (5000, 0.8), (300, 0.1)):
        a = torch.empty(n, device='cpu').bernoulli_(p, generator=g.manual_seed(n))
        b = torch.empty(n, dtype=torch.float64, device='cpu').uniform_(generator=g.manual_seed(n)) < p
        if not torch.equal(a.bool(), b):
            return False
    return True


class _Dropout(torch.autograd.Function):
    """x * mask / (1 - p), saving the mask as bool (a quarter of the float noise)."""

    @staticmethod
    def forward(ctx, x, keep, p):
        ctx.save_for_backward(keep)
        ctx.p = p
        return x * keep.to(x.dtype).div_(1 - p)

    @staticmethod
    def backward(ctx, grad):
        keep, = ctx.saved_tensors
        return grad * keep.to(grad.dtype).div_(1 - ctx.p), None, None


def dropout(x, p, training):
    """`F.dropout(x, p, training)` with the same random draws.

    On the CPU, torch draws the mask with a serial `bernoulli_`; where that equals
    a float64 `uniform_` compared with 1 - p (checked once), the mask is drawn
    that way, about 3x faster, and saved for backward as bool."""
    if not training or p == 0 or x.device.type != 'cpu' or not _uniform_draws_bernoulli():
        return F.dropout(x, p, training)
    keep = torch.empty_like(x, dtype=torch.float64).uniform_() < 1 - p   # strides of x, as torch's noise
    return _Dropout.apply(x, keep, p)


def _heads(x, n_heads):
    b, l, h = x.shape
    return x.view(b, l, n_heads, h // n_heads).transpose(1, 2)        # [B, nh, L, d]


def attention(mha, q_tokens, q_packer, kv_tokens, kv_packer, key_padding_mask, training, qkv=None,
              kv_index=None):
    """Multi-head attention of `mha`'s weights on packed tokens.

    Args:
        q_tokens: [Tq, H] packed queries; kv_tokens: [Tk, H] packed keys/values.
        key_padding_mask: [B, Lk] True where a key is ignored.
        qkv: optional [T, 3H] in-projection of the queries, already computed
            (self-attention only); the keys are the tokens `kv_index` of the queries, or all.
    Returns:
        [Tq, H] attention output (after the output projection), packed like the queries.
    """
    h = mha.embed_dim
    w, b = mha.in_proj_weight, mha.in_proj_bias
    if q_packer.shape[1] == 1 and len(q_packer.index) == q_packer.shape[0]:
        return _one_query_attention(mha, q_tokens, kv_tokens, kv_packer, key_padding_mask, training)
    q_lin = F.linear(q_tokens, w[:h], b[:h]) if qkv is None else qkv[:, :h]
    kv_lin = (F.linear(kv_tokens, w[h:], b[h:]) if qkv is None else
              qkv[:, h:] if kv_index is None else qkv[:, h:].index_select(0, kv_index))
    q = q_packer.unpack(q_lin)                                         # [B, Lq, H]
    kv = kv_packer.unpack(kv_lin)                                      # [B, Lk, 2H]
    k, v = kv.chunk(2, dim=-1)
    q, k, v = (_heads(t, mha.num_heads) for t in (q, k, v))
    allowed = ~key_padding_mask[:, None, None, :]                      # [B, 1, 1, Lk]
    p = mha.dropout if training else 0.0
    ctx = head_padded_attention(q, k, v, allowed, p, pad_heads(q))
    ctx = ctx.transpose(1, 2).reshape(q.shape[0], -1, h)               # [B, Lq, H]
    return F.linear(q_packer.pack(ctx), mha.out_proj.weight, mha.out_proj.bias)


def pad_heads(q):
    """The head width to pad to: on CUDA a multiple of 8, which the fused attention kernels need
    (hidden size 300 with 4 heads has width 75 and would take the slow math kernel); else none."""
    d = q.shape[-1]
    return -(-d // 8) * 8 if q.is_cuda and d % 8 else d


def head_padded_attention(q, k, v, allowed, dropout_p, width):
    """`scaled_dot_product_attention` with q, k, v [B, nh, L, d] zero-padded to head width `width`:
    the padded columns add 0 to every score and give output columns that are cut off again, and
    the scale stays 1 / sqrt(d)."""
    d = q.shape[-1]
    if width == d:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
    q, k, v = (F.pad(t, (0, width - d)) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=d ** -0.5)
    return out[..., :d]


class _Halves(torch.autograd.Function):
    """x [T, 2C] -> its halves [T, C], [T, C]; backward concatenates the two gradients
    (slicing's backward would zero a [T, 2C] tensor for each half and add)."""

    @staticmethod
    def forward(ctx, x):
        c = x.shape[1] // 2
        return x[:, :c], x[:, c:]

    @staticmethod
    def backward(ctx, ga, gb):
        ga = torch.zeros_like(gb) if ga is None else ga
        gb = torch.zeros_like(ga) if gb is None else gb
        return torch.cat([ga, gb], dim=1)


class _RowDot(torch.autograd.Function):
    """Per-head dot products of each packed key k[t] with its row's query q[row[t]]: [T, heads].

    Autograd of `(q[row] * k).sum` would keep the gathered [T, H] queries for backward;
    this keeps q [B, H] and gathers again in backward."""

    @staticmethod
    def forward(ctx, q, k, row, nh):
        ctx.save_for_backward(q, k, row)
        ctx.nh = nh
        return (q.index_select(0, row) * k).view(len(row), nh, -1).sum(-1)

    @staticmethod
    def backward(ctx, grad):
        q, k, row = ctx.saved_tensors
        g = grad.unsqueeze(-1)                                         # [T, nh, 1]
        t, nh = grad.shape
        dk = (g * q.index_select(0, row).view(t, nh, -1)).view(t, -1)
        dq = q.new_zeros(q.shape).index_add_(0, row, (g * k.view(t, nh, -1)).view(t, -1))
        return dq, dk, None, None


def _one_query_attention(mha, q_tokens, kv_tokens, kv_packer, key_padding_mask, training):
    """`attention` with one query per row (the last decoder layer, its cross-attention).

    Keys and values stay packed: only the [B, heads, Lk] scores are padded, where
    the padded path would unpack [B, Lk, 2H] keys and values. The dropout on the
    attention weights is drawn on the same [B, heads, 1, Lk] tensor as in
    `scaled_dot_product_attention`, so the random stream is the same."""
    h, nh = mha.embed_dim, mha.num_heads
    d = h // nh
    w, b = mha.in_proj_weight, mha.in_proj_bias
    batch, lk = kv_packer.shape
    q = F.linear(q_tokens, w[:h], b[:h])                               # [B, H]
    k, v = _Halves.apply(F.linear(kv_tokens, w[h:], b[h:]))           # [T, H] each
    row = kv_packer.index // lk                                        # [T] row of each key
    scores = _RowDot.apply(q, k, row, nh) * d ** -0.5                  # [T, nh]
    padded = scores.new_full((batch * lk, nh), float('-inf')).index_copy(0, kv_packer.index, scores)
    padded = padded.view(batch, lk, nh).transpose(1, 2)                # [B, nh, Lk]
    padded = padded.masked_fill(key_padding_mask[:, None, :], float('-inf'))
    probs = padded.softmax(-1).unsqueeze(2).contiguous()               # [B, nh, 1, Lk]
    if training and mha.dropout > 0:
        probs = dropout(probs, mha.dropout, True)
    p = probs.view(batch, nh, lk).transpose(1, 2).reshape(batch * lk, nh).index_select(0, kv_packer.index)
    ctx = q.new_zeros(batch, h).index_add(0, row, (p.unsqueeze(-1) * v.view(-1, nh, d)).view(-1, h))
    return F.linear(ctx, mha.out_proj.weight, mha.out_proj.bias)


def feed_forward(layer, x, training):
    return layer.linear2(dropout(layer.activation(layer.linear1(x)), layer.dropout.p, training))


def encoder_layer(layer, x, packer, key_padding_mask, training, qkv=None, keys=None):
    """One post-norm nn.TransformerEncoderLayer on packed tokens x [T, H] (`qkv`: see `attention`).

    keys: None (every unmasked token of x is a key), or (index [Tk] of the key tokens in x,
    their packer, their key_padding_mask): tokens that are masked keys attend without being
    keys, which gives the same result without their keys and values."""
    if keys is None:
        att = attention(layer.self_attn, x, packer, x, packer, key_padding_mask, training, qkv)
    else:
        index, kv_packer, kv_mask = keys
        att = attention(layer.self_attn, x, packer, x.index_select(0, index), kv_packer, kv_mask, training, qkv,
                        kv_index=index)
    x = layer.norm1(x + dropout(att, layer.dropout1.p, training))
    return layer.norm2(x + dropout(feed_forward(layer, x, training), layer.dropout2.p, training))


def _bernoulli_keep(shape, p, like):
    """bool mask, True with probability 1 - p. On the CPU, where 256 (1 - p) is a whole number
    (p = 0.5, 0.25, ...), one random byte per element: a quarter of the cost of `dropout`'s
    float64 stream, which is needed only where the draws must equal torch's."""
    level = (1 - p) * 256
    if like.device.type != 'cpu':
        return torch.empty(shape, device=like.device).bernoulli_(1 - p).bool()
    if level != int(level):
        return torch.rand(shape, device='cpu') < 1 - p
    n = math.prod(shape)
    words = torch.empty((n + 7) // 8, dtype=torch.int64, device='cpu').random_(-2 ** 63, None)   # 64 random bits each
    return (words.view(torch.uint8)[:n] < int(level)).view(shape)


def _drop(x, p, training):
    """Dropout with `_bernoulli_keep` masks (the padded slots' own draws)."""
    if not training or p == 0:
        return x
    return x * _bernoulli_keep(x.shape, p, x).to(x.dtype).div_(1 - p)


def _query_only_sums(layer, norm, x, qkv, key_index, key_mask, counts, training):
    """Per row, the sum of `counts[r]` independent dropout draws of `norm(layer(x))` for a
    token x [H] that attends to row r's keys but is not a key itself (see `query_only_sums`)."""
    mha = layer.self_attn
    h, nh = mha.embed_dim, mha.num_heads
    d = h // nh
    r, n = key_index.shape
    k, v = qkv[:, h:].index_select(0, key_index.reshape(-1)).view(r, n, 2, nh, d).unbind(2)   # [R, n, nh, d]
    q = F.linear(x, mha.in_proj_weight[:h], mha.in_proj_bias[:h]).view(nh, d)
    scores = torch.einsum('hd,rnhd->rhn', q, k) * d ** -0.5
    probs = scores.masked_fill(key_mask[:, None, :], float('-inf')).softmax(-1)             # [R, nh, n]
    # the output projection folded into the values: row r's att = weights [nh * n] @ wv[r]
    wv = torch.einsum('rnhd,ehd->rhne', v, mha.out_proj.weight.view(h, nh, d)).reshape(r, nh * n, h)
    slots = int(counts.max())
    weights = probs.reshape(r, 1, nh * n).expand(r, slots, nh * n)
    att = torch.bmm(_drop(weights, mha.dropout, training), wv)                              # [R, slots, H]
    packer = Packer(torch.arange(slots, device=counts.device)[None, :] < counts[:, None], x.device)
    y = layer.norm1(x + _drop(packer.pack(att) + mha.out_proj.bias, layer.dropout1.p, training))
    ffn = layer.linear2(_drop(layer.activation(layer.linear1(y)), layer.dropout.p, training))
    y = norm(layer.norm2(y + _drop(ffn, layer.dropout2.p, training)))                       # [S, H]
    return y.new_zeros(r, h).index_add_(0, packer.index // slots, y)


def query_only_sums(layer, norm, x, qkv, key_index, key_mask, counts, training, chunk=8192, recompute=True):
    """Sums over many dropout draws of a one-layer encoder's output at a query-only token.

    The padded interest slots of the original (SPEC 3.2 step 4) are such tokens: their input
    x [H] is the PAD interest, they attend to their row's valid slots and are masked as keys,
    and in training each has its own dropout draws. Their shared attention probabilities and
    the output projection are computed once per row; each draw costs its masks, the norms
    and the feed-forward layer. Groups of about `chunk` draws are recomputed in backward
    (same random draws), so memory does not grow with the number of slots.

    Args:
        layer: nn.TransformerEncoderLayer (post-norm); norm: the encoder's final norm.
        x: [H] the token; qkv: [U, 3H] in-projection of the key tokens.
        key_index: long [R, n] rows of qkv that are row r's keys; key_mask: bool [R, n] True = no key.
        counts: long [R] draws per row (at least 1), on the host.
        recompute: False keeps the activations for backward instead.
    Returns:
        [R, H] per-row sums of the draws' outputs.
    """
    out, start = [], 0
    totals = counts.cumsum(0)
    while start < len(counts):
        done = int(totals[start - 1]) if start else 0
        stop = max(int(torch.searchsorted(totals, done + chunk, right=True)), start + 1)
        args = (layer, norm, x, qkv, key_index[start:stop], key_mask[start:stop], counts[start:stop], training)
        if recompute and torch.is_grad_enabled():
            out.append(torch.utils.checkpoint.checkpoint(_query_only_sums, *args, use_reentrant=False))
        else:
            out.append(_query_only_sums(*args))
        start = stop
    return torch.cat(out)


def decoder_layer(layer, x, packer, key_padding_mask, memory, query_rows=None, query_packer=None,
                  training=False):
    """One post-norm nn.TransformerDecoderLayer on packed tokens x [T, H].

    Keys and values of self-attention come from all of x; queries from
    `x[query_rows]` when given (the last layer only needs the output positions).
    `memory` is (tokens [Tm, H], packer, key_padding_mask [B, Lm]) or None for
    an empty memory, whose attention context is zero.
    """
    q, q_packer = (x, packer) if query_rows is None else (x.index_select(0, query_rows), query_packer)
    q = layer.norm1(q + dropout(attention(layer.self_attn, q, q_packer, x, packer,
                                          key_padding_mask, training), layer.dropout1.p, training))
    if memory is None:
        cross = layer.multihead_attn.out_proj.bias.expand_as(q)
    else:
        mem, mem_packer, mem_mask = memory
        cross = attention(layer.multihead_attn, q, q_packer, mem, mem_packer, mem_mask, training)
    q = layer.norm2(q + dropout(cross, layer.dropout2.p, training))
    return layer.norm3(q + dropout(feed_forward(layer, q, training), layer.dropout3.p, training))


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

    def encode_memory(self, tokens, packer, key_padding_mask, first_qkv=None, keys=None):
        """Encoder stack (with its final norm) on packed interest tokens [T, H];
        `first_qkv` [T, 3H]: the first layer's in-projection of the tokens, if already known;
        `keys`: see `encoder_layer`."""
        x = tokens
        for i, layer in enumerate(self.trm_model.encoder.layers):
            x = encoder_layer(layer, x, packer, key_padding_mask, self.training, first_qkv if i == 0 else None,
                              keys)
        return self.trm_model.encoder.norm(x)

    def decode(self, tokens, packer, key_padding_mask, memory, query_rows, query_packer):
        """Decoder stack (with its final norm); returns [Tq, H] at `query_rows` of the packed tokens."""
        layers = self.trm_model.decoder.layers
        x = tokens
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1
            x = decoder_layer(layer, x, packer, key_padding_mask, memory,
                              query_rows if last else None, query_packer if last else None,
                              self.training)
        return self.trm_model.decoder.norm(x)
