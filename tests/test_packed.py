"""The packed layers of packed.py draw the same random numbers as torch's own."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from packed import Packer, _uniform_draws_bernoulli, attention, dropout, head_padded_attention, pad_heads


@pytest.mark.parametrize('p', [0.5, 0.2, 0.1])
@pytest.mark.parametrize('transposed', [False, True])
def test_dropout_equals_torch_dropout_in_value_gradient_and_draws(p, transposed):
    if not _uniform_draws_bernoulli():
        pytest.skip("this torch build's bernoulli_ is not a float64 uniform_: dropout falls back to torch's")
    x0 = torch.randn(300, 70, dtype=torch.float32)
    x0 = x0.t() if transposed else x0                 # a non-contiguous input keeps torch's fill order
    outs = []
    for fn in (F.dropout, dropout):
        x = x0.clone().requires_grad_(True) if not transposed else x0.t().clone().t().requires_grad_(True)
        torch.manual_seed(11)
        y = fn(x, p, True)
        (y * torch.arange(y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), x.grad, torch.rand(3)))   # the generator is left in the same state
        if fn is dropout:
            assert type(y.grad_fn).__name__ == '_DropoutBackward'  # its own masks, not torch's dropout
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert 0 < (outs[0][0] == 0).float().mean() < 1


def test_dropout_is_the_identity_in_eval():
    x = torch.randn(5, 4)
    assert dropout(x, 0.5, False) is x


def _padded_attention(mha, q, k, key_padding_mask, training):
    """nn.MultiheadAttention's arithmetic on padded [B, L, H] inputs, dropout from SDPA."""
    h, nh = mha.embed_dim, mha.num_heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    qp, kp, vp = F.linear(q, w[:h], b[:h]), F.linear(k, w[h:2 * h], b[h:2 * h]), F.linear(k, w[2 * h:], b[2 * h:])
    heads = [t.view(t.shape[0], t.shape[1], nh, h // nh).transpose(1, 2) for t in (qp, kp, vp)]
    ctx = F.scaled_dot_product_attention(*heads, attn_mask=~key_padding_mask[:, None, None, :],
                                         dropout_p=mha.dropout if training else 0.0)
    ctx = ctx.transpose(1, 2).reshape(q.shape[0], q.shape[1], h)
    return F.linear(ctx, mha.out_proj.weight, mha.out_proj.bias)


@pytest.mark.parametrize('training', [False, True])
def test_one_query_attention_equals_padded_attention_with_the_same_dropout(training):
    """One query per row (the last decoder layer) runs on packed keys and values; its
    attention dropout must draw what `scaled_dot_product_attention` draws."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, dropout=0.5, batch_first=True)
    lengths = torch.tensor([3, 1, 6, 4])
    keys = torch.randn(4, 6, 16)
    mask = torch.arange(6)[None, :] >= lengths[:, None]               # [B, Lk] True = padding
    query = torch.randn(4, 1, 16)
    kv_packer, q_packer = Packer(~mask), Packer(torch.ones(4, 1, dtype=torch.bool))
    torch.manual_seed(5)
    packed = attention(mha, q_packer.pack(query), q_packer, kv_packer.pack(keys), kv_packer, mask, training)
    after_packed = torch.rand(2)
    torch.manual_seed(5)
    padded = _padded_attention(mha, query, keys, mask, training)[:, 0]
    assert torch.allclose(packed, padded, atol=1e-6)
    assert torch.equal(after_packed, torch.rand(2))


def test_row_dot_gradients_equal_autograd_of_the_gathered_product():
    from packed import _RowDot
    torch.manual_seed(1)
    q = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    row = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    assert torch.autograd.gradcheck(lambda q, kv: _RowDot.apply(q, kv[:, :8], row, 2), (q, kv))
    ref = (q.index_select(0, row) * kv[:, :8]).view(7, 2, 4).sum(-1)
    assert torch.allclose(_RowDot.apply(q, kv[:, :8], row, 2), ref)


def test_attention_with_head_width_padded_to_80_equals_width_75():
    """Hidden size 300 with 4 heads: width 75, padded to 80 on CUDA for the fused kernels; on the
    CPU the padded computation gives the same outputs and gradients (to rounding)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 4, 9, 75, generator=g, requires_grad=True) for _ in range(3))
    allowed = torch.rand(6, 1, 1, 9, generator=g) > 0.3
    allowed[..., 0] = True
    outs = []
    for width in (75, 80):
        out = head_padded_attention(q, k, v, allowed, 0.0, width)
        grads = torch.autograd.grad((out * torch.arange(75.0)).sum(), (q, k, v))
        outs.append((out, *grads))
    assert outs[1][0].shape == (6, 4, 9, 75)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-5)   # gradients reach ~100: float32 rounding
    assert pad_heads(q) == 75                                           # the CPU keeps its width
