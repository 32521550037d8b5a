"""A whole search: settings → run directory → study → engine → Pareto set → winners.

`run_search(settings)` is what `vitrank search` and `vitrank.search` call. The Optuna
study in `study.db` is the record of every trial; a killed search resumes from it with
`resume=True`: trials that were running when it died are marked failed (and flagged
`interrupted`), baselines not yet scored are enqueued again, and only the missing number
of trials runs. No completed trial is lost or run again.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from vitrank.core.progress import progress
from vitrank.search._engines import (
    EngineJob,
    check_trial_resources,
    damaged_study,
    local_gpus,
    open_study,
    run_engine,
    storage,
)
from vitrank.search._problem import (
    BASELINE_ATTR,
    BASELINE_PARAMS_ATTR,
    check_cache,
    damaged_cache,
    define_trial,
    evaluate_trial,
    forget,
    prepare,
    problem,
)
from vitrank.search._progress import SearchProgress
from vitrank.search._rundir import RunDir, atomic_write_json, atomic_write_text
from vitrank.search._samplers import baseline_of, make_sampler
from vitrank.search._settings import BUDGET_FIELDS, SearchSettings
from vitrank.search._stop import Stopped, stop_rule, stopped
from vitrank.search._table import (
    INTERRUPTED_ATTR,
    progress_summary,
    trials_frame,
    write_pareto,
    write_trials,
)
from vitrank.search._winners import save_winners
from vitrank.search.baselines import BASELINES, forward_evaluations

if TYPE_CHECKING:
    import optuna
    from vitrank.search._problem import Problem
    from vitrank.workloads import Workload

STUDY_NAME = "vitrank"
# Settings a resumed run may change; the rest must stay as the run started.
RESUMABLE = (
    "trials",
    "engine",
    "ray_address",
    "cpus_per_trial",
    "gpus_per_trial",
    "promote",
    "finetune_top",
    "finetune_epochs",
    "finetune_images",
    "resume",
)
TABLE_EVERY_S = 5.0


def resolve_run(settings: SearchSettings, given: dict[str, Any] | None = None) -> SearchSettings:
    """The settings to run with: as given, or, on resume, run.yaml plus resumable changes."""
    run = RunDir(settings.run_dir())
    if not settings.resume:
        # A directory whose start failed before any trial (an infeasible budget, say) holds
        # no study: starting it again is safe, and its stale cache is cleared on start.
        if run.exists() and run.study_db.exists():
            raise FileExistsError(
                f"{run.root} already holds a search; continue it with --resume, or choose "
                "another --out."
            )
        _check_startable(run)
        return settings
    if not run.exists():
        raise FileNotFoundError(
            f"--resume needs a run directory with run.yaml, but {run.root} has none."
        )
    saved = SearchSettings.load(run.settings)
    given = {k: v for k, v in (given or {}).items() if v is not None}
    changes = {k: v for k, v in given.items() if k in RESUMABLE}
    before = saved.to_dict()
    conflicts = {}
    for key, value in given.items():
        if key in RESUMABLE or key in ("out", "name"):
            continue
        changed = {**before, key: value}
        if key in BUDGET_FIELDS:  # another kind of budget replaces the run's, not joins it
            changed.update({name: None for name in BUDGET_FIELDS if name != key})
        after = SearchSettings.from_dict(changed).to_dict()[key]
        if after != before[key]:
            conflicts[key] = (before[key], after)
    if conflicts:
        shown = ", ".join(f"{k}: run has {a!r}, given {b!r}" for k, (a, b) in conflicts.items())
        raise ValueError(
            f"A resumed run keeps its settings; only {', '.join(RESUMABLE)} may change ({shown})."
        )
    merged = saved.to_dict() | changes | {"out": str(run.root), "resume": True}
    return SearchSettings.from_dict(merged)


def _check_startable(run: RunDir) -> None:
    """Refuse to start a search in a directory that holds anything but a failed start.

    A new search writes run.yaml, trials tables and reports: in a folder of someone else's
    files (a report, a summary, another tool's run.yaml) it would overwrite them.
    """
    if run.root.exists() and not run.root.is_dir():
        raise FileExistsError(f"{run.root} is a file, not a run directory; choose another --out.")
    foreign = run.foreign_entries()
    problem = ""
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        problem = f"it holds {shown}"
    elif run.exists():
        try:
            SearchSettings.load(run.settings)
        except (OSError, ValueError, yaml.YAMLError) as error:
            problem = f"its run.yaml is not a vitrank search's: {error}"
    elif run.cache.exists() or run.baselines.exists():
        # A start writes run.yaml first; and a start clears the cache it finds.
        problem = "it holds cache/ or baselines/ but no run.yaml"
    if problem:
        raise FileExistsError(
            f"{run.root} is not empty and is not a vitrank run ({problem}); a new search "
            "would overwrite files there. Choose a new or empty --out, or continue your own "
            "run there with --resume."
        )


def _check_machine(settings: SearchSettings) -> None:
    """What the settings ask of this machine, refused before any work: a device that is not
    there, or Ray trials bigger than any node (Tune would wait for them forever)."""
    from vitrank.search._problem import run_device

    run_device(settings)
    if settings.engine == "ray":
        check_trial_resources(settings.cpus_per_trial, settings.trial_gpus(), settings.ray_address)


def _check_study(run: RunDir) -> None:
    """Read every trial of study.db once: a damaged file is refused before calibration."""
    with damaged_study(run.storage_url):
        rdb = storage(run.storage_url)
        for study in rdb.get_all_studies():
            rdb.get_all_trials(study._study_id, deepcopy=False)


def read_trials(run_dir: str | Path) -> Any:
    """The trials table rebuilt from a run's study.db (the one truth), without writing it.

    trials.parquet is rewritten only every few seconds and at the end, so after a killed
    or interrupted search it may miss trials; this reads them all. None when there is no
    study (or run.yaml is not one this version reads): trials.parquet is then all there is.
    """
    import optuna

    run = RunDir(run_dir)
    if not run.study_db.is_file() or run.study_db.stat().st_size == 0:
        return None
    with damaged_study(run.storage_url):
        rdb = storage(run.storage_url)
        if STUDY_NAME not in {study.study_name for study in rdb.get_all_studies()}:
            return None
        study = optuna.load_study(study_name=STUDY_NAME, storage=rdb)
        trials = study.get_trials(deepcopy=False)
    try:
        cost = SearchSettings.load(run.settings).objective_names[1]
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return trials_frame(trials, cost, study.user_attrs)


def _load_workload(settings: SearchSettings) -> Workload:
    from vitrank.workloads import WorkloadSettings

    return WorkloadSettings.of(settings).load()


def _baselines(current: Problem, names: list[str], log: Any) -> dict[str, Any]:
    """Compute (once) and save the baselines' configs; return them by name."""
    from vitrank.search.baselines import BaselineInputs, run_baselines

    run = current.run
    done = {p.stem for p in run.baselines.glob("*.json")} if run.baselines.exists() else set()
    todo = [n for n in names if n not in done and n != "_skipped"]
    skipped_path = run.baselines / "_skipped.json"
    if todo and not skipped_path.exists():
        log(f"computing baselines at the budget: {', '.join(todo)} ...")
        spectral = current.proxy("whitened", "spectral")
        inputs = BaselineInputs(
            space=current.space,
            budget=current.budget,
            score=current.quick_score(),
            spectral=spectral.score,
            latency_table=current.latency_table,
            feature_error=current.feature_error(),
        )
        configs, skipped = {}, {}
        seconds = _seconds_per_evaluation(current, inputs)
        limit = current.settings.baseline_seconds
        if limit is None:  # no limit on a GPU; a CPU run keeps each baseline to ~2 min
            limit = 0.0 if current.device.type == "cuda" else 120.0
        for name in todo:
            count = forward_evaluations(name, current.space)
            expected = count * seconds
            if limit and expected > limit:
                skipped[name] = (
                    f"left out: about {count} forward evaluations, ~{expected / 60:.1f} min on "
                    f"{current.device} (over --baseline-seconds {limit:g}; --baseline-seconds 0 "
                    "runs every baseline)"
                )
                continue
            began = time.monotonic()
            with progress(f"baseline {name}", count or None, enabled=count > 0) as advance:
                counted = _counting(inputs, advance)
                found, why = run_baselines(counted, [name])
            configs.update(found)
            skipped.update(why)
            log(
                f"baseline {name}: {'done' if found else 'skipped'} in {time.monotonic() - began:.1f} s"
            )
        for name, config in configs.items():
            config.replace(provenance={"baseline": name}).save(run.baselines / f"{name}.json")
        atomic_write_json(skipped_path, skipped)
        for name, reason in skipped.items():
            log(f"baseline {name} skipped: {reason}")
    return {n: current.baseline(n) for n in names if (run.baselines / f"{n}.json").exists()}


def _seconds_per_evaluation(current: Problem, inputs: Any) -> float:
    """The best of two timed proxy evaluations of a candidate compressed from block 0 on."""
    from dataclasses import replace

    from vitrank.spaces import ladder

    space = current.space
    choice = space.blocks[0]
    specs = list(space.dense().blocks)
    if "lowrank" in choice.ops("attn"):
        specs[0] = replace(specs[0], attn=ladder(choice, "attn", "lowrank")[0])  # type: ignore[arg-type]
    config = space.config(specs)
    times = []
    for _ in range(2):
        began = time.perf_counter()
        inputs.score(config)
        times.append(time.perf_counter() - began)
    return min(times)


def _counting(inputs: Any, advance: Any) -> Any:
    """`inputs` whose forward-pass scores advance a progress bar."""
    from dataclasses import replace

    def counted(function: Any) -> Any:
        if function is None:
            return None

        def call(config: Any) -> float:
            advance()
            return function(config)

        return call

    return replace(inputs, score=counted(inputs.score), feature_error=counted(inputs.feature_error))


def _repair_study(study: optuna.Study, storage_url: str) -> int:
    """Mark trials a killed search left running as failed+interrupted; count the scored.

    Only one search holds the run's lock, so a RUNNING trial here belongs to a dead one.
    Only complete trials count toward `--trials`: one that failed (by an error inside it,
    Ctrl-C or a kill) is run again.
    """
    from optuna.trial import TrialState

    rdb = storage(storage_url)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        rdb.set_trial_user_attr(trial._trial_id, INTERRUPTED_ATTR, True)
        rdb.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _enqueue_baselines(study: optuna.Study, current: Problem, configs: dict[str, Any]) -> None:
    """Enqueue each baseline not yet scored and not already waiting (warm start)."""
    from optuna.trial import TrialState
    from vitrank.search.baselines import raw_expressible
    from vitrank.spaces import raw_params

    present = {
        t.user_attrs.get(BASELINE_ATTR)
        for t in study.get_trials(deepcopy=False)
        if t.state in (TrialState.COMPLETE, TrialState.WAITING, TrialState.RUNNING)
    }
    raw = current.settings.parametrization == "raw"
    for name, config in configs.items():
        if name in present:
            continue
        expressible = raw and raw_expressible(config, current.space)
        study.enqueue_trial(
            raw_params(config, current.space) if expressible else {},
            user_attrs={BASELINE_ATTR: name, BASELINE_PARAMS_ATTR: expressible},
            skip_if_exists=False,
        )


def _sampler(settings: SearchSettings, current: Problem) -> optuna.samplers.BaseSampler:
    """The named sampler, wrapped for local refinement when the settings ask for it."""
    sampler = make_sampler(settings.sampler, settings.seed)
    refining = settings.refine > 0 and baseline_of(settings.sampler) is None
    if not refining or settings.parametrization != "raw":
        return sampler
    from vitrank.search._local import LocalSearchSampler

    start_after = max(1, round(settings.trials * (1 - settings.refine)))
    return LocalSearchSampler(sampler, current.space_fn, start_after, seed=settings.seed)


def _teacher_record(current: Problem, workload: Workload) -> dict[str, Any]:
    from vitrank.evaluators import evaluate_accuracy

    record: dict[str, Any] = {
        "params": float(current.space.dense_params),
        "flops": float(current.space.dense_flops),
        "accuracy": float(
            evaluate_accuracy(current.teacher, workload.val, device=current.device, progress=False)
        ),
        # the device (and dtype) the whole run computed on
        "device": str(current.device),
        "dtype": str(next(current.teacher.parameters()).dtype).removeprefix("torch."),
    }
    if current.latency_table is not None:
        record["latency_ms"] = float(current.latency_table.dense_ms)
    from vitrank.search._build import measured_latency

    # Timed as the winners are (batch, device), so that their speed-up is measured too.
    record["measured_latency_ms"] = measured_latency(
        current.teacher, workload, current.settings.batch, str(current.device)
    )
    return record


def run_search(
    settings: SearchSettings,
    workload: Workload | None = None,
    *,
    log: Any = None,
) -> Path:
    """Run (or resume) the search `settings` describe; returns the run directory.

    `workload` replaces loading `settings.workload` (tests and notebooks pass one); the
    ray engine's fine-tuning reloads the workload by name, so it then runs in-process.
    """
    import optuna
    from rich.console import Console

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar says it better
    console = Console(stderr=True)
    log = log or console.print
    _check_machine(settings)
    run = RunDir(settings.run_dir())
    watch = Stopwatch()
    with stop_rule(), run:
        try:
            _search(run, settings, workload, log, console, watch)
        except (KeyboardInterrupt, Exception) as error:
            stop = stopped(error)
            if not isinstance(stop, KeyboardInterrupt):
                raise  # an error with no stop signal behind it
            # A trial stopped between Optuna's ask and tell is still RUNNING: flag it now.
            _flag_interrupted(run)
            _write_timings(run, watch.seconds, None, str(settings.device), stopped=True)
            what = f"stopped by {stop}" if isinstance(stop, Stopped) else "interrupted"
            log(f"search {what}; continue it with --resume --out {run.root}")
            if stop is error:
                raise
            raise stop from None
    return run.root


def _flag_interrupted(run: RunDir) -> None:
    """Flag the trials a stop left RUNNING (`interrupted`); nothing when no study exists yet."""
    import optuna

    if not run.study_db.exists():
        return
    rdb = storage(run.storage_url)
    if STUDY_NAME in {study.study_name for study in rdb.get_all_studies()}:
        _repair_study(optuna.load_study(study_name=STUDY_NAME, storage=rdb), run.storage_url)


class Stopwatch:
    """Seconds per phase of one session; a phase a stop cuts short still counts."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - began


@dataclass
class _Explored:
    """What the trials left: the study's rows, the feasible front, the engine's job."""

    job: EngineJob
    rows: list[dict[str, Any]]
    front: list[dict[str, Any]]


def _search(
    run: RunDir,
    settings: SearchSettings,
    workload: Workload | None,
    log: Any,
    console: Any,
    watch: Stopwatch,
) -> None:
    """The stages: prepare, explore (the trials), rung 1, winners (rung 2), the baselines
    against the winner, finish."""
    if settings.resume and run.study_db.exists():
        _check_study(run)
    if not settings.resume and not run.study_db.exists() and run.cache.exists():
        shutil.rmtree(run.cache)  # left by a start that failed; made for other settings
    atomic_write_text(run.settings, settings.to_yaml())
    # Ray workers can rebuild only a workload that the settings name.
    by_name = workload is None
    with watch.phase("workload"):
        workload = workload or _load_workload(settings)
    current = _prepare(run, settings, workload, log, watch)
    explored = _explore(run, settings, current, workload, log, console, watch)
    with watch.phase("rung1"):
        if explored.front and settings.promote > 0:
            _rung1(current, workload, explored, log)
    with watch.phase("winners"):
        if explored.front:
            save_winners(
                current,
                workload,
                explored.rows,
                top=settings.finetune_top,
                epochs=settings.finetune_epochs,
                ray=settings.engine == "ray" and by_name,
                log=log,
            )
            explored.rows = write_trials(run, open_study(explored.job), settings.objective_names[1])
        else:
            log("no feasible trial: no winners saved (raise the budget or run more trials).")
    with watch.phase("baselines_compared"):
        if explored.front and settings.baselines:
            from vitrank.search._compare import compare_baselines

            compare_baselines(
                current,
                workload,
                explored.rows,
                finetune=settings.finetune_baselines,
                epochs=settings.finetune_epochs,
                log=log,
            )
    _write_timings(
        run, watch.seconds, open_study(explored.job), str(current.device),
        within={"compensation": current.compensation_seconds},
    )  # fmt: skip
    if explored.front and settings.promote > 0:
        from vitrank.search._fidelity import write_rungs

        write_rungs(run, explored.rows, _selection_seconds(run))


def _prepare(
    run: RunDir, settings: SearchSettings, workload: Workload, log: Any, watch: Stopwatch
) -> Problem:
    """Calibration, factors, held-out batch and sensitivity (cached), then the `Problem`."""
    with damaged_cache(run):
        check_cache(run)  # what a resumed run finds; prepare writes what is missing
        prepare(run, settings, workload, log, watch.seconds)
    forget(run.root)
    with watch.phase("load_problem"):
        return problem(run.root)


def _explore(
    run: RunDir,
    settings: SearchSettings,
    current: Problem,
    workload: Workload,
    log: Any,
    console: Any,
    watch: Stopwatch,
) -> _Explored:
    """The baselines, then the engine's trials; the trials table and the Pareto front."""
    started = time.monotonic()
    only = baseline_of(settings.sampler)
    names = [only] if only else (list(BASELINES) if settings.baselines else [])
    with watch.phase("baselines"):
        configs = _baselines(current, names, log) if names else {}
    if only and only not in configs:
        raise ValueError(f"Baseline {only!r} cannot meet the budget {current.budget}.")
    cost = settings.objective_names[1]
    job = EngineJob(
        storage_url=run.storage_url,
        study_name=STUDY_NAME,
        metrics=settings.objective_names,
        define=functools.partial(define_trial, run_dir=str(run.root.resolve())),
        evaluate=functools.partial(evaluate_trial, run_dir=str(run.root.resolve())),
        sampler=_sampler(settings, current),
        n_trials=0,
        tune_dir=run.tune,
        ray_address=settings.ray_address,
        cpus_per_trial=settings.cpus_per_trial,
        gpus_per_trial=settings.trial_gpus(),
    )
    study = open_study(job)
    done = _repair_study(study, run.storage_url)
    _enqueue_baselines(study, current, configs)
    total = 1 if only else settings.trials
    job.n_trials = max(0, total - done)
    sessions = sorted(run.tune.glob("session-*")) if run.tune.exists() else []
    job.session = f"session-{len(sessions)}"
    write_trials(run, study, cost)
    if job.n_trials:
        log(
            f"search: {job.n_trials} trial(s) to run ({done} done) with the "
            f"{settings.engine} engine, sampler {settings.sampler}, proxy {settings.proxy}, "
            f"budget {current.budget}"
        )
    with watch.phase("trials"), SearchProgress(total, done, console=console) as progress:
        job.on_trial_done = _progress_callback(run, cost, progress, total)
        run_engine(settings.engine, job)
    rows = write_trials(run, open_study(job), cost)
    budget = {
        "kind": current.budget.kind,
        "text": str(current.budget),
        "limit": float(current.budget.limit(current.space)),
    }
    front = write_pareto(
        run, rows, settings.objective_names, budget, _teacher_record(current, workload)
    )
    log(
        f"{sum(r['state'] == 'COMPLETE' for r in rows)} trials scored, "
        f"{sum(bool(r['feasible']) for r in rows)} feasible, {len(front)} on the Pareto front "
        f"({time.monotonic() - started:.0f} s)"
    )
    return _Explored(job=job, rows=rows, front=front)


def rung1_on_ray(settings: SearchSettings, device: str) -> bool:
    """Whether Ray Tune runs rung 1's candidates side by side: with the ray engine, on a
    cluster (`ray_address`) or on more than one local GPU. On one machine with one device,
    torch already spreads a candidate's distillation over every core, and Ray's workers would
    only add their start-up (each one loads the run again), so rung 1 runs here."""
    if settings.engine != "ray":
        return False
    if settings.ray_address is not None:
        return True
    return device.startswith("cuda") and local_gpus() > 1


def _rung1(current: Problem, workload: Workload, explored: _Explored, log: Any) -> None:
    """Rung 1 of the fidelity ladder, here or on Ray Tune (`rung1_on_ray`; the workload
    travels to its workers)."""
    from vitrank.search._fidelity import run_rung1

    job, settings = explored.job, current.settings
    study = open_study(job)
    ray = rung1_on_ray(settings, current.device.type)
    run_rung1(current, workload, study, storage(job.storage_url), explored.rows, ray=ray, log=log)
    explored.rows = write_trials(current.run, open_study(job), settings.objective_names[1])


def _selection_seconds(run: RunDir) -> dict[str, float]:
    """The proxy selection's time (every session's trials) beside the ladder's (plus rungs
    1 and 2), from timings.json."""
    import json

    sessions = json.loads((run.root / "timings.json").read_text())["sessions"]
    total = {
        key: round(sum(s["seconds"].get(key, 0.0) for s in sessions), 3)
        for key in ("trials", "rung1", "winners")
    }
    return {
        "proxy_selection": total["trials"],
        "rung1": total["rung1"],
        "rung2": total["winners"],
        "multi_fidelity_selection": round(total["trials"] + total["rung1"] + total["winners"], 3),
    }


def _write_timings(
    run: RunDir,
    timings: dict[str, float],
    study: Any,
    device: str,
    stopped: bool = False,
    within: dict[str, float] | None = None,
) -> None:
    """timings.json: seconds per phase of this session (a resumed run adds a session; a
    stopped one is kept too, flagged `stopped`, so every session's time counts); `within`:
    work spread over several phases (error compensation), already counted in them."""
    import json

    durations = [
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in (study.get_trials(deepcopy=False) if study is not None else [])
        if t.datetime_complete is not None and t.datetime_start is not None
    ]
    durations.sort()
    session = {
        "device": device,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
        "total_seconds": round(sum(timings.values()), 3),
        "trial_median_seconds": durations[len(durations) // 2] if durations else None,
        **({"stopped": True} if stopped else {}),
        **({"within_phases": {k: round(v, 3) for k, v in within.items()}} if within else {}),
    }
    path = run.root / "timings.json"
    sessions = []
    if path.exists():
        try:
            sessions = json.loads(path.read_text()).get("sessions", [])
        except (ValueError, AttributeError):
            sessions = []
    atomic_write_json(path, {"sessions": [*sessions, session]})


def _progress_callback(run: RunDir, cost: str, progress: SearchProgress, total: int) -> Any:
    study_storage = storage(run.storage_url)
    last_write = [0.0]

    def on_trial_done() -> None:
        import optuna

        study = optuna.load_study(study_name=STUDY_NAME, storage=study_storage)
        trials = study.get_trials(deepcopy=False)
        done, best, front = progress_summary(trials, cost)
        progress.update(done, best, front)
        now = time.monotonic()
        if now - last_write[0] > TABLE_EVERY_S or done >= total:
            write_trials(run, study, cost)
            last_write[0] = now

    return on_trial_done
