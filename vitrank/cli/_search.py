"""`vitrank search`: the Pareto search under a budget (the main job)."""

from __future__ import annotations

import argparse
from typing import Any

HELP = "search the Pareto front of compressed models under a budget (the main job)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option is a field of `SearchSettings`: its help, default and choices are read
    from the field's declaration, so the command line and the settings never disagree."""
    import dataclasses
    import typing

    from vitrank.search import SETTING_GROUPS, SearchSettings

    p.add_argument("--config", default=None, metavar="YAML", help="settings file (run.yaml)")
    defaults = SearchSettings()  # what a run without options uses (the budget filled in)
    groups = {
        title: p.add_argument_group(title.format(budget=defaults.budget_params))
        for title in SETTING_GROUPS
    }
    hints = typing.get_type_hints(SearchSettings)
    for field in dataclasses.fields(SearchSettings):
        if field.metadata.get("help") is None:
            continue  # a setting of run.yaml and the API only
        groups[field.metadata["group"]].add_argument(
            f"--{field.name.replace('_', '-')}", **_option(field, hints[field.name])
        )


def _option(field: Any, hint: Any) -> dict[str, Any]:
    """argparse keywords of one settings field. The default is None (not given), so that
    only what the user typed reaches the settings; the help shows the field's default."""
    import typing

    meta = field.metadata
    help_text = meta["help"]
    names = tuple(meta["choices"]()) if meta["choices"] is not None else ()
    if names:
        help_text = help_text.replace("%(choices)s", ", ".join(names))
    if field.default is not None and not isinstance(field.default, bool):
        help_text += f" (default: {field.default})"
    if hint is bool:
        return {"action": "store_true", "default": None, "help": help_text}
    kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kind = kinds[0] if kinds[0] in (int, float) else None
    option: dict[str, Any] = {"default": None, "metavar": meta["metavar"], "help": help_text}
    if kind is not None:
        option["type"] = kind
    if names and meta["strict"]:
        option["choices"] = names
    return option


def _rank(directory: Any) -> int:
    """A winner's rank in its metrics.json (1 is the winner); unranked ones last."""
    import json

    try:
        return int(json.loads((directory / "metrics.json").read_text()).get("rank", 10**6))
    except (OSError, ValueError, AttributeError):
        return 10**6


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vitrank.api import search
    from vitrank.search import SearchSettings

    known = set(SearchSettings.__dataclass_fields__)
    given = {k: v for k, v in vars(args).items() if k in known and v is not None}
    run_dir = Path(search(args.config, **given))
    winners = sorted(p for p in (run_dir / "winners").glob("*") if p.is_dir())
    winners.sort(key=lambda p: _rank(p))
    print(f"run: {run_dir}")
    if (run_dir / "report.html").exists():
        print(f"report: {run_dir / 'report.html'}")
    for winner in winners:
        print(f"winner: {winner}")
    return 0
