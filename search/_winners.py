"""Winners: the top K of the feasible front, built, compensated, fine-tuned, measured, saved.

Each winner lands in `winners/<id>/` as `config.json` + `model.safetensors` (loadable with
`vitrank.load`) and `metrics.json` (accuracy before and after fine-tuning, parameters,
FLOPs, predicted and measured latency). With the ray engine the fine-tuning runs as Ray
Tune trials (in parallel where the cluster has room); otherwise in this process.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitrank.search._build import build_winner, measured_latency, validation_accuracy
from vitrank.search._pareto import pick_winners
from vitrank.search._rundir import RunDir, atomic_write_json
from vitrank.search._table import front_rows

if TYPE_CHECKING:
    from torch import nn
    from vitrank.search._problem import Problem
    from vitrank.workloads import Workload


TUNED_FILE = "finetune.json"  # a Ray rung-2 worker's figures, beside its staged model


def winner_id(number: int) -> str:
    return f"trial-{number:04d}"


def choose(rows: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The top `k` feasible rows: best proxy first, the rest spread along the front."""
    front = front_rows(rows)
    points = [(r["proxy"], r["cost"]) for r in front]
    return [front[i] for i in pick_winners(points, list(range(len(front))), k)]


def finetune_candidate(
    problem: Problem,
    workload: Workload,
    model: nn.Module,
    epochs: int,
    *,
    train_images: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Rung 2: distil `model` in place for `epochs` on the distillation images and keep
    the last epoch, unless the model as built is better by the ladder's signal on the
    selection images beyond two standard errors (`Measured.beats`): then it is handed out
    as built, never worse by the run's own held-out measure than it was. Every signal is
    then measured there (`selection_score` is the ladder's, what ranks the winners), and
    the validation split.

    The same for every config a comparison fine-tunes (benchmarks/quality.py uses it):
    the seed, learning rate and images are the run's. `train_images` distils on a seeded
    subset of that many distillation images instead (default: the run's `finetune_images`).
    """
    from vitrank.evaluators import finetune
    from vitrank.search._fidelity import limited
    from vitrank.search._selection import _selection, selection_signals

    settings = problem.settings
    signal = settings.ladder_signal
    data = _selection(problem, workload)
    train = limited(data.train, train_images or settings.finetune_images, settings.seed)
    built = selection_signals(model, data, problem.device)[signal]
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    result = finetune(
        model,
        problem.teacher,
        train,
        None,
        epochs=epochs,
        lr=settings.finetune_lr,
        alpha=settings.finetune_alpha,
        seed=settings.seed,
        device=str(problem.device),
        progress=progress,
        keep="last",
        score=lambda student: selection_signals(student, data, problem.device)[signal].value,
    )
    after = selection_signals(model, data, problem.device)
    kept = int(result.best_epoch)
    if built.beats(after[signal]):  # the fine-tuning hurt beyond the signal's noise
        model.load_state_dict(state)
        after, kept = selection_signals(model, data, problem.device), 0
    return {
        "selection_signal": signal,
        "selection_score": after[signal].value,
        "selection_se": after[signal].se,
        "selection_signals": {name: m.value for name, m in after.items()},
        "selection_accuracy": after["accuracy"].value,
        "finetuned_accuracy": validation_accuracy(model, workload, str(problem.device)),
        "best_epoch": kept,
        "finetune_history": result.history,
    }


def finetune_winner(config: dict[str, Any]) -> None:
    """Ray Tune trainable: fine-tune the model saved in `winner_dir` as rung 2 does, save it
    into its staging folder with its figures (`TUNED_FILE`)."""
    from ray import tune
    from vitrank.core.model import load, save
    from vitrank.search._problem import problem
    from vitrank.workloads import WorkloadSettings

    current = problem(config["run_dir"])
    workload = WorkloadSettings.of(current.settings).load()
    directory = Path(config["winner_dir"])
    model = load(directory).to(current.device)
    result = finetune_candidate(current, workload, model, int(config["epochs"]), progress=False)
    # Beside the winner, not over it: the driver swaps it in with its metrics (`_publish`).
    staged = staging_dir(directory)
    shutil.rmtree(staged, ignore_errors=True)
    save(model, staged)
    atomic_write_json(staged / TUNED_FILE, {**result, "finetune_epochs": int(config["epochs"])})
    tune.report({k: v for k, v in result.items() if k != "finetune_history"})


def _finetune_ray(
    run: RunDir,
    directories: list[Path],
    problem: Problem,
    epochs: int,
    session: str,
    on_done: Callable[[Path], None],
) -> None:
    """Rung 2 as Ray Tune trials; `on_done(folder)` as each winner's trial ends (its
    fine-tuned model and figures wait in the folder's staging folder)."""
    from ray import tune
    from vitrank.core.progress import progress
    from vitrank.search._engines import init_ray, trials_done_callback, tune_environment

    settings = problem.settings
    init_ray(settings.ray_address)
    space = {
        "winner_dir": tune.grid_search([str(d.resolve()) for d in directories]),
        "run_dir": str(run.root.resolve()),
        "epochs": epochs,
    }
    # Tune's experiment banner and TensorBoard hint stay out of the user's terminal; a
    # count of the winners done takes their place.
    with (
        tune_environment(),
        progress("rung 2 winners", len(directories)) as advance,
    ):
        tuner = tune.Tuner(
            tune.with_resources(
                finetune_winner, {"cpu": settings.cpus_per_trial, "gpu": settings.trial_gpus()}
            ),
            param_space=space,
            tune_config=tune.TuneConfig(reuse_actors=True),
            run_config=tune.RunConfig(
                name=session,
                storage_path=str(run.tune.resolve()),
                verbose=0,
                log_to_file=False,
                callbacks=[
                    trials_done_callback(
                        lambda: advance(),
                        on_complete=lambda trial: on_done(Path(trial.config["winner_dir"])),
                    )
                ],
            ),
        )
        results = tuner.fit()
    for index in range(len(results)):
        result = results[index]
        if result.error is not None:
            directory = (result.config or {})["winner_dir"]
            raise RuntimeError(f"fine-tuning {directory} failed: {result.error}")


def save_winners(
    problem: Problem,
    workload: Workload,
    rows: list[dict[str, Any]],
    *,
    top: int,
    epochs: int,
    ray: bool,
    log: Any = print,
    remove_others: bool = True,
) -> list[Path]:
    """Build, (compensate,) fine-tune, measure and save the top winners; their folders.

    With rung-1 results the winners are the best of rung 1 (`search._fidelity`), else the
    best proxy and points spread along the front. Fine-tuned winners (rung 2) are ranked by
    their selection accuracy; `rank` in metrics.json says the order (1 is the winner).
    Folders of earlier sessions' winners that are not among these are removed
    (`remove_others`) or ranked after them.
    """
    from vitrank.core.model import CONFIG_ATTRIBUTE
    from vitrank.search._fidelity import rung1_order
    from vitrank.spaces import count_flops, count_params, predict_latency

    settings = problem.settings
    device = str(problem.device)
    ladder = rung1_order(rows)
    chosen = ladder[: max(top, 1)] if ladder else choose(rows, max(top, 1))
    run = problem.run
    # (folder, model as built, or None when an earlier session fine-tuned it, metrics)
    records: list[tuple[Path, nn.Module | None, dict[str, Any]]] = []
    for row in chosen:
        directory = run.winners / winner_id(int(row["number"]))
        previous = _finished(directory, epochs)
        if previous is None:
            previous = _adopt_staged(problem, directory, epochs)
        if previous is not None:  # rung 2 of an earlier session: not run again
            log(f"winner {directory.name}: fine-tuned in an earlier session")
            records.append((directory, None, previous))
            continue
        log(
            f"building winner {directory.name} on {device}"
            + (" with error compensation ..." if settings.compensates else " ...")
        )
        model, metrics = build_winner(problem, workload, row, settings.compensates, device)
        config = getattr(model, CONFIG_ATTRIBUTE)
        metrics.update(
            params=int(count_params(config)),
            params_built=int(sum(p.numel() for p in model.parameters())),
            flops=int(count_flops(config)),
        )
        if row.get("rung1_accuracy") is not None:
            metrics["rung1_accuracy"] = float(row["rung1_accuracy"])
            metrics["rung1_score"] = float(row["rung1_score"])
            metrics["rung1_units"] = int(row["rung1_units"])
        if problem.latency_table is not None:
            metrics["predicted_latency_ms"] = float(predict_latency(config, problem.latency_table))
        # Measured before any fine-tuning (which keeps the structure, hence the latency), so
        # that Ray fine-tuning workers never share the cores with the measurement.
        metrics["latency_ms"] = measured_latency(model, workload, settings.batch, device)
        metrics["latency_batch"], metrics["latency_device"] = settings.batch, device
        _publish(directory, metrics, model=model)
        records.append((directory, model, metrics))
    # Fine-tune only the first `top` (the best first); the others are kept as built.
    tune_these = [d for d, m, _ in records[: top if epochs > 0 else 0] if m is not None]
    by_folder = {d.resolve(): m for d, _, m in records}
    if tune_these and ray:
        log(
            f"rung 2: fine-tuning {len(tune_these)} winner(s) for {epochs} epoch(s) as Ray Tune trials ..."
        )
        sessions = sorted(run.tune.glob("finetune-*")) if run.tune.exists() else []

        def done(directory: Path) -> None:
            metrics = by_folder[directory.resolve()]
            staged = staging_dir(directory)
            tuned = json.loads((staged / TUNED_FILE).read_text())
            _finish(problem, directory, metrics, tuned, epochs, staged=staged)

        _finetune_ray(run, tune_these, problem, epochs, f"finetune-{len(sessions)}", done)
    elif tune_these:
        for directory, built, metrics in records:
            if directory not in tune_these or built is None:
                continue
            log(f"rung 2: fine-tuning {directory.name} for {epochs} epoch(s) ...")
            tuned = finetune_candidate(problem, workload, built, epochs)
            _finish(problem, directory, metrics, tuned, epochs, model=built)
    # The winner is the best on the selection images after rung 2, where the evidence
    # tells them apart, else the best proxy (`by_evidence`); unranked ones keep rung 1's order.
    order = _rung2_order(problem, workload, [m for _, _, m in records])
    for rank, index in enumerate(order, start=1):
        directory, _, metrics = records[index]
        metrics["rank"] = rank
        atomic_write_json(directory / "metrics.json", metrics)  # the model stays as it is
    _record_rung2(problem, [records[i][2] for i in order])
    kept = [records[i][0] for i in order]
    _settle_others(run, kept, remove=remove_others, log=log)
    return kept


def staging_dir(directory: Path) -> Path:
    """Where a winner's next version is written before it replaces the folder: outside
    winners/ (nothing there is ever half a winner), on the same file system."""
    return directory.parent.parent / "cache" / "winners-staging" / directory.name


def _publish(
    directory: Path,
    metrics: dict[str, Any],
    *,
    model: nn.Module | None = None,
    staged: Path | None = None,
) -> None:
    """Replace the winner's folder by `model` (or the folder `staged` holds) with its
    metrics.json, in one step: a reader, or a run killed at any moment, finds the old
    folder or the new one (or, between the two renames, none), never weights from one
    and figures from the other."""
    from vitrank.core.model import save

    staged = staged or staging_dir(directory)
    if model is not None:
        shutil.rmtree(staged, ignore_errors=True)
        save(model, staged)
    atomic_write_json(staged / "metrics.json", metrics)
    (staged / TUNED_FILE).unlink(missing_ok=True)  # its figures are in metrics.json now
    old = staged.with_name(f"{staged.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    if directory.exists():
        directory.rename(old)
    staged.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def _adopt_staged(problem: Problem, directory: Path, epochs: int) -> dict[str, Any] | None:
    """A fine-tuning a stopped session finished but did not swap in (Ray's rung 2): its
    model and figures wait in the staging folder; they are published now."""
    staged = staging_dir(directory)
    try:
        tuned = json.loads((staged / TUNED_FILE).read_text())
        metrics = json.loads((directory / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if tuned.get("finetune_epochs") != epochs or not (staged / "model.safetensors").is_file():
        return None
    _finish(problem, directory, metrics, tuned, epochs, staged=staged)
    return metrics


def _settle_others(run: RunDir, kept: list[Path], *, remove: bool, log: Any) -> None:
    """Winner folders of earlier sessions that are no longer among this run's winners:
    removed (a search), or ranked after the kept ones (`vitrank finetune` of fewer)."""
    if not run.winners.is_dir():
        return
    chosen = {p.resolve() for p in kept}
    others = sorted(p for p in run.winners.iterdir() if p.is_dir() and p.resolve() not in chosen)
    for rank, directory in enumerate(others, start=len(kept) + 1):
        if remove:
            shutil.rmtree(directory)
            log(
                f"removed {directory.name}: an earlier session's winner, no longer among the winners"
            )
            continue
        path = directory / "metrics.json"
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        atomic_write_json(path, {**metrics, "rank": rank})


def _rung2_order(problem: Problem, workload: Workload, metrics: list[dict[str, Any]]) -> list[int]:
    from vitrank.search._fidelity import by_evidence

    tuned = [{**m, "index": i} for i, m in enumerate(metrics) if m.get("selection_se") is not None]
    if not tuned:
        return list(range(len(metrics)))
    ranked = by_evidence(
        [{**m, "proxy": m.get("proxy") or 0.0} for m in tuned], "selection_score", "selection_se"
    )
    first = [int(m["index"]) for m in ranked]
    return first + [i for i in range(len(metrics)) if i not in first]


def _finished(directory: Path, epochs: int) -> dict[str, Any] | None:
    """The metrics of a winner that an earlier session fine-tuned for `epochs` and saved."""
    path = directory / "metrics.json"
    if not (directory / "model.safetensors").is_file() or not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except ValueError:
        return None
    done = "selection_se" in metrics and metrics.get("finetune_epochs") == epochs
    return metrics if done else None


def _finish(
    problem: Problem,
    directory: Path,
    metrics: dict[str, Any],
    tuned: dict[str, Any],
    epochs: int,
    *,
    model: nn.Module | None = None,
    staged: Path | None = None,
) -> None:
    """A fine-tuned winner published with its figures at once (a killed rung 2 keeps it)."""
    metrics.update(tuned, finetune_epochs=epochs)
    _publish(directory, metrics, model=model, staged=staged)
    _record_rung2(problem, [metrics])


def _record_rung2(problem: Problem, winners: list[dict[str, Any]]) -> None:
    """Each fine-tuned winner's rung-2 figures on its Optuna trial (the trials table)."""
    from vitrank.search._engines import storage
    from vitrank.search._table import RUNG2_ATTR, rung_key

    fine_tuned = [m for m in winners if "selection_score" in m]
    if not fine_tuned or not problem.run.study_db.exists():
        return
    import optuna

    rdb = storage(problem.run.storage_url)
    names = [s.study_name for s in rdb.get_all_studies()]
    if not names:
        return
    study = optuna.load_study(study_name=names[0], storage=rdb)
    for metrics in fine_tuned:
        record = {
            "selection_score": metrics["selection_score"],
            "selection_accuracy": metrics["selection_accuracy"],
            "signals": metrics.get("selection_signals"),
            "accuracy": metrics["finetuned_accuracy"],
            "epochs": metrics.get("finetune_epochs"),
            "rank": metrics.get("rank"),
        }
        key = rung_key(RUNG2_ATTR, int(metrics["number"]))
        rdb.set_study_user_attr(study._study_id, key, record)
