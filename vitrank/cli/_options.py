"""Options several subcommands share, and how they turn into library objects."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterator
from typing import Any


class RegistryChoices:
    """The names of a registry as argparse ``choices``, read only when argparse needs them
    (a value to check, a help page), so ``vitrank --help`` imports no torch."""

    def __init__(self, module: str, registry: str, *extra: str) -> None:
        self.module, self.registry, self.extra = module, registry, extra

    def _names(self) -> tuple[str, ...]:
        return (*getattr(importlib.import_module(self.module), self.registry).names(), *self.extra)

    def __contains__(self, value: object) -> bool:
        return value in self._names()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


def add_workload(parser: argparse.ArgumentParser, *, calib: bool = True) -> None:
    group = parser.add_argument_group("workload (teacher and images)")
    group.add_argument(
        "--workload",
        default=None,
        choices=RegistryChoices("vitrank.workloads", "WORKLOADS"),
        metavar="NAME",
        help="named workload: %(choices)s (default: digits-vit, a small ViT on sklearn's digits)",
    )
    group.add_argument(
        "--model",
        default=None,
        help="a timm ViT name (e.g. deit_small_patch16_224) or local-dir:PATH (a timm folder)",
    )
    group.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="ImageFolder directory: DIR/train/<class>/, DIR/val/<class>/ or DIR/<class>/; "
        "with --workload fashion-vit, the folder of its four idx files",
    )
    group.add_argument(
        "--pretrained",
        action="store_true",
        default=None,
        help="load the named model's hub weights (needs a network)",
    )
    if calib:
        group.add_argument(
            "--calib-size",
            type=int,
            default=None,
            metavar="N",
            help="calibration images drawn from the training split (default: 256; a search "
            "takes fewer for large models on a CPU)",
        )


def add_device(parser: argparse.ArgumentParser | argparse._ArgumentGroup, batch_help: str) -> None:
    parser.add_argument(
        "--device",
        default=None,
        metavar="D",
        help="auto, cpu, cuda or cuda:N: where everything runs (default: auto, the first "
        "CUDA GPU when there is one, else the CPU)",
    )
    parser.add_argument("--batch", type=positive_int, default=None, metavar="B", help=batch_help)


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse names the option and exits 2)."""
    value = int(text)  # a ValueError reads "invalid positive_int value: 'x'"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, but got {value}")
    return value


def add_ops(parser: argparse.ArgumentParser) -> None:
    from vitrank.spaces import search_families

    parser.add_argument(
        "--ops",
        default=None,
        help="operator families to search, comma separated, of "
        f"{','.join(search_families())} (default: {','.join(search_families(default=True))} "
        "for FLOPs/latency budgets, all of them but tokens for a params budget)",
    )
    parser.add_argument(
        "--granularity",
        type=int,
        default=None,
        metavar="G",
        help="ranks are multiples of G (default: 8)",
    )


def workload_from_args(args: argparse.Namespace) -> Any:
    """The `Workload` the shared workload options name."""
    from vitrank.workloads import WorkloadSettings

    return WorkloadSettings.of(args).load()


def use_recorded_workload(args: argparse.Namespace, config: Any, directory: Any) -> bool:
    """Fill the workload options the user left out from what the config was made with.

    With no teacher named, the one the config was found for; calibration settings always
    default to the recorded ones, so a winner's config rebuilds the winner exactly. Returns
    whether any workload is known (named or recorded).
    """
    from vitrank.reports import recorded_workload

    recorded = recorded_workload(config, directory)
    named = any(getattr(args, key, None) is not None for key in ("workload", "model", "data"))
    for key, value in recorded.items():
        if not hasattr(args, key) or getattr(args, key) is not None:
            continue
        if not named or key in ("calib_size", "seed"):
            setattr(args, key, value)
    return named or bool(recorded)


def saved_model_dir(path: Any) -> Any:
    """A folder holding a saved compressed model, or a clear error."""
    from pathlib import Path

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{directory} holds no saved compressed model (config.json + model.safetensors); "
            "make one with `vitrank apply` or pass a search's runs/<name>/winners/<id>/."
        )
    return directory
