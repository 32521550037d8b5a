"""`CompressionConfig`: one point of the search space, saved and replayed as plain data.

A config names the timm architecture it was made for, carries that architecture's
fingerprint (checked before it is applied) and one `BlockSpec` per block. Provenance
(run, trial, metrics) travels with it but is not part of equality: two trials that chose
the same compression are the same config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitrank.core.apply import validate_block
from vitrank.core.files import atomic_write_text
from vitrank.core.lowrank import DEFAULT_SHRINKAGE as DEFAULT_SHRINKAGE
from vitrank.core.spec import BlockSpec
from vitrank.core.structure import Fingerprint

SCHEMA_VERSION = 1
SVD_KINDS = ("whitened", "plain")


@dataclass(frozen=True)
class CompressionConfig:
    model: str  # timm model name, what `timm.create_model` rebuilds
    # Keyword arguments for `timm.create_model` (img_size, depth, ...); a dict, so the
    # config is compared by value and never hashed.
    model_args: dict[str, Any]
    fingerprint: Fingerprint  # the architecture this config was made for
    blocks: tuple[BlockSpec, ...]  # one plan per transformer block
    svd: str = "whitened"  # factor kind: activation-aware ("whitened") or "plain" SVD
    compensate: bool = False  # run layer-wise error compensation after factorizing
    # Whitened factors: shrinkage of the calibration covariance (see DEFAULT_SHRINKAGE).
    shrinkage: float = DEFAULT_SHRINKAGE
    schema_version: int = SCHEMA_VERSION
    # Where the config came from: {"run": ..., "trial": ..., "metrics": {...}}.
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)

    __hash__ = None  # type: ignore[assignment]  # dict fields: equality only

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(
                f"`schema_version == {SCHEMA_VERSION}` must hold (this vitrank reads version "
                f"{SCHEMA_VERSION}), but got schema_version={self.schema_version!r}."
            )
        if self.svd not in SVD_KINDS:
            raise ValueError(f"`svd` must be one of {SVD_KINDS}, but got svd={self.svd!r}.")
        if not isinstance(self.compensate, bool):
            raise ValueError(f"`compensate` must be a bool, but got {self.compensate!r}.")
        shrinkage = self.shrinkage
        if isinstance(shrinkage, bool) or not isinstance(shrinkage, int | float):
            raise ValueError(f"`shrinkage` must be a number, but got {shrinkage!r}.")
        if not 0.0 <= shrinkage < 1.0:
            raise ValueError(f"`0 <= shrinkage < 1` must hold, but got {shrinkage=}.")
        object.__setattr__(self, "shrinkage", float(shrinkage))
        if not isinstance(self.model_args, dict) or not isinstance(self.provenance, dict):
            raise ValueError("`model_args` and `provenance` must be dicts.")
        # Stored as JSON would give them back, so a saved config loads equal to itself.
        object.__setattr__(self, "model_args", _plain(self.model_args))
        object.__setattr__(self, "provenance", _plain(self.provenance))
        object.__setattr__(self, "blocks", tuple(self.blocks))
        shapes = self.fingerprint.blocks
        if len(self.blocks) != len(shapes):
            raise ValueError(
                f"`len(blocks) == {len(shapes)}` (blocks in the fingerprint) must hold, "
                f"but got len(blocks)={len(self.blocks)}."
            )
        for shape, spec in zip(shapes, self.blocks, strict=True):
            if not isinstance(spec, BlockSpec):
                raise ValueError(
                    f"{shape.name}: a block plan must be a BlockSpec, but got {spec!r}."
                )
            # The same rules `apply` enforces, checked now so a bad config never gets saved.
            validate_block(spec, shape)

    @property
    def merge_ratios(self) -> tuple[float, ...]:
        return tuple(b.merge_ratio for b in self.blocks)

    @property
    def token_schedule(self) -> list[int]:
        """Tokens entering each block, and leaving the last one."""
        from vitrank.core.spec import token_schedule

        fp = self.fingerprint
        return token_schedule(self.merge_ratios, fp.num_tokens, fp.num_prefix_tokens)

    @classmethod
    def dense(
        cls, model: str, model_args: dict[str, Any], fingerprint: Fingerprint, **kwargs: Any
    ) -> CompressionConfig:
        """The uncompressed config: every block dense, no merging."""
        blocks = tuple(BlockSpec() for _ in fingerprint.blocks)
        return cls(model, dict(model_args), fingerprint, blocks, **kwargs)

    def replace(self, **changes: Any) -> CompressionConfig:
        return dataclasses.replace(self, **changes)

    def check_compatible(self, fingerprint: Fingerprint) -> None:
        """Refuse to apply this config to a model whose architecture differs."""
        if fingerprint != self.fingerprint:
            diff = self.fingerprint.describe_difference(fingerprint)
            raise ValueError(
                f"This config was made for {self.fingerprint.architecture} "
                f"(fingerprint {self.fingerprint.digest}), not for {fingerprint.architecture} "
                f"(fingerprint {fingerprint.digest}); first difference (config != model): {diff}."
            )

    # ---- serialization -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "model": self.model,
            "model_args": _plain(self.model_args),
            "svd": self.svd,
            "compensate": self.compensate,
            "shrinkage": self.shrinkage,
            "blocks": [b.to_dict() for b in self.blocks],
            "fingerprint": self.fingerprint.to_dict(),
            "provenance": _plain(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: Any) -> CompressionConfig:
        if not isinstance(data, dict):
            raise ValueError(
                f"A compression config must be a mapping, but got {type(data).__name__}."
            )
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"`schema_version == {SCHEMA_VERSION}` must hold (this vitrank reads version "
                f"{SCHEMA_VERSION}), but got schema_version={version!r}."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        missing = sorted({"model", "fingerprint", "blocks"} - set(data))
        if unknown or missing:
            raise ValueError(
                f"Damaged compression config: unknown keys {unknown}, missing keys {missing}."
            )
        try:
            fingerprint = Fingerprint.from_dict(data["fingerprint"])
            blocks = tuple(BlockSpec.from_dict(b) for b in data["blocks"])
        except (TypeError, KeyError, AttributeError) as error:
            raise ValueError(f"Damaged compression config: {error!r}.") from error
        _check_knobs(blocks)
        return cls(
            model=data["model"],
            model_args=dict(data.get("model_args") or {}),
            fingerprint=fingerprint,
            blocks=blocks,
            svd=data.get("svd", "whitened"),
            compensate=data.get("compensate", False),
            shrinkage=data.get("shrinkage", DEFAULT_SHRINKAGE),
            schema_version=version,
            provenance=dict(data.get("provenance") or {}),
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> CompressionConfig:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as error:  # nested past any config
            raise ValueError(f"Damaged compression config (not valid JSON): {error}.") from error
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> CompressionConfig:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"Damaged compression config (not valid YAML): {error}.") from error
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        """Write JSON (.json) or YAML (.yaml/.yml), atomically (write then rename)."""
        path = Path(path)
        text = self.to_json() if _format(path) == "json" else self.to_yaml()
        return atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> CompressionConfig:
        path = Path(path)
        text = path.read_text()
        try:
            if _format(path) == "json":
                return cls.from_json(text)
            return cls.from_yaml(text)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    raise ValueError(f"A config file ends in .json, .yaml or .yml, but got {path.name!r}.")


def _check_knobs(blocks: tuple[BlockSpec, ...]) -> None:
    """Every knob a loaded config sets belongs to its part's operator."""
    from vitrank.core.operators import OPERATORS

    for i, block in enumerate(blocks):
        for part, spec in (("attn", block.attn), ("mlp", block.mlp)):
            key = f"{part}.{spec.op}"
            if key not in OPERATORS:
                continue  # an unknown operator is named by the check against the model
            knobs = OPERATORS.get(key).knobs
            foreign = [k for k, _ in spec.knobs if k not in knobs]
            if foreign:
                raise ValueError(
                    f"Damaged compression config: blocks.{i}.{part} op {spec.op!r} has knobs "
                    f"{list(knobs)}, but the file sets {foreign}."
                )


def _plain(value: Any) -> Any:
    """Tuples to lists (what JSON and YAML give back), so round trips are identities."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
