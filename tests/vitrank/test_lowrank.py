"""Whitened and plain low-rank factorization of one Linear: exactness of factors and errors."""

from __future__ import annotations

import pytest
import torch

from vitrank.core.lowrank import LowRankLinear, add_residual_term, factorize_linear, whitening


def _data(n: int = 400, d_in: int = 12, d_out: int = 9, seed: int = 0):
    """Correlated, non-centred inputs (as after a LayerNorm with bias) and a Linear."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64) @ mix + 0.5
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(d_out, generator=g, dtype=torch.float64)
    return X, W, b


def _measured(X, W, down, up) -> float:
    return float((X @ (W - up.detach() @ down.detach()).T).square().sum() / X.shape[0])


def test_full_rank_reproduces_weight_exactly():
    X, W, b = _data()
    C = X.T @ X / len(X)
    for factors in (factorize_linear(W, b, C), factorize_linear(W, b, None)):
        down, up, bias = factors.at_rank(factors.max_rank)
        torch.testing.assert_close(up @ down, W, rtol=1e-10, atol=1e-10)
        assert torch.equal(bias, b)
        assert factors.error(factors.max_rank) == 0.0


def test_closed_form_error_equals_measured_output_error():
    X, W, b = _data()
    C = X.T @ X / len(X)
    for whiten in (True, False):
        factors = factorize_linear(W, b, C, whiten=whiten)
        for rank in range(0, factors.max_rank + 1):
            down, up = factors.down[:rank], factors.up[:, :rank]
            measured = _measured(X, W, down, up)
            assert abs(factors.error(rank) - measured) <= 1e-6 * max(measured, 1e-12), rank
    assert factors.energy == pytest.approx(float((X @ W.T).square().sum() / len(X)), rel=1e-10)


def test_whitened_never_worse_than_plain_on_calibration_data():
    X, W, b = _data(seed=3)
    C = X.T @ X / len(X)
    whitened = factorize_linear(W, b, C)
    plain = factorize_linear(W, b, None)
    for rank in range(1, whitened.max_rank):
        w = _measured(X, W, *whitened.at_rank(rank)[:2])
        p = _measured(X, W, *plain.at_rank(rank)[:2])
        assert w <= p * (1 + 1e-9), rank
    assert _measured(X, W, *whitened.at_rank(3)[:2]) < 0.9 * _measured(X, W, *plain.at_rank(3)[:2])


def test_damping_is_raised_for_singular_covariance_and_errors_stay_exact():
    X, W, b = _data(d_in=8)
    X = torch.cat([X, X[:, :3]], dim=1)  # duplicate columns: C is singular
    W = torch.cat([W, torch.randn(W.shape[0], 3, dtype=torch.float64)], dim=1)
    C = X.T @ X / len(X)
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(C)
    S = whitening(C)
    damped = S @ S.T - C
    assert damped.diagonal().min() > 0  # some λ·mean(diag)·I was added
    assert torch.allclose(damped, torch.diag(damped.diagonal()), atol=1e-9)
    factors = factorize_linear(W, b, C)
    for rank in (1, 4, 8):
        measured = _measured(X, W, *factors.at_rank(rank)[:2])
        assert factors.error(rank) == pytest.approx(measured, rel=1e-6)


def test_whitening_refuses_instead_of_falling_back():
    with pytest.raises(ValueError, match="mean\\(diag C\\) > 0"):
        whitening(torch.zeros(4, 4), name="blocks.0.mlp.fc1")
    indefinite = torch.diag(torch.tensor([10.0, 10.0, -5.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="blocks.3.attn.proj.*Cholesky"):
        whitening(indefinite, name="blocks.3.attn.proj")


@pytest.mark.parametrize("where", ["W", "bias", "C"])
def test_non_finite_input_is_reported_with_the_layer_name(where):
    X, W, b = _data()
    C = X.T @ X / len(X)
    tensors = {"W": W.clone(), "bias": b.clone(), "C": C.clone()}
    tensors[where].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=f"blocks.1.mlp.fc2: `{where}` must be finite"):
        factorize_linear(tensors["W"], tensors["bias"], tensors["C"], name="blocks.1.mlp.fc2")


def test_low_rank_linear_matches_factors_and_rejects_bad_ranks():
    X, W, b = _data()
    factors = factorize_linear(W, b, X.T @ X / len(X))
    down, up, bias = factors.at_rank(4)
    layer = LowRankLinear.from_factors(down, up, bias, dtype=torch.float64)
    assert layer.rank == 4 and layer.down.bias is None
    torch.testing.assert_close(layer(X), X @ (up @ down).T + bias)
    assert sum(p.numel() for p in layer.parameters()) == 4 * (12 + 9) + 9
    with pytest.raises(ValueError, match="rank <= 9"):
        factors.at_rank(10)
    with pytest.raises(ValueError, match="min\\(in, out\\)"):
        LowRankLinear(12, 9, 10)


def test_residual_term_matches_closed_form_and_repairs_a_moved_first_term():
    X, W, b = _data(seed=5)
    C = X.T @ X / len(X)
    factors = factorize_linear(W, b, C)
    first = LowRankLinear.from_factors(*factors.at_rank(3), dtype=torch.float64)
    two = add_residual_term(first, W, C, 2)
    assert two.rank == 5
    measured = _measured(X, W, two.down.weight, two.up.weight)
    assert measured == pytest.approx(factors.error(5), rel=1e-9)
    torch.testing.assert_close(two.up.bias, b)
    with torch.no_grad():  # a first term moved away from the closed form
        first.down.weight.add_(0.3 * torch.randn_like(first.down.weight))
    moved = _measured(X, W, first.down.weight, first.up.weight)
    repaired = add_residual_term(first, W, C, 2)
    assert _measured(X, W, repaired.down.weight, repaired.up.weight) < moved
