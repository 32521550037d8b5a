from __future__ import annotations

import pytest
import torch
from timm.layers import LayerNorm
from timm.models.vision_transformer import Attention
from torch import nn
from vitrank.core.attention import (
    DenseAttention,
    HeadFactorizedAttention,
    LowRankAttention,
    attend,
)
from vitrank.core.lowrank import linear_from

DIM, HEADS, TOKENS = 24, 3, 7


def _timm_attention(qkv_bias: bool = True, qk_norm: bool = False) -> Attention:
    torch.manual_seed(0)
    attn = Attention(DIM, HEADS, qkv_bias=qkv_bias, qk_norm=qk_norm, norm_layer=LayerNorm)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.3)
    return attn.eval()


def _explicit(q, k, v, scale, log_size=None):
    logits = q @ k.transpose(-2, -1) * scale
    if log_size is not None:
        logits = logits + log_size[:, None, None, :]
    return logits.softmax(-1) @ v


def _keys(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return attn.k_norm(qkv[1]).mean(1)


def _comcat_full_rank(attn: Attention):
    """Exact full-rank COMCAT factors of a timm Attention (no SVD needed at full rank)."""
    h, dh = attn.num_heads, attn.head_dim
    w = attn.qkv.weight.detach()
    b = attn.qkv.bias.detach() if attn.qkv.bias is not None else torch.zeros(w.shape[0])
    wq, wk, wv = (w[i * h * dh : (i + 1) * h * dh].reshape(h, dh, -1) for i in range(3))
    bq, bk, bv = (b[i * h * dh : (i + 1) * h * dh].reshape(h, 1, dh) for i in range(3))
    P = torch.cat([wq.transpose(1, 2), bq], dim=1)  # (H, d+1, dh)
    Q = torch.cat([wk.transpose(1, 2), bk], dim=1)
    V = wv.transpose(1, 2)  # (H, d, dh)
    wo = attn.proj.weight.detach()  # (d, H*dh)
    out_factor = wo.T.reshape(h, dh, -1)  # (H, dh, d)
    out_bias = attn.proj.bias.detach() + wo @ b[2 * h * dh :]
    G = torch.eye(dh).expand(h, dh, dh)  # Q holds the teacher's keys: the key map is I
    return P, Q, G, V, out_factor, out_bias


def test_attend_matches_explicit_softmax_with_and_without_size_bias():
    torch.manual_seed(1)
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    v = torch.randn(2, 3, 5, 6)  # value width differs from the query-key width
    log_size = torch.rand(2, 5).log1p()
    for bias in (None, log_size):
        out = attend(q, k, v, 0.37, bias)
        assert out.shape == (2, 3, 5, 6)
        torch.testing.assert_close(out, _explicit(q, k, v, 0.37, bias), atol=1e-6, rtol=1e-5)
    # The size bias changes the result (it is not silently ignored).
    assert (attend(q, k, v, 0.37, log_size) - attend(q, k, v, 0.37)).abs().max() > 1e-3


def test_proportional_attention_equals_duplicated_tokens():
    # A key of size 2 must weigh exactly like the same key present twice (ToMe's rationale).
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, 4, 3), torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 5)
    size = torch.tensor([[1.0, 2.0, 1.0]])
    merged = attend(q, k, v, 0.5, size.log())
    dup = attend(q, k[:, :, [0, 1, 1, 2]], v[:, :, [0, 1, 1, 2]], 0.5)
    torch.testing.assert_close(merged, dup, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_dense_attention_reproduces_timm(qkv_bias, qk_norm):
    attn = _timm_attention(qkv_bias, qk_norm)
    x = torch.randn(2, TOKENS, DIM)
    dense = DenseAttention.from_timm(attn).eval()
    out, keys = dense(x)
    torch.testing.assert_close(out, attn(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys, _keys(attn, x), atol=1e-6, rtol=1e-6)
    assert keys.shape == (2, TOKENS, DIM // HEADS)


def test_dense_attention_from_weights_copies_and_checks_shapes():
    attn = _timm_attention()
    x = torch.randn(2, TOKENS, DIM)
    rebuilt = DenseAttention.from_weights(
        attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias, HEADS, 8, attn.scale
    )
    torch.testing.assert_close(rebuilt(x)[0], attn(x), atol=1e-5, rtol=1e-5)
    # Its parameters are copies: training the built module leaves the source untouched.
    assert rebuilt.qkv.weight.data_ptr() != attn.qkv.weight.data_ptr()
    with pytest.raises(ValueError, match="3 \\* num_heads \\* head_dim"):
        DenseAttention.from_weights(
            attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias, 2, 8, attn.scale
        )


def test_low_rank_attention_with_exact_factors_reproduces_timm():
    attn = _timm_attention()
    x = torch.randn(2, TOKENS, DIM)

    class Pair(nn.Module):  # a full-rank two-Linear stand-in with LowRankLinear's semantics
        def __init__(self, layer: nn.Linear):
            super().__init__()
            u, s, vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
            self.b = linear_from((s.sqrt()[:, None] * vh).float(), None)
            self.a = linear_from((u * s.sqrt()).float(), layer.bias)

        def forward(self, t):
            return self.a(self.b(t))

    lowrank = LowRankAttention(
        Pair(attn.qkv), attn.proj, HEADS, DIM // HEADS, attn.scale, attn.q_norm, attn.k_norm
    ).eval()
    out, keys = lowrank(x)
    torch.testing.assert_close(out, attn(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys, _keys(attn, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_head_factorized_attention_at_full_rank_is_exact(qkv_bias):
    attn = _timm_attention(qkv_bias)
    x = torch.randn(2, TOKENS, DIM)
    heads = HeadFactorizedAttention.from_factors(
        *_comcat_full_rank(attn), scale=attn.scale, qk_bias=qkv_bias
    )
    out, keys = heads.eval()(x)
    torch.testing.assert_close(out, attn(x), atol=1e-5, rtol=1e-5)
    # With P, Q holding the teacher's query/key maps, the keys are the teacher's keys.
    torch.testing.assert_close(keys, _keys(attn, x), atol=1e-6, rtol=1e-6)
    assert (heads.qk_rank, heads.vo_rank) == (8, 8)
    # No zero q/k biases for a teacher without qkv bias.
    assert (heads.q.bias is None) == (heads.k.bias is None) == (not qkv_bias)


def test_head_factorized_attention_with_unequal_ranks_and_size_bias():
    torch.manual_seed(3)
    h, d, rqk, rvo = 2, 6, 2, 3
    P, Q, G = torch.randn(h, d + 1, rqk), torch.randn(h, d + 1, rqk), torch.randn(h, rqk, 4)
    V, out_factor, out_bias = torch.randn(h, d, rvo), torch.randn(h, rvo, d), torch.randn(d)
    scale = 0.25  # the teacher's head_dim^-1/2, not rqk^-1/2
    module = HeadFactorizedAttention.from_factors(P, Q, G, V, out_factor, out_bias, scale)
    x, log_size = torch.randn(3, 5, d), torch.rand(3, 5).log1p()
    out, keys = module(x, log_size)
    xbar = torch.cat([x, torch.ones(3, 5, 1)], dim=-1)
    q = torch.einsum("bnd,hdr->bhnr", xbar, P)
    k = torch.einsum("bnd,hdr->bhnr", xbar, Q)
    v = torch.einsum("bnd,hdr->bhnr", x, V)
    heads_out = _explicit(q, k, v, scale, log_size)
    expected = torch.einsum("bhnr,hrd->bnd", heads_out, out_factor) + out_bias
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys, torch.einsum("bhnr,hre->bne", k, G) / h)
    n_params = sum(p.numel() for p in module.parameters())
    assert n_params == 2 * h * rqk * (d + 1) + h * rqk * 4 + 2 * h * rvo * d + d


def test_head_factorized_empty_has_the_shapes_of_built_one():
    torch.manual_seed(4)
    P, Q, G = torch.randn(3, 9, 2), torch.randn(3, 9, 2), torch.randn(3, 2, 5)
    vo = (torch.randn(3, 8, 4), torch.randn(3, 4, 8), torch.randn(8))
    for qk_bias in (True, False):
        built = HeadFactorizedAttention.from_factors(P, Q, G, *vo, 0.5, qk_bias=qk_bias)
        empty = HeadFactorizedAttention.empty(8, 3, 2, 4, 0.5, head_dim=5, qk_bias=qk_bias)
        assert {k: v.shape for k, v in built.state_dict().items()} == {
            k: v.shape for k, v in empty.state_dict().items()
        }
    with pytest.raises(ValueError, match="P.shape == Q.shape"):
        HeadFactorizedAttention.from_factors(P, Q[:, :, :1], G, *vo, 0.5)
    with pytest.raises(ValueError, match="G.shape"):
        HeadFactorizedAttention.from_factors(P, Q, G[:, :1], *vo, 0.5)


def test_modules_train_with_dropout_and_gradients():
    attn = Attention(DIM, HEADS, qkv_bias=True, attn_drop=0.5)
    x = torch.randn(2, TOKENS, DIM)
    dense = DenseAttention.from_timm(attn)
    heads = HeadFactorizedAttention.from_factors(
        *_comcat_full_rank(attn), scale=attn.scale, attn_drop=0.5
    )
    for module in (dense, heads):
        module.train()
        torch.manual_seed(0)
        first = module(x)[0]
        torch.manual_seed(1)
        second = module(x)[0]
        assert not torch.allclose(first, second)  # attention dropout is active in training
        first.square().mean().backward()
        # Every trainable parameter gets a gradient (the fixed key map is not trainable).
        assert all(p.grad is not None for p in module.parameters() if p.requires_grad)
        module.eval()
        torch.testing.assert_close(module(x)[0], module(x)[0])
