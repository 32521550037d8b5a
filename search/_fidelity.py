"""The fidelity ladder: how far past the proxy each candidate goes.

- Rung 0: the proxy, over every trial (the search itself).
- Rung 1: a short distillation of the promoted candidates: the best by the proxy and
  points spread along the feasible front, and every feasible baseline (the bar to beat).
  Successive halving stops the weaker half at each milestone: Ray Tune's
  `ASHAScheduler` with the ray engine, the same milestones in-process with the optuna
  engine. Its objective is one number, the top-1 on the selection images: training images
  that neither the calibration nor any distillation uses, never the validation split.
- Rung 2: the full fine-tune of the K best of rung 1 (`search._winners`), on the same
  distillation images, each keeping its last epoch unless an earlier one is more accurate
  on the same selection images beyond chance; the winners are ranked by it.

Each rung-1 candidate's state (weights, optimizer, schedule, step) is saved at every
milestone under `cache/rungs/`, and its accuracies are recorded on its Optuna trial (the
`rung1` study attribute, one per trial) once it is done, so a killed search resumes each
candidate where it stopped and never runs a finished one again. The candidates finished
in an earlier session count in the in-process halving; a resumed ASHA compares the
remaining ones among themselves. Rung 2 keeps each fine-tuned winner as soon as it is
done (`search._winners`), so a resumed search fine-tunes only the missing ones.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from vitrank.core.files import atomic_write
from vitrank.evaluators import RECIPE, Recipe, gather
from vitrank.evaluators.signals import Measured
from vitrank.search._pareto import pick_winners
from vitrank.search._rundir import RunDir, atomic_write_json
from vitrank.search._selection import (
    SelectionData,
    _selection,
    selection_signals,
)
from vitrank.search._table import RUNG1_ATTR, front_rows, rung_key

if TYPE_CHECKING:
    import optuna
    from torch.utils.data import Dataset
    from vitrank.search._problem import Problem
    from vitrank.workloads import Workload

# RUNG1_ATTR: {"score", "accuracy", "units", "curve", "seconds", ...} once it is done;
# RUNG2_ATTR: {"selection_score", "accuracy", "epochs", "rank"} of a fine-tuned winner.
RUNG_REPORTS = 4  # selection evaluations in a rung-1 distillation: the milestones 1, 2, 4
REDUCTION = 2  # successive halving keeps 1 in REDUCTION at each milestone
BATCH_SIZE = 64


def milestones(units: int = RUNG_REPORTS, reduction: int = REDUCTION) -> list[int]:
    """The successive-halving milestones 1, r, r², ... up to `units` (always included)."""
    steps, unit = [], 1
    while unit < units:
        steps.append(unit)
        unit *= reduction
    return [*steps, units]


# -- which candidates ----------------------------------------------------------------


def promotion_pool(rows: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The rung-1 candidates: `count` feasible configs and every feasible baseline.

    Half of `count` are the best by the proxy; the rest are spread along the (proxy, cost)
    front (`pick_winners`). Every feasible baseline is added: a short distillation is what
    tells whether the search found better than they. Distinct configs only (a baseline's
    config that a sampled trial repeated counts once, under the baseline).
    """
    feasible = [r for r in rows if r["feasible"] and r["proxy"] == r["proxy"]]
    feasible.sort(key=lambda r: (r["baseline"] is None, r["number"]))  # baselines first
    distinct: dict[str, dict[str, Any]] = {}
    for row in feasible:
        distinct.setdefault(row["config"], row)
    pool = list(distinct.values())
    if count <= 0 or not pool:
        return []
    chosen: list[dict[str, Any]] = []

    def add(row: dict[str, Any]) -> None:
        if all(row["number"] != c["number"] for c in chosen):
            chosen.append(row)

    for row in sorted(pool, key=lambda r: (r["proxy"], r["number"]))[: (count + 1) // 2]:
        add(row)
    front = [r for r in front_rows(pool) if all(r["number"] != c["number"] for c in chosen)]
    points = [(r["proxy"], r["cost"]) for r in front]
    for index in pick_winners(points, list(range(len(front))), count - len(chosen)):
        add(front[index])
    for row in sorted(pool, key=lambda r: (r["proxy"], r["number"])):
        if len(chosen) >= count:
            break
        add(row)
    for row in pool:
        if row["baseline"] is not None:
            add(row)
    return chosen


def rung1_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with a rung-1 result, best first: furthest milestone, then `by_evidence`."""
    done = [r for r in rows if r.get("rung1_score") is not None]
    done = [r for r in done if r["rung1_score"] == r["rung1_score"]]
    out: list[dict[str, Any]] = []
    for units in sorted({int(r["rung1_units"]) for r in done}, reverse=True):
        group = [r for r in done if int(r["rung1_units"]) == units]
        out += by_evidence(group, "rung1_score", "rung1_se")
    return out


def by_evidence(rows: list[dict[str, Any]], score: str, se: str) -> list[dict[str, Any]]:
    """Rows best first: the ones the best by `score` does not beat beyond its noise (two
    standard errors of the difference, `Measured.beats`) are ranked by the proxy (the
    lower-variance signal), the others after them by `score`.

    A rung measured on a few thousand images tells candidates apart only where they differ
    by more than its noise; within it, the proxy's order stands.
    """
    if not rows:
        return []

    def value(row: dict[str, Any]) -> Measured:
        return Measured(float(row[score]), float(row.get(se) or 0.0), 0)

    best = value(max(rows, key=lambda r: float(r[score])))
    close = [r for r in rows if not best.beats(value(r))]
    rest = [r for r in rows if best.beats(value(r))]
    close.sort(key=lambda r: (r["proxy"], r["number"]))
    rest.sort(key=lambda r: (-float(r[score]), r["proxy"], r["number"]))
    return close + rest


# -- the images ----------------------------------------------------------------------


def limited(dataset: Dataset, count: int | None, seed: int) -> Dataset:
    """A seeded subset of `count` images of `dataset` (all of it when None or larger)."""
    from torch.utils.data import Subset

    size = len(dataset)  # type: ignore[arg-type]
    if count is None or count >= size:
        return dataset
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return Subset(dataset, sorted(order[:count].tolist()))


def plain(signals: dict[str, Measured]) -> dict[str, list[float]]:
    """Measured signals as JSON: name -> [value, standard error]."""
    return {name: [m.value, m.se] for name, m in signals.items()}


# -- one distillation, in milestones ---------------------------------------------------


class Distillation:
    """A seeded distillation of `student` from `teacher`, run in `units` equal parts.

    The loss, optimizer and schedule are `evaluators.finetune`'s (AdamW, warm-up then
    cosine over the whole run); the batches are a seeded permutation per epoch, so the
    run is the same whether it goes in one piece or stops and resumes at a milestone
    (`state_dict` / `load_state_dict`).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        train: Dataset,
        epochs: float,
        *,
        units: int = RUNG_REPORTS,
        seed: int = 0,
        lr: float | None = None,
        alpha: float | None = None,
        batch_size: int | None = None,
        device: torch.device | str = "cpu",
        recipe: Recipe = RECIPE,
    ) -> None:
        from vitrank.evaluators.finetune import warmup_cosine

        recipe = recipe.with_changes(lr=lr, alpha=alpha, batch_size=batch_size)
        lr, weight_decay, warmup = recipe.lr, recipe.weight_decay, recipe.warmup
        batch_size, temperature, alpha = recipe.batch_size, recipe.temperature, recipe.alpha

        if epochs <= 0:
            raise ValueError(f"`rung_epochs > 0` must hold, but got {epochs}.")
        self.student, self.teacher, self.train = student, teacher, train
        self.size = len(train)  # type: ignore[arg-type]
        if self.size == 0:
            raise ValueError("the distillation has no training images.")
        self.batch_size, self.seed = batch_size, seed
        self.per_epoch = math.ceil(self.size / batch_size)
        self.total_steps = max(units, math.ceil(epochs * self.per_epoch))
        self.units = units
        self.step = 0
        self.device = torch.device(device)
        self.temperature, self.alpha = temperature, alpha
        student.to(device=self.device, dtype=torch.float32)
        teacher.to(self.device).eval()
        parameters = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            warmup_cosine(self.total_steps, max(1, round(warmup * self.total_steps))),
        )

    def boundary(self, unit: int) -> int:
        """The step at which milestone `unit` (1..units) ends."""
        return round(self.total_steps * unit / self.units)

    def _batch(self, step: int) -> tuple[Tensor, Tensor]:
        epoch, position = divmod(step, self.per_epoch)
        order = torch.randperm(
            self.size, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch)
        )
        chosen = order[position * self.batch_size : (position + 1) * self.batch_size]
        return gather(self.train, chosen.tolist())

    def run_to(self, unit: int, advance: Callable[[], None] | None = None) -> None:
        """Train until the end of milestone `unit` (nothing when already past it)."""
        from vitrank.evaluators.accuracy import input_dtype
        from vitrank.evaluators.finetune import distillation_loss

        teacher_dtype = input_dtype(self.teacher)
        end = self.boundary(unit)
        self.student.train()
        try:
            while self.step < end:
                images, labels = self._batch(self.step)
                generator_state = torch.random.get_rng_state()
                torch.manual_seed(self.seed * 7 + self.step)  # dropout, stochastic depth
                images, labels = images.to(self.device), labels.to(self.device)
                with torch.no_grad():
                    teacher_logits = self.teacher(images.to(teacher_dtype)).float()
                loss = distillation_loss(
                    self.student(images.float()),
                    teacher_logits,
                    labels,
                    self.temperature,
                    self.alpha,
                )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.schedule.step()
                torch.random.set_rng_state(generator_state)
                self.step += 1
                if advance is not None:
                    advance()
        finally:
            self.student.eval()

    def state_dict(self) -> dict[str, Any]:
        return {
            "student": {k: v.detach().cpu() for k, v in self.student.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.student.to(self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step = int(state["step"])


def _checkpoint_path(run: RunDir, number: int) -> Path:
    return run.cache / "rungs" / f"trial-{number:04d}.pt"


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a checkpoint cut short by a kill: start that candidate again
        path.unlink(missing_ok=True)
        return None


class Candidate:
    """One promoted trial's rung-1 distillation, resumable at its milestones."""

    def __init__(
        self, current: Problem, workload: Workload, row: dict[str, Any], images: int | None = None
    ) -> None:
        from vitrank.search._build import build_candidate

        settings = current.settings
        self.number = int(row["number"])
        self.run = current.run
        self.data = _selection(current, workload)
        model = build_candidate(current, workload, row, settings.compensates)
        count = images or (current.sizes.rung if current.sizes else settings.rung_images)
        train = limited(self.data.train, count, settings.seed)
        self.device = current.device
        self.distillation = Distillation(
            model, current.teacher, train, settings.rung_epochs, seed=settings.seed,
            lr=settings.finetune_lr, alpha=settings.finetune_alpha, device=self.device,
        )  # fmt: skip
        self.signal = settings.ladder_signal
        images = len(self.data.labels)
        # Every signal at each milestone (name -> [value, standard error]); the ladder's
        # decides, the others are recorded beside it.
        self.curve: list[dict[str, list[float]]] = []
        self.seconds = 0.0
        state = _load_checkpoint(_checkpoint_path(self.run, self.number))
        if state is not None and isinstance(state.get("initial"), dict):
            self.distillation.load_state_dict(state["distillation"])
            self.curve = list(state["curve"])
            self.seconds = float(state["seconds"])
            self.initial = dict(state["initial"])
        else:  # none yet, or one of an older kind: start over
            self.initial = plain(selection_signals(model, self.data, self.device))
        self._images = images

    @property
    def units(self) -> int:
        return len(self.curve)

    def _best(self, unit: int) -> dict[str, list[float]]:
        """Every signal at the best milestone up to `unit` by the ladder's signal, the model
        as built included (a distillation that hurts never ranks a candidate below what it
        was); of equal ones the latest (the most distilled)."""
        points = [self.initial, *self.curve[:unit]]
        best = points[0]
        for point in points:
            if point[self.signal][0] >= best[self.signal][0]:
                best = point
        return best

    def best(self, unit: int) -> float:
        """The ladder's signal at the best milestone up to `unit` (`_best`)."""
        return float(self._best(unit)[self.signal][0])

    def run_to(self, unit: int) -> float:
        """Distil to milestone `unit`, measuring (and saving) at each one on the way; the
        best value of the ladder's signal so far (`best`)."""
        while len(self.curve) < unit:
            began = time.perf_counter()
            self.distillation.run_to(len(self.curve) + 1)
            student = self.distillation.student
            self.curve.append(plain(selection_signals(student, self.data, self.device)))
            self.seconds += time.perf_counter() - began
            state = {
                "distillation": self.distillation.state_dict(),
                "curve": self.curve,
                "initial": self.initial,
                "seconds": self.seconds,
            }
            _save_checkpoint(_checkpoint_path(self.run, self.number), state)
        return self.best(unit)

    def record(self) -> dict[str, Any]:
        best = self._best(len(self.curve))
        return {
            "signal": self.signal,
            "score": float(best[self.signal][0]),
            "se": float(best[self.signal][1]),
            "signals": {name: float(v[0]) for name, v in best.items()},
            "accuracy": float(best["accuracy"][0]),
            "initial": float(self.initial[self.signal][0]),
            "images": self._images,
            "units": len(self.curve),
            "of_units": self.distillation.units,
            "curve": [float(point[self.signal][0]) for point in self.curve],
            "seconds": round(self.seconds, 3),
            "steps": self.distillation.step,
        }


# -- the rung ---------------------------------------------------------------------------


def _record(
    run: RunDir, study: optuna.Study, storage: Any, number: int, record: dict[str, Any]
) -> None:
    """A finished candidate's rung-1 record in the study; its checkpoint is done with."""
    storage.set_study_user_attr(study._study_id, rung_key(RUNG1_ATTR, number), record)
    _checkpoint_path(run, number).unlink(missing_ok=True)


def run_rung1(
    current: Problem,
    workload: Workload,
    study: optuna.Study,
    storage: Any,
    rows: list[dict[str, Any]],
    *,
    ray: bool,
    log: Any = print,
) -> None:
    """Promote the pool, distil it with successive halving, record each result on its trial."""
    settings = current.settings
    pool = promotion_pool(rows, settings.promote)
    if not pool or all(r.get("rung1_score") is not None for r in pool):
        return
    began = time.perf_counter()
    data = _selection(current, workload)  # start-up, before the bar counts candidates
    startup = time.perf_counter() - began  # what each Ray worker spends on it again
    plan = rung1_plan(current, workload, pool, data, log, ray=ray, startup=startup)
    pool = [r for r in pool if int(r["number"]) in plan.numbers]
    todo = [r for r in pool if r.get("rung1_score") is None]
    done = len(pool) - len(todo)
    if not todo:
        return
    log(
        f"rung 1: short distillation ({settings.rung_epochs:g} epoch(s) of {plan.images} "
        f"images) of {len(pool)} candidates ({done} done), successive halving at milestones "
        f"{milestones()} of {RUNG_REPORTS} ..."
    )
    if ray:
        _rung1_ray(current, workload, study, storage, todo, plan.images)
    else:
        # The bound holds even where the plan's estimate was short: past it, the survivors
        # of the last milestone reached stop there.
        deadline = began + plan.bound if plan.bound > 0 else None
        _rung1_halving(
            current, workload, study, storage, todo, rows, plan.images, deadline=deadline, log=log
        )


# On a CPU rung 1 is bounded like the baselines: this many seconds, unless --rung-seconds.
CPU_RUNG_SECONDS = 90.0
RUNG_MIN_IMAGES = 32  # per epoch: fewer candidates go before fewer images than this


@dataclass(frozen=True)
class RungPlan:
    numbers: tuple[int, ...]  # the candidates rung 1 distils
    images: int  # distillation images per rung-1 epoch
    seconds: float  # the estimate (0 when not bounded)
    bound: float = 0.0  # the time bound (0: none)


def _halving_work(count: int, asynchronous: bool = False) -> tuple[float, float]:
    """(epochs of distillation, selection evaluations) successive halving spends on `count`
    candidates: each milestone's survivors train the next part and are evaluated after it.
    Asynchronous halving (Ray's ASHA) may let every candidate run to the end (the first ones
    have nothing to be compared with): its worst case is counted."""
    if asynchronous:
        return float(count), float(count * (1 + len(milestones())))
    steps, trained, evaluations, previous, alive = milestones(), 0.0, float(count), 0, count
    for position, unit in enumerate(steps):
        trained += alive * (unit - previous) / RUNG_REPORTS
        evaluations += alive
        previous = unit
        alive = _survivors(count, position)
    return trained, evaluations


@dataclass(frozen=True)
class RungCosts:
    """What rung 1's parts take here, measured on its first candidate: building one (with
    compensation when the run compensates), a distillation step per image and an
    evaluation per selection image."""

    build: float
    step: float
    evaluation: float
    startup: float = 0.0  # once per rung: Ray's workers load the run and the selection split
    asynchronous: bool = False  # Ray's ASHA, counted at its worst case

    def estimate(self, count: int, images: int, epochs: float, selection: int) -> float:
        """Seconds rung 1 takes for `count` candidates at `images` per epoch."""
        trained, evaluations = _halving_work(count, self.asynchronous)
        return (
            self.startup
            + count * self.build
            + self.step * images * epochs * trained
            + self.evaluation * selection * evaluations
        )


def measure_rung_costs(
    current: Problem,
    workload: Workload,
    row: dict[str, Any],
    data: SelectionData,
    *,
    ray: bool = False,
    startup: float = 0.0,
) -> RungCosts:
    """`RungCosts` timed on one candidate: its build, then two batches of distillation."""
    from vitrank.search._build import build_candidate

    settings = current.settings
    began = time.perf_counter()
    model = build_candidate(current, workload, row, settings.compensates)
    build = time.perf_counter() - began
    train = limited(data.train, 2 * BATCH_SIZE, settings.seed)
    distillation = Distillation(
        model, current.teacher, train, 1.0, units=1, seed=settings.seed,
        lr=settings.finetune_lr, alpha=settings.finetune_alpha, device=current.device,
    )  # fmt: skip
    began = time.perf_counter()
    distillation.run_to(1)
    step = (time.perf_counter() - began) / max(len(train), 1)  # type: ignore[arg-type]
    return RungCosts(build, step, data.forward_seconds, startup if ray else 0.0, ray)


def rung1_plan(
    current: Problem,
    workload: Workload,
    pool: list[dict[str, Any]],
    data: SelectionData,
    log: Any = print,
    *,
    ray: bool = False,
    startup: float = 0.0,
) -> RungPlan:
    """The candidates and images per epoch rung 1 can afford within `rung_seconds` (on a
    CPU by default `CPU_RUNG_SECONDS`), by `RungCosts` measured on the first candidate:
    fewer images first, down to `RUNG_MIN_IMAGES`, then fewer candidates (the proxy's best
    and every baseline stay). Chosen once per run (cache/rung1_plan.json), so a resumed
    rung 1 goes on with the same plan."""
    import json

    path = current.run.cache / "rung1_plan.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        return RungPlan(
            tuple(saved["numbers"]),
            int(saved["images"]),
            float(saved["seconds"]),
            float(saved.get("bound", 0.0)),
        )
    settings = current.settings
    images = current.sizes.rung if current.sizes else (settings.rung_images or 2048)
    bound = settings.rung_seconds
    if bound is None:
        bound = CPU_RUNG_SECONDS if current.device.type == "cpu" else 0.0
    chosen = list(pool)
    estimate = 0.0
    if bound > 0:
        costs = measure_rung_costs(current, workload, pool[0], data, ray=ray, startup=startup)
        epochs, selection = settings.rung_epochs, len(data.labels)

        def seconds(count: int, per_epoch: int) -> float:
            return costs.estimate(count, per_epoch, epochs, selection)

        estimate = seconds(len(chosen), images)
        if estimate > bound:
            before = (len(chosen), images, estimate)
            trained, evaluations = _halving_work(len(chosen), costs.asynchronous)
            spare = (
                bound
                - costs.startup
                - len(chosen) * costs.build
                - costs.evaluation * selection * evaluations
            )
            fits = spare / max(costs.step * epochs * trained, 1e-12)
            images = int(min(images, max(RUNG_MIN_IMAGES, fits)))
            droppable = [r for r in chosen[1:] if r["baseline"] is None]
            while seconds(len(chosen), images) > bound and droppable:
                chosen.remove(droppable.pop())
            estimate = seconds(len(chosen), images)
            log(
                f"rung 1 bounded to {bound:g} s on {current.device.type}: {len(chosen)} "
                f"candidates (of {before[0]}), {images} images per epoch (of {before[1]}), "
                f"~{estimate:.0f} s (unbounded ~{before[2]:.0f} s; --rung-seconds 0 lifts the "
                "bound)"
            )
    plan = RungPlan(tuple(int(r["number"]) for r in chosen), images, estimate, bound)
    atomic_write_json(
        path,
        {"numbers": plan.numbers, "images": plan.images, "seconds": plan.seconds, "bound": bound},
    )
    return plan


def _running_best(scores: list[float]) -> list[float]:
    """After each entry, the best one so far."""
    out, best = [], scores[0]
    for value in scores:
        best = max(best, value)
        out.append(best)
    return out


def _prior_curves(rows: list[dict[str, Any]]) -> list[list[float]]:
    """The curves of candidates done in an earlier session (they count in the halving):
    entry u - 1 is what `Candidate.best(u)` gave at milestone u."""
    return [
        _running_best([float(r["rung1_initial"]), *map(float, r["rung1_curve"])])[1:]
        for r in rows
        if r.get("rung1_curve") is not None and r.get("rung1_initial") is not None
    ]


def _survivors(count: int, reached: int) -> int:
    """How many of `count` candidates go past milestone number `reached` (0-based)."""
    return max(1, math.ceil(count / REDUCTION ** (reached + 1)))


def _rung1_halving(
    current: Problem,
    workload: Workload,
    study: optuna.Study,
    storage: Any,
    todo: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    images: int | None = None,
    *,
    deadline: float | None = None,
    log: Any = print,
) -> None:
    """Synchronous successive halving in this process, one candidate at a time. Past
    `deadline` (`time.perf_counter()`), after the first milestone, the candidates still in
    play are recorded where they are."""
    from vitrank.core.progress import progress

    prior = _prior_curves(rows)
    steps = milestones()
    alive = list(todo)
    running: dict[int, Candidate] = {}  # candidates kept in memory between milestones
    total = len(prior) + len(todo)
    # The bar counts parts of distillation (a part: 1/RUNG_REPORTS of the rung's epochs,
    # with its evaluation), the work the halving plans, so its time left is the rung's:
    # candidates end in bursts at the milestones, not at an even pace.
    parts = _planned_parts(len(todo), total)
    with progress("rung 1 distillation parts", parts) as advance:
        counted = 0
        for position, unit in enumerate(steps):
            if position and deadline is not None and time.perf_counter() > deadline:
                for number in list(running):
                    candidate = running.pop(number)
                    _record(current.run, study, storage, number, candidate.record())
                log(
                    f"rung 1 reached its time bound after milestone {steps[position - 1]} of "
                    f"{RUNG_REPORTS}: {len(alive)} candidate(s) stop there (--rung-seconds)"
                )
                break
            scores: dict[int, float] = {}
            for row in alive:
                number = int(row["number"])
                candidate = (
                    running.pop(number)
                    if number in running
                    else Candidate(current, workload, row, images)
                )
                before = candidate.units
                scores[number] = candidate.run_to(unit)
                step = min(candidate.units - before, parts - counted)
                counted += step
                advance(step)
                if unit == steps[-1]:
                    _record(current.run, study, storage, number, candidate.record())
                else:
                    running[number] = candidate
            if unit == steps[-1]:
                break
            # Rank this milestone's values with the earlier sessions' at the same one.
            others = [c[unit - 1] for c in prior if len(c) >= unit]
            keep = _survivors(total, position)
            # Ties (an accuracy saturates on easy data) go to the better proxy.
            ranked = sorted(
                alive, key=lambda r: (-scores[int(r["number"])], r["proxy"], r["number"])
            )
            bar = sorted([*scores.values(), *others], reverse=True)[keep - 1]
            survivors = [r for r in ranked if scores[int(r["number"])] >= bar][:keep]
            for row in alive:
                if row not in survivors:
                    candidate = running.pop(int(row["number"]))
                    _record(current.run, study, storage, candidate.number, candidate.record())
            alive = survivors
        advance(parts - counted)  # earlier sessions' candidates took places planned here


def _planned_parts(todo: int, total: int) -> int:
    """Parts of distillation synchronous halving spends on `todo` new candidates of `total`
    (the rest done in an earlier session): each milestone's survivors train on to the next
    one, at most `todo` of them."""
    parts, previous, alive = 0, 0, todo
    for position, unit in enumerate(milestones()):
        parts += alive * (unit - previous)
        previous = unit
        alive = min(todo, _survivors(total, position))
    return parts


def rung1_trainable(config: dict[str, Any], workload: Workload) -> None:
    """Ray Tune trainable: one candidate's rung-1 distillation, reported per milestone."""
    from ray import tune
    from vitrank.search._problem import problem

    current = problem(config["run_dir"])
    row = {"number": config["number"], "config": config["config"], "baseline": config["baseline"]}
    candidate = Candidate(current, workload, row, config.get("images"))
    for unit in range(1, RUNG_REPORTS + 1):
        score = candidate.run_to(unit)
        tune.report({"unit": unit, "selection_score": score, "record": candidate.record()})


def _rung1_ray(
    current: Problem,
    workload: Workload,
    study: optuna.Study,
    storage: Any,
    todo: list[Any],
    images: int | None = None,
) -> None:
    """Asynchronous successive halving: Ray Tune's ASHAScheduler over the candidates."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from vitrank.core.progress import progress
    from vitrank.search._engines import (
        check_trial_resources,
        init_ray,
        trials_done_callback,
        tune_environment,
    )

    settings = current.settings
    init_ray(settings.ray_address)
    check_trial_resources(settings.cpus_per_trial, settings.trial_gpus(), settings.ray_address)
    by_number = {int(r["number"]): r for r in todo}
    space = {
        "number": tune.grid_search(sorted(by_number)),
        "run_dir": str(current.run.root.resolve()),
        "images": images,
    }
    configs = {n: (by_number[n]["config"], by_number[n]["baseline"]) for n in by_number}
    scheduler = ASHAScheduler(
        time_attr="unit",
        max_t=RUNG_REPORTS,
        grace_period=1,
        reduction_factor=REDUCTION,
    )
    sessions = sorted(current.run.tune.glob("rung1-*")) if current.run.tune.exists() else []

    def trainable(config: dict[str, Any], workload: Workload) -> None:
        chosen, baseline = configs[config["number"]]
        rung1_trainable({**config, "config": chosen, "baseline": baseline}, workload)

    def recorded(trial: Any) -> None:
        """Each candidate's record as its trial ends (a stopped run keeps what is done)."""
        record = (trial.last_result or {}).get("record")
        if record is not None:
            _record(current.run, study, storage, int(trial.config["number"]), dict(record))

    with (
        tune_environment(),
        progress("rung 1 candidates", len(by_number)) as advance,
    ):
        tuner = tune.Tuner(
            tune.with_resources(
                # The workload travels once, through Ray's object store.
                tune.with_parameters(trainable, workload=workload),
                {"cpu": settings.cpus_per_trial, "gpu": settings.trial_gpus()},
            ),
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="selection_score", mode="max", scheduler=scheduler, reuse_actors=True
            ),
            run_config=tune.RunConfig(
                name=f"rung1-{len(sessions)}",
                storage_path=str(current.run.tune.resolve()),
                verbose=0,
                log_to_file=False,
                callbacks=[trials_done_callback(lambda: advance(), on_complete=recorded)],
            ),
        )
        results = tuner.fit()
    for index in range(len(results)):
        result = results[index]
        number = int((result.config or {})["number"])
        if result.error is not None:
            raise RuntimeError(f"rung 1 of trial {number} failed: {result.error}")
        record = (result.metrics or {}).get("record")
        if record is not None:
            _record(current.run, study, storage, number, dict(record))


# -- agreement between rungs -----------------------------------------------------------


def rung_signals() -> list[tuple[str, str, float]]:
    """(name, trials-table column, sign) of what each rung ranks by: the proxy (lower is
    better), then every registered signal at rung 1 and after rung 2."""
    from vitrank.evaluators.signals import signal_names

    return [
        ("proxy", "proxy", -1.0),
        *((f"rung1 {name}", f"rung1_{name}", 1.0) for name in signal_names()),
        *((f"rung2 {name}", f"rung2_{name}", 1.0) for name in signal_names()),
    ]


def rank_agreement(
    rows: Sequence[dict[str, Any]],
    final: str = "final_accuracy",
    signals: Sequence[tuple[str, str, float]] | None = None,
) -> dict[str, Any]:
    """Kendall τ-b (and its p-value) of each signal against `final` over the rows that have
    both (`evaluators.rank_fidelity`); a signal's sign is -1 where lower is better (the
    proxy)."""
    from vitrank.evaluators import rank_fidelity

    out: dict[str, Any] = {}
    for name, key, sign in rung_signals() if signals is None else signals:
        pairs = [
            (float(r[key]), float(r[final]))
            for r in rows
            if r.get(key) is not None and r.get(final) is not None
        ]
        agreement = rank_fidelity(
            [p[0] for p in pairs], [p[1] for p in pairs], lower_is_better=sign < 0
        )
        out[name] = {"tau": agreement.kendall_tau, "p": agreement.kendall_p, "count": agreement.n}
    return out


def write_rungs(run: RunDir, rows: list[dict[str, Any]], seconds: dict[str, float]) -> None:
    """rungs.json: each promoted candidate's scores at every rung and the rungs' times."""
    promoted = [r for r in rows if r.get("rung1_score") is not None]
    atomic_write_json(
        run.root / "rungs.json",
        {
            "candidates": [
                {
                    "number": int(r["number"]),
                    "baseline": r["baseline"],
                    "params": r["params"],
                    "cost": r["cost"],
                    "proxy": r["proxy"],
                    "rung1_signal": r.get("rung1_signal"),
                    "rung1_score": r["rung1_score"],
                    "rung1_units": r["rung1_units"],
                    **{key: r.get(key) for _, key, _ in rung_signals()[1:]},
                    "rung2_selection_score": r.get("rung2_selection_score"),
                    "final_accuracy": r.get("final_accuracy"),
                }
                for r in promoted
            ],
            "agreement": rank_agreement(promoted),
            "seconds": seconds,
        },
    )
