"""Whitened and plain low-rank factorization of one Linear: exactness of factors and errors."""

from __future__ import annotations

import pytest
import torch
from vitrank.core.lowrank import (
    LowRankLinear,
    add_residual_term,
    factorize_linear,
    shrinkage_ridge,
    whitening,
)


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


@pytest.mark.parametrize("d_out", [9, 20])  # wide (out < in) and tall layers
def test_shrinkage_is_a_ridge_and_errors_stay_those_under_c(d_out):
    """Whitening by (1 - α)·C + α·mean(diag C)·I gives the factors of ridge α / (1 - α)
    (to the 1e-6 damping every Cholesky gets); the errors are still the output errors on
    the data (under C), and they rise with α at every rank (α = 0 is the optimum there)
    while α -> 1 tends to plain SVD."""
    X, W, b = _data(d_out=d_out)
    C = X.T @ X / len(X)
    shrunk_errors = []
    for alpha in (0.0, 0.5, 0.9, 0.99):
        ridge = shrinkage_ridge(alpha)
        factors = factorize_linear(W, b, C, ridge=ridge)
        target = (1 - alpha) * C + alpha * C.diagonal().mean() * torch.eye(len(C), dtype=C.dtype)
        shrunk = factorize_linear(W, b, target)
        for rank in range(1, factors.max_rank):
            down, up = factors.down[:rank], factors.up[:, :rank]
            torch.testing.assert_close(
                up @ down, shrunk.up[:, :rank] @ shrunk.down[:rank], rtol=1e-4, atol=1e-5
            )
            measured = _measured(X, W, down, up)
            assert factors.error(rank) == pytest.approx(measured, rel=1e-6, abs=1e-12), rank
        shrunk_errors.append([factors.error(r) for r in range(1, factors.max_rank)])
    for low, high in zip(shrunk_errors, shrunk_errors[1:], strict=False):
        assert all(a <= b * (1 + 1e-9) for a, b in zip(low, high, strict=True))
    plain = factorize_linear(W, b, C, whiten=False)
    rank = factors.max_rank // 2
    assert factors.error(rank) == pytest.approx(plain.error(rank), rel=0.05)
    with pytest.raises(ValueError, match="0 <= shrinkage < 1"):
        shrinkage_ridge(1.0)


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


def _svd_reference(W, C, whiten):
    """The design's factors by a direct SVD of W S: (σ², B, A) with W ≈ A[:, :r] B[:r]."""
    S = whitening(C) if whiten else torch.eye(W.shape[1], dtype=torch.float64)
    U, sigma, Vh = torch.linalg.svd(W @ S, full_matrices=False)
    down = torch.linalg.solve_triangular(S, Vh, upper=False, left=False)  # Vᵀ S⁻¹
    return sigma.square(), sigma.sqrt()[:, None] * down, U * sigma.sqrt()


@pytest.mark.parametrize("shape", [(9, 12), (12, 9), (10, 10)], ids=["wide", "tall", "square"])
@pytest.mark.parametrize("whiten", [True, False])
def test_factors_from_the_smaller_gram_match_the_svd_of_w_s(shape, whiten):
    """Eigenvectors of the smaller Gram replace the SVD: same spectrum, same truncations."""
    d_out, d_in = shape
    X, W, b = _data(d_in=d_in, d_out=d_out, seed=7)
    C = X.T @ X / len(X)
    factors = factorize_linear(W, b, C, whiten=whiten)
    sigma2, down, up = _svd_reference(W, C, whiten)
    torch.testing.assert_close(factors.sigma2, sigma2, rtol=0, atol=1e-12 * float(sigma2[0]))
    for rank in range(1, factors.max_rank + 1):
        torch.testing.assert_close(
            factors.up[:, :rank] @ factors.down[:rank],
            up[:, :rank] @ down[:rank],
            rtol=0,
            atol=1e-10 * float(W.abs().max()),
        )
        measured = _measured(X, W, *factors.at_rank(rank)[:2])
        assert factors.error(rank) == pytest.approx(measured, rel=1e-9, abs=1e-12), rank


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)], ids=["wide", "tall"])
@pytest.mark.parametrize("whiten", [True, False])
def test_rank_deficient_weights_stay_finite_and_exact(shape, whiten):
    X, _, b = _data(d_in=shape[1], d_out=shape[0], seed=2)
    g = torch.Generator().manual_seed(3)
    W = torch.randn(shape[0], 3, generator=g, dtype=torch.float64)
    W = W @ torch.randn(3, shape[1], generator=g, dtype=torch.float64)  # rank 3 of 6
    W[0] = 0.0  # and a dead output
    factors = factorize_linear(W, b, X.T @ X / len(X), whiten=whiten)
    assert all(bool(torch.isfinite(t).all()) for t in (factors.down, factors.up, factors.errors))
    torch.testing.assert_close(factors.up @ factors.down, W, rtol=0, atol=1e-12)
    # Beyond the weight's rank the components carry nothing but the eigensolver's fp64
    # rounding, ~1e-16·σ²max (how much exactly depends on the BLAS and the CPU).
    assert float(factors.sigma2[3:].max()) <= 1e-14 * float(factors.sigma2[0])
    assert factors.error(3) <= 1e-12 * factors.energy


def test_indefinite_covariance_is_refused_for_wide_and_tall_layers():
    C = torch.diag(torch.tensor([10.0, 10.0, -5.0], dtype=torch.float64))
    wide = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match="blocks.0.mlp.fc2: .*positive semi-definite"):
        factorize_linear(wide, None, C, name="blocks.0.mlp.fc2")
    with pytest.raises(ValueError, match="blocks.0.mlp.fc1: Cholesky"):
        factorize_linear(torch.ones(4, 3, dtype=torch.float64), None, C, name="blocks.0.mlp.fc1")


def test_batched_whitening_damps_each_matrix_on_its_own_and_names_the_failing_one():
    X, _, _ = _data(d_in=8)
    regular = X.T @ X / len(X)
    singular = torch.cat([X, X[:, :3]], dim=1)[:, :8]
    singular = singular.T @ singular / len(X)
    batch = torch.stack([regular, singular, 2 * regular])
    S = whitening(batch, "blocks.2.attn.vo")
    for got, C in zip(S, batch, strict=True):
        torch.testing.assert_close(got, whitening(C), rtol=0, atol=0)
    indefinite = torch.diag(torch.tensor([1.0] * 7 + [-5.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="blocks.2.attn.vo head 1: Cholesky"):
        whitening(torch.stack([regular, indefinite]), "blocks.2.attn.vo")
    with pytest.raises(ValueError, match="blocks.2.attn.vo head 0: `mean\\(diag C\\) > 0`"):
        whitening(torch.stack([0 * regular, regular]), "blocks.2.attn.vo")
