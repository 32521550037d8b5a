"""Head-level attention factorization (COMCAT, Xiao et al. 2023), made exact with biases.

Per head h (timm's qkv rows: q = [0:D], k = [D:2D], v = [2D:3D], D = H·d_h, head h at
rows h·d_h:(h+1)·d_h of each):

- query/key: q_h k_hᵀ = x̄ M_h x̄'ᵀ with x̄ = [x, 1] and M_h = [W_qʰ, b_qʰ]ᵀ [W_kʰ, b_kʰ],
  so the biases are exact. Whitened on both sides with C̄ = E[x̄ x̄ᵀ] = S̄ S̄ᵀ:
  S̄ᵀ M_h S̄ = U Σ Vᵀ, P_h = S̄⁻ᵀ U Σ^½, Q_h = S̄⁻ᵀ V Σ^½, so q'_h = x̄ P_h, k'_h = x̄ Q_h.
  Without a qkv bias the last rows of P_h and Q_h are zero (so are M_h's last row and
  column). Token merging compares the teacher's keys k_h = x̄ [W_kʰ, b_kʰ]ᵀ, which the
  logits do not determine; G_h = Σ^-½ Vᵀ S̄ᵀ [W_kʰ, b_kʰ]ᵀ reads them back, k_h = k'_h G_h
  at full rank (see `_key_maps`).
- value/output: out = Σ_h A_h (x W_vʰᵀ + b_vʰ) W_oʰᵀ + b_o = Σ_h (A_h x) N_h + out_bias with
  N_h = W_vʰᵀ W_oʰᵀ and out_bias = b_o + W_o b_v (rows of A_h sum to 1). Whitened on the
  input side with C_h = E[(A_h x)ᵀ(A_h x)] = S_h S_hᵀ: S_hᵀ N_h = U Σ Vᵀ,
  V_h = S_h⁻ᵀ U Σ^½, O_h = Σ^½ Vᵀ.

Both products have rank <= d_h, so the SVD runs on a d_h × d_h core (QR of the two thin
factors) rather than on a (d+1)² matrix; each factor's R comes from its d_h × d_h Gram
(under the covariance when whitened), so neither S̄ nor the S_h are ever computed (see
`_thin_root`). Errors are exact on the calibration data:
- qk: E_{x, x'}[(x̄ (M_h - M̂_h) x̄'ᵀ)²] over independent pairs of calibration tokens
  (= tr(Δ C̄ Δᵀ C̄)); the cross terms between components are kept, so this is exact even
  where the damping made S̄ S̄ᵀ = C̄ + shift·I differ from C̄;
- vo: E‖(A_h x)(N_h - N̂_h)‖² per token, per head (cross-head terms are not included).
Without statistics the errors are the weight-space ‖M_h - M̂_h‖_F² (‖N_h - N̂_h‖_F²).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from vitrank.core.lowrank import check_finite, initial_damping, suffix_sums


@dataclass(frozen=True)
class HeadFactors:
    """Full-rank per-head factors; components are the last axis of `left` and `right`.

    qk: left = P (H, d+1, k), right = Q (H, d+1, k).
    vo: left = V (H, d, k), right = Oᵀ (H, d_out, k).
    """

    left: Tensor
    right: Tensor
    sigma2: Tensor  # (H, k) squared singular values, descending per head
    errors: Tensor  # (H, k + 1): errors[h, r] output error of head h at rank r
    # qk only: G (H, k, d_h) with k_h ≈ k'_h G_h[:r], the teacher's keys read back from
    # the factorized ones (what token merging compares; see `_key_maps`).
    keys: Tensor | None = None

    @property
    def max_rank(self) -> int:
        return self.left.shape[-1]

    @property
    def energy(self) -> float:
        return float(self.errors[:, 0].sum())

    def check_rank(self, rank: int, name: str = "heads", low: int = 1) -> None:
        if not low <= rank <= self.max_rank:
            raise ValueError(
                f"{name}: `{low} <= rank <= {self.max_rank}` must hold, but got {rank=}."
            )

    def at_rank(self, rank: int, name: str = "heads") -> tuple[Tensor, Tensor]:
        self.check_rank(rank, name)
        return self.left[..., :rank], self.right[..., :rank]

    def error(self, rank: int, name: str = "heads") -> float:
        """Output error at rank `rank`, summed over heads."""
        self.check_rank(rank, name, low=0)
        return float(self.errors[:, rank].sum())


def _split_heads(W: Tensor, num_heads: int) -> Tensor:
    """(H·d_h, ...) rows -> (H, d_h, ...)."""
    return W.reshape(num_heads, W.shape[0] // num_heads, *W.shape[1:])


def _augment(W: Tensor, b: Tensor | None) -> Tensor:
    """[W, b] (rows × (in + 1)); a missing bias is a zero column."""
    column = W.new_zeros(W.shape[0], 1) if b is None else b.reshape(-1, 1)
    return torch.cat([W, column], dim=1)


def _thin_root(
    F: Tensor, C: Tensor | None = None, name: str = "heads", ridge: float = 0.0
) -> tuple[Tensor, Tensor, Tensor | None]:
    """A QR of the (whitened) thin factor Sᵀ F_h, S Sᵀ = C + shift·I, S = I when C is None.

    F: (H, n, d_h); C: (n, n) shared or (H, n, n) per head. -> (R, B, T), per head
    R (d_h × d_h) with RᵀR = K_h = F_hᵀ (C + shift·I) F_h, B = S⁻ᵀ Q (n × d_h), the input-
    space directions of Q's columns, and T = Bᵀ C B (None without C). With K_h = E Λ Eᵀ,
    R = Λ^½ Eᵀ and Q = Sᵀ F_h E Λ^-½, so B = F_h E Λ^-½ and Q R = Sᵀ F_h. Only d_h × d_h
    eigensolvers run: no Cholesky of C (one per head for the values, the largest cost of
    the head products), and no Householder QR of the tall F_h, which LAPACK parallelises
    so badly that two threads take 30× one. The Gram costs accuracy only in σ_i below
    ~1e-16·σ_max² (as in `lowrank`). The shift is `initial_damping`'s; an indefinite K_h
    is refused instead.
    """
    Ft = F.transpose(-1, -2)
    K0 = Ft @ F if C is None else Ft @ (C @ F)  # F_hᵀ C F_h
    K = K0
    if C is not None:
        shift = initial_damping(C, name, item="head", ridge=ridge)
        K = K0 + shift[..., None, None] * (Ft @ F)
    values, E = torch.linalg.eigh(K)
    low, high = values[:, 0], values[:, -1]
    for head in (low < -1e-9 * high).nonzero().flatten().tolist()[:1]:
        raise ValueError(
            f"{name} head {head}: the input covariance must be positive semi-definite, but "
            f"the head weights' Gram under it has eigenvalue {float(low[head]):.3g} "
            f"(largest {float(high[head]):.3g})."
        )
    values = values.clamp_min(0)
    inverse = torch.where(values > 0, values.rsqrt(), torch.zeros_like(values))
    M = E * inverse.unsqueeze(-2)  # E Λ^-½
    root = values.sqrt().unsqueeze(-1) * E.transpose(-1, -2)
    return root, F @ M, None if C is None else M.transpose(-1, -2) @ K0 @ M


def _core_svd(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(u, σ, v) of left @ rightᵀ per head, d_h × d_h roots of the two thin factors."""
    u, sigma, vh = torch.linalg.svd(left @ right.transpose(-1, -2))
    return u, sigma, vh.transpose(-1, -2)


def _trailing_block_sums(G: Tensor) -> Tensor:
    """T[..., r] = Σ_{i, j >= r} G[..., i, j] for r = 0..k (last entry 0)."""
    flipped = torch.flip(G, dims=(-2, -1)).cumsum(-1).cumsum(-2)
    diag = torch.flip(flipped.diagonal(dim1=-2, dim2=-1), dims=(-1,))
    return torch.cat([diag, diag.new_zeros(diag.shape[:-1] + (1,))], dim=-1)


def _checked_covariance(C: Tensor, size: int, name: str) -> Tensor:
    C = C.detach().double()
    check_finite(name, C=C)
    if C.shape[-2:] != (size, size):
        raise ValueError(f"{name}: covariance must be ({size}, {size}), but got {tuple(C.shape)}.")
    return C


def factorize_qk(
    W_q: Tensor,
    b_q: Tensor | None,
    W_k: Tensor,
    b_k: Tensor | None,
    num_heads: int,
    C_bar: Tensor | None = None,
    *,
    whiten: bool = True,
    name: str = "attn.qk",
    ridge: float = 0.0,
) -> HeadFactors:
    """Per-head factors P, Q of M_h = [W_qʰ, b_qʰ]ᵀ[W_kʰ, b_kʰ]; C_bar = E[x̄ x̄ᵀ] or None.

    The caller must make sure q and k are not normalised per head (qk_norm): then the
    logits are not a bilinear form of x and this factorization does not apply.
    """
    W_q, W_k = W_q.detach().double(), W_k.detach().double()
    b_q = None if b_q is None else b_q.detach().double()
    b_k = None if b_k is None else b_k.detach().double()
    check_finite(name, W_q=W_q, b_q=b_q, W_k=W_k, b_k=b_k)
    dim = W_q.shape[1]
    # (H, d+1, d_h): the transposed augmented head weights [W_qʰ, b_qʰ]ᵀ.
    q_bar = _split_heads(_augment(W_q, b_q), num_heads).transpose(-1, -2)
    k_bar = _split_heads(_augment(W_k, b_k), num_heads).transpose(-1, -2)
    if C_bar is not None:
        C_bar = _checked_covariance(C_bar, dim + 1, name)
    whitened = C_bar if whiten else None
    r_q, basis_q, gram_q = _thin_root(q_bar, whitened, name, ridge)
    r_k, basis_k, gram_k = _thin_root(k_bar, whitened, name, ridge)
    u, sigma, v = _core_svd(r_q, r_k)
    U, V = basis_q @ u, basis_k @ v
    keys = _key_maps(v, sigma, r_k)  # in the coordinates of the QR of S̄ᵀ k̄_h
    grams: tuple[Tensor, Tensor] | None = None  # Uᵀ C̄ U, Vᵀ C̄ V
    if gram_q is not None and gram_k is not None:
        grams = (u.transpose(-1, -2) @ gram_q @ u, v.transpose(-1, -2) @ gram_k @ v)
    elif C_bar is not None:
        grams = (U.transpose(-1, -2) @ C_bar @ U, V.transpose(-1, -2) @ C_bar @ V)
    root = sigma.sqrt().unsqueeze(-2)
    if grams is None:
        errors = suffix_sums(sigma.square())
    else:
        G = sigma.unsqueeze(-1) * sigma.unsqueeze(-2) * grams[0] * grams[1]
        errors = _trailing_block_sums(G)
    return HeadFactors(U * root, V * root, sigma.square(), errors, keys)


def _key_maps(V: Tensor, sigma: Tensor, k_bar: Tensor) -> Tensor:
    """G_h = Σ^-½ Vᵀ k̄_h (H, k, d_h), V and k̄_h in the whitened basis: k_h ≈ k'_h G_h.

    (Or both in the coordinates of an orthonormal basis of it: the core's right singular
    vectors and the R of the QR of S̄ᵀ k̄_h give the same Vᵀ S̄ᵀ k̄_h.)

    The factorized keys k'_h = x̄ Q_h live in head h's SVD basis, and cosine similarity
    is not invariant to that change of basis; nor can the teacher's keys be recovered
    from P_h, Q_h alone, since any (P_h T⁻ᵀ, Q_h T) gives the same logits. G_h holds what
    is missing. V's columns are an orthonormal basis of the column space of S̄ᵀ k̄_h, so
    x̄ Q_h G_h = x̄ S̄⁻ᵀ V Vᵀ S̄ᵀ k̄_h = x̄ k̄_h exactly at full rank. At rank r,
    k'_h G_h[:r] projects the keys on the r kept key directions: the least-squares fit of
    the teacher's keys on the calibration data (the columns of Q are C̄-orthogonal), or
    in weight space without whitening, so the error falls as the rank grows. Components
    of zero singular value carry no key (their column of Q is zero) and get zero rows.
    """
    tiny = torch.finfo(sigma.dtype).eps * sigma.amax(dim=-1, keepdim=True)
    inverse = torch.where(sigma > tiny, sigma.clamp_min(1e-300).rsqrt(), torch.zeros_like(sigma))
    return inverse.unsqueeze(-1) * (V.transpose(-1, -2) @ k_bar)


def key_maps_of(Q: Tensor, W_k: Tensor, b_k: Tensor | None, num_heads: int) -> Tensor:
    """The key maps G (H, k, d_h) of full-rank key factors Q (H, d+1, k) by least squares.

    For factors stored without them (older factor files): at full rank x̄ Q_h G_h = x̄ k̄_h
    has the one solution `_key_maps` gives, whatever whitening made Q.
    """
    kw: dict[str, Any] = {"dtype": torch.float64, "device": Q.device}
    b_k = None if b_k is None else b_k.detach().to(**kw)
    k_bar = _split_heads(_augment(W_k.detach().to(**kw), b_k), num_heads).transpose(-1, -2)
    return torch.linalg.lstsq(Q.to(**kw), k_bar).solution


def factorize_vo(
    W_v: Tensor,
    b_v: Tensor | None,
    W_o: Tensor,
    b_o: Tensor | None,
    num_heads: int,
    C_heads: Tensor | None = None,
    *,
    whiten: bool = True,
    name: str = "attn.vo",
    ridge: float = 0.0,
) -> tuple[HeadFactors, Tensor | None]:
    """Per-head factors of N_h = W_vʰᵀ W_oʰᵀ and the folded bias b_o + W_o b_v.

    C_heads: (H, d, d) E[(A_h x)ᵀ(A_h x)] or None. The bias is None only when neither
    the value nor the output projection has one.
    """
    W_v, W_o = W_v.detach().double(), W_o.detach().double()
    b_v = None if b_v is None else b_v.detach().double()
    b_o = None if b_o is None else b_o.detach().double()
    check_finite(name, W_v=W_v, b_v=b_v, W_o=W_o, b_o=b_o)
    dim = W_v.shape[1]
    v_t = _split_heads(W_v, num_heads).transpose(-1, -2)  # (H, d, d_h) = W_vʰᵀ
    o_h = _split_heads(W_o.T, num_heads).transpose(-1, -2)  # (H, d_out, d_h) = W_oʰ
    if C_heads is not None:
        C_heads = _checked_covariance(C_heads, dim, name)
        if C_heads.shape[0] != num_heads:
            raise ValueError(f"{name}: need {num_heads} head covariances, got {C_heads.shape[0]}.")
    r_v, basis_v, gram_v = _thin_root(v_t, C_heads if whiten else None, name, ridge)
    r_o, basis_o, _ = _thin_root(o_h)
    u, sigma, v = _core_svd(r_v, r_o)
    U, V = basis_v @ u, basis_o @ v
    energies = sigma.square()
    if gram_v is not None:
        energies = energies * ((gram_v @ u) * u).sum(-2)
    elif C_heads is not None:
        energies = energies * torch.einsum("hik,hij,hjk->hk", U, C_heads, U)
    root = sigma.sqrt().unsqueeze(-2)
    out_bias = None
    if b_v is not None or b_o is not None:
        out_bias = torch.zeros(W_o.shape[0], dtype=W_o.dtype, device=W_o.device)
        if b_o is not None:
            out_bias = out_bias + b_o
        if b_v is not None:
            out_bias = out_bias + W_o @ b_v
    return HeadFactors(U * root, V * root, sigma.square(), suffix_sums(energies)), out_bias
