"""The `vitrank` command line: subcommands, the `space` table, clean errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from vitrank.core.structure import UnsupportedModelError
from vitrank.workloads import DIGITS_MODEL_ARGS

from vitrank.cli import SUBCOMMANDS, build_parser, main


def _vitrank(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vitrank", *args], capture_output=True, text=True, timeout=300
    )


def test_help_lists_every_planned_subcommand():
    result = _vitrank("--help")
    assert result.returncode == 0
    for name in ("search", "report", "apply", "eval", "finetune", "export", "latency", "space"):
        assert name in result.stdout
    assert set(SUBCOMMANDS) == {
        "search", "report", "apply", "eval", "finetune", "export", "latency", "space"
    }  # fmt: skip


def test_space_prints_the_teachers_blocks_with_shapes():
    result = _vitrank("space", "--workload", "digits-vit")
    assert result.returncode == 0, result.stderr
    for i in range(4):
        assert f"blocks.{i}" in result.stdout
    row = next(line for line in result.stdout.splitlines() if "blocks.0" in line)
    dim, heads = DIGITS_MODEL_ARGS["embed_dim"], DIGITS_MODEL_ARGS["num_heads"]
    hidden = int(dim * DIGITS_MODEL_ARGS["mlp_ratio"])
    assert row.replace("│", " ").split()[1:5] == [
        str(dim),
        str(heads),
        str(dim // heads),
        str(hidden),
    ]
    assert "tokens 17 (1 prefix)" in result.stdout


def test_search_with_a_non_vit_fails_cleanly(tmp_path):
    result = _vitrank("search", "--model", "resnet18", "--out", str(tmp_path / "run"))
    assert result.returncode != 0
    assert "resnet18" in result.stderr and "ViT" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2


def test_unknown_model_suggests_close_names(capsys):
    assert main(["space", "--model", "deit_smal_patch16_224"]) == 2
    err = capsys.readouterr().err
    assert "deit_small_patch16_224" in err and len(err.strip().splitlines()) <= 2


def test_verbose_shows_the_traceback(tmp_path):
    with pytest.raises(UnsupportedModelError):
        main(["search", "--model", "resnet18", "--out", str(tmp_path / "run"), "--verbose"])
    with pytest.raises(UnsupportedModelError):
        main(["--verbose", "space", "--model", "resnet18"])


def test_missing_data_folder_is_a_usage_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["space", "--data", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["report", "runs/a", "runs/b"],
        ["apply", "config.json", "--out", "out"],
        ["eval", "out", "--json"],
        ["finetune", "runs/a", "--top", "2"],
        ["export", "out", "--onnx", "m.onnx"],
    ],
)
def test_handlers_parse_their_options(argv):
    args = build_parser().parse_args(argv)
    assert args.command == argv[0]


def test_search_options_parse():
    args = build_parser().parse_args(
        [
            "search",
            "--budget-params",
            "0.5",
            "--ops",
            "lowrank,heads",
            "--proxy",
            "spectral",
            "--parametrization",
            "budgeted",
            "--trials",
            "20",
            "--sampler",
            "nsga2",
            "--engine",
            "optuna",
            "--ray-address",
            "127.0.0.1:6379",
            "--cpus-per-trial",
            "1",
            "--gpus-per-trial",
            "0",
            "--finetune-top",
            "2",
            "--finetune-epochs",
            "3",
            "--out",
            "runs/x",
            "--resume",
            "--calib-size",
            "64",
            "--seed",
            "1",
        ]
    )
    assert (args.budget_params, args.trials, args.engine, args.resume) == (
        "0.5",
        20,
        "optuna",
        True,
    )
    assert args.calib_size == 64 and args.finetune_top == 2
    with pytest.raises(SystemExit):
        build_parser().parse_args(["search", "--engine", "spark"])


def _options(parser):
    sub = next(
        a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction)
    )
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.option_strings and action.dest not in ("help", "verbose"):
                yield name, action


def test_no_cli_default_differs_from_its_settings_default():
    """The settings decide every default: an option passes None when not given, and where
    its help names a default it is the settings' own (SearchSettings, WorkloadSettings)."""
    import dataclasses
    import re

    from vitrank.search import SearchSettings
    from vitrank.workloads import WorkloadSettings

    defaults = {f.name: f.default for f in dataclasses.fields(WorkloadSettings)}
    defaults.update(
        {f.name: f.default for f in dataclasses.fields(SearchSettings) if f.default is not None}
    )
    defaults["budget_params"] = SearchSettings().budget_params  # filled in when none is given
    checked = 0
    for command, action in _options(build_parser()):
        if action.dest not in defaults:
            continue
        assert action.default is None, f"{command} --{action.dest}: default {action.default!r}"
        shown = re.search(r"\(default:? ([^;,)]+)", action.help or "")
        if shown and defaults[action.dest] is not None:
            value = shown.group(1).split()[0]  # "1 for latency": the number
            assert value == str(defaults[action.dest]), (
                f"`vitrank {command}` --{action.dest} says default {value}, "
                f"the settings {defaults[action.dest]!r}"
            )
            checked += 1
    assert checked >= 20


def test_every_search_option_is_a_setting_and_every_cli_setting_an_option():
    import dataclasses

    from vitrank.search import SearchSettings

    fields = {f.name: f for f in dataclasses.fields(SearchSettings)}
    options = {a.dest for c, a in _options(build_parser()) if c == "search"}
    assert options - set(fields) == {"config"}
    assert {n for n, f in fields.items() if f.metadata.get("help")} == options - {"config"}


def test_help_without_a_subcommand_builds_no_subcommand_options():
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from vitrank.cli import main\n"
         "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
         "print('torch' in sys.modules, 'vitrank.search' in sys.modules)"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.stdout.strip().splitlines()[-1] == "False False"
