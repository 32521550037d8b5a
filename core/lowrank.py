"""Activation-aware (whitened) and plain low-rank factorization of a Linear.

Conventions: a Linear computes y = x Wᵀ + b with W (out × in); C = E[x xᵀ] is the
second moment of its input over the calibration tokens. With C = S Sᵀ (Cholesky) and
W S = U Σ Vᵀ, the rank-r approximation minimising E‖x(W - Ŵ)ᵀ‖² is
Ŵ_r = U_r Σ_r V_rᵀ S⁻¹, stored as two Linears: B_r = Σ_r^½ V_rᵀ S⁻¹ (r × in, no bias)
and A_r = U_r Σ_r^½ (out × r, the original bias). Factors are computed once at full rank;
every rank is a slice of the leading rows of B and columns of A.

Errors are exact on the calibration data, even though the Cholesky is damped: the
discarded components are orthogonal on the output side (U), so
E‖x(W - Ŵ_r)ᵀ‖² = Σ_{i>r} σ_i² · y_iᵀ C y_i with y_i = S⁻ᵀ v_i, which is Σ_{i>r} σ_i² when
no damping was needed (y_iᵀ C y_i = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

_DAMPING_START = 1e-6
# Shrinkage α of the whitening covariance toward its scaled identity, (1 - α)·C +
# α·mean(diag C)·I. Chosen by benchmarks/calibration.py (README, "Calibration and
# factors"): whitening by C itself fits the calibration activations too closely to be best
# end to end.
DEFAULT_SHRINKAGE = 0.8
_DAMPING_LIMIT = 1.0


def check_finite(name: str, **tensors: Tensor | None) -> None:
    """Raise ValueError naming the layer and the tensor that holds NaN or Inf."""
    for label, value in tensors.items():
        if value is None or value.numel() == 0:
            continue
        # min and max propagate NaN and see ±Inf, in one pass without a boolean copy
        # (covariances of wide layers are 3073² and are checked often).
        low, high = torch.aminmax(value)
        if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(
                f"{name}: `{label}` must be finite, but it holds {bad} NaN/Inf values."
            )


def diagonal_scale(C: Tensor, name: str = "layer", item: str = "head") -> Tensor:
    """mean(diag C) of each matrix of C (..., n, n), refused where it is not positive."""
    scale = C.diagonal(dim1=-2, dim2=-1).mean(-1)
    for index in (~(scale > 0)).flatten().nonzero().flatten().tolist()[:1]:
        where = f"{name} {item} {index}" if C.ndim > 2 else name
        raise ValueError(
            f"{where}: `mean(diag C) > 0` must hold, but got {float(scale.flatten()[index])} "
            "(no signal)."
        )
    return scale


def shrinkage_ridge(shrinkage: float) -> float:
    """The relative shift λ that shrinkage α toward the scaled identity amounts to.

    (1 - α)·C + α·mean(diag C)·I = (1 - α)·(C + λ·mean(diag C)·I) with λ = α / (1 - α), and
    a whitened SVD does not change under a positive scale of C: shrinking the covariance
    is damping its Cholesky by λ. α = 0 whitens by C itself; α -> 1 tends to plain SVD.
    """
    if not 0.0 <= shrinkage < 1.0:
        raise ValueError(f"`0 <= shrinkage < 1` must hold, but got {shrinkage=}.")
    return shrinkage / (1.0 - shrinkage)


def initial_damping(
    C: Tensor, name: str = "layer", item: str = "head", ridge: float = 0.0
) -> Tensor:
    """The shift `whitening` tries first, max(1e-6, ridge)·mean(diag C), per matrix of C.

    A Cholesky of a second-moment matrix (a sum of outer products in fp64) passes at this
    λ for any n below ~10⁵: its negative eigenvalues from rounding are ~n·1e-16·‖C‖, and
    the shift is at least 1e-6·‖C‖/n. Factorizations that never invert S (wide Linears,
    the value/output products) use it without the Cholesky.
    """
    return max(_DAMPING_START, ridge) * diagonal_scale(C, name, item)


def whitening(C: Tensor, name: str = "layer", item: str = "head", ridge: float = 0.0) -> Tensor:
    """Lower-triangular S with S Sᵀ = C + λ·mean(diag C)·I, in fp64; C may be a batch.

    See `damped_whitening`, which also returns the shift λ·mean(diag C).
    """
    return damped_whitening(C, name, item, ridge)[0]


def damped_whitening(
    C: Tensor, name: str = "layer", item: str = "head", ridge: float = 0.0
) -> tuple[Tensor, Tensor]:
    """(S, shift): lower-triangular S with S Sᵀ = C + shift·I, shift = λ·mean(diag C).

    λ starts at max(1e-6, ridge) (`ridge`: the shrinkage the caller asks for, see
    `shrinkage_ridge`) and is raised ×10 until the Cholesky succeeds (a rank-deficient C,
    e.g. duplicate input features or the constant column of a LayerNorm output, needs
    it), for each matrix of a batch on its own. There is no silent fallback: if λ reaches
    1 the layer's name (in a batch, with `item` and the index) is in the error.
    """
    C = C.double()
    check_finite(name, C=C)
    if C.ndim < 2 or C.shape[-1] != C.shape[-2]:
        raise ValueError(f"{name}: C must be square, but got shape {tuple(C.shape)}.")
    # Summation order leaves C asymmetric in the last bits; the Cholesky (and eigvalsh)
    # read the lower triangle only, so that costs nothing.
    flat = C.reshape(-1, *C.shape[-2:])
    scale = diagonal_scale(C, name, item).reshape(-1)

    def where(index: int) -> str:
        return f"{name} {item} {index}" if C.ndim > 2 else name

    S = torch.empty_like(flat)
    shifts = torch.empty_like(scale)
    todo, damping = torch.arange(len(flat)), max(_DAMPING_START, ridge)
    while damping <= max(_DAMPING_LIMIT, ridge):
        added = damping * scale[todo]
        damped = flat[todo]  # a copy, shifted in place
        damped.diagonal(dim1=-2, dim2=-1).add_(added[:, None])
        factor, info = torch.linalg.cholesky_ex(damped)
        done = info == 0
        if len(todo) == len(flat) and bool(done.all()):  # the usual case: the first λ for all
            return factor.reshape(C.shape), added.reshape(C.shape[:-2])
        S[todo[done]] = factor[done]
        shifts[todo[done]] = added[done]
        todo = todo[~done]
        if len(todo) == 0:
            return S.reshape(C.shape), shifts.reshape(C.shape[:-2])
        damping *= 10
    index = int(todo[0])
    raise ValueError(
        f"{where(index)}: Cholesky of the input covariance failed even with damping "
        f"{_DAMPING_LIMIT}·mean(diag C); C is not positive semi-definite (min eigenvalue "
        f"{float(torch.linalg.eigvalsh(flat[index]).min()):.3g})."
    )


def whitened_directions(S: Tensor, V: Tensor) -> Tensor:
    """S⁻ᵀ V by a triangular solve (S lower triangular; batch dimensions broadcast)."""
    if S.ndim == 2 and V.ndim > 2:
        # One solve with the batch side by side: broadcasting S solves each batch
        # element on its own, many times slower (12 heads of 64 columns for deit_base).
        n, k = V.shape[-2:]
        columns = V.movedim(-2, 0).reshape(n, -1)
        solved = torch.linalg.solve_triangular(S.T, columns, upper=True)
        return solved.reshape(n, *V.shape[:-2], k).movedim(0, -2)
    return torch.linalg.solve_triangular(S.transpose(-1, -2), V, upper=True)


def suffix_sums(energies: Tensor) -> Tensor:
    """errors[r] = Σ_{i >= r} energies[i] for r = 0..k (length k + 1, last is 0)."""
    zero = energies.new_zeros(energies.shape[:-1] + (1,))
    flipped = torch.flip(energies, dims=(-1,)).cumsum(-1)
    return torch.cat([torch.flip(flipped, dims=(-1,)), zero], dim=-1)


@dataclass(frozen=True)
class LinearFactors:
    """Full-rank factors of one Linear; W ≈ up[:, :r] @ down[:r] for every rank r."""

    down: Tensor  # B, (k × in) fp64
    up: Tensor  # A, (out × k) fp64
    bias: Tensor | None  # (out,), the original bias, fp64
    sigma2: Tensor  # squared singular values of W S (or W), descending, (k,)
    errors: Tensor  # errors[r]: output error at rank r, r = 0..k; errors[0] = energy

    @property
    def max_rank(self) -> int:
        return self.down.shape[0]

    @property
    def energy(self) -> float:
        return float(self.errors[0])

    def check_rank(self, rank: int, name: str = "layer", low: int = 1) -> None:
        if not low <= rank <= self.max_rank:
            raise ValueError(
                f"{name}: `{low} <= rank <= {self.max_rank}` must hold, but got {rank=}."
            )

    def at_rank(self, rank: int, name: str = "layer") -> tuple[Tensor, Tensor, Tensor | None]:
        """(B_r: r × in, A_r: out × r, bias) — slices, no copy of the full factors."""
        self.check_rank(rank, name)
        return self.down[:rank], self.up[:, :rank], self.bias

    def error(self, rank: int, name: str = "layer") -> float:
        self.check_rank(rank, name, low=0)
        return float(self.errors[rank])


def factorize_linear(
    W: Tensor,
    bias: Tensor | None = None,
    C: Tensor | None = None,
    *,
    whiten: bool = True,
    name: str = "linear",
    ridge: float = 0.0,
) -> LinearFactors:
    """Full-rank factors of a Linear (W: out × in), whitened by C = E[x xᵀ] when given.

    `ridge` λ whitens by C + λ·mean(diag C)·I instead (shrinkage, see `shrinkage_ridge`);
    errors are still those under C itself.
    `C=None`: plain SVD, errors are ‖W - Ŵ_r‖_F² (weight space).
    `C` given, `whiten=False`: plain SVD, errors measured on the data (E‖x(W - Ŵ_r)ᵀ‖²) so
    the baseline is comparable with the whitened factors.
    """
    W = W.detach().double()
    bias = None if bias is None else bias.detach().double()
    check_finite(name, W=W, bias=bias)
    if C is not None:
        C = C.detach().double()
        check_finite(name, C=C)
        if C.shape != (W.shape[1], W.shape[1]):
            raise ValueError(
                f"{name}: C must be ({W.shape[1]}, {W.shape[1]}) for W {tuple(W.shape)}, "
                f"but got {tuple(C.shape)}."
            )
    whitened = C is not None and whiten
    if W.shape[0] < W.shape[1]:
        down, up, sigma2, energies = _wide_factors(W, C, whitened, name, ridge)
    else:
        S, shift = (
            damped_whitening(C, name, ridge=ridge) if C is not None and whiten else (None, None)
        )
        down, up, sigma2, energies = _tall_factors(W, C, S, shift)
    return LinearFactors(down, up, bias, sigma2, suffix_sums(energies))


# The SVD of W S comes from the eigenvectors of its smaller Gram matrix: a symmetric
# eigensolver on min(out, in)² is several times faster than an SVD of W S (which LAPACK
# does slowly for wide matrices), and the other side is recovered by one product, so
# U Σ Vᵀ = W S holds to rounding at full rank whatever the eigenvectors' accuracy. The
# price is absolute, not relative, accuracy in σ²: components below ~1e-16·σ_max² are
# ordered and split arbitrarily, which changes no error by more than that.


def _descending_eigh(G: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors of the symmetric G (lower triangle), largest first."""
    values, vectors = torch.linalg.eigh(G)
    return values.flip(-1), vectors.flip(-1)


def _sorted_by(sigma: Tensor, *columns: Tensor) -> tuple[Tensor, ...]:
    """σ descending and the last axis of each of `columns` in the same order."""
    order = sigma.argsort(descending=True, stable=True)
    if bool((order[1:] > order[:-1]).all()):  # the eigensolver's order, as almost always
        return sigma, *columns
    return sigma[order], *(c[..., order] for c in columns)


def _balance(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(σ^½, σ^-½), the inverse 0 where σ is 0 (a component that carries nothing)."""
    root = sigma.sqrt()
    return root, torch.where(root > 0, root.reciprocal(), torch.zeros_like(root))


def _tall_factors(
    W: Tensor, C: Tensor | None, S: Tensor | None, shift: Tensor | None
) -> tuple[Tensor, ...]:
    """out >= in: V from the (in × in) Gram of M = W S, then U Σ = M V.

    Whitened, the output energy of component i is σ_i² y_iᵀ C y_i, and with S Sᵀ = C +
    shift·I, y_iᵀ C y_i = ‖Sᵀ y_i‖² - shift·‖y_i‖² = 1 - shift·‖y_i‖² (v_i is a unit
    vector): no product with C.
    """
    M = W if S is None else W @ S
    _, V = _descending_eigh(M.T @ M)
    B = M @ V  # U Σ, columns orthogonal
    sigma, B, V = _sorted_by(B.norm(dim=0), B, V)
    root, inverse = _balance(sigma)
    # Y = S⁻ᵀ V: the input-space directions of the components (V itself when plain).
    Y = V if S is None else whitened_directions(S, V)
    down = (Y * root).T.contiguous()
    up = (B * inverse).contiguous()
    sigma2 = sigma.square()
    if C is None:
        energies = sigma2
    elif S is None:
        energies = sigma2 * ((C @ Y) * Y).sum(0)
    else:
        assert shift is not None
        energies = sigma2 * (1 - shift * Y.square().sum(0)).clamp_min(0)
    return down, up, sigma2, energies


def _wide_factors(
    W: Tensor, C: Tensor | None, whitened: bool, name: str, ridge: float = 0.0
) -> tuple[Tensor, ...]:
    """out < in: U from the (out × out) Gram of W S, (W S)(W S)ᵀ = W (C + shift·I) Wᵀ.

    No S is needed: Vᵀ S⁻¹ = Σ⁻¹ Uᵀ W S S⁻¹ = Σ⁻¹ Uᵀ W, so B = Σ^-½ Uᵀ W and U B = W, and
    the output energy of component i is u_iᵀ W C Wᵀ u_i = σ_i² - shift·‖Wᵀ u_i‖². Nor is a
    Cholesky of C (in × in, the largest matrix of the layer): the shift is
    `initial_damping`'s; an indefinite W C Wᵀ is refused instead.
    """
    shift = 0.0
    if whitened:
        assert C is not None
        shift = float(initial_damping(C, name, ridge=ridge))
        gram = torch.add(W @ C, W, alpha=shift) @ W.T
    else:
        gram = W @ W.T
    values, U = _descending_eigh(gram)
    if whitened and float(values[-1]) < -1e-9 * float(values[0]):
        raise ValueError(
            f"{name}: the input covariance must be positive semi-definite, but W C Wᵀ has "
            f"eigenvalue {float(values[-1]):.3g} (largest {float(values[0]):.3g})."
        )
    D = U.T @ W  # Σ Vᵀ S⁻¹ (Σ Vᵀ when plain)
    norms2 = D.square().sum(1)  # ‖Wᵀ u_i‖²
    if whitened:
        # σ_i² >= shift·‖Wᵀ u_i‖² keeps B = Σ^-½ Uᵀ W bounded where rounding leaves σ_i² at 0.
        sigma2 = torch.maximum(values, shift * norms2)
        energies = (values - shift * norms2).clamp_min(0)
    else:
        sigma2 = norms2
        energies = sigma2 if C is None else ((D @ C) * D).sum(1)
    sigma, U, Dt, energies = _sorted_by(sigma2.sqrt(), U, D.T, energies)
    root, inverse = _balance(sigma)
    down = (Dt * inverse).T.contiguous()
    up = (U * root).contiguous()
    return down, up, sigma.square(), energies


def _bare_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` around the given tensors, skipping the initialisation.

    ``nn.Linear.__init__`` runs a Kaiming initialisation that is overwritten at once; a
    search builds thousands of layers, so this skips it (even on the meta device it costs
    a millisecond per layer).
    """
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = weight.shape[1], weight.shape[0]
    layer.weight = nn.Parameter(weight)
    layer.register_parameter("bias", None if bias is None else nn.Parameter(bias))
    return layer


def empty_linear(
    in_features: int,
    out_features: int,
    bias: bool,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Linear:
    """An ``nn.Linear`` of the right shape with uninitialised weights (a state dict fills it)."""
    kw: dict[str, Any] = {"dtype": dtype, "device": device}
    return _bare_linear(
        torch.empty(out_features, in_features, **kw),
        torch.empty(out_features, **kw) if bias else None,
    )


def linear_from(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` (out × in) and ``bias``.

    Copies, because the tensors are often slices of a factor cache or views of the
    teacher's weights, which fine-tuning must not write through to.
    """
    return _bare_linear(
        weight.detach().clone(memory_format=torch.contiguous_format),
        None if bias is None else bias.detach().clone(memory_format=torch.contiguous_format),
    )


class LowRankLinear(nn.Module):
    """y = up(down(x)): a rank-r Linear, `down` (r × in, no bias), `up` (out × r, bias).

    The weights start uninitialised: `from_factors` or a state dict fills them, and a
    random initialisation would cost more than building the rest of a block.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"`1 <= rank <= min(in, out) = {min(in_features, out_features)}` must hold, "
                f"but got {rank=}."
            )
        self.in_features = in_features
        self.out_features = out_features
        self.down = empty_linear(in_features, rank, False, dtype=dtype, device=device)
        self.up = empty_linear(rank, out_features, bias, dtype=dtype, device=device)

    @property
    def rank(self) -> int:
        return self.down.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> Tensor:
        """Ŵ = A B (out × in), for checks and error measurements."""
        return self.up.weight @ self.down.weight

    @classmethod
    def from_factors(
        cls,
        down: Tensor,
        up: Tensor,
        bias: Tensor | None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> LowRankLinear:
        """Module holding B (`down`, r × in) and A (`up`, out × r) and the bias, copied."""
        rank, in_features = down.shape
        if up.shape[1] != rank:
            raise ValueError(
                f"`up.shape[1] == down.shape[0]` must hold, but got {up.shape[1]} != {rank}."
            )
        dtype = dtype or torch.get_default_dtype()
        module = cls(
            in_features, up.shape[0], rank, bias=bias is not None, device=device, dtype=dtype
        )
        with torch.no_grad():
            module.down.weight.copy_(down)
            module.up.weight.copy_(up)
            if bias is not None:
                module.up.bias.copy_(bias)
        return module

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def add_residual_term(
    layer: LowRankLinear, W: Tensor, C: Tensor | None, rank: int, name: str = "linear"
) -> LowRankLinear:
    """Two-term Ŵ = W_a + W_b (Azizi et al. 2024): W_b of rank `rank` fitted to W - W_a.

    W_b is the whitened rank-`rank` factorization of the residual, i.e. the term that
    minimises E‖x(W - W_a - W_b)ᵀ‖² given W_a; the two terms are stacked into one
    LowRankLinear of rank `layer.rank + rank`. For a closed-form W_a this equals the
    closed-form factors at the summed rank; it matters once W_a has been moved by
    compensation (or chosen otherwise).
    """
    residual = W.detach().double() - layer.dense_weight().detach().double()
    factors = factorize_linear(residual, None, C, name=f"{name} residual")
    down_b, up_b, _ = factors.at_rank(rank, name)
    weight = layer.down.weight
    return LowRankLinear.from_factors(
        torch.cat([layer.down.weight.detach().double(), down_b]),
        torch.cat([layer.up.weight.detach().double(), up_b], dim=1),
        None if layer.up.bias is None else layer.up.bias.detach(),
        dtype=weight.dtype,
        device=weight.device,
    )
