"""Engines that run trials against one Optuna study: in-process Optuna, or Ray Tune.

Both take the same `EngineJob`: a define-by-run function (suggests a point, records its
costs and constraints on the Optuna trial) and an evaluation function (scores the point
from the sampled parameters). Both are module-level callables or `functools.partial`s of
them, so Ray Tune can pickle them; heavy state (teacher, factors) is loaded lazily in each
process from the run directory, never pickled per trial.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitrank.core.registry import Registry
from vitrank.search._stop import TUNE_ENVIRONMENT, deferred, immediate, reinstall, stop_rule

if TYPE_CHECKING:
    import optuna

# Keys a define-by-run function returns next to the sampled parameters; they reach the
# evaluation function (and the Tune trial's config) but are not Optuna parameters.
TRIAL_ID_KEY = "__trial_id__"
METRICS_ATTR = "metrics"
VIOLATION_ATTR = "violation"  # Optuna user attr: the budget excess (<= 0 is feasible)
INTERRUPTED_ATTR = "interrupted"  # set on trials stopped by Ctrl-C or left running by a kill
_REPORT_KEY = "vitrank_metrics"


@dataclass
class EngineJob:
    storage_url: str  # sqlite:///…/study.db
    study_name: str
    metrics: tuple[str, ...]  # result keys told to Optuna, all minimised
    define: Callable[[Any], dict[str, Any]]  # (optuna trial) -> constants
    evaluate: Callable[[dict[str, Any]], dict[str, float]]  # (params + constants) -> metrics
    sampler: optuna.samplers.BaseSampler
    n_trials: int  # trials to run in this session
    tune_dir: Path | None = None  # Ray Tune's storage_path
    session: str = "session-0"  # Ray Tune experiment name of this session
    ray_address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    on_trial_done: Callable[[], None] | None = None  # driver side, after each finished trial


def _sqlite_pragmas(connection: Any, record: Any) -> None:
    # WAL with synchronous=NORMAL: a commit survives the process being killed (even by
    # SIGKILL) without an fsync per write; Optuna commits once per suggested parameter.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def storage(url: str) -> optuna.storages.RDBStorage:
    """The run's Optuna RDB storage (sqlite)."""
    import optuna
    from sqlalchemy import event

    with damaged_study(url):
        # A generous timeout: Ray's driver and the table writer share the file.
        rdb = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    if url.startswith("sqlite"):
        event.listen(rdb.engine, "connect", _sqlite_pragmas)
        rdb.engine.dispose()  # reconnect with the pragmas
    return rdb


@contextlib.contextmanager
def damaged_study(url: str) -> Iterator[None]:
    """sqlite's errors for a damaged study.db, as a ValueError naming the file and the fix.

    Busy or locked databases (OperationalError) are not damage and pass unchanged.
    """
    from sqlalchemy import exc

    try:
        yield
    except exc.DatabaseError as error:
        if isinstance(error, exc.OperationalError):
            raise
        where = url.removeprefix("sqlite:///")
        raise ValueError(
            f"{where} is damaged ({error.orig}); it is the record of the run's trials, so the "
            "run cannot be resumed or reported from it: restore it from a backup, or start "
            "the search again with another --out."
        ) from error


def open_study(job: EngineJob) -> optuna.Study:
    import optuna

    return optuna.create_study(
        storage=storage(job.storage_url),
        study_name=job.study_name,
        directions=["minimize"] * len(job.metrics),
        sampler=job.sampler,
        load_if_exists=True,
    )


def _objective(trial: optuna.Trial, job: EngineJob) -> list[float]:
    # Everything the trial does is inside the try, the write of its metrics too: a stop
    # landing there would otherwise leave a failed trial that is not flagged.
    try:
        with immediate():
            return _evaluate_trial(trial, job)
    except KeyboardInterrupt:
        # Optuna marks it failed; the flag says it did not fail by itself.
        trial.set_user_attr(INTERRUPTED_ATTR, True)
        raise


def _evaluate_trial(trial: optuna.Trial, job: EngineJob) -> list[float]:
    constants = job.define(trial)
    metrics = job.evaluate({**trial.params, **constants})
    trial.set_user_attr(METRICS_ATTR, metrics)
    return [metrics[name] for name in job.metrics]


class _QuietInterrupt(logging.Filter):
    """Drops Optuna's report of a trial stopped by Ctrl-C (a warning with the whole
    KeyboardInterrupt traceback, then its value); other failures are still logged."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            self.interrupted = True
        return not self.interrupted


def run_optuna(job: EngineJob) -> None:
    """`study.optimize` in this process, one trial at a time."""
    import functools

    study = open_study(job)
    callbacks = []
    if job.on_trial_done is not None:
        done = job.on_trial_done
        callbacks.append(lambda study, trial: done())
    # Optuna's trial runner logs through its module's logger before it re-raises.
    logger, quiet = logging.getLogger("optuna.study._optimize"), _QuietInterrupt()
    logger.addFilter(quiet)

    # A signal outside a trial's objective (while Optuna samples or tells) is held until
    # Optuna has recorded the trial: its trial runner loses a KeyboardInterrupt that lands
    # in its tell step (an UnboundLocalError from its `finally` replaces it).
    def no_more_trials() -> None:
        with contextlib.suppress(RuntimeError):  # outside the optimize loop: nothing to stop
            study.stop()

    try:
        with stop_rule(), deferred(on_signal=no_more_trials):
            study.optimize(
                functools.partial(_objective, job=job),
                n_trials=job.n_trials,
                callbacks=callbacks,
                gc_after_trial=False,
                show_progress_bar=False,
            )
    finally:
        logger.removeFilter(quiet)


def _tune_trial(config: dict[str, Any], evaluate: Callable[[dict[str, Any]], dict]) -> None:
    from ray import tune

    metrics = evaluate(config)
    # The flat keys are what OptunaSearch tells Optuna; the nested copy is what the
    # recorder stores on the Optuna trial.
    tune.report({**metrics, _REPORT_KEY: metrics})


def _trial_name(trial: Any) -> str:
    # Tune's default names spell out the whole config: long paths for many knobs.
    return f"trial_{trial.config.get(TRIAL_ID_KEY, trial.trial_id)}"


def init_ray(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Start (or join, with `address`) Ray once per process."""
    import ray

    if ray.is_initialized():
        return
    # A single-machine session needs no token; this silences Ray's warning about it.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    else:
        from vitrank.search._ray_session import mark_session, reap_orphans

        reap_orphans()  # agents of a local Ray whose vitrank driver was killed
        context = ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1,
            num_gpus=num_gpus,
            include_dashboard=False,
            log_to_driver=False,
        )
        session = getattr(context, "address_info", {}).get("session_dir")
        if session:
            mark_session(session)
    reinstall()  # ray.init installs a SIGTERM handler of its own (exit 1, no resume line)


def local_gpus() -> int:
    """CUDA GPUs this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_trial_resources(cpus: float, gpus: float, address: str | None = None) -> None:
    """Refuse a per-trial request that no node can meet: Tune would wait for it forever.

    Before vitrank starts a local Ray the machine's CPUs and GPUs are compared (no Ray is
    started for it); in a Ray session already running, or on the cluster at `address`, the
    nodes alive now. An autoscaling cluster's future nodes are not counted.
    """
    import ray

    if address or ray.is_initialized():
        init_ray(address)
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        where = f"the Ray cluster at {address}" if address else "the running Ray session"
    else:
        nodes = [{"CPU": float(os.cpu_count() or 1), "GPU": float(local_gpus())}]
        where = "this machine"
    if any(n.get("CPU", 0.0) >= cpus and n.get("GPU", 0.0) >= gpus for n in nodes):
        return
    shown = "; ".join(f"{n.get('CPU', 0.0):g} CPU, {n.get('GPU', 0.0):g} GPU" for n in nodes)
    raise ValueError(
        f"a trial asks for {cpus:g} CPU and {gpus:g} GPU (--cpus-per-trial, --gpus-per-trial), "
        f"but no node of {where} has that much ({shown or 'no node alive'}), so no trial could "
        "ever start; ask for less per trial, or use --engine optuna."
    )


def _recorder(job: EngineJob) -> Any:
    from ray.tune import Callback

    class StudyRecorder(Callback):
        """Stores each trial's metrics on its Optuna trial before OptunaSearch tells it.

        Tune pickles its callbacks with the experiment state; only the storage URL travels
        (the driver-side progress hook and the database connection do not pickle).
        """

        def __init__(self, storage_url: str, on_trial_done: Callable[[], None] | None) -> None:
            self.storage_url = storage_url
            self.on_trial_done = on_trial_done
            self._storage: Any = None

        def __getstate__(self) -> dict[str, Any]:
            return {"storage_url": self.storage_url, "on_trial_done": None, "_storage": None}

        def on_trial_result(self, iteration, trials, trial, result, **info):  # type: ignore[override]
            trial_id = trial.config.get(TRIAL_ID_KEY)
            metrics = result.get(_REPORT_KEY)
            if trial_id is None or metrics is None:
                return
            if self._storage is None:
                self._storage = storage(self.storage_url)
            self._storage.set_trial_user_attr(trial_id, METRICS_ATTR, metrics)

        def on_trial_complete(self, iteration, trials, trial, **info):  # type: ignore[override]
            if self.on_trial_done is not None:
                self.on_trial_done()

        def on_trial_error(self, iteration, trials, trial, **info):  # type: ignore[override]
            if self.on_trial_done is not None:
                self.on_trial_done()

    return StudyRecorder(job.storage_url, job.on_trial_done)


def trials_done_callback(
    advance: Callable[[], None], on_complete: Callable[[Any], None] | None = None
) -> Any:
    """A Ray Tune callback that calls `advance` in the driver as each trial ends: finished,
    stopped early by a scheduler, or failed (a live count for the rungs' Tuners). A trial
    that ended without an error is first handed to `on_complete` (the Tune trial: its
    `config` and `last_result`), so that its result is recorded as it arrives, not when
    the whole Tune run returns."""
    from ray.tune import Callback

    class TrialsDone(Callback):
        def __init__(self, hook: Callable[[], None] | None, done: Any) -> None:
            self.hook, self.done = hook, done

        def __getstate__(self) -> dict[str, Any]:
            return {"hook": None, "done": None}  # the driver's hooks do not pickle

        def on_trial_complete(self, iteration, trials, trial, **info):  # type: ignore[override]
            if self.done is not None:
                self.done(trial)
            if self.hook is not None:
                self.hook()

        def on_trial_error(self, iteration, trials, trial, **info):  # type: ignore[override]
            if self.hook is not None:
                self.hook()

    return TrialsDone(advance, on_complete)


def run_ray(job: EngineJob) -> None:
    """Ray Tune's Tuner with OptunaSearch on the same study; actors are reused."""
    with stop_rule(), tune_environment():
        _run_tuner(job)


@contextlib.contextmanager
def tune_environment() -> Iterator[None]:
    """The environment of every Tune run vitrank starts (`TUNE_ENVIRONMENT`: vitrank's stop
    rule, no per-trial loggers), set where not already and restored after the block: the
    caller's own Tune runs keep Tune's defaults."""
    added = [key for key in TUNE_ENVIRONMENT if key not in os.environ]
    for key in added:
        os.environ[key] = TUNE_ENVIRONMENT[key]
    # Tune's own console output, and the result-file warnings its disabled loggers cause
    # ("Failed to fetch metrics"): every Tune run's, resumed ones included.
    logging.getLogger("ray.tune").setLevel(logging.WARNING)
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _run_tuner(job: EngineJob) -> None:
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    init_ray(job.ray_address)
    check_trial_resources(job.cpus_per_trial, job.gpus_per_trial, job.ray_address)
    import ray

    cpus = ray.cluster_resources().get("CPU", 1.0)
    concurrent = job.max_concurrent or max(1, int(cpus // job.cpus_per_trial))
    searcher = OptunaSearch(
        space=job.define,
        metric=list(job.metrics),
        mode=["min"] * len(job.metrics),
        sampler=job.sampler,
        storage=storage(job.storage_url),
        study_name=job.study_name,
    )
    trainable = tune.with_resources(
        tune.with_parameters(_tune_trial, evaluate=job.evaluate),
        {"cpu": job.cpus_per_trial, "gpu": job.gpus_per_trial},
    )
    assert job.tune_dir is not None, "the ray engine needs `tune_dir`"
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=job.n_trials,
            max_concurrent_trials=concurrent,
            reuse_actors=True,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=job.session,
            storage_path=str(Path(job.tune_dir).resolve()),
            verbose=0,
            callbacks=[_recorder(job)],
            log_to_file=False,
        ),
    )
    tuner.fit()


ENGINES: Registry[Callable[[EngineJob], None]] = Registry("engine")
ENGINES.add("ray", run_ray)
ENGINES.add("optuna", run_optuna)


def run_engine(name: str, job: EngineJob) -> None:
    engine = ENGINES.get(name)
    if job.n_trials > 0:
        engine(job)
