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
_DAMPING_LIMIT = 1.0


def check_finite(name: str, **tensors: Tensor | None) -> None:
    """Raise ValueError naming the layer and the tensor that holds NaN or Inf."""
    for label, value in tensors.items():
        if value is not None and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(
                f"{name}: `{label}` must be finite, but it holds {bad} NaN/Inf values."
            )


def whitening(C: Tensor, name: str = "layer") -> Tensor:
    """Lower-triangular S with S Sᵀ = C + λ·mean(diag C)·I, in fp64.

    λ starts at 1e-6 and is raised ×10 until the Cholesky succeeds (a rank-deficient C,
    e.g. duplicate input features or the constant column of a LayerNorm output, needs
    it). There is no silent fallback: if λ reaches 1 the layer's name is in the error.
    """
    C = C.double()
    check_finite(name, C=C)
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"{name}: C must be square, but got shape {tuple(C.shape)}.")
    C = (C + C.T) / 2  # summation order leaves C asymmetric in the last bits
    scale = float(C.diagonal().mean())
    if not scale > 0:
        raise ValueError(f"{name}: `mean(diag C) > 0` must hold, but got {scale} (no signal).")
    eye = torch.eye(C.shape[0], dtype=C.dtype, device=C.device)
    damping = _DAMPING_START
    while damping <= _DAMPING_LIMIT:
        S, info = torch.linalg.cholesky_ex(C + damping * scale * eye)
        if int(info) == 0:
            return S
        damping *= 10
    raise ValueError(
        f"{name}: Cholesky of the input covariance failed even with damping "
        f"{_DAMPING_LIMIT}·mean(diag C); C is not positive semi-definite (min eigenvalue "
        f"{float(torch.linalg.eigvalsh(C).min()):.3g})."
    )


def whitened_directions(S: Tensor, V: Tensor) -> Tensor:
    """S⁻ᵀ V by a triangular solve (S lower triangular; batch dimensions broadcast)."""
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
) -> LinearFactors:
    """Full-rank factors of a Linear (W: out × in), whitened by C = E[x xᵀ] when given.

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
    S = whitening(C, name) if C is not None and whiten else None
    U, sigma, Vh = torch.linalg.svd(W if S is None else W @ S, full_matrices=False)
    root = sigma.sqrt()
    # Y = S⁻ᵀ V: the input-space directions of the components (V itself when plain).
    Y = Vh.T if S is None else whitened_directions(S, Vh.T)
    down = (Y * root).T.contiguous()
    up = (U * root).contiguous()
    sigma2 = sigma.square()
    energies = sigma2 if C is None else sigma2 * torch.einsum("ik,ij,jk->k", Y, C, Y)
    return LinearFactors(down, up, bias, sigma2, suffix_sums(energies))


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
