"""The factor cache: every operator of a model factorized once at full rank.

A search evaluates thousands of configurations; each needs factors at some rank. Every
SVD and Cholesky runs here, at construction; afterwards `linear`, `qk`, `key_maps`, `vo`,
`error` and `spectrum` are slices and sums of stored tensors.

Layer keys: "blocks.{i}.attn.qkv", "blocks.{i}.attn.proj", "blocks.{i}.mlp.fc1",
"blocks.{i}.mlp.fc2" (Linears) and "blocks.{i}.attn.qk", "blocks.{i}.attn.vo" (per-head
products, see `heads`). Errors are per-token output errors on the calibration data (see
`lowrank` and `heads` for what exactly); without statistics they are weight-space errors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from vitrank.core.files import load_tensors, save_tensors
from vitrank.core.heads import HeadFactors, factorize_qk, factorize_vo, key_maps_of
from vitrank.core.lowrank import (
    DEFAULT_SHRINKAGE,
    LinearFactors,
    factorize_linear,
    shrinkage_ridge,
)
from vitrank.core.progress import progress as progress_bar
from vitrank.core.stats import LINEAR_KEYS, CalibrationStats

_FORMAT = "vitrank.factors/1"


def weights_digest(model: nn.Module) -> str:
    """sha256 of the model's parameter and buffer names, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # hashed in place
    return digest.hexdigest()


def _blocks(model: nn.Module) -> nn.Sequential:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise ValueError(f"{type(model).__name__} has no `blocks` sequence to factorize.")
    return blocks


def _key_maps_from_teacher(attn: Any, Q: Tensor) -> Tensor:
    D = attn.num_heads * attn.head_dim
    b = attn.qkv.bias
    b_k = None if b is None else b[D : 2 * D]
    return key_maps_of(Q, attn.qkv.weight[D : 2 * D], b_k, attn.num_heads)


def _split_key(key: str) -> tuple[int, str]:
    parts = key.split(".")
    if len(parts) != 4 or parts[0] != "blocks" or not parts[1].isdigit():
        raise KeyError(f"Layer key must look like 'blocks.<i>.attn.qkv', but got {key!r}.")
    return int(parts[1]), ".".join(parts[2:])


Job = tuple[str, Callable[[], Any], float]  # (layer key, work, its rough cost)


def _run(jobs: list[Job], parallel: bool) -> Iterator[Any]:
    """Every job's result, in order, as it is ready; on the CPU the jobs share the threads.

    The factorizations of the layers are independent, and the symmetric eigensolvers at
    their heart barely use a second thread (two threads run a 768² fp64 `eigh` only ~10 %
    faster than one), so on the CPU each of `torch.get_num_threads()` workers runs whole
    layers with one thread, the costliest first so that none is left alone at the end.
    The first error (in job order) is raised once every started job is done; jobs not
    yet started are dropped.
    """
    workers = min(torch.get_num_threads(), len(jobs)) if parallel else 1
    if workers <= 1:
        yield from (job() for _, job, _ in jobs)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="vitrank-factorize")
    try:
        order = sorted(range(len(jobs)), key=lambda index: -jobs[index][2])
        futures = {index: pool.submit(_single_threaded, jobs[index][1]) for index in order}
        for index in range(len(jobs)):
            yield futures[index].result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


def _single_threaded(job: Callable[[], Any]) -> Any:
    torch.set_num_threads(1)  # the intra-op setting of this worker thread
    with torch.no_grad():
        return job()


class FactorCache:
    """Full-rank factors of every block's Linears and head products; ranks are slices.

    `stats=None` or `whitening=False` gives plain SVD factors (baselines); with stats and
    `whitening=False` the errors are still measured on the calibration data.
    `shrinkage` α whitens by (1 - α)·C + α·mean(diag C)·I rather than by C (see
    `lowrank.shrinkage_ridge`); errors stay those on the calibration data.
    Returned tensors have `dtype` (default: the model's parameter dtype).
    """

    def __init__(
        self,
        model: nn.Module,
        stats: CalibrationStats | None,
        whitening: bool = True,
        dtype: torch.dtype | None = None,
        *,
        shrinkage: float = DEFAULT_SHRINKAGE,
        progress: bool = False,
    ) -> None:
        blocks = _blocks(model)
        self.ridge = shrinkage_ridge(shrinkage)
        self.shrinkage = float(shrinkage)
        if stats is not None:
            stats.check_finite()
        self.whitening = bool(whitening and stats is not None)
        self.calibrated = stats is not None
        self.dtype = dtype or next(model.parameters()).dtype
        self._cast_cache: dict[str, tuple[Tensor | None, ...]] = {}
        self.num_blocks = len(blocks)
        self._linear: dict[str, LinearFactors] = {}
        self._heads: dict[str, HeadFactors] = {}
        self._vo_bias: dict[int, Tensor | None] = {}
        self.qk_norm_blocks: set[int] = set()
        # The digest (hashing every weight) runs beside the factorizations.
        jobs: list[Job] = [("digest", lambda: weights_digest(model), 1e9)]
        for i, block in enumerate(blocks):
            jobs += self._block_jobs(i, block, stats)
        kind = "whitened" if self.whitening else "plain"
        with (
            torch.no_grad(),
            progress_bar(f"factorizing ({kind})", len(jobs) - 1, progress) as advance,
        ):
            on_cpu = next(model.parameters()).device.type == "cpu"
            results = _run(jobs, parallel=on_cpu)
            self.digest = next(results)
            for (key, _, _), result in zip(jobs[1:], results, strict=True):
                self._store(key, result)
                advance()

    def _block_jobs(self, i: int, block: Any, stats: CalibrationStats | None) -> list[Job]:
        """(layer key, factorization, cost) of each Linear and head product of block `i`.

        The cost is the multiply-adds of the largest products, roughly.
        """
        attn, mlp = block.attn, block.mlp
        layers = {
            "attn.qkv": attn.qkv,
            "attn.proj": attn.proj,
            "mlp.fc1": mlp.fc1,
            "mlp.fc2": mlp.fc2,
        }
        whiten, ridge = self.whitening, self.ridge
        jobs: list[Job] = []
        for name in LINEAR_KEYS:
            key, layer = f"blocks.{i}.{name}", layers[name]

            def linear(key: str = key, layer: nn.Linear = layer) -> LinearFactors:
                C = stats.covariance(key) if stats is not None else None
                return factorize_linear(
                    layer.weight, layer.bias, C, whiten=whiten, name=key, ridge=ridge
                )

            out, inner = layer.weight.shape
            jobs.append((key, linear, out * inner * (inner if whiten else min(out, inner))))
        D, H = attn.num_heads * attn.head_dim, attn.num_heads
        W, b = attn.qkv.weight, attn.qkv.bias
        bq, bk, bv = (None, None, None) if b is None else (b[:D], b[D : 2 * D], b[2 * D :])
        if isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity):
            key = f"blocks.{i}.attn.qk"

            def qk() -> HeadFactors:
                C_bar = (
                    stats.augmented_covariance(f"blocks.{i}.attn.qkv")
                    if stats is not None
                    else None
                )
                return factorize_qk(
                    W[:D], bq, W[D : 2 * D], bk, H, C_bar, whiten=whiten, name=key, ridge=ridge
                )

            jobs.append((key, qk, 2.0 * D * W.shape[1] ** 2))
        else:
            self.qk_norm_blocks.add(i)

        def vo() -> tuple[HeadFactors, Tensor | None]:
            C_heads = stats.head_covariance(i) if stats is not None else None
            return factorize_vo(
                W[2 * D :], bv, attn.proj.weight, attn.proj.bias, H, C_heads,
                whiten=whiten, name=f"blocks.{i}.attn.vo", ridge=ridge,
            )  # fmt: skip

        jobs.append((f"blocks.{i}.attn.vo", vo, 2.0 * D * W.shape[1] ** 2))
        return jobs

    def _store(self, key: str, result: Any) -> None:
        index, name = _split_key(key)
        if name == "attn.vo":
            self._heads[key], self._vo_bias[index] = result
        elif name == "attn.qk":
            self._heads[key] = result
        else:
            self._linear[key] = result

    # -- lookup ------------------------------------------------------------------------

    def layer_keys(self) -> list[str]:
        return sorted(
            [*self._linear, *self._heads], key=lambda k: (_split_key(k)[0], _split_key(k)[1])
        )

    def _factors(self, key: str) -> LinearFactors | HeadFactors:
        index, name = _split_key(key)
        if key in self._linear:
            return self._linear[key]
        if key in self._heads:
            return self._heads[key]
        if name == "attn.qk" and index in self.qk_norm_blocks:
            raise ValueError(
                f"{key}: block {index} normalises q and k per head (qk_norm), so the logits are "
                "not a bilinear form of x and head-level factorization is not exact there."
            )
        raise KeyError(f"No factors for {key!r}; the model has {self.num_blocks} blocks.")

    def _cast_full(self, key: str, tensors: tuple[Tensor | None, ...]) -> tuple[Any, ...]:
        """The full-rank factors of `key` in the model's dtype, cast once and kept.

        Factors are computed in fp64; casting a slice on every lookup would cost more than
        building the block, and every rank is a slice of these.
        """
        cast = self._cast_cache.get(key)
        if cast is None:
            cast = tuple(None if t is None else t.to(self.dtype) for t in tensors)
            self._cast_cache[key] = cast
        return cast

    def _head_factors(self, key: str) -> HeadFactors:
        factors = self._factors(key)
        assert isinstance(factors, HeadFactors)
        return factors

    def linear(self, key: str, rank: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(B: r × in, A: out × r, bias) with W ≈ A @ B; y = x Bᵀ Aᵀ + bias."""
        factors = self._factors(key)
        if not isinstance(factors, LinearFactors):
            raise KeyError(f"{key!r} is a head product; use `qk` or `vo`.")
        factors.check_rank(rank, key)
        down, up, bias = self._cast_full(key, (factors.down, factors.up, factors.bias))
        return down[:rank], up[:, :rank], bias

    def qk(self, block_index: int, rank: int) -> tuple[Tensor, Tensor]:
        """(P, Q), each (H, d + 1, r): q'_h = x̄ P_h, k'_h = x̄ Q_h, x̄ = [x, 1]."""
        key = f"blocks.{block_index}.attn.qk"
        factors = self._head_factors(key)
        factors.check_rank(rank, key)
        P, Q = self._cast_full(key, (factors.left, factors.right))
        return P[..., :rank], Q[..., :rank]

    def key_maps(self, block_index: int, rank: int) -> Tensor:
        """G (H, r, d_h): the teacher's keys k_h ≈ k'_h G_h from the rank-r keys of `qk`
        (exact at full rank; what token merging compares, see `heads._key_maps`)."""
        key = f"blocks.{block_index}.attn.qk"
        factors = self._head_factors(key)
        factors.check_rank(rank, key)
        assert factors.keys is not None  # set by factorize_qk and by `load`
        (G,) = self._cast_full(f"{key}.keys", (factors.keys,))
        return G[:, :rank]

    def vo(self, block_index: int, rank: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(V: (H, d, r), O: (H, r, d_out), out_bias): out = Σ_h A_h (x V_h) O_h + out_bias."""
        key = f"blocks.{block_index}.attn.vo"
        factors = self._head_factors(key)
        factors.check_rank(rank, key)
        V, O_t, bias = self._cast_full(
            key, (factors.left, factors.right, self._vo_bias[block_index])
        )
        return V[..., :rank], O_t[..., :rank].transpose(-1, -2), bias

    def spectrum(self, key: str) -> Tensor:
        """Squared singular values, descending; (k,) for Linears, (H, k) for head products."""
        return self._factors(key).sigma2.clone()

    def error(self, key: str, rank: int) -> float:
        """Closed-form output error at `rank` (summed over heads for head products)."""
        return self._factors(key).error(rank, key)

    def errors(self, key: str) -> Tensor:
        """errors[r] for r = 0..max_rank (summed over heads), fp64."""
        factors = self._factors(key)
        table = factors.errors
        return table.sum(0) if table.ndim == 2 else table.clone()

    def fractions(self, key: str, dense_at_zero: bool) -> list[float]:
        """f[r] = discarded / total output energy at rank r (r = 0..max_rank); with
        `dense_at_zero`, rank 0 discards nothing (a low-rank Linear at 0 stays dense)."""
        errors = self.errors(key)
        energy = float(errors[0])
        fractions = (errors / energy).tolist() if energy > 0 else [0.0] * len(errors)
        if dense_at_zero:
            fractions[0] = 0.0
        return fractions

    def energy(self, key: str) -> float:
        """Output energy at rank 0 (= error(key, 0))."""
        return self._factors(key).energy

    def max_rank(self, key: str) -> int:
        return self._factors(key).max_rank

    # -- disk --------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """One safetensors file (atomic write)."""
        tensors: dict[str, Tensor] = {}
        for key, f in self._linear.items():
            tensors.update({f"{key}.down": f.down, f"{key}.up": f.up, f"{key}.sigma2": f.sigma2})
            tensors[f"{key}.errors"] = f.errors
            if f.bias is not None:
                tensors[f"{key}.bias"] = f.bias
        for key, h in self._heads.items():
            tensors.update({f"{key}.left": h.left, f"{key}.right": h.right})
            tensors.update({f"{key}.sigma2": h.sigma2, f"{key}.errors": h.errors})
            if h.keys is not None:
                tensors[f"{key}.keys"] = h.keys
        for i, bias in self._vo_bias.items():
            if bias is not None:
                tensors[f"blocks.{i}.attn.vo.bias"] = bias
        header = {
            "format": _FORMAT,
            "digest": self.digest,
            "whitening": self.whitening,
            "shrinkage": self.shrinkage,
            "calibrated": self.calibrated,
            "num_blocks": self.num_blocks,
            "qk_norm_blocks": sorted(self.qk_norm_blocks),
        }
        save_tensors(path, tensors, header)

    @classmethod
    def load(
        cls, path: str | Path, model: nn.Module, dtype: torch.dtype | None = None
    ) -> FactorCache:
        """Read factors saved for exactly this model's weights (checked by digest)."""
        header, tensors = load_tensors(path, "Factor file", _FORMAT)
        digest = weights_digest(model)
        if header["digest"] != digest:
            raise ValueError(
                f"Factor file {path} was made for other weights (digest {header['digest'][:12]}, "
                f"this model {digest[:12]}); rebuild the cache."
            )
        cache = cls.__new__(cls)
        cache.whitening, cache.calibrated = header["whitening"], header["calibrated"]
        cache.shrinkage = float(header.get("shrinkage", 0.0))  # files from before shrinkage
        cache.ridge = shrinkage_ridge(cache.shrinkage)
        cache.dtype = dtype or next(model.parameters()).dtype
        cache._cast_cache = {}
        cache.digest, cache.num_blocks = digest, header["num_blocks"]
        cache.qk_norm_blocks = set(header["qk_norm_blocks"])
        cache._linear, cache._heads, cache._vo_bias = {}, {}, {}
        blocks: Any = _blocks(model)
        for i in range(cache.num_blocks):
            for name in LINEAR_KEYS:
                key = f"blocks.{i}.{name}"
                cache._linear[key] = LinearFactors(
                    tensors[f"{key}.down"], tensors[f"{key}.up"], tensors.get(f"{key}.bias"),
                    tensors[f"{key}.sigma2"], tensors[f"{key}.errors"],
                )  # fmt: skip
            for name in ("attn.qk", "attn.vo"):
                key = f"blocks.{i}.{name}"
                if f"{key}.left" in tensors:
                    keys = tensors.get(f"{key}.keys")
                    if keys is None and name == "attn.qk":  # a file from before key maps
                        keys = _key_maps_from_teacher(blocks[i].attn, tensors[f"{key}.right"])
                    cache._heads[key] = HeadFactors(
                        tensors[f"{key}.left"], tensors[f"{key}.right"],
                        tensors[f"{key}.sigma2"], tensors[f"{key}.errors"], keys,
                    )  # fmt: skip
            cache._vo_bias[i] = tensors.get(f"blocks.{i}.attn.vo.bias")
        return cache
