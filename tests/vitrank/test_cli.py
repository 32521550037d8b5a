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
