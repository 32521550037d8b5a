"""`vitrank apply`: a saved config applied to a teacher, re-calibrated on the user's data."""

from __future__ import annotations

import argparse
import sys

from ._options import add_workload, use_recorded_workload, workload_from_args

HELP = "apply a saved compression config to a model, re-calibrated on your data"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="a config.json found by a search")
    add_workload(p)
    p.add_argument("--out", required=True, metavar="DIR", help="where to save the model")
    p.add_argument("--seed", type=int, default=None, help="picks the calibration subset")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vitrank.core.files import check_writable
    from vitrank.core.model import check_buildable, compress, save
    from vitrank.core.structure import inspect_vit
    from vitrank.evaluators.calibration import calibrate
    from vitrank.reports import recorded_granularity
    from vitrank.spaces import CompressionConfig, build_space
    from vitrank.workloads import WorkloadSettings

    path = Path(args.config)
    path = path / "config.json" if path.is_dir() else path  # a winner's folder is accepted
    if not path.is_file():
        raise FileNotFoundError(
            f"config {path} does not exist; pass a config.json a search saved "
            "(runs/<name>/winners/<id>/config.json)."
        )
    config = CompressionConfig.load(path)
    check_buildable(config, path)  # its own model_args against its own fingerprint
    # A hand-edited config is refused before any work: a rank no search offers (the
    # width itself, or off the grid) makes a model bigger or slower than it needs to be.
    granularity = recorded_granularity(config, path.parent) or 1
    build_space(config.fingerprint, granularity=granularity).check_on_grid(config)
    check_writable(args.out)  # before the calibration, not after it
    use_recorded_workload(args, config, path.parent)
    workload = workload_from_args(args)
    fingerprint = inspect_vit(workload.model, config.fingerprint.architecture)
    if fingerprint != config.fingerprint:
        raise ValueError(
            f"{path} was found for {config.fingerprint.architecture}, which {workload.name} is "
            f"not ({config.fingerprint.describe_difference(fingerprint)}); pass --model with "
            "the architecture the config was made for."
        )
    stats = calibrate(workload.model, workload.calib, progress=sys.stderr.isatty())
    recorded = {
        key: getattr(args, key, None) for key in WorkloadSettings.names()
    }  # what rebuilds this workload
    recorded["data"] = None if recorded["data"] is None else str(recorded["data"])
    recorded["pretrained"] = bool(recorded["pretrained"])
    provenance = {**config.provenance, "applied_from": str(path), "workload": recorded}
    refine = {"images": workload.calib} if config.compensate else {}
    model = compress(workload.model, config.replace(provenance=provenance), stats, **refine)
    out = save(model, args.out)
    params = sum(p.numel() for p in model.parameters())
    teacher = sum(p.numel() for p in workload.model.parameters())
    print(
        f"saved {out}: {params:,} parameters, {params / teacher:.1%} of {workload.name}; "
        f"measure it with `vitrank eval {args.out}`."
    )
    return 0
