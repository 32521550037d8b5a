"""Head-level (COMCAT) factorization: exact products with biases, exact closed-form errors."""

from __future__ import annotations

import pytest
import torch
from vitrank.core.heads import factorize_qk, factorize_vo, key_maps_of

H, DH, D = 3, 4, 10


def _setup(seed: int = 0, bias: bool = True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    mix = r(D, D)
    x = r(6, 20, D) @ mix + 0.3  # 6 images of 20 tokens, correlated and not centred
    W_qkv, b_qkv = r(3 * H * DH, D), (r(3 * H * DH) if bias else None)
    W_o, b_o = r(D, H * DH), (r(D) if bias else None)
    return x, W_qkv, b_qkv, W_o, b_o


def _split(W_qkv, b_qkv):
    n = H * DH
    parts = [W_qkv[i * n : (i + 1) * n] for i in range(3)]
    biases = [None] * 3 if b_qkv is None else [b_qkv[i * n : (i + 1) * n] for i in range(3)]
    return parts, biases


def _bar(x):
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


def _tokens(x):
    """The pooled augmented calibration tokens X (n, D + 1) and C̄ = E[x̄ x̄ᵀ] over them."""
    X = _bar(x).reshape(-1, D + 1)
    return X, X.T @ X / len(X)


def _augmented(W, b):
    """[W, b], a zero column for a missing bias (the rows of M_h's factors)."""
    return torch.cat([W, W.new_zeros(W.shape[0], 1) if b is None else b[:, None]], 1)


def _qk_logits(x, W_q, b_q, W_k, b_k):
    q = x @ W_q.T + (0 if b_q is None else b_q)
    k = x @ W_k.T + (0 if b_k is None else b_k)
    q = q.reshape(*x.shape[:-1], H, DH).transpose(-2, -3)
    k = k.reshape(*x.shape[:-1], H, DH).transpose(-2, -3)
    return q @ k.transpose(-1, -2)  # (..., H, N, N)


def _attention(x, W_qkv, b_qkv):
    (W_q, W_k, _), (b_q, b_k, _) = _split(W_qkv, b_qkv)
    return (_qk_logits(x, W_q, b_q, W_k, b_k) * DH**-0.5).softmax(-1)


@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_qk_reproduces_logits_with_biases(bias):
    x, W_qkv, b_qkv, _, _ = _setup(bias=bias)
    (W_q, W_k, _), (b_q, b_k, _) = _split(W_qkv, b_qkv)
    _, C_bar = _tokens(x)
    for C in (C_bar, None):
        factors = factorize_qk(W_q, b_q, W_k, b_k, H, C)
        P, Q = factors.at_rank(DH)
        assert P.shape == (H, D + 1, DH)
        approx = (_bar(x).unsqueeze(1) @ P) @ (_bar(x).unsqueeze(1) @ Q).transpose(-1, -2)
        torch.testing.assert_close(approx, _qk_logits(x, W_q, b_q, W_k, b_k), rtol=1e-9, atol=1e-9)
        assert factors.error(DH) == 0.0


@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_vo_reproduces_output_with_folded_bias(bias):
    x, W_qkv, b_qkv, W_o, b_o = _setup(bias=bias)
    (_, _, W_v), (_, _, b_v) = _split(W_qkv, b_qkv)
    A = _attention(x, W_qkv, b_qkv)  # (6, H, N, N)
    v = (x @ W_v.T + (0 if b_v is None else b_v)).reshape(6, 20, H, DH).transpose(1, 2)
    reference = (A @ v).transpose(1, 2).reshape(6, 20, H * DH) @ W_o.T + (0 if b_o is None else b_o)
    Ax = A @ x.unsqueeze(1)  # (6, H, N, d)
    C_heads = torch.einsum("bhni,bhnj->hij", Ax, Ax) / (6 * 20)
    for C in (C_heads, None):
        factors, out_bias = factorize_vo(W_v, b_v, W_o, b_o, H, C)
        V, O_t = factors.at_rank(DH)
        out = (Ax @ V @ O_t.transpose(-1, -2)).sum(1) + (0 if out_bias is None else out_bias)
        torch.testing.assert_close(out, reference, rtol=1e-9, atol=1e-9)
        assert (out_bias is None) == (not bias)


def test_qk_closed_form_error_equals_measured_mean_over_token_pairs():
    x, W_qkv, b_qkv, _, _ = _setup(seed=1)
    (W_q, W_k, _), (b_q, b_k, _) = _split(W_qkv, b_qkv)
    X, C_bar = _tokens(x)
    # ridge: shrinkage of the whitening (errors stay those under C̄ itself)
    for whiten, ridge in ((True, 0.0), (False, 0.0), (True, 4.0)):
        factors = factorize_qk(W_q, b_q, W_k, b_k, H, C_bar, whiten=whiten, ridge=ridge)
        q = (X @ torch.cat([W_q, b_q[:, None]], 1).T).reshape(-1, H, DH).transpose(0, 1)
        k = (X @ torch.cat([W_k, b_k[:, None]], 1).T).reshape(-1, H, DH).transpose(0, 1)
        logits = q @ k.transpose(-1, -2)  # (H, n, n): every pair of calibration tokens
        for rank in range(DH + 1):
            P, Q = factors.left[..., :rank], factors.right[..., :rank]
            approx = (X @ P) @ (X @ Q).transpose(-1, -2)
            measured = float((logits - approx).square().sum() / len(X) ** 2)
            assert factors.error(rank) == pytest.approx(measured, rel=1e-6, abs=1e-12), rank


@pytest.mark.parametrize("bias", [True, False])
def test_key_maps_read_the_teacher_keys_back(bias):
    x, W_qkv, b_qkv, _, _ = _setup(seed=3, bias=bias)
    (W_q, W_k, _), (b_q, b_k, _) = _split(W_qkv, b_qkv)
    X, C_bar = _tokens(x)
    k_bar = _augmented(W_k, b_k)
    keys = (X @ k_bar.T).reshape(-1, H, DH).transpose(0, 1)  # (H, n, d_h): the teacher's
    for C, whiten in ((C_bar, True), (C_bar, False), (None, True)):
        factors = factorize_qk(W_q, b_q, W_k, b_k, H, C, whiten=whiten)
        assert factors.keys is not None and factors.keys.shape == (H, DH, DH)
        torch.testing.assert_close(
            key_maps_of(factors.right, W_k, b_k, H), factors.keys, rtol=1e-7, atol=1e-9
        )
        errors = []
        for rank in range(1, DH + 1):
            k_factored = X @ factors.right[..., :rank]  # (H, n, r)
            fitted = k_factored @ factors.keys[:, :rank]
            errors.append(float((fitted - keys).square().sum()))
            if C is not None and whiten:
                # The least-squares fit of the teacher's keys on the calibration tokens.
                best = torch.linalg.lstsq(k_factored, keys).solution
                optimum = float((k_factored @ best - keys).square().sum())
                assert errors[-1] == pytest.approx(optimum, rel=1e-5, abs=1e-9)
        assert errors[-1] <= 1e-18 * float(keys.square().sum())  # exact at full rank
        assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors


def test_vo_closed_form_error_equals_measured_per_head_output_error():
    x, W_qkv, b_qkv, W_o, b_o = _setup(seed=2)
    (_, _, W_v), (_, _, b_v) = _split(W_qkv, b_qkv)
    Ax = (_attention(x, W_qkv, b_qkv) @ x.unsqueeze(1)).transpose(0, 1).reshape(H, -1, D)
    C_heads = Ax.transpose(-1, -2) @ Ax / Ax.shape[1]
    N = W_v.reshape(H, DH, D).transpose(-1, -2) @ W_o.T.reshape(H, DH, D)  # (H, d, d)
    errors = {}
    # ridge: shrinkage of the whitening (errors stay those under C_h itself)
    for whiten, ridge in ((True, 0.0), (False, 0.0), (True, 4.0)):
        factors, _ = factorize_vo(W_v, b_v, W_o, b_o, H, C_heads, whiten=whiten, ridge=ridge)
        for rank in range(DH + 1):
            V, O_t = factors.left[..., :rank], factors.right[..., :rank]
            diff = Ax @ (N - V @ O_t.transpose(-1, -2))
            measured = float(diff.square().sum() / Ax.shape[1])
            assert factors.error(rank) == pytest.approx(measured, rel=1e-6, abs=1e-12), rank
            errors[whiten, ridge, rank] = measured
    for rank in range(1, DH):
        assert errors[True, 0.0, rank] <= errors[True, 4.0, rank] * (1 + 1e-9)
        assert errors[True, 0.0, rank] <= errors[False, 0.0, rank] * (1 + 1e-9)


def test_whitened_qk_never_worse_than_plain():
    x, W_qkv, b_qkv, _, _ = _setup(seed=4)
    (W_q, W_k, _), (b_q, b_k, _) = _split(W_qkv, b_qkv)
    X, C_bar = _tokens(x)
    whitened = factorize_qk(W_q, b_q, W_k, b_k, H, C_bar)
    plain = factorize_qk(W_q, b_q, W_k, b_k, H, C_bar, whiten=False)
    for rank in range(1, DH):
        assert whitened.error(rank) <= plain.error(rank) * (1 + 1e-9)


def test_non_finite_weights_are_reported():
    x, W_qkv, b_qkv, W_o, b_o = _setup()
    (W_q, W_k, W_v), (b_q, b_k, b_v) = _split(W_qkv, b_qkv)
    W_o = W_o.clone()
    W_o[0, 0] = float("inf")
    with pytest.raises(ValueError, match="blocks.2.attn.vo: `W_o` must be finite"):
        factorize_vo(W_v, b_v, W_o, b_o, H, None, name="blocks.2.attn.vo")
    C = torch.eye(D + 1, dtype=torch.float64)
    C[1, 1] = float("nan")
    with pytest.raises(ValueError, match="`C` must be finite"):
        factorize_qk(W_q, b_q, W_k, b_k, H, C)


@pytest.mark.parametrize("singular", [False, True])
def test_whitened_vo_matches_the_svd_of_each_whitened_head_product(singular):
    """No Cholesky per head: the same spectrum and truncations as SVD(S_hᵀ N_h) with
    S_h S_hᵀ = C_h + 1e-6·mean(diag C_h)·I, also where C_h is singular."""
    from vitrank.core.lowrank import whitening

    x, W_qkv, b_qkv, W_o, b_o = _setup(seed=5)
    (_, _, W_v), (_, _, b_v) = _split(W_qkv, b_qkv)
    Ax = (_attention(x, W_qkv, b_qkv) @ x.unsqueeze(1)).transpose(0, 1).reshape(H, -1, D)
    if singular:  # two input features that always agree
        Ax = torch.cat([Ax[..., :-2], Ax[..., :1], Ax[..., -1:]], dim=-1)
    C_heads = Ax.transpose(-1, -2) @ Ax / Ax.shape[1]
    factors, _ = factorize_vo(W_v, b_v, W_o, b_o, H, C_heads)
    N = W_v.reshape(H, DH, D).transpose(-1, -2) @ W_o.T.reshape(H, DH, D)
    S = whitening(C_heads)
    U, sigma, Vh = torch.linalg.svd(S.transpose(-1, -2) @ N)
    left = torch.linalg.solve_triangular(S.transpose(-1, -2), U[..., :DH], upper=True)
    scale = float(sigma[:, 0].max())
    torch.testing.assert_close(
        factors.sigma2, sigma[:, :DH].square(), rtol=0, atol=1e-12 * scale**2
    )
    for rank in range(1, DH + 1):
        reference = (left[..., :rank] * sigma[:, None, :rank]) @ Vh[:, :rank]
        got = factors.left[..., :rank] @ factors.right[..., :rank].transpose(-1, -2)
        torch.testing.assert_close(got, reference, rtol=0, atol=1e-10 * float(N.abs().max()))


def test_an_indefinite_head_covariance_is_refused_with_the_head():
    _, W_qkv, b_qkv, W_o, b_o = _setup()
    (_, _, W_v), (_, _, b_v) = _split(W_qkv, b_qkv)
    C_heads = torch.eye(D, dtype=torch.float64).repeat(H, 1, 1)
    C_heads[2] = -C_heads[2]
    C_heads[2, 0, 0] = 20.0  # mean(diag) > 0, yet indefinite
    with pytest.raises(ValueError, match="blocks.1.attn.vo head 2: .*positive semi-definite"):
        factorize_vo(W_v, b_v, W_o, b_o, H, C_heads, name="blocks.1.attn.vo")


@pytest.mark.parametrize("bias", [True, False])
def test_whitened_qk_matches_the_svd_of_each_whitened_head_product(bias):
    from vitrank.core.lowrank import whitening

    x, W_qkv, b_qkv, _, _ = _setup(seed=6, bias=bias)
    (W_q, W_k, _), (b_q, b_k, _) = _split(W_qkv, b_qkv)
    X, C_bar = _tokens(x)
    factors = factorize_qk(W_q, b_q, W_k, b_k, H, C_bar)
    q_bar, k_bar = _augmented(W_q, b_q), _augmented(W_k, b_k)
    M = q_bar.reshape(H, DH, D + 1).transpose(-1, -2) @ k_bar.reshape(H, DH, D + 1)
    S = whitening(C_bar)
    U, sigma, Vh = torch.linalg.svd(S.T @ M @ S)
    P = torch.linalg.solve_triangular(S.T, U[..., :DH], upper=True)
    Q = torch.linalg.solve_triangular(S.T, Vh[:, :DH].transpose(-1, -2), upper=True)
    scale = float(sigma[:, 0].max())
    torch.testing.assert_close(
        factors.sigma2, sigma[:, :DH].square(), rtol=0, atol=1e-12 * scale**2
    )
    for rank in range(1, DH + 1):
        reference = (P[..., :rank] * sigma[:, None, :rank]) @ Q[..., :rank].transpose(-1, -2)
        got = factors.left[..., :rank] @ factors.right[..., :rank].transpose(-1, -2)
        torch.testing.assert_close(got, reference, rtol=0, atol=1e-10 * float(M.abs().max()))
