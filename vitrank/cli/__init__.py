"""The `vitrank` command line: one subcommand per step of the pipeline.

Each subcommand is a module here with `HELP`, `add_arguments(parser)` and `run(args) -> int`,
calling the public functions of the layer it needs; heavy imports happen inside `run`, so
`vitrank --help` stays fast. Errors caused by the user's input print one or two lines
(exit 2); anything else prints one line and exits 1; `--verbose` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from . import _apply, _eval, _export, _finetune, _latency, _report, _search, _space

USAGE_ERROR, FAILURE = 2, 1

COMMANDS: dict[str, ModuleType] = {
    "search": _search,
    "report": _report,
    "apply": _apply,
    "eval": _eval,
    "finetune": _finetune,
    "export": _export,
    "latency": _latency,
    "space": _space,
}
SUBCOMMANDS: dict[str, str] = {name: module.HELP for name, module in COMMANDS.items()}


def _version() -> str:
    from vitrank import __version__

    return __version__


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command`, only that subcommand gets its options (the others keep
    their one-line help), so that `vitrank eval` never imports the search's settings."""
    parser = argparse.ArgumentParser(
        prog="vitrank",
        description="Automatic compression of Vision Transformers: searches per-layer "
        "ranks, head-level factorization, token merging and channel pruning under a budget.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show full tracebacks")
    # also accepted after the subcommand; SUPPRESS keeps it from resetting the global flag
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        parser_of = sub.add_parser(
            name, help=module.HELP, description=module.HELP, parents=[verbose]
        )
        if command is None or name == command:
            module.add_arguments(parser_of)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand `argv` names: its first word that is not an option (the global
    options take no values)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _is_usage_error(error: BaseException) -> bool:
    """The user's input is wrong (a model, a path, a value), or the user must fix the
    machine (a full disk, a folder that cannot be written, a run another search holds):
    say what, exit 2."""
    from vitrank.core.files import WriteError
    from vitrank.core.structure import UnsupportedModelError
    from vitrank.search import RunLockedError

    return isinstance(
        error,
        (
            UnsupportedModelError,
            ValueError,
            FileNotFoundError,
            FileExistsError,
            WriteError,
            RunLockedError,
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command(argv)
    parser = build_parser(command if command in COMMANDS else "")
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except KeyboardInterrupt as stop:
        # a search's stop rule raises a KeyboardInterrupt that knows its signal (SIGTERM: 143)
        code = int(getattr(stop, "exit_code", 130))
        print("vitrank: stopped." if code != 130 else "vitrank: interrupted.", file=sys.stderr)
        return code
    except Exception as error:
        if args.verbose:
            raise
        usage = _is_usage_error(error)
        message = str(error) or type(error).__name__
        print(f"vitrank {args.command}: error: {message}", file=sys.stderr)
        if not usage:
            print("(rerun with --verbose for the traceback)", file=sys.stderr)
        return USAGE_ERROR if usage else FAILURE


__all__ = ["COMMANDS", "FAILURE", "SUBCOMMANDS", "USAGE_ERROR", "build_parser", "main"]
