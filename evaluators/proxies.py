"""Proxies: how good a candidate compression is, without fine-tuning it.

Two proxies, looked up by name (`create_proxy("spectral", inputs)`):

- ``spectral``: Σ_l w_l · f_l, where f_l is the fraction of layer l's output energy a
  candidate throws away, read from the factor cache's closed-form errors (low rank and
  head-level ranks), from the calibration importance of pruned units, or from the share of
  tokens merged. No forward pass: a score is a few list look-ups per block.
- ``logits``: the candidate is built from the cached factors (slices, no SVD) and run on a
  fixed held-out batch; KL(teacher ‖ candidate), top-1 agreement with the teacher and
  accuracy. The teacher's logits and its activations entering every block are computed
  once, so a candidate runs only from its first compressed block on.

The spectral proxy's weights w_l come from `measure_sensitivity`: the logit KL when only
term l is compressed at a reference level, divided by that level's fraction f_l, so that
Σ_l w_l · f_l is a first-order estimate of the candidate's KL.

Term keys (the keys of a sensitivity dict), per block i: the factor cache's layer keys
"blocks.{i}.attn.qkv", ".attn.proj", ".attn.qk", ".attn.vo", ".mlp.fc1", ".mlp.fc2", plus
"blocks.{i}.attn.heads" (head pruning), "blocks.{i}.mlp.hidden" (hidden-unit pruning) and
"blocks.{i}.merge" (token merging).
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vitrank.core.operators import OPERATORS, TermContext, of
from vitrank.core.registry import Registry
from vitrank.core.spec import MERGE_FAMILY, BlockSpec, merge_count
from vitrank.core.structure import BlockShape, Fingerprint, inspect_vit
from vitrank.evaluators._data import gather, progress_bar

if TYPE_CHECKING:
    from vitrank.core.factorize import FactorCache
    from vitrank.core.stats import CalibrationStats
    from vitrank.spaces import CompressionConfig


@dataclass
class ProxyInputs:
    """Everything a proxy may need; each proxy takes what it uses."""

    teacher: nn.Module
    factors: FactorCache
    stats: CalibrationStats | None = None
    heldout_images: Tensor | None = None  # a fixed batch the calibration did not see
    heldout_labels: Tensor | None = None
    sensitivity: dict[str, float] | None = None  # spectral weights per term key


class Proxy(abc.ABC):
    """A cheap estimate of a candidate's quality; `metric` names the value to minimise."""

    name: ClassVar[str]
    metric: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def from_inputs(cls, inputs: ProxyInputs) -> Proxy:
        """Build the proxy from the shared inputs (what `create_proxy` calls)."""

    @abc.abstractmethod
    def evaluate(self, config: CompressionConfig) -> dict[str, float]:
        """Scores of one candidate; holds at least `metric`."""

    def score(self, config: CompressionConfig) -> float:
        return self.evaluate(config)[self.metric]


PROXIES: Registry[type[Proxy]] = Registry("proxy")


_ProxyClass = TypeVar("_ProxyClass", bound=type[Proxy])


def register_proxy(cls: _ProxyClass) -> _ProxyClass:
    """Class decorator: make the proxy available by its `name`."""
    PROXIES.add(cls.name, cls)
    return cls


def proxy_names() -> tuple[str, ...]:
    return PROXIES.names()


def get_proxy(name: str) -> type[Proxy]:
    return PROXIES.get(name)


def create_proxy(name: str, inputs: ProxyInputs) -> Proxy:
    """The proxy registered as `name`, built from `inputs`."""
    return get_proxy(name).from_inputs(inputs)


def _check_factor_kind(config: CompressionConfig, factors: FactorCache) -> None:
    kind = "whitened" if factors.whitening else "plain"
    if config.svd != kind:
        raise ValueError(
            f"The config asks for svd={config.svd!r} factors, but the factor cache holds "
            f"{kind!r} ones; build the cache with whitening={config.svd == 'whitened'}."
        )


# -- spectral ---------------------------------------------------------------------------


# Per block, the weighted table of every term the operators declare ("attn.qkv" -> the
# weighted fractions indexed by knob value, or why it cannot be scored) and the weight of
# token merging.
_BlockTables = tuple[dict[str, list[float] | str], float]


@register_proxy
class SpectralProxy(Proxy):
    """Σ_l w_l · (discarded energy_l / total energy_l); no forward pass.

    Per block: low-rank Linears and head-level products use the factor cache's
    closed-form errors at the chosen rank; pruning uses the share of the squared
    calibration importance (`prune.mlp_unit_scores` / `prune.head_scores`) that is removed,
    which needs `teacher` and `stats`; token merging uses the share of the block's
    mergeable tokens merged away. `sensitivity` maps term keys to w_l (missing keys and
    `sensitivity=None` weigh 1). Every table is precomputed, so `evaluate` is a few list
    look-ups per block.
    """

    name = "spectral"
    metric = "spectral"

    def __init__(
        self,
        factors: FactorCache,
        sensitivity: dict[str, float] | None = None,
        *,
        teacher: nn.Module | None = None,
        stats: CalibrationStats | None = None,
    ) -> None:
        self.factors = factors
        self.sensitivity = dict(sensitivity or {})
        shapes = inspect_vit(teacher).blocks if teacher is not None else None
        with torch.no_grad():
            self._tables = [
                self._block_tables(i, teacher, shapes[i] if shapes else None, stats)
                for i in range(factors.num_blocks)
            ]

    def _weight(self, index: int, term: str) -> float:
        return float(self.sensitivity.get(f"blocks.{index}.{term}", 1.0))

    def _block_tables(
        self,
        i: int,
        teacher: nn.Module | None,
        shape: BlockShape | None,
        stats: CalibrationStats | None,
    ) -> _BlockTables:
        """Every registered operator's terms of block i, each weighted by its sensitivity."""
        block = teacher.blocks[i] if teacher is not None and shape is not None else None  # type: ignore[index]
        ctx = TermContext(self.factors, i, block, shape, stats if block is not None else None)
        tables: dict[str, list[float] | str] = {}
        for key, op in OPERATORS.items():
            part = key.split(".", 1)[0]
            for term, table in op.proxy_tables(ctx).items():
                weight = self._weight(i, f"{part}.{term}")
                weighted = table if isinstance(table, str) else [weight * f for f in table]
                tables[f"{part}.{term}"] = weighted
        return tables, self._weight(i, "merge")

    @classmethod
    def from_inputs(cls, inputs: ProxyInputs) -> SpectralProxy:
        sensitivity = inputs.sensitivity
        if sensitivity is None and inputs.heldout_images is not None:
            sensitivity = measure_sensitivity(
                inputs.teacher, inputs.factors, inputs.stats, inputs.heldout_images
            )
        return cls(inputs.factors, sensitivity, teacher=inputs.teacher, stats=inputs.stats)

    def evaluate(self, config: CompressionConfig) -> dict[str, float]:
        _check_factor_kind(config, self.factors)
        return {"spectral": self.score_specs(config.blocks, config.fingerprint)}

    def score(self, config: CompressionConfig) -> float:
        _check_factor_kind(config, self.factors)
        return self.score_specs(config.blocks, config.fingerprint)

    def score_specs(self, specs: Sequence[BlockSpec], fingerprint: Fingerprint) -> float:
        """The score of per-block specs (what `evaluate` computes for a config)."""
        if len(specs) != len(self._tables):
            raise ValueError(
                f"`len(blocks) == {len(self._tables)}` (blocks in the factor cache) must hold, "
                f"but got {len(specs)}."
            )
        prefix = fingerprint.num_prefix_tokens
        tokens = fingerprint.num_tokens
        total = 0.0
        for i, spec in enumerate(specs):
            tables, merge_weight = self._tables[i]
            for name, part in (("attn", spec.attn), ("mlp", spec.mlp)):
                for term, value in of(part).proxy_terms(part):
                    table = tables[f"{name}.{term}"]
                    if isinstance(table, str):
                        raise ValueError(f"blocks.{i}: {table}")
                    total += table[value]
            if spec.merge_ratio:
                merged = merge_count(spec.merge_ratio, tokens, prefix)
                if merged:
                    total += merge_weight * merged / (tokens - prefix)
                    tokens -= merged
        return total


# -- logits -----------------------------------------------------------------------------


def _embed(model: Any, images: Tensor) -> Tensor:
    """Tokens entering the first block: timm VisionTransformer.forward_features up to blocks."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def _features(model: Any, tokens: Tensor) -> Tensor:
    """The pooled features the classifier reads (timm's pre-logits) from the last tokens."""
    return model.forward_head(model.norm(tokens), pre_logits=True)


def _head(model: Any, tokens: Tensor) -> Tensor:
    """Logits from the last block's tokens: the rest of timm's forward."""
    return model.forward_head(model.norm(tokens))


class _ShareOnDeepcopy:
    """A module's `__deepcopy__` that returns the module itself (a class, so it pickles)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, memo: dict) -> nn.Module:
        return self.module


class _CopyContainer(_ShareOnDeepcopy):
    """A container's `__deepcopy__`: a new module with its own attribute dicts.

    Children are deep-copied through `memo` (so shared ones stay shared and the ones
    `apply_specs` drops stay dropped); parameters and buffers held directly are shared.
    """

    def __call__(self, memo: dict) -> nn.Module:
        module = self.module
        new = object.__new__(type(module))
        memo[id(module)] = new
        for name, value in module.__dict__.items():
            if name == "__deepcopy__":
                continue
            if name == "_modules":
                value = {k: copy.deepcopy(child, memo) for k, child in value.items()}
            elif isinstance(value, dict):
                value = value.copy()  # hooks, parameter and buffer tables, configs
            new.__dict__[name] = value
        return new


def _shared_shell(teacher: nn.Module) -> nn.Module:
    """A private copy of the teacher whose deep copies share all but the containers.

    `apply_specs` deep-copies the model it is given, then rebuilds the blocks; for a
    proxy that throws each candidate away after one forward, copying every unchanged
    Linear and norm is most of the cost. In this shell, deep-copying the root, `blocks`,
    each block and its `attn` and `mlp` (the containers `apply_specs` reassigns parts of)
    makes new containers, and any other module is returned as is: a candidate shares the
    shell's unchanged modules (never the teacher's: the shell is a copy, only ever read).
    """
    shell: Any = copy.deepcopy(teacher).eval()
    containers = [shell, shell.blocks]
    for block in shell.blocks:
        containers += [block, block.attn, block.mlp]
    ids = {id(m) for m in containers}
    for module in shell.modules():
        hook = _CopyContainer(module) if id(module) in ids else _ShareOnDeepcopy(module)
        # object.__setattr__: a plain instance attribute, not a registered submodule.
        object.__setattr__(module, "__deepcopy__", hook)
    return shell


@register_proxy
class LogitsProxy(Proxy):
    """KL(teacher ‖ candidate), top-1 agreement and accuracy on a fixed held-out batch.

    The candidate is `apply_specs(teacher, config.blocks, factors, stats)` (factor slices,
    no SVD), from a private copy of the teacher whose unchanged modules candidates share
    (see `_shared_shell`). Blocks before the first compressed one are the teacher's, so
    the run starts from the teacher's cached activations there (kept for every block while
    they fit in `cache_bytes`). `heldout_labels=None` leaves accuracy out.
    """

    name = "logits"
    metric = "kl"

    def __init__(
        self,
        teacher: nn.Module,
        factors: FactorCache | None,
        stats: CalibrationStats | None,
        heldout_images: Tensor,
        heldout_labels: Tensor | None = None,
        batch_size: int = 256,
        cache_bytes: int = 512 * 2**20,
    ) -> None:
        if len(heldout_images) == 0:
            raise ValueError("The logits proxy needs at least one held-out image, but got none.")
        if heldout_labels is not None and len(heldout_labels) != len(heldout_images):
            raise ValueError(
                f"one label per held-out image is needed, but got {len(heldout_labels)} labels "
                f"for {len(heldout_images)} images."
            )
        self.teacher = teacher
        self.factors = factors
        self.stats = stats
        self.fingerprint = inspect_vit(teacher)
        self._shell: Any = _shared_shell(teacher)  # also runs the teacher: same weights, eval mode
        parameter = next(teacher.parameters())
        images = heldout_images.to(device=parameter.device, dtype=parameter.dtype)
        self.labels = None if heldout_labels is None else heldout_labels.to(parameter.device)
        depth = len(self.fingerprint.blocks)
        with torch.inference_mode():
            tokens = [_embed(self._shell, chunk) for chunk in images.split(batch_size)]
            per_state = sum(t.numel() * t.element_size() for t in tokens)
            # The teacher's tokens entering block k (k = depth: leaving the last block) for
            # k < cached; a candidate starts from the last cached state before its first
            # compressed block.
            self._cached = max(1, min(depth + 1, cache_bytes // max(per_state, 1)))
            self._states = [tokens]
            blocks: Any = self._shell.blocks
            for k in range(depth):
                tokens = [blocks[k](x) for x in tokens]
                if k + 1 < self._cached:
                    self._states.append(tokens)
            self.teacher_features = torch.cat([_features(self._shell, x) for x in tokens])
            logits = torch.cat([_head(self._shell, x) for x in tokens])
            self.teacher_log_probs = F.log_softmax(logits, dim=-1)
            self.teacher_top1 = self.teacher_log_probs.argmax(-1)

    @classmethod
    def from_inputs(cls, inputs: ProxyInputs) -> LogitsProxy:
        if inputs.heldout_images is None:
            raise ValueError("The logits proxy needs `heldout_images`, but got None.")
        return cls(
            inputs.teacher, inputs.factors, inputs.stats, inputs.heldout_images,
            inputs.heldout_labels,
        )  # fmt: skip

    def evaluate(self, config: CompressionConfig) -> dict[str, float]:
        if config.fingerprint is not self.fingerprint and config.fingerprint != self.fingerprint:
            config.check_compatible(self.fingerprint)
        if self.factors is not None:
            _check_factor_kind(config, self.factors)
        return self.evaluate_specs(config.blocks)

    def _build(self, specs: Sequence[BlockSpec]) -> nn.Module:
        """The candidate, for one read-only forward: it shares modules with the shell."""
        from vitrank.core.apply import apply_specs

        return apply_specs(
            self._shell, specs, self.factors, self.stats, fingerprint=self.fingerprint
        )

    def evaluate_specs(self, specs: Sequence[BlockSpec]) -> dict[str, float]:
        """KL, agreement (and accuracy) of the candidate built from per-block specs."""
        specs = tuple(specs)
        first = next((i for i, s in enumerate(specs) if not s.is_dense), len(specs))
        start = min(first, self._cached - 1)
        with torch.inference_mode():
            if start == len(specs):  # nothing compressed: the teacher itself
                log_probs = self.teacher_log_probs
            else:
                candidate = self._build(specs)
                log_probs = torch.cat(
                    [
                        F.log_softmax(self._run(candidate, start, x), dim=-1)
                        for x in self._states[start]
                    ]
                )
            teacher = self.teacher_log_probs
            kl = (teacher.exp() * (teacher - log_probs)).sum(-1).mean()
            top1 = log_probs.argmax(-1)
            result = {
                "kl": max(float(kl), 0.0),
                "agreement": float((top1 == self.teacher_top1).double().mean()),
            }
            if self.labels is not None:
                result["accuracy"] = float((top1 == self.labels).double().mean())
        return result

    def feature_error(self, config: CompressionConfig) -> float:
        """‖f − f_teacher‖² / ‖f_teacher‖² of the final features (before the classifier)."""
        specs = tuple(config.blocks)
        first = next((i for i, s in enumerate(specs) if not s.is_dense), len(specs))
        if first == len(specs):
            return 0.0
        start = min(first, self._cached - 1)
        with torch.inference_mode():
            candidate = self._build(specs)
            features = torch.cat(
                [self._run(candidate, start, x, features=True) for x in self._states[start]]
            )
            error = (features - self.teacher_features).double().pow(2).sum()
            return float(error / self.teacher_features.double().pow(2).sum().clamp_min(1e-30))

    @staticmethod
    def _run(candidate: Any, start: int, x: Tensor, features: bool = False) -> Tensor:
        size = None  # no token is merged before the first compressed block
        for block in candidate.blocks[start:]:
            x, size, _ = block(x, size, None)
        return _features(candidate, x) if features else _head(candidate, x)


# -- sensitivity ------------------------------------------------------------------------


def _reference_terms(
    teacher: nn.Module,
    factors: FactorCache,
    stats: CalibrationStats | None,
    reference: float,
    merge_ratio: float,
) -> list[tuple[str, int, BlockSpec, str]]:
    """(term key, block index, the block's spec compressing only that term, the family of
    the operator it belongs to): every registered operator's `reference_specs`, then merging."""
    shapes = inspect_vit(teacher).blocks
    terms = []
    for i, shape in enumerate(shapes):
        ctx = TermContext(factors, i, teacher.blocks[i], shape, stats)  # type: ignore[index]
        for key, op in OPERATORS.items():
            part = key.split(".", 1)[0]
            for term, spec in op.reference_specs(ctx, reference):
                block = BlockSpec(attn=spec) if part == "attn" else BlockSpec(mlp=spec)  # type: ignore[arg-type]
                terms.append((f"blocks.{i}.{part}.{term}", i, block, op.family))
        terms.append((f"blocks.{i}.merge", i, BlockSpec(merge_ratio=merge_ratio), MERGE_FAMILY))
    return terms


def measure_sensitivity(
    teacher: nn.Module,
    factors: FactorCache,
    stats: CalibrationStats | None,
    images: Tensor,
    *,
    reference: float = 0.5,
    merge_ratio: float = 0.25,
    batch_size: int = 64,
    progress: bool = False,
    families: tuple[str, ...] | None = None,
) -> dict[str, float]:
    """Per-term weight w_l = KL(teacher ‖ only l compressed) / f_l at a reference level.

    Each term is compressed alone at `reference` of its full rank (or of its heads or
    hidden units when pruned; tokens merged at `merge_ratio`) and the KL is measured on
    `images` (not the calibration images). f_l is the spectral fraction at that level,
    so w_l · f_l reproduces the measured KL there. Pruning terms need `stats`.
    """
    if not 0.0 < reference < 1.0:
        raise ValueError(f"`0 < reference < 1` must hold, but got {reference=}.")
    fingerprint = inspect_vit(teacher)
    depth = len(fingerprint.blocks)
    logits = LogitsProxy(teacher, factors, stats, images, batch_size=batch_size)
    unit = SpectralProxy(factors, None, teacher=teacher, stats=stats)
    sensitivity = {}
    terms = _reference_terms(teacher, factors, stats, reference, merge_ratio)
    if families is not None:  # only the terms a search over these families can score
        terms = [t for t in terms if t[3] in families]
    with progress_bar("sensitivity terms", len(terms), progress) as advance:
        for term, index, spec, _ in terms:
            specs = [BlockSpec()] * depth
            specs[index] = spec
            fraction = unit.score_specs(specs, fingerprint)
            advance()
            if fraction <= 1e-12:  # nothing discarded at the reference (e.g. no token merged)
                continue
            kl = logits.evaluate_specs(specs)["kl"]
            sensitivity[term] = kl / fraction
    return sensitivity


# -- held-out data ----------------------------------------------------------------------


def heldout_batch(
    workload: Any, size: int = 256, seed: int = 0, calib: Any = None
) -> tuple[Tensor, Tensor]:
    """A fixed batch of training images that calibration did not use: (images, labels).

    The calibration images (`calib`, default `workload.calib`) must be a `Subset` of
    `workload.train` (as `load_workload` makes it); the batch is a seeded random choice of
    the remaining training images.
    """
    from torch.utils.data import Subset

    train = workload.train
    calib = workload.calib if calib is None else calib
    num_train = len(train)
    if not isinstance(calib, Subset) or calib.dataset is not train:
        raise ValueError("`workload.calib` must be a Subset of `workload.train`.")
    return gather(train, heldout_indices(num_train, calib.indices, size, seed))


def heldout_indices(num_train: int, calib_indices: Any, size: int, seed: int) -> np.ndarray:
    """The training indices `heldout_batch` takes: a seeded choice of `size` of the images
    not in `calib_indices`, ascending."""
    excluded = set(int(i) for i in calib_indices)
    remaining = np.array([i for i in range(num_train) if i not in excluded])
    if len(remaining) == 0:
        raise ValueError(
            f"every one of the {num_train} training images is a calibration image; use a "
            "smaller calib_size to leave held-out images for the proxy."
        )
    return np.sort(np.random.default_rng(seed).permutation(remaining)[: min(size, len(remaining))])


__all__ = [
    "PROXIES",
    "LogitsProxy",
    "Proxy",
    "ProxyInputs",
    "SpectralProxy",
    "create_proxy",
    "get_proxy",
    "heldout_batch",
    "heldout_indices",
    "measure_sensitivity",
    "proxy_names",
    "register_proxy",
]
