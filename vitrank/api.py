"""The Python API: compress a teacher with a config, save it, load it back.

    model = vitrank.compress(teacher, config, stats)   # config: spaces.CompressionConfig
    vitrank.save(model, "out/")                         # model.safetensors + config.json
    model = vitrank.load("out/")                        # no teacher, no statistics

Imports are lazy (inside the functions) so that ``import vitrank`` stays cheap and the
layers below (``vitrank.compress``) never import ``spaces``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn
    from torch.utils.data import DataLoader, Dataset

    from spaces import CompressionConfig
    from vitrank.compress.factorize import FactorCache
    from vitrank.compress.stats import CalibrationStats

CONFIG_ATTRIBUTE = "vitrank_config"


def factor_cache(
    model: nn.Module, config: CompressionConfig, stats: CalibrationStats | None
) -> FactorCache:
    """The factors ``config.svd`` asks for: whitened needs statistics, plain does not."""
    from vitrank.compress.factorize import FactorCache

    if config.svd == "whitened" and stats is None:
        raise ValueError(
            "`svd='whitened'` factorizes on calibration activations, so `stats` must be given "
            "(evaluators.calibrate(model, images)); use svd='plain' for weight-only SVD."
        )
    return FactorCache(model, stats, whitening=config.svd == "whitened")


def compress(
    model: nn.Module,
    config: CompressionConfig,
    stats: CalibrationStats | None = None,
    factors: FactorCache | None = None,
    images: Tensor | Dataset | DataLoader | None = None,
    *,
    compensation_steps: int = 100,
) -> nn.Module:
    """A new compressed model built from ``model`` as ``config`` says; ``model`` is untouched.

    ``stats`` (calibration statistics) are needed for whitened factors and for channel
    and head pruning; ``factors`` may be passed to reuse a ``FactorCache`` across many
    configs (a search does), else one is built here when the config needs it. With
    ``config.compensate`` the factorized parameters are then refined block by block
    against the teacher on the calibration ``images`` (a tensor, or (image, label) data).
    The config travels with the model (``model.vitrank_config``) for ``save``.
    """
    from spaces import CompressionConfig
    from vitrank.compress.apply import apply_specs
    from vitrank.compress.structure import inspect_vit

    if not isinstance(config, CompressionConfig):
        raise TypeError(
            f"`config` must be a spaces.CompressionConfig, but got {type(config).__name__}."
        )
    # The fingerprint's label is the name it was made with; every shape is compared.
    config.check_compatible(inspect_vit(model, config.fingerprint.architecture))
    needs_factors = any(
        b.attn.op in ("lowrank", "heads") or b.mlp.op == "lowrank" for b in config.blocks
    )
    if factors is None and needs_factors:
        factors = factor_cache(model, config, stats)
    elif factors is not None and factors.whitening != (config.svd == "whitened"):
        kind = "whitened" if factors.whitening else "plain"
        raise ValueError(
            f"`factors` must be of the kind the config asks for (svd={config.svd!r}), but "
            f"they are {kind} SVD factors."
        )
    if config.compensate and images is None:
        raise ValueError(
            "`config.compensate` refines the factors on calibration images, so `images` must "
            "be given (the calibration data), but got images=None."
        )
    student = apply_specs(model, config.blocks, factors, stats)
    if config.compensate and images is not None:
        from vitrank.compress.compensate import compensate as refine

        refine(student, model, images, steps=compensation_steps)
    setattr(student, CONFIG_ATTRIBUTE, config)
    return student


def save(model: nn.Module, directory: str | Path) -> Path:
    """Write ``directory``/model.safetensors and config.json (the full CompressionConfig)."""
    from vitrank.compress.io import save_model

    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if config is None:
        raise ValueError(
            f"`model` must come from vitrank.compress or vitrank.load (it carries "
            f"`{CONFIG_ATTRIBUTE}`), but {type(model).__name__} has none."
        )
    return save_model(model, directory, config.to_dict())


def load(directory: str | Path) -> nn.Module:
    """Rebuild a model saved by ``save`` from its two files alone, in eval mode."""
    from spaces import CompressionConfig
    from vitrank.compress.io import CONFIG_FILE, load_model
    from vitrank.compress.structure import inspect_vit

    parsed: list[CompressionConfig] = []

    def check(base: nn.Module, meta: dict[str, Any]) -> None:
        path = Path(directory) / CONFIG_FILE
        try:
            config = CompressionConfig.from_dict(meta)
            config.check_compatible(inspect_vit(base, config.fingerprint.architecture))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error
        parsed.append(config)

    model, _ = load_model(directory, check=check)
    setattr(model, CONFIG_ATTRIBUTE, parsed[0])
    return model


def search(
    config: str | Path | None = None,
    *,
    workload: Any = None,
    report: bool = True,
    **settings: Any,
) -> Path:
    """Search the Pareto front of compressed models under a budget; returns the run directory.

    ``settings`` are the options of ``vitrank search`` with underscores (``budget_params=0.35``,
    ``trials=100``, ``engine="optuna"``, ``out="runs/x"``, ``resume=True``, ...); ``config``
    a run.yaml to start from (explicit settings win). ``workload`` is a workload name or a
    ``vitrank.Workload`` object. When the ``reports`` package is installed the run's
    report.html and summary.md are written at the end (``report=False`` skips them).
    """
    from search import SearchSettings, resolve_run, resolve_settings, run_search

    given = dict(settings)
    loaded = None
    if workload is not None and not isinstance(workload, str):
        loaded, given["workload"] = workload, workload.name
    elif workload is not None:
        given["workload"] = workload
    if given.get("resume"):
        # The run directory alone says how to continue; explicit settings may only extend it.
        where = SearchSettings(**{k: given[k] for k in ("out", "name") if given.get(k)})
        base = SearchSettings(**{**where.to_dict(), "resume": True})
        resolved = resolve_run(base, given)
    else:
        resolved = resolve_run(resolve_settings(config, **given), given)
    run_dir = run_search(resolved, loaded)
    if report:
        _build_report(run_dir)
    return run_dir


def _build_report(run_dir: Path) -> None:
    """reports.build(run_dir) when the reports package is there (it depends on search)."""
    import importlib.util
    import sys

    if importlib.util.find_spec("reports") is None:
        print(f"(no reports package: report not written for {run_dir})", file=sys.stderr)
        return
    import reports

    paths = reports.build(run_dir)
    print(f"report: {paths.html}\nsummary: {paths.summary}", file=sys.stderr)
