"""`vitrank apply / eval / export` on a tiny saved teacher and a compressed winner of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vitrank.cli import main

CALIB = 64
TEACHER_ARGS = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)


def _save_teacher(directory: Path, **overrides) -> str:
    import timm.models

    from tests.conftest import make_tiny_vit

    args = {**TEACHER_ARGS, **overrides}
    timm.models.save_for_hf(
        make_tiny_vit(**args), str(directory), model_args=args, safe_serialization=True
    )
    return f"local-dir:{directory}"


@pytest.fixture(scope="module")
def winner(tmp_path_factory):
    """A teacher on the digits and a winner of it: every operator, merging included."""
    from vitrank.core.spec import AttentionSpec, BlockSpec, MlpSpec
    from vitrank.core.structure import inspect_vit
    from vitrank.evaluators.calibration import calibrate
    from vitrank.spaces import CompressionConfig
    from vitrank.workloads import load_workload

    from vitrank.api import compress, save

    root = tmp_path_factory.mktemp("reuse")
    model = _save_teacher(root / "teacher")
    workload = load_workload(model=model, calib_size=CALIB)
    blocks = (
        BlockSpec(
            AttentionSpec("heads", qk_rank=4, vo_rank=8), MlpSpec("prune", hidden_kept=64), 0.25
        ),
        BlockSpec(
            AttentionSpec("lowrank", qkv_rank=8, proj_rank=8),
            MlpSpec("lowrank", fc1_rank=8, fc2_rank=16),
        ),
    )
    config = CompressionConfig(
        workload.model_name,
        workload.model_args,
        inspect_vit(workload.model, workload.model_name),
        blocks,
        provenance={"workload": {"model": model}},
    )
    student = compress(
        workload.model, config, calibrate(workload.model, workload.calib, progress=False)
    )
    save(student, root / "winner")
    images = torch.stack([workload.val[i][0] for i in range(16)])
    with torch.inference_mode():
        logits = student(images)
    return dict(root=root, model=model, images=images, logits=logits)


def test_apply_of_a_winner_config_reproduces_its_logits(winner):
    from vitrank.api import load

    out = winner["root"] / "applied"
    config = winner["root"] / "winner" / "config.json"
    code = main(
        [
            "apply",
            str(config),
            "--model",
            winner["model"],
            "--calib-size",
            str(CALIB),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    with torch.inference_mode():
        applied = load(out)(winner["images"])
        saved = load(winner["root"] / "winner")(winner["images"])
    torch.testing.assert_close(saved, winner["logits"])
    torch.testing.assert_close(applied, winner["logits"])


def test_apply_refuses_a_config_of_another_architecture(winner, tmp_path, capsys):
    wider = _save_teacher(tmp_path / "wider", embed_dim=48, num_heads=3)
    config = winner["root"] / "winner" / "config.json"
    code = main(["apply", str(config), "--model", wider, "--out", str(tmp_path / "out")])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) <= 2
    assert "was found for" in error[0] and "other_params: 2538 != 3802" in error[0]
    assert not (tmp_path / "out").exists()


def test_apply_of_a_missing_config_is_a_usage_error(tmp_path, capsys):
    assert main(["apply", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_reports_accuracy_params_flops_and_latency(winner, capsys):
    from vitrank.spaces import count_flops

    from vitrank.api import CONFIG_ATTRIBUTE, load

    directory = winner["root"] / "winner"
    assert main(["eval", str(directory), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    model = load(directory)
    assert result["params"] == sum(p.numel() for p in model.parameters())
    assert result["flops"] == count_flops(getattr(model, CONFIG_ATTRIBUTE))
    assert result["params"] < result["teacher"]["params"]
    assert result["flops"] < result["teacher"]["flops"]
    # The workload comes from the config's provenance: accuracy is measured on its val split.
    assert 0.0 <= result["accuracy"] <= 1.0 and 0.0 <= result["teacher"]["accuracy"] <= 1.0
    assert result["latency_ms"] > 0 and result["speedup"] > 0


def test_eval_without_a_workload_prints_costs_and_latency(winner, tmp_path, capsys):
    from vitrank.api import CONFIG_ATTRIBUTE, load, save

    model = load(winner["root"] / "winner")
    config = getattr(model, CONFIG_ATTRIBUTE)
    setattr(model, CONFIG_ATTRIBUTE, config.replace(provenance={}))
    save(model, tmp_path / "anonymous")
    assert main(["eval", str(tmp_path / "anonymous")]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "FLOPs" in out and "latency" in out
    assert "accuracy" not in out.split("speed-up")[0]  # no data: no accuracy row
    assert "--workload/--model/--data to measure accuracy" in out


def test_eval_of_a_missing_directory_is_a_usage_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "holds no saved compressed model" in capsys.readouterr().err


def test_export_matches_pytorch_logits_in_onnxruntime(winner, tmp_path, capsys):
    onnxruntime = pytest.importorskip("onnxruntime")
    from vitrank.api import load

    path = tmp_path / "winner.onnx"
    assert main(["export", str(winner["root"] / "winner"), "--onnx", str(path)]) == 0
    assert "onnxruntime matches PyTorch" in capsys.readouterr().out
    # Checked here again on real images and another batch size (the batch axis is dynamic).
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": winner["images"].numpy()})[0]
    with torch.inference_mode():
        expected = load(winner["root"] / "winner")(winner["images"]).numpy()
    assert abs(got - expected).max() < 1e-4


def test_eval_refuses_a_teacher_of_another_architecture(winner, tmp_path, capsys):
    """A deeper teacher beside the winner gave a ratio of 10.24 and a made-up speed-up."""
    deeper = _save_teacher(tmp_path / "deeper", depth=3)
    assert main(["eval", str(winner["root"] / "winner"), "--model", deeper]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert "is not the vit_small_patch16_224 this model was compressed from" in error
    assert "number of blocks: 2 != 3" in error or "other_params" in error
    assert "speed-up would not compare" in error


def test_eval_refuses_batch_zero(winner, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["eval", str(winner["root"] / "winner"), "--batch", "0"])
    assert exited.value.code == 2 and "--batch: must be >= 1" in capsys.readouterr().err


def _edited_config(winner, tmp_path, **provenance):
    """The winner's config with block 1's qkv rank set later by the test."""
    data = json.loads((winner["root"] / "winner" / "config.json").read_text())
    data.setdefault("provenance", {}).update(provenance)
    return data, tmp_path / "config.json"


@pytest.mark.parametrize(
    ("rank", "provenance", "rule"),
    [
        (32, {}, "`qkv_rank in [1, 2,"),  # the width: a factorized layer bigger than dense
        (30, {}, "`qkv_rank in [1, 2,"),  # saves no parameters either
        (12, {"granularity": 8}, "`qkv_rank in [8, 16]` must hold"),  # off the run's grid
    ],
)
def test_apply_refuses_ranks_no_search_offers(
    winner, tmp_path, capsys, monkeypatch, rank, provenance, rule
):
    from vitrank.workloads import WorkloadSettings

    data, path = _edited_config(winner, tmp_path, **provenance)
    data["blocks"][1]["attn"]["qkv_rank"] = rank
    path.write_text(json.dumps(data))
    monkeypatch.setattr(WorkloadSettings, "load", lambda self: pytest.fail("loaded"))
    assert main(["apply", str(path), "--out", str(tmp_path / "out")]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert rule in error and f"but got qkv_rank={rank}" in error and "blocks.1.attn" in error
    assert not (tmp_path / "out").exists()  # refused before any work


def test_apply_to_an_unwritable_out_fails_before_any_work(winner, tmp_path, capsys, monkeypatch):
    from vitrank.core import files
    from vitrank.workloads import WorkloadSettings

    out = tmp_path / "read-only"
    out.mkdir()

    def denied(directory, name):
        raise PermissionError(13, "Permission denied", str(directory))

    monkeypatch.setattr(files, "_new_temp_file", denied)
    monkeypatch.setattr(WorkloadSettings, "load", lambda self: pytest.fail("loaded"))
    config = winner["root"] / "winner" / "config.json"
    assert main(["apply", str(config), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"cannot write into {out}" in error and "--out" in error


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 6-trial search on the tiny workload, registered by name (finetune
    rebuilds the workload from run.yaml)."""
    from vitrank.search import SearchSettings, run_search
    from vitrank.workloads import WORKLOADS

    from tests.search.conftest import tiny_settings, tiny_workload

    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(WORKLOADS._entries, "tiny", lambda settings: tiny_workload())
        settings = tiny_settings(tmp_path_factory.mktemp("tiny") / "run", trials=6)
        run = run_search(SearchSettings(**{**settings.to_dict(), "baselines": False}))
        yield run


def _copy_run(run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_report_of_an_interrupted_run_shows_every_trial_of_the_study(tiny_run, tmp_path):
    """trials.parquet is rewritten every few seconds: Ctrl-C can leave it behind study.db."""
    import pandas as pd

    run = _copy_run(tiny_run, tmp_path)
    stale = pd.read_parquet(run / "trials.parquet").head(2)
    stale.to_parquet(run / "trials.parquet", index=False)
    assert main(["report", str(run)]) == 0
    assert "6 trials" in (run / "summary.md").read_text()
    assert len(pd.read_csv(run / "trials.csv")) == 6
    assert pd.read_parquet(run / "trials.parquet").equals(stale)  # the search's file, untouched


def test_report_of_a_damaged_study_names_the_file_and_the_fix(tiny_run, tmp_path, capsys):
    run = _copy_run(tiny_run, tmp_path)
    (run / "study.db").write_bytes(b"not a database at all" * 100)
    assert main(["report", str(run)]) == 2
    error = " ".join(capsys.readouterr().err.split())
    assert f"{run / 'study.db'} is damaged" in error and "restore it from a backup" in error


def test_finetune_says_how_many_winners_it_fine_tuned(tiny_run, tmp_path, capsys):
    """`--top 100` on a front of a few points fine-tunes those few, and says so."""
    import pandas as pd
    from vitrank.workloads import WORKLOADS

    from tests.search.conftest import tiny_workload

    run = _copy_run(tiny_run, tmp_path)
    (run / "run.yaml").write_text((run / "run.yaml").read_text().replace(str(tiny_run), str(run)))
    front = int(pd.read_parquet(run / "trials.parquet")["feasible"].sum())
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(WORKLOADS._entries, "tiny", lambda settings: tiny_workload())
        assert main(["finetune", str(run), "--top", "100", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    tuned = [p for p in (run / "winners").iterdir() if p.is_dir()]
    assert 1 <= len(tuned) <= front < 100
    assert f"fine-tuned the top {len(tuned)} winner(s)" in out


def _config_edited(winner, tmp_path, edit) -> Path:
    data = json.loads((winner["root"] / "winner" / "config.json").read_text())
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


def test_apply_refuses_a_config_whose_model_args_contradict_its_fingerprint(
    winner, tmp_path, capsys, monkeypatch
):
    from vitrank.workloads import WorkloadSettings

    path = _config_edited(winner, tmp_path, lambda d: d["model_args"].update(embed_dim=64))
    monkeypatch.setattr(WorkloadSettings, "load", lambda self: pytest.fail("calibrated first"))
    code = main(["apply", str(path), "--model", winner["model"], "--out", str(tmp_path / "o")])
    assert code == 2
    error = capsys.readouterr().err
    assert "its model_args build another model than its fingerprint describes" in error
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda d: d.update(model="hf-hub:timm/vit_tiny_patch16_224"), "would load another model"),
        (lambda d: d["model_args"].update(checkpoint_path="/etc/x"), "checkpoint_path"),
    ],
)
def test_apply_refuses_a_config_naming_other_weights_before_any_work(
    winner, tmp_path, capsys, monkeypatch, edit, says
):
    from vitrank.workloads import WorkloadSettings

    path = _config_edited(winner, tmp_path, edit)
    monkeypatch.setattr(WorkloadSettings, "load", lambda self: pytest.fail("calibrated first"))
    assert main(["apply", str(path), "--out", str(tmp_path / "o")]) == 2
    assert says in capsys.readouterr().err


def test_export_refuses_to_write_over_the_models_own_files_or_a_folder(winner, tmp_path, capsys):
    import shutil

    folder = tmp_path / "winner"
    shutil.copytree(winner["root"] / "winner", folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for target in (folder / "model.safetensors", folder / "config.json"):
        assert main(["export", str(folder), "--onnx", str(target)]) == 2
        assert "is a file of the model folder" in capsys.readouterr().err
    assert main(["export", str(folder), "--onnx", str(tmp_path)]) == 2
    assert "is a directory; give a file name" in capsys.readouterr().err
    assert main(["export", str(folder), "--onnx", str(tmp_path / "no" / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_config_nested_past_any_depth_is_a_clear_error(winner, tmp_path, capsys):
    import shutil

    folder = tmp_path / "winner"
    shutil.copytree(winner["root"] / "winner", folder)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(["eval", str(folder)]) == 2
    error = capsys.readouterr().err
    assert f"{folder / 'config.json'} is damaged" in error and "Traceback" not in error


def test_an_empty_device_is_refused_not_taken_for_auto(winner, capsys):
    assert main(["eval", str(winner["root"] / "winner"), "--device", ""]) == 2
    assert "unknown device ''" in capsys.readouterr().err
