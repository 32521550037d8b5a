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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml
from vitrank.core.compensate import COMPENSATION_STEPS
from vitrank.core.config import DEFAULT_SHRINKAGE
from vitrank.core.device import AUTO_DTYPE, DTYPES
from vitrank.evaluators import RECIPE
from vitrank.evaluators.proxies import PROXIES
from vitrank.search._engines import ENGINES
from vitrank.search._samplers import check_sampler
from vitrank.spaces import MERGE_FAMILY as _MERGE
from vitrank.spaces import PARAMETRIZATIONS, SVD_KINDS, search_families
from vitrank.workloads import DIGITS, WORKLOADS

COSTS = ("params", "flops", "latency_ms")


def default_ops(by_cost: bool) -> tuple[str, ...]:
    """Every family searched by default against FLOPs or latency; token merging removes no
    parameters, so under a parameter budget (it could only cost accuracy) it is left out."""
    return tuple(op for op in search_families(default=True) if by_cost or op != _MERGE)


def setting(
    default: Any,
    help: str | None = None,
    *,
    group: str = "search",
    metavar: str | None = None,
    choices: Callable[[], Sequence[str]] | None = None,
    strict: bool = True,
) -> Any:
    """A settings field and its command-line option (`vitrank search --NAME`), declared
    together: the CLI reads the help, the default and the choices from here. `help=None`
    makes a setting of run.yaml and the API only. A default that is not None is shown as
    "(default: ...)"; a setting whose None default means "chosen per model and device"
    says so in its help. `choices` (a registry's names) fill "%(choices)s" in the help and,
    when `strict`, are the only values the option takes."""
    metadata = {
        "help": help, "group": group, "metavar": metavar, "choices": choices, "strict": strict,
    }  # fmt: skip
    return dataclasses.field(default=default, metadata=metadata)


def _family_names() -> tuple[str, ...]:
    return search_families()


def _signal_names() -> tuple[str, ...]:
    from vitrank.evaluators.signals import signal_names

    return signal_names()


def _sampler_names() -> tuple[str, ...]:
    from vitrank.search._samplers import SAMPLERS

    return (*SAMPLERS.names(), "baseline:NAME")


# The settings' groups, in the order `vitrank search --help` shows them.
SETTING_GROUPS = (
    WORKLOAD := "workload (teacher and images)",
    BUDGET := "budget (default: --budget-params {budget})",
    SPACE := "what is searched and how a candidate is scored",
    ENGINE := "how the search runs",
    LADDER := "the fidelity ladder: rung 1 (short distillation) and rung 2 (fine-tuning)",
    RUN := "the run directory",
)


@dataclass
class SearchSettings:
    # What to compress: a named workload, or a timm model (name or local dir) + images.
    workload: str | None = setting(
        DIGITS, "named workload: %(choices)s (digits-vit: a small ViT on sklearn's digits)",
        group=WORKLOAD, metavar="NAME", choices=WORKLOADS.names,
    )  # fmt: skip
    model: str | None = setting(
        None, "a timm ViT name (e.g. deit_small_patch16_224) or local-dir:PATH (a timm folder)",
        group=WORKLOAD,
    )  # fmt: skip
    data: str | None = setting(
        None, "ImageFolder directory: DIR/train/<class>/, DIR/val/<class>/ or DIR/<class>/; "
        "with --workload fashion-vit, the folder of its four idx files",
        group=WORKLOAD, metavar="DIR",
    )  # fmt: skip
    pretrained: bool = setting(
        False, "load the named model's hub weights (needs a network)", group=WORKLOAD
    )
    # Calibration and held-out images; None: what the model's size and the device make
    # sensible (256 each for small models, fewer for DeiT-sized ones on a CPU).
    calib_size: int | None = setting(
        None, "calibration images drawn from the training split (default: 256, fewer for "
        "large models on a CPU)", group=WORKLOAD, metavar="N",
    )  # fmt: skip
    heldout_size: int | None = setting(
        None, "held-out training images the proxy scores on (default: 256, fewer for large "
        "models on a CPU)", group=SPACE, metavar="N",
    )  # fmt: skip
    # Budget: exactly one kind; none given is `DEFAULT_BUDGET_PARAMS` (filled in, so that
    # run.yaml records what the run used and a given value is never taken for the default).
    budget_params: str | None = setting(
        None, "parameters kept: a fraction of the teacher's, 0 < P < 1 (0.5), or a whole "
        "count below the teacher's (11M, 11000)", group=BUDGET, metavar="P",
    )  # fmt: skip
    budget_latency: float | None = setting(
        None, "latency in ms at --batch on --device", group=BUDGET, metavar="MS"
    )
    budget_flops: float | None = setting(
        None, "FLOPs kept: a fraction of the teacher's, 0 < F < 1 (0.4)", group=BUDGET,
        metavar="F",
    )  # fmt: skip
    batch: int = setting(1, "batch size the latency budget is measured at", group=BUDGET,
                         metavar="B")  # fmt: skip
    # One device for the whole pipeline: auto (the first CUDA GPU, else the CPU), cpu, cuda:N.
    device: str = setting(
        "auto", "auto, cpu, cuda or cuda:N: where everything runs (auto: the first CUDA GPU "
        "when there is one, else the CPU)", group=BUDGET, metavar="D",
    )  # fmt: skip
    dtype: str = setting(
        AUTO_DTYPE, "%(choices)s: the forward passes of proxies, rungs, winners and latency "
        "(auto: bfloat16 on a CUDA GPU that has it, float32 on the CPU; statistics and "
        "factorization stay fp64)", group=BUDGET, choices=lambda: (AUTO_DTYPE, *DTYPES),
    )  # fmt: skip
    # What is searched and how a candidate is scored.
    objectives: str | None = setting(
        None, "comma separated objectives (default: proxy,params; proxy,latency with a "
        "latency budget)", group=SPACE,
    )  # fmt: skip
    ops: tuple[str, ...] | None = setting(
        None, "operator families to search, comma separated, of %(choices)s (default: all "
        "for FLOPs/latency budgets; all but token merging for a params budget)", group=SPACE,
        choices=_family_names, strict=False,
    )  # fmt: skip
    granularity: int = setting(8, "ranks are multiples of G", group=SPACE, metavar="G")
    proxy: str = setting(
        "logits", "%(choices)s", group=SPACE, metavar="NAME", choices=PROXIES.names
    )
    parametrization: str = setting(
        "raw", "%(choices)s", group=SPACE, metavar="NAME", choices=PARAMETRIZATIONS.names
    )
    # factors of the searched configs: "whitened" or "plain"
    svd: str = setting("whitened", "%(choices)s", group=SPACE, choices=lambda: SVD_KINDS)
    # whitened factors: (1 - A)·C + A·mean(diag C)·I instead of the calibration covariance C
    shrinkage: float = setting(
        DEFAULT_SHRINKAGE,
        "shrinkage A of the whitening covariance toward its scaled identity, 0 <= A < 1 "
        "(0: whiten by the calibration activations alone)",
        group=SPACE,
        metavar="A",
    )
    # How the search runs.
    trials: int = setting(40, "trials the engine runs", group=ENGINE, metavar="N")
    sampler: str = setting(
        "tpe", "%(choices)s", group=ENGINE, choices=_sampler_names, strict=False
    )  # a registered sampler, or baseline:NAME (the baseline's config alone)
    # Fraction of the trials spent refining the best feasible trials by local moves
    # (raw parametrization; see search._local). 0 leaves every trial to the sampler.
    refine: float = setting(
        0.75, "fraction of the trials that refine the best feasible trials by local moves "
        "(raw parametrization; 0 turns it off)", group=ENGINE, metavar="F",
    )  # fmt: skip
    baselines: bool = setting(True)  # enqueue the baselines' configs as the first trials
    # The longest a baseline may be expected to take; longer ones are left out, saying so.
    # None: 120 s on a CPU, no limit on a GPU; 0: no limit.
    baseline_seconds: float | None = setting(
        None, "leave out baselines expected to take longer than S seconds (default: 120 on "
        "a CPU, no limit on a GPU; 0: run every baseline)", group=ENGINE, metavar="S",
    )  # fmt: skip
    seed: int = setting(0, "seeds the sampler, the splits and every distillation", group=ENGINE)
    engine: str = setting("ray", "%(choices)s", group=ENGINE, metavar="NAME", choices=ENGINES.names)
    ray_address: str | None = setting(
        None, "join an existing Ray cluster", group=ENGINE, metavar="ADDR"
    )
    cpus_per_trial: float = setting(1.0, "CPUs each Ray trial asks for", group=ENGINE,
                                    metavar="N")  # fmt: skip
    # GPUs each Ray trial asks for (fractional: several trials share one); None: a quarter
    # of a GPU when the run's device is a GPU, else none.
    gpus_per_trial: float | None = setting(
        None, "GPUs each Ray trial asks for (default: 0.25 when the run's device is a GPU, "
        "else 0)", group=ENGINE, metavar="N",
    )  # fmt: skip
    # The fidelity ladder (search._fidelity). Rung 1: a short distillation of `promote`
    # candidates and every feasible baseline, with successive halving; 0 skips it.
    promote: int = setting(
        6, "rung 1: candidates (plus every feasible baseline) given a short distillation, "
        "the weaker halved away (0 ranks by the proxy alone)", group=LADDER, metavar="N",
    )  # fmt: skip
    rung_epochs: float = setting(
        1.0, "rung 1: epochs of the short distillation", group=LADDER, metavar="E"
    )
    # The longest rung 1 may be expected to take; None: 90 s on a CPU, no bound on a GPU.
    rung_seconds: float | None = setting(
        None, "rung 1: fit in about S seconds, with fewer images per epoch, then fewer "
        "candidates (default: 90 on a CPU, no bound on a GPU; 0: no bound)", group=LADDER,
        metavar="S",
    )  # fmt: skip
    # What rungs 1 and 2 rank by, on the selection images (evaluators.signals); a rung
    # changes the proxy's order only where this signal differs beyond its noise.
    ladder_signal: str = setting(
        "kl", "the signal rungs 1 and 2 rank by on the selection images, of %(choices)s",
        group=LADDER, metavar="NAME", choices=_signal_names, strict=True,
    )  # fmt: skip
    # Distillation images per rung-1 epoch (a seeded subset); None: 2048, fewer for
    # DeiT-sized models on a CPU (cache/sizes.json says what was chosen).
    rung_images: int | None = setting(
        None, "rung 1: distil on a seeded subset of N training images per epoch (default: "
        "2048, fewer for DeiT-sized models on a CPU)", group=LADDER, metavar="N",
    )  # fmt: skip
    # Rung 2: the best K of rung 1 (else of the front) fine-tuned by distillation, on a
    # seeded subset of `finetune_images` distillation images per epoch (None: all).
    finetune_top: int = setting(
        1, "rung 2: the best K of rung 1 fine-tuned in full; the best of them wins",
        group=LADDER, metavar="K",
    )  # fmt: skip
    finetune_epochs: int = setting(1, "rung 2: epochs of fine-tuning", group=LADDER,
                                   metavar="E")  # fmt: skip
    # Every feasible baseline is measured against the winner on the validation split as
    # built (search._compare); this also fine-tunes each one as the winner was.
    finetune_baselines: bool = setting(
        False, "fine-tune every feasible baseline as the winner is and compare them after "
        "fine-tuning too (each is always compared as built)", group=LADDER,
    )  # fmt: skip
    finetune_images: int | None = setting(
        None, "rung 2: distil on a seeded subset of N training images per epoch (default: "
        "all)", group=LADDER, metavar="N",
    )  # fmt: skip
    # AdamW's peak learning rate of every distillation (rungs 1 and 2), warm-up then cosine.
    finetune_lr: float = setting(
        RECIPE.lr, "peak AdamW learning rate of rungs 1 and 2 (warm-up, then cosine)",
        group=LADDER, metavar="LR",
    )  # fmt: skip
    # The weight of the teacher's soft targets in that loss; the rest is cross-entropy with
    # the labels (1: the teacher's outputs only).
    finetune_alpha: float = setting(
        RECIPE.alpha, "weight of the teacher's soft targets in rungs 1 and 2; the rest is "
        "cross-entropy with the labels (1: the teacher only)", group=LADDER, metavar="A",
    )  # fmt: skip
    compensate: bool = setting(True)  # error compensation of winners before fine-tuning
    compensation_steps: int = setting(
        COMPENSATION_STEPS, "error compensation's gradient steps per block, for rung 1's "
        "candidates, the winners and the baselines built alike; it takes tens of seconds per "
        "config at 224 px on a CPU (0: none, the closed-form factors as built)",
        group=LADDER, metavar="N",
    )  # fmt: skip
    # Where the run lives: `out` itself when given, else `runs/<name>/`.
    out: str | None = setting(None, "run directory (default: runs/<name of the settings>)",
                              group=RUN, metavar="DIR")  # fmt: skip
    name: str | None = setting(None)
    resume: bool = setting(False, "continue the search in --out where it stopped", group=RUN)

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
            self.ops = default_ops(by_cost)
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
        if not 0.0 <= self.shrinkage < 1.0:
            raise ValueError(f"`0 <= shrinkage < 1` must hold, but got {self.shrinkage=}.")
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
        if self.rung_seconds is not None and not self.rung_seconds >= 0:
            raise ValueError(
                f"`rung_seconds >= 0` must hold (0: no bound), but got {self.rung_seconds!r}."
            )
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
        from vitrank.evaluators.signals import SIGNALS

        SIGNALS.check(self.ladder_signal)
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
        if self.compensation_steps < 0:
            raise ValueError(
                f"`compensation_steps >= 0` must hold (0: no compensation), but got "
                f"{self.compensation_steps=}."
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

    @property
    def compensates(self) -> bool:
        """Whether rungs and winners get error compensation (`compensate`, with steps)."""
        return self.compensate and self.compensation_steps > 0

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
