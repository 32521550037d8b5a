"""Every setting of a search, from defaults, a YAML file and the command line.

The resolved settings are written to the run directory as `run.yaml`; passing that file
back with `--config` starts the same run again.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from vitrank.evaluators.proxies import PROXIES
from vitrank.search._engines import ENGINES
from vitrank.search._samplers import check_sampler
from vitrank.spaces import MERGE_FAMILY as _MERGE
from vitrank.spaces import OPS, PARAMETRIZATIONS, SVD_KINDS

COSTS = ("params", "flops", "latency_ms")
DEFAULT_OPS = OPS
# Token merging removes no parameters: under a parameter budget it can only cost accuracy,
# so it is searched by default only against FLOPs or latency budgets.
PARAMS_BUDGET_OPS = tuple(op for op in OPS if op != _MERGE)


@dataclass
class SearchSettings:
    # What to compress: a named workload, or a timm model (name or local dir) + images.
    workload: str | None = "digits-vit"
    model: str | None = None
    data: str | None = None
    pretrained: bool = False
    # Calibration and held-out images; None: what the model's size and the device make
    # sensible (256 each for small models, fewer for DeiT-sized ones on a CPU).
    calib_size: int | None = None
    heldout_size: int | None = None
    # Budget: exactly one kind; none given is `DEFAULT_BUDGET_PARAMS` (filled in, so that
    # run.yaml records what the run used and a given value is never taken for the default).
    budget_params: str | None = None  # fraction of the teacher (0.5) or a count ("11M")
    budget_latency: float | None = None  # milliseconds at `batch` on `device`
    budget_flops: float | None = None  # fraction of the teacher's FLOPs
    batch: int = 1
    # One device for the whole pipeline: auto (the first CUDA GPU, else the CPU), cpu, cuda:N.
    device: str = "auto"
    dtype: str = "float32"  # forward passes of proxies, winners and latency
    # What is searched and how a candidate is scored.
    objectives: str | None = None  # "proxy,params" (default) | "proxy,flops" | "proxy,latency"
    ops: tuple[str, ...] | None = None  # default: by budget kind (see PARAMS_BUDGET_OPS)
    granularity: int = 8
    proxy: str = "logits"
    parametrization: str = "raw"
    svd: str = "whitened"  # factors of the searched configs: "whitened" or "plain"
    # How the search runs.
    trials: int = 40
    sampler: str = "tpe"  # tpe | nsga2 | gp | random | baseline:NAME
    # Fraction of the trials spent refining the best feasible trials by local moves
    # (raw parametrization; see search._local). 0 leaves every trial to the sampler.
    refine: float = 0.75
    baselines: bool = True  # enqueue the baselines' configs as the first trials
    # The longest a baseline may be expected to take; longer ones are left out, saying so.
    # None: 120 s on a CPU, no limit on a GPU; 0: no limit.
    baseline_seconds: float | None = None
    seed: int = 0
    engine: str = "ray"
    ray_address: str | None = None
    cpus_per_trial: float = 1.0
    # GPUs each Ray trial asks for (fractional: several trials share one); None: a quarter
    # of a GPU when the run's device is a GPU, else none.
    gpus_per_trial: float | None = None
    # The fidelity ladder (search._fidelity). Rung 1: a short distillation of `promote`
    # candidates and every feasible baseline, with successive halving; 0 skips it.
    promote: int = 6
    rung_epochs: float = 1.0
    # Distillation images per rung-1 epoch (a seeded subset); None: 2048, fewer for
    # DeiT-sized models on a CPU (cache/sizes.json says what was chosen).
    rung_images: int | None = None
    # Rung 2: the best K of rung 1 (else of the front) fine-tuned by distillation, on a
    # seeded subset of `finetune_images` distillation images per epoch (None: all).
    finetune_top: int = 1
    finetune_epochs: int = 1
    finetune_images: int | None = None
    # AdamW's peak learning rate of every distillation (rungs 1 and 2), warm-up then cosine.
    finetune_lr: float = 5e-4
    # The weight of the teacher's soft targets in that loss; the rest is cross-entropy with
    # the labels (1: the teacher's outputs only).
    finetune_alpha: float = 0.7
    compensate: bool = True  # error compensation of winners before fine-tuning
    # Where the run lives: `out` itself when given, else `runs/<name>/`.
    out: str | None = None
    name: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        for name in PATH_FIELDS:
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
        check_types(vars(self), "search settings")
        for name, hint in _annotations().items():
            value = getattr(self, name)
            if _accepts(hint, 1.0) and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, float(value))  # run.yaml says 1.0 whether 1 or 1.0 was given
        given = [name for name in BUDGET_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            both = " and ".join(f"--{n.replace('_', '-')} {getattr(self, n)}" for n in given)
            raise ValueError(
                f"Give one budget, but got {both}: a search meets one limit (parameters, "
                "FLOPs or latency) and plots the other costs beside it. Keep the one to meet."
            )
        if not given:
            self.budget_params = DEFAULT_BUDGET_PARAMS
        if self.ops is None:
            by_cost = self.budget_latency is not None or self.budget_flops is not None
            self.ops = DEFAULT_OPS if by_cost else PARAMS_BUDGET_OPS
        elif isinstance(self.ops, str):
            self.ops = tuple(op.strip() for op in self.ops.split(",") if op.strip())
        else:
            self.ops = tuple(self.ops)
        if self.budget_params is not None:
            self.budget_params = str(self.budget_params)
        self.validate()

    def validate(self) -> None:
        for name, registry in (
            ("engine", ENGINES),
            ("proxy", PROXIES),
            ("parametrization", PARAMETRIZATIONS),
        ):
            value = getattr(self, name)
            if value not in registry:
                raise ValueError(f"`{name}` must be one of {registry.names()}, but got {value!r}.")
        if self.svd not in SVD_KINDS:
            raise ValueError(f"`svd` must be one of {SVD_KINDS}, but got {self.svd=}.")
        from vitrank.core.device import check_device_name, resolve_dtype

        resolve_dtype(self.dtype)
        # Whether the device is on this machine is checked when a search starts
        # (`run_search`): settings of a GPU run are also read elsewhere (reports, workers).
        check_device_name(self.device)
        check_sampler(self.sampler)
        if self.batch < 1:
            raise ValueError(
                f"`batch >= 1` must hold (images per forward pass), but got {self.batch=}."
            )
        for name in ("calib_size", "heldout_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name} >= 1` must hold, but got {name}={value!r}.")
        if self.baseline_seconds is not None and self.baseline_seconds < 0:
            raise ValueError(
                f"`baseline_seconds >= 0` must hold (0: no limit), but got {self.baseline_seconds!r}."
            )
        self.objective_names  # noqa: B018  (validates `objectives`)
        if not 0.0 <= self.refine < 1.0:
            raise ValueError(f"`0 <= refine < 1` must hold, but got {self.refine=}.")
        if self.trials < 1:
            raise ValueError(f"`trials >= 1` must hold, but got {self.trials=}.")
        if self.promote < 0:
            raise ValueError(f"`promote >= 0` must hold (0: no rung 1), but got {self.promote=}.")
        if not self.rung_epochs > 0:
            raise ValueError(f"`rung_epochs > 0` must hold, but got {self.rung_epochs=}.")
        for name in ("rung_images", "finetune_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name} >= 1` must hold, but got {name}={value!r}.")
        if not (math.isfinite(self.finetune_lr) and self.finetune_lr > 0):
            raise ValueError(
                f"`finetune_lr > 0` must hold (a finite number), but got {self.finetune_lr=}."
            )
        if not 0.0 <= self.finetune_alpha <= 1.0:  # NaN fails too
            raise ValueError(
                f"`0 <= finetune_alpha <= 1` must hold, but got {self.finetune_alpha=}."
            )
        if self.finetune_top < 0 or self.finetune_epochs < 0:
            raise ValueError(
                "`finetune_top >= 0` and `finetune_epochs >= 0` must hold, but got "
                f"{self.finetune_top=}, {self.finetune_epochs=}."
            )
        if self.cpus_per_trial <= 0 or (self.gpus_per_trial or 0.0) < 0:
            raise ValueError(
                "`cpus_per_trial > 0` and `gpus_per_trial >= 0` must hold, but got "
                f"{self.cpus_per_trial=}, {self.gpus_per_trial=}."
            )
        active = [
            name for name in ("budget_latency", "budget_flops") if getattr(self, name) is not None
        ]
        # Checked here, before any model is loaded, by the rules `spaces.parse_budget` reads.
        if self.budget_flops is not None and not 0 < self.budget_flops < 1:
            raise ValueError(
                "`0 < budget_flops < 1` must hold (a fraction of the teacher's FLOPs; 1 keeps "
                f"them all), but got {self.budget_flops=}."
            )
        if self.budget_latency is not None and not self.budget_latency > 0:
            raise ValueError(
                f"`budget_latency > 0` must hold (milliseconds), but got {self.budget_latency=}."
            )
        if not active and self.budget_params is not None:
            from vitrank.spaces import parse_budget

            parse_budget(self.budget_params, kind="params")

    def trial_gpus(self) -> float:
        """`gpus_per_trial`, or its default for the run's device."""
        if self.gpus_per_trial is not None:
            return self.gpus_per_trial
        from vitrank.core.device import resolve_device

        return 0.25 if resolve_device(self.device).type == "cuda" else 0.0

    @property
    def objective_names(self) -> tuple[str, str]:
        """The two minimised objectives: the proxy and a cost (params, flops or latency_ms)."""
        if self.objectives:
            names = tuple(n.strip() for n in self.objectives.split(",") if n.strip())
            names = tuple("latency_ms" if n == "latency" else n for n in names)
            if len(names) != 2 or names[0] != "proxy" or names[1] not in COSTS:
                raise ValueError(
                    f"`objectives` must be 'proxy,C' with C in {COSTS}, but got {self.objectives=}."
                )
            return names  # type: ignore[return-value]
        if self.budget_latency is not None:
            return ("proxy", "latency_ms")
        return ("proxy", "params")

    @property
    def budget_text(self) -> str:
        """The budget in the syntax of `spaces.parse_budget`."""
        if self.budget_latency is not None:
            return f"{self.budget_latency}ms@{self.batch}/{self.device}"
        if self.budget_flops is not None:
            return f"flops={self.budget_flops}"
        return str(self.budget_params)

    def run_name(self) -> str:
        if self.name:
            return self.name
        source = self.workload or Path(self.model or "model").name
        budget = self.budget_text.replace("/", "-").replace("@", "-").replace("=", "")
        return f"{source}-{budget}-{self.engine}-s{self.seed}"

    def run_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / self.run_name()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ops"] = list(self.ops or ())
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown search settings {unknown}; known: {sorted(known)}.")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path, **overrides: Any) -> SearchSettings:
        """Settings from a YAML file, with `overrides` (not None) on top."""
        try:
            with open(path, encoding="utf-8") as handle:  # a stream: YAML's marks name the file
                data = yaml.safe_load(handle) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{path} is not valid YAML: {error}\nFix the line it names (or pass another "
                "--config)."
            ) from error
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a mapping of settings, got {type(data).__name__}.")
        check_types(data, path)  # before the overrides join, so an error names the file
        given = {k: v for k, v in overrides.items() if v is not None}
        if any(name in given for name in BUDGET_FIELDS):
            # a budget given beside a file replaces the file's budget, whatever its kind
            data = {k: v for k, v in data.items() if k not in BUDGET_FIELDS}
        elif (
            str(data.get("budget_params")) == DEFAULT_BUDGET_PARAMS
            and sum(data.get(n) is not None for n in BUDGET_FIELDS) > 1
        ):
            # run.yaml of releases that recorded the default params budget beside another
            data.pop("budget_params")
        data.update(given)
        return cls.from_dict(data)


BUDGET_FIELDS = ("budget_params", "budget_flops", "budget_latency")
DEFAULT_BUDGET_PARAMS = "0.5"  # half the teacher's parameters, when no budget is given
# Settings that name files: a path object is taken as its string.
PATH_FIELDS = ("data", "out")
# Accepted beyond the annotation: a params budget as a number (0.5, 11e6), ops as one
# comma-separated string ("lowrank,heads").
ALSO_ACCEPTED: dict[str, Any] = {"budget_params": float, "ops": str}
_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


@functools.cache
def _annotations() -> dict[str, Any]:
    return typing.get_type_hints(SearchSettings)


def _accepts(hint: Any, value: Any) -> bool:
    """Whether `value` is of type `hint`; a bool is not a number, an int is a float."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    if typing.get_origin(hint) is tuple:  # tuple[X, ...], from YAML a list
        element = typing.get_args(hint)[0]
        return isinstance(value, (list, tuple)) and all(_accepts(element, v) for v in value)
    if hint in _NAMES:
        return isinstance(value, hint)
    raise TypeError(f"No type check for settings of type {hint!r}; add one to `_accepts`.")


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = sorted(typing.get_args(hint), key=lambda arg: arg is type(None))  # null last
        names = [_describe(arg) for arg in args]
        return ", ".join(names[:-1]) + " or " + names[-1]
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('a ')}s"
    return _NAMES[hint]


def check_types(data: dict[str, Any], source: str | Path) -> None:
    """Refuse a setting whose value is not of its field's type, naming the key and value.

    Unknown keys are left to `SearchSettings.from_dict`, which lists the known ones.
    """
    for key, value in data.items():
        hint = _annotations().get(key)
        if hint is None:
            continue
        if key in ALSO_ACCEPTED:
            hint = hint | ALSO_ACCEPTED[key]
        if not _accepts(hint, value):
            raise ValueError(
                f"{source}: `{key}` must be {_describe(hint)}, but got {value!r} "
                f"({type(value).__name__})."
            )


def resolve_settings(config: str | Path | None = None, **overrides: Any) -> SearchSettings:
    """Defaults < YAML file < explicit overrides (None means "not given")."""
    if config is not None:
        return SearchSettings.load(config, **overrides)
    return SearchSettings.from_dict({k: v for k, v in overrides.items() if v is not None})
