"""The fast exact forward pass of MISSRec (`forward_path: packed`, the default).

`missrec.py` writes the model plainly: padded tensors through torch's Transformer layers. This
module computes the same values and gradients (tests/test_forward.py, tests/test_model.py) with
the same weights and the same dropout sites, faster and in less memory:
- packed tokens: linear layers see only the positions whose output can reach the result (valid
  positions and the positions read at the end); attention still uses the padded layout with
  key-padding masks, so the result equals the padded computation;
- the last decoder layer computes its queries only at the output positions, and its
  cross-attention keeps keys and values packed (`_one_query_attention`);
- the interest encoder runs rows grouped by their number of distinct interests
  (`interest_buckets`), and the first layer's in-projection once per distinct interest;
- the PAD interest slots of the regulariser, which are query-only tokens, are computed once per
  row, or per dropout draw with the shared parts computed once (`query_only_sums`);
- dropout masks are kept as bool, and on the CPU drawn as the same random numbers torch draws.

Host and device: everything whose size or positions depend on the data (distinct interests,
buckets, packed positions) is planned on the host, from the batch's host tensors and one host
copy of the interest lookup tables per step, and only index tensors are copied to the model's
device. So a training step waits for the GPU about once (bench/host_syncs.py).

Entry: `seq_output(model, ...)`, called by `MISSRec.seq_output`.
"""
import functools
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from model_utils import to_device, unique_interests


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


# ---------------------------------------------------------------- the model on packed tokens
def seq_output(model, item_seq, item_seq_len, modal_emb, empty_masks, interest_ids, interest_table,
               pad_len=None, width_max=None):
    """`MISSRec.seq_output` (SPEC 3.2) on packed tokens: the same arguments (item_seq, item_seq_len,
    empty_masks and interest_ids on the host) and the same (s [B, H], reg), without `attention`."""
    memory, reg = _encode_interests(model, item_seq, item_seq_len, interest_ids, interest_table, pad_len,
                                    width_max)
    tokens, packer, key_mask, query_rows, query_packer, n_out = _decoder_tokens(
        model, item_seq, item_seq_len, modal_emb, empty_masks)
    out = decode(model, tokens, packer, key_mask, memory, query_rows, query_packer)   # [B*P, H]
    out = out.view(item_seq.shape[0], n_out, -1).mean(1)                            # [B, H]
    return F.normalize(out, dim=1), reg


def _encode_interests(model, item_seq, item_seq_len, interest_ids, interest_table, pad_len, width_max=None):
    """Encoder over distinct interest tokens; returns (memory, reg).

    The original pads each row's distinct ids to the longest row of the batch
    (Q slots); padded slots (and an explicit 0 id) hold the zero PAD interest and
    are masked as keys. The decoder gets each row's valid slots and one PAD slot.
    Without dropout every PAD slot of a row has the same output, so one is
    computed and the regulariser counts it Q - n times. In training, each PAD
    slot has its own dropout draw (SPEC 3.2 step 4): the other Q - n - 1 are
    computed as query-only tokens (`query_only_sums`; with more than
    one encoder layer, as extra slots of the rows), unless `reg_pad_draws: shared`
    (faster, not the original's distribution).
    """
    device = interest_table.device if model.modalities else None
    if not model.modalities:
        return None, model.position_embedding.weight.new_zeros(())
    ids, n_valid = unique_interests(interest_ids)                    # [B, Qv], [B] (host)
    b, qv = ids.shape
    full_len = item_seq.shape[1] if pad_len is None else pad_len
    has_zero = (item_seq_len < full_len).long()                      # a padded item gives id 0
    q_orig = int((n_valid + has_zero).max())                         # the batch's padded width
    if width_max is not None:   # a share of a global batch: the width of the whole batch
        q_orig = width_max(q_orig)
    n_pad = q_orig - n_valid                                         # PAD slots of the original
    draws = _independent_pad_draws(model)
    layers = model.trm_model.encoder.layers
    widened = draws and len(layers) > 1                              # every PAD slot in the rows
    pads = n_pad.clamp(min=1) if widened else torch.ones_like(n_valid)
    width = max(qv + 1, int((n_valid + pads).max()))
    ids = torch.cat([ids, ids.new_zeros(b, width - qv)], dim=1)
    key_mask = ids == 0                                              # [B, width]
    slot = torch.arange(width, device=ids.device)
    active = slot[None, :] < (n_valid + pads)[:, None]
    # The encoder's inputs are rows of the interest table, so the first layer's
    # in-projection is computed once per distinct interest of the batch and gathered (exact).
    used, ids_in_used = torch.unique(ids, return_inverse=True)      # [U], [B, width]
    used_rows = interest_table.index_select(0, to_device(used, device))   # [U, H]
    qkv = (F.linear(used_rows, layers[0].self_attn.in_proj_weight, layers[0].self_attn.in_proj_bias)
           if len(layers) else None)                                 # [U, 3H]
    memory = _encode_in_buckets(model, used_rows, qkv, ids_in_used, n_valid, active, key_mask)  # [T, H]

    # Regulariser (SPEC 3.2 step 4): pooled = n/Q * (sum of the n valid outputs + the
    # Q - n PAD outputs), from the packed outputs (a row's n valid tokens, then its PADs).
    w = n_valid.float() / q_orig                                     # [B]
    per_row = n_valid + pads
    row = torch.repeat_interleave(torch.arange(b, device=ids.device), per_row)   # [T]
    coef = w[row]
    is_pad = torch.arange(len(row), device=ids.device) - (per_row.cumsum(0) - per_row)[row] >= n_valid[row]
    one_draw = draws and not widened                                 # the other draws: _other_pad_draws
    stands_for = n_pad.clamp(max=1) if one_draw else n_pad          # PAD outputs the computed ones stand for
    coef[is_pad] *= (stands_for.float() / pads.float())[row[is_pad]]
    pooled = memory.new_zeros(b, memory.shape[1]).index_add(
        0, to_device(row, device), memory * to_device(coef, device).unsqueeze(1))
    if one_draw:
        pooled = pooled + to_device(w, device)[:, None] * _other_pad_draws(model, 
            used, used_rows, qkv, ids_in_used[:, :qv], n_valid, n_pad - 1)
    reg = (pooled * pooled).sum() / pooled.shape[1]

    # the decoder's memory: valid slots and the first PAD slot of each row
    keep = active & (slot[None, :] <= n_valid[:, None])
    if not bool(keep.equal(active)):
        memory = memory.index_select(0, to_device((active.reshape(-1).long().cumsum(0) - 1)[keep.reshape(-1)],
                                                  device))
    return (memory, Packer(keep[:, :qv + 1], device), to_device(key_mask[:, :qv + 1], device)), reg


def _independent_pad_draws(model):
    """True when the PAD slots' dropout draws must each be computed (SPEC 3.2 step 4)."""
    if not model.training or model.reg_pad_draws == 'shared':
        return False
    layer = model.trm_model.encoder.layers[0] if len(model.trm_model.encoder.layers) else None
    return layer is not None and max(layer.dropout1.p, layer.dropout2.p, layer.dropout.p,
                                     layer.self_attn.dropout) > 0


def interest_buckets(n_valid):
    """Rows grouped by their number of distinct interests: 1-2, 3-4, 5-8, 9-16, ...

    Rows are independent in the interest encoder, so each group can be padded to its own
    longest row. Yields long [R] row indices of each non-empty group, smallest first."""
    lower, upper, most = 0, 2, int(n_valid.max()) if len(n_valid) else 0
    while lower < most:
        rows = ((n_valid > lower) & (n_valid <= upper)).nonzero().squeeze(1)
        if len(rows):
            yield rows
        lower, upper = upper, upper * 2


def _encode_in_buckets(model, used_rows, qkv, ids_in_used, n_valid, active, key_mask):
    """Encoder outputs [T, H] of the active slots, packed like `Packer(active)`.

    Slot (b, j) holds interest `used_rows[ids_in_used[b, j]]`, whose first-layer in-projection
    is `qkv[ids_in_used[b, j]]`. The groups of `interest_buckets` are encoded one by one,
    each padded to its own longest row: the attention then costs at most 4x the unpadded
    one instead of growing with the longest row of the batch."""
    device = used_rows.device
    position = active.reshape(-1).long().cumsum(0) - 1               # packed index of each slot
    width = active.shape[1]
    outputs, targets = [], []
    for rows in interest_buckets(n_valid):
        q = int(active[rows].sum(1).max())
        sub_active, sub_mask = active[rows, :q], key_mask[rows, :q]
        sub = Packer(sub_active, device)
        idx = to_device(sub.pack(ids_in_used[rows, :q]), device)     # [t] rows of `used`
        # keys and values: a row's valid slots (its first n tokens); its PAD slots are
        # masked keys, so they are queries only
        n_rows = n_valid[rows]
        counts = sub_active.sum(1)
        kv_mask = torch.arange(int(n_rows.max()), device=rows.device)[None, :] >= n_rows[:, None]
        key_index = ((counts.cumsum(0) - counts)[:, None]
                     + torch.arange(kv_mask.shape[1], device=rows.device)[None, :])[~kv_mask]
        outputs.append(encode_memory(model, used_rows.index_select(0, idx), sub, to_device(sub_mask, device),
                                          None if qkv is None else qkv.index_select(0, idx),
                                          keys=(to_device(key_index, device), Packer(~kv_mask, device),
                                                to_device(kv_mask, device))))
        flat = (rows[:, None] * width + torch.arange(q, device=rows.device)[None, :])[sub_active]
        targets.append(position[flat])
    out = torch.cat(outputs)
    return out.new_empty(out.shape).index_copy(0, to_device(torch.cat(targets), device), out)


def encode_memory(model, tokens, packer, key_padding_mask, first_qkv=None, keys=None):
    """Encoder stack (with its final norm) on packed interest tokens [T, H];
    `first_qkv` [T, 3H]: the first layer's in-projection of the tokens, if already known;
    `keys`: see `encoder_layer`."""
    x = tokens
    for i, layer in enumerate(model.trm_model.encoder.layers):
        x = encoder_layer(layer, x, packer, key_padding_mask, model.training, first_qkv if i == 0 else None,
                          keys)
    return model.trm_model.encoder.norm(x)


def _other_pad_draws(model, used, used_rows, qkv, ids_in_used, n_valid, counts):
    """[B, H] per row, the sum of `counts` more PAD slot outputs of a one-layer encoder,
    each with its own dropout draws; rows grouped by their number of keys, like the encoder."""
    device = used_rows.device
    pad = int(torch.searchsorted(used, used.new_zeros(())))          # the PAD interest among `used`
    out = used_rows.new_zeros(len(n_valid), used_rows.shape[1])
    for rows in interest_buckets(n_valid):
        rows = rows[counts[rows] > 0]
        if len(rows):
            n = int(n_valid[rows].max())
            key_mask = torch.arange(n, device=rows.device)[None, :] >= n_valid[rows, None]
            sums = query_only_sums(model.trm_model.encoder.layers[0], model.trm_model.encoder.norm,
                                   used_rows[pad], qkv, to_device(ids_in_used[rows, :n], device),
                                   to_device(key_mask, device), counts[rows], model.training)
            out = out.index_add(0, to_device(rows, device), sums)
    return out


def _decoder_tokens(model, item_seq, item_seq_len, modal_emb, empty_masks):
    """Packed decoder inputs (SPEC 3.2 step 5) and the rows to read out (step 6)."""
    b, l = item_seq.shape
    pad = item_seq == 0                                              # [B, L]
    last = (item_seq_len - 1).clamp(min=0)
    rows = torch.arange(b, device=item_seq.device)
    contextual = model.seq_mm_fusion == 'contextual' and model.modalities
    if not contextual:
        key_mask = pad
        out_pos = last[:, None]                                      # [B, 1]
    else:  # one token per (modality, position), flattened to [B, M*L]
        key_mask = torch.cat([pad | empty_masks[m] for m in model.modalities], dim=1)
        if model.contextual_gather_quirk:   # SPEC 3.2 QUIRK: lands in the text block
            out_pos = last[:, None]
        else:                              # the last item's token of every modality
            out_pos = last[:, None] + l * torch.arange(len(model.modalities), device=last.device)[None]
    active = ~key_mask
    active[rows[:, None].expand_as(out_pos), out_pos] = True
    device = model.position_embedding.weight.device
    packer = Packer(active, device)

    # inputs of the active tokens only: features (+ ID) + position
    flat = packer.host_index                                         # [T] into [B, M*L] or [B, L]
    seq_pos = (flat // active.shape[1]) * l + flat % l               # [T] into [B, L]
    seq_pos_dev = to_device(seq_pos, device)
    # index_select: its backward is a fast index_add (indexing's is a slow accumulate)
    x = model.position_embedding.weight.index_select(0, to_device(seq_pos % l, device))     # [T, H]
    if model.use_id:
        x = x + model.item_embedding.weight.index_select(0, to_device(item_seq.reshape(-1)[seq_pos], device))
    if contextual:
        modality = (flat % active.shape[1]) // l
        for i, m in enumerate(model.modalities):
            table, index = modal_emb[m]
            x = x + table.index_select(0, index.reshape(-1)[seq_pos_dev]) * to_device(modality == i,
                                                                                      device).unsqueeze(1)
    else:
        for m in model.modalities:
            table, index = modal_emb[m]
            x = x + table.index_select(0, index.reshape(-1)[seq_pos_dev])
    tokens = dropout(model.LayerNorm(x), model.dropout.p, model.training)   # [T, H]

    # position of each output token inside the packed tokens
    packed_index = active.reshape(-1).long().cumsum(0) - 1
    query_rows = to_device(packed_index[(rows[:, None] * active.shape[1] + out_pos).reshape(-1)], device)
    query_packer = Packer(torch.ones_like(out_pos, dtype=torch.bool), device)
    return tokens, packer, to_device(key_mask, device), query_rows, query_packer, out_pos.shape[1]


def decode(model, tokens, packer, key_padding_mask, memory, query_rows, query_packer):
    """Decoder stack (with its final norm); returns [Tq, H] at `query_rows` of the packed tokens."""
    layers = model.trm_model.decoder.layers
    x = tokens
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        x = decoder_layer(layer, x, packer, key_padding_mask, memory,
                          query_rows if last else None, query_packer if last else None,
                          model.training)
    return model.trm_model.decoder.norm(x)
