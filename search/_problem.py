"""What a trial needs: prepared once per run on disk, loaded once per process.

`prepare` (the driver, once) calibrates the teacher and writes everything a trial reads to
`runs/<name>/cache/`: the teacher's weights, calibration statistics, whitened (and plain)
factors, a fixed held-out batch, the spectral proxy's per-layer sensitivity and, for a
latency budget, the latency table. `problem(run_dir)` loads those files once per process
(the driver, and each Ray worker) and keeps them in a module-level cache, so neither the
teacher nor the factors are ever pickled with a trial.

`define_trial` (Optuna's define-by-run function) and `evaluate_trial` (scores sampled
parameters) are module level and take the run directory as their only extra argument, so
`functools.partial(define_trial, run_dir=...)` pickles for Ray Tune.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import Dataset
from vitrank.search._engines import TRIAL_ID_KEY, VIOLATION_ATTR
from vitrank.search._rundir import RunDir, atomic_write_json
from vitrank.search._settings import SearchSettings

if TYPE_CHECKING:
    from torch import Tensor, nn
    from vitrank.core.factorize import FactorCache
    from vitrank.core.stats import CalibrationStats
    from vitrank.evaluators.proxies import Proxy
    from vitrank.spaces import Budget, CompressionConfig, LatencyTable, SearchSpace, SpaceFunction
    from vitrank.workloads import Workload

BASELINE_KEY = "__baseline__"  # constant naming the baseline a trial replays ("" for none)
BASELINE_ATTR = "baseline"  # Optuna user attr of enqueued baseline trials
BASELINE_PARAMS_ATTR = "baseline_params"  # True when the baseline was enqueued with raw params
HELDOUT_SIZE = 256  # the most held-out images the logits proxy scores on
SENSITIVITY_IMAGES = 64  # the most held-out images for per-term sensitivity and baselines
# Floating-point work one proxy evaluation may take on a CPU (a forward pass over the
# held-out images): it sets how many held-out images a large model gets there.
CPU_PROXY_FLOPS = 3e10
# ... and one winner's error compensation (forward and backward of every block, for
# every step): it bounds the calibration images compensation refines on.
CPU_COMPENSATION_FLOPS = 1e12
# ... and the whole sensitivity phase (each term runs the blocks from its own on, about
# half the model, over the sensitivity images).
CPU_SENSITIVITY_FLOPS = 1.5e12
# Rung 1 distils each candidate on at most RUNG_IMAGES images per epoch (forward and
# backward of the student, forward of the teacher: ~4 forwards an image), on a CPU also
# bounded by CPU_RUNG_FLOPS.
RUNG_IMAGES = 2048
SELECTION_MAX = 2000  # selection images, at most (a fifth of the training images otherwise)
SELECTION_MIN = 64
CPU_RUNG_FLOPS = 4e12
SENSITIVITY_TERMS_PER_BLOCK = 8
# Calibration tokens a CPU run aims at (256 images of 50 tokens): several times the widest
# Linear input of a DeiT-B block (3072), so every covariance is well conditioned.
CPU_CALIB_TOKENS = 12_800


@dataclass(frozen=True)
class DataSizes:
    """How many images each phase uses, and why."""

    calib: int
    heldout: int
    sensitivity: int
    chosen: bool  # False when the settings gave them
    compensation: int = 64  # the first calibration images, for the winners' compensation
    rung: int = RUNG_IMAGES  # distillation images per rung-1 epoch
    # Training images only the ladder's signals read (disjoint from all the above and
    # from every distillation); None: chosen from what is left (runs of older versions).
    selection: int | None = None

    def describe(self, model: str, device: torch.device) -> str:
        how = f"chosen for {model} on {device}" if self.chosen else "as set"
        selection = "" if self.selection is None else f"{self.selection} for selection, "
        return (
            f"images: {self.calib} for calibration, {self.heldout} held out for the proxy, "
            f"{self.sensitivity} for sensitivity and baselines, {self.compensation} for "
            f"compensation, {selection}{self.rung} per rung-1 epoch ({how}; --calib-size, "
            "--heldout-size, --rung-images to change)"
        )


def selection_size(num_train: int) -> int:
    """Selection images for a training split of `num_train` (a fifth, within bounds)."""
    return min(SELECTION_MAX, max(SELECTION_MIN, num_train // 5))


def data_sizes(
    settings: SearchSettings, fingerprint: Any, device: torch.device, num_train: int | None = None
) -> DataSizes:
    """Image counts that keep each phase's cost bounded for this model on this device; a
    chosen calibration size leaves half of a training split too small for it held out."""
    from vitrank.spaces import dense_flops

    calib, heldout = settings.calib_size, settings.heldout_size
    per_image = max(dense_flops(fingerprint), 1)
    if device.type == "cpu":
        auto_heldout = int(min(HELDOUT_SIZE, max(16, CPU_PROXY_FLOPS // per_image)))
        auto_calib = int(min(256, max(16, -(-CPU_CALIB_TOKENS // fingerprint.num_tokens))))
        # a forward and a backward (3 forwards' worth) of the whole model per step
        steps = max(1, settings.compensation_steps)
        compensation = int(max(4, CPU_COMPENSATION_FLOPS // (3 * steps * per_image)))
    else:
        auto_heldout, auto_calib, compensation = HELDOUT_SIZE, 256, SENSITIVITY_IMAGES
    if num_train is not None and auto_calib >= num_train:
        auto_calib = max(1, num_train // 2)
    calib = calib or auto_calib
    sensitivity = min(SENSITIVITY_IMAGES, heldout or auto_heldout)
    if device.type == "cpu":
        terms = SENSITIVITY_TERMS_PER_BLOCK * len(fingerprint.blocks)
        sensitivity = int(
            min(sensitivity, max(8, CPU_SENSITIVITY_FLOPS // (terms * per_image / 2)))
        )
    rung = settings.rung_images or RUNG_IMAGES
    if device.type == "cpu" and settings.rung_images is None:
        rung = int(min(RUNG_IMAGES, max(64, CPU_RUNG_FLOPS // (4 * per_image))))
    heldout = heldout or auto_heldout
    selection = None
    if num_train is not None:
        # The selection split comes out of what calibration leaves; on a small training
        # split the proxy's held-out batch gives way to it (at most a third of the rest).
        rest = max(num_train - calib, 0)
        selection = min(selection_size(num_train), rest // 3)
        heldout = min(heldout, rest - selection)
        sensitivity = min(sensitivity, heldout)
    return DataSizes(
        rung=rung,
        selection=selection,
        calib=calib,
        heldout=heldout,
        sensitivity=sensitivity,
        chosen=None in (settings.calib_size, settings.heldout_size, settings.rung_images),
        compensation=min(compensation, sensitivity, calib),
    )


@dataclass
class Problem:
    """The loaded state of one run: teacher, space, budget, factors, proxies, baselines."""

    run: RunDir
    settings: SearchSettings
    teacher: nn.Module
    space: SearchSpace
    budget: Budget
    stats: CalibrationStats
    heldout: tuple[Tensor, Tensor]
    sensitivity: dict[str, float]
    latency_table: LatencyTable | None
    space_fn: SpaceFunction
    factors: dict[str, FactorCache] = field(default_factory=dict)  # by svd kind
    # The fp32 teacher the factors were made from, when `teacher` runs in fp16 / bf16.
    reference: nn.Module | None = None
    sizes: DataSizes | None = None  # the images each phase used (cache/sizes.json)
    # The fidelity ladder's distillation and selection images (search._fidelity), once made.
    selection: Any = None
    # Compensated configs built so far in this process (search._build): by config, their
    # refined parameters and whether compensation was kept.
    compensated: dict[str, tuple[dict[str, Tensor], bool]] = field(default_factory=dict)
    compensation_seconds: float = 0.0  # spent compensating, in this process

    def compensation_images(self, workload: Workload) -> Dataset:
        """The calibration images error compensation refines on: the first of the run's
        calibration images, as many as its sensitivity phase used (bounded like it)."""
        from torch.utils.data import Subset
        from vitrank.workloads import calibration_indices

        calib = self.sizes.calib if self.sizes else len(workload.calib)  # type: ignore[arg-type]
        count = self.sizes.compensation if self.sizes else calib
        indices = calibration_indices(len(workload.train), calib, self.settings.seed)  # type: ignore[arg-type]
        return Subset(workload.train, indices[:count].tolist())

    _proxies: dict[str, Proxy] = field(default_factory=dict)
    _baselines: dict[str, CompressionConfig] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Where the teacher, every candidate and the winners run."""
        return next(self.teacher.parameters()).device

    @property
    def cost_name(self) -> str:
        return self.settings.objective_names[1]

    def factor_cache(self, svd: str) -> FactorCache:
        if svd not in self.factors:
            from vitrank.core.factorize import FactorCache

            dtype = next(self.teacher.parameters()).dtype
            source = self.teacher if self.reference is None else self.reference
            with damaged_cache(self.run):
                self.factors[svd] = FactorCache.load(
                    factor_path(self.run, svd), source, dtype=dtype
                )
        return self.factors[svd]

    def proxy(self, svd: str | None = None, name: str | None = None) -> Proxy:
        """The run's proxy (or `name`) over factors of kind `svd` (default: the run's)."""
        from vitrank.evaluators.proxies import ProxyInputs, create_proxy

        svd = svd or self.settings.svd
        name = name or self.settings.proxy
        key = f"{name}/{svd}"
        if key not in self._proxies:
            inputs = ProxyInputs(
                teacher=self.teacher,
                factors=self.factor_cache(svd),
                stats=self.stats,
                heldout_images=self.heldout[0],
                heldout_labels=self.heldout[1],
                sensitivity=self.sensitivity,
            )
            self._proxies[key] = create_proxy(name, inputs)
        return self._proxies[key]

    def _quick(self) -> Any:
        from vitrank.evaluators.proxies import LogitsProxy

        key = "quick"
        if key not in self._proxies:
            self._proxies[key] = LogitsProxy(
                self.teacher,
                self.factor_cache("whitened"),
                self.stats,
                self.heldout[0][:SENSITIVITY_IMAGES],
            )
        return self._proxies[key]

    def quick_score(self) -> Any:
        """The logits KL on the first `SENSITIVITY_IMAGES` held-out images (whitened)."""
        return self._quick().score

    def feature_error(self) -> Any:
        """The final features' normalised error on the same images (FLAR-SVD's criterion)."""
        return self._quick().feature_error

    def baseline(self, name: str) -> CompressionConfig:
        if name not in self._baselines:
            from vitrank.spaces import CompressionConfig

            self._baselines[name] = CompressionConfig.load(self.run.baselines / f"{name}.json")
        return self._baselines[name]

    def costs(self, config: CompressionConfig) -> dict[str, float]:
        """Exact params and FLOPs; predicted latency when the run has a latency table."""
        from vitrank.spaces import count_flops, count_params, predict_latency

        costs = {"params": float(count_params(config)), "flops": float(count_flops(config))}
        if self.latency_table is not None:
            costs["latency_ms"] = float(predict_latency(config, self.latency_table))
        return costs

    def violation(self, config: CompressionConfig) -> float:
        return float(self.budget.violation(config, self.space, self.latency_table))

    def score(self, config: CompressionConfig) -> dict[str, float]:
        """Proxy metrics (`proxy` is the one minimised) and costs of one config."""
        proxy = self.proxy(config.svd)
        metrics = {k: float(v) for k, v in proxy.evaluate(config).items()}
        return {"proxy": metrics[proxy.metric], **metrics, **self.costs(config)}

    def define(self, trial: Any) -> dict[str, Any]:
        """Suggest a config, record its costs and budget constraint; return the constants."""
        baseline = str(trial.user_attrs.get(BASELINE_ATTR) or "")
        if baseline:
            config = self.baseline(baseline)
            if trial.user_attrs.get(BASELINE_PARAMS_ATTR):
                # The enqueued raw params of the baseline: recorded so the sampler learns.
                self.space_fn.suggest(trial)
        else:
            config = self.space_fn.suggest(trial)
        violation = self.violation(config)
        trial.set_constraint("budget", violation)
        from vitrank.spaces import CONFIG_ATTR

        trial.set_user_attr(CONFIG_ATTR, config.to_json(indent=None))
        trial.set_user_attr(VIOLATION_ATTR, violation)
        trial.set_user_attr("costs", self.costs(config))
        return {TRIAL_ID_KEY: trial._trial_id, BASELINE_KEY: baseline}

    def config_of(self, values: dict[str, Any]) -> CompressionConfig:
        """The config of a trial, rebuilt from its sampled parameters (or its baseline)."""
        baseline = values.get(BASELINE_KEY)
        if baseline:
            return self.baseline(baseline)
        params = {k: v for k, v in values.items() if not k.startswith("__")}
        return self.space_fn.config_of(params)


_PROBLEMS: dict[str, Problem] = {}


def problem(run_dir: str | Path) -> Problem:
    """The run's `Problem`, loaded from disk once per process."""
    key = str(Path(run_dir).resolve())
    if key not in _PROBLEMS:
        with damaged_cache(RunDir(key)):
            _PROBLEMS[key] = load_problem(RunDir(key))
    return _PROBLEMS[key]


def forget(run_dir: str | Path) -> None:
    """Drop a cached problem (after its files changed)."""
    _PROBLEMS.pop(str(Path(run_dir).resolve()), None)


def define_trial(trial: Any, run_dir: str) -> dict[str, Any]:
    """Optuna define-by-run function of a run (partial on `run_dir` for Ray Tune)."""
    return problem(run_dir).define(trial)


def evaluate_trial(values: dict[str, Any], run_dir: str) -> dict[str, float]:
    """Score the config that a trial's sampled parameters (and constants) describe."""
    current = problem(run_dir)
    return current.score(current.config_of(values))


# ---- preparing and loading the cache -------------------------------------------------


def factor_path(run: RunDir, svd: str) -> Path:
    return run.cache / f"factors-{svd}.safetensors"


def _paths(run: RunDir) -> dict[str, Path]:
    c = run.cache
    return {
        "teacher": c / "teacher.safetensors",
        "teacher_meta": c / "teacher.json",
        "stats": c / "stats.safetensors",
        "heldout": c / "heldout.safetensors",
        "sensitivity": c / "sensitivity.json",
        "latency": c / "latency.json",
        "sizes": c / "sizes.json",
    }


def needs_latency_table(settings: SearchSettings) -> bool:
    return settings.budget_latency is not None or settings.objective_names[1] == "latency_ms"


def make_budget(settings: SearchSettings) -> Budget:
    from vitrank.spaces import parse_budget

    if settings.budget_latency is not None:
        return parse_budget(
            settings.budget_latency,
            kind="latency",
            batch=settings.batch,
            device=str(run_device(settings)),
        )
    if settings.budget_flops is not None:
        return parse_budget(settings.budget_flops, kind="flops")
    return parse_budget(str(settings.budget_params), kind="params")


def make_space(settings: SearchSettings, teacher: nn.Module, meta: dict[str, Any]) -> SearchSpace:
    from vitrank.spaces import build_space

    return build_space(
        teacher,
        ops=settings.ops or (),
        granularity=settings.granularity,
        model_name=meta["model_name"],
        model_args=meta["model_args"],
        svd=settings.svd,
        shrinkage=settings.shrinkage,
    )


def run_device(settings: SearchSettings) -> torch.device:
    """The device the run computes on (``auto``: the first CUDA GPU, else the CPU).

    A Ray trial that asked for no GPU sees none (Ray hides them): it runs on the CPU.
    """
    import os

    from vitrank.core.device import resolve_device

    if os.environ.get("CUDA_VISIBLE_DEVICES") == "" and settings.device != "cpu":
        return torch.device("cpu")
    return resolve_device(settings.device)


def prepare(
    run: RunDir,
    settings: SearchSettings,
    workload: Workload,
    log: Any = print,
    timings: dict[str, float] | None = None,
) -> None:
    """Write everything trials read to `run.cache` (skipping files already there).

    Every step runs on the run's device; the statistics are stored once (stats.safetensors)
    and the factors once per SVD kind. `timings` receives each phase's seconds.
    """
    import time

    timings = {} if timings is None else timings
    clock = [time.perf_counter()]

    def lap(phase: str) -> None:
        now = time.perf_counter()
        timings[phase] = timings.get(phase, 0.0) + now - clock[0]
        clock[0] = now

    from safetensors.torch import save_file
    from torch.utils.data import Subset
    from vitrank.core.factorize import FactorCache
    from vitrank.core.files import atomic_write
    from vitrank.core.stats import CalibrationStats
    from vitrank.core.structure import check_teacher, inspect_vit
    from vitrank.evaluators.calibration import calibrate
    from vitrank.evaluators.proxies import heldout_batch, measure_sensitivity
    from vitrank.spaces import check_feasible
    from vitrank.workloads import calibration_indices

    paths = _paths(run)
    run.cache.mkdir(parents=True, exist_ok=True)
    device = run_device(settings)
    teacher = workload.model.eval()
    check_teacher(teacher, workload.name)  # a workload passed in was not loaded by name
    meta = {"model_name": workload.model_name, "model_args": dict(workload.model_args)}
    meta |= _same_teacher(run, teacher, workload.name)
    if not paths["teacher"].exists():
        state = {k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()}
        atomic_write(paths["teacher"], lambda tmp: save_file(state, tmp))
        atomic_write_json(paths["teacher_meta"], meta)
    # The budget is checked before calibration: a budget refused costs no pass over the data.
    space = make_space(settings, teacher, meta)
    budget = make_budget(settings)
    table = None
    if needs_latency_table(settings):
        table = _latency_table(run, settings, teacher, space, log)
    check_feasible(space, budget, table)
    lap("teacher_and_latency_table")
    num_train = len(workload.train)  # type: ignore[arg-type]
    sizes = data_sizes(settings, inspect_vit(teacher), device, num_train)
    if sizes.calib >= num_train:  # checked before the pass over the data
        raise ValueError(
            f"--calib-size {sizes.calib} takes every one of the {num_train} training images; "
            "the proxy needs held-out ones: use a smaller --calib-size."
        )
    log(sizes.describe(workload.model_name, device))
    atomic_write_json(paths["sizes"], dataclasses.asdict(sizes))
    home = next(teacher.parameters()).device
    teacher = teacher.to(device)  # fp32 for the statistics (summed in fp64)
    if paths["stats"].exists():
        stats = CalibrationStats.load(paths["stats"])
    else:
        train = workload.train
        calib = Subset(train, calibration_indices(len(train), sizes.calib, settings.seed).tolist())  # type: ignore[arg-type]
        stats = calibrate(teacher, calib, progress=True)
        stats.save(paths["stats"])
    lap("calibration")
    kinds = {settings.svd}
    if settings.baselines or settings.sampler.startswith("baseline:"):
        kinds |= {"whitened", "plain"}
    for svd in sorted(kinds):
        if not factor_path(run, svd).exists():
            log(f"factorizing every layer once ({svd} SVD) on {device} ...")
            whitened = svd == "whitened"
            cache = FactorCache(
                teacher,
                stats if whitened else None,
                whitened,
                shrinkage=settings.shrinkage,
                progress=True,
            )
            cache.save(factor_path(run, svd))
            del cache
    lap("factorization")
    if not paths["heldout"].exists():
        excluded = Subset(
            workload.train,
            calibration_indices(len(workload.train), sizes.calib, settings.seed).tolist(),  # type: ignore[arg-type]
        )
        images, labels = heldout_batch(
            workload, size=sizes.heldout, seed=settings.seed, calib=excluded
        )
        tensors = {"images": images.contiguous(), "labels": labels.contiguous()}
        atomic_write(paths["heldout"], lambda tmp: save_file(tensors, tmp))
    lap("heldout_batch")
    if not paths["sensitivity"].exists():
        images = _load_tensors(paths["heldout"])["images"][: sizes.sensitivity]
        factors = FactorCache.load(factor_path(run, settings.svd), teacher)
        sensitivity = measure_sensitivity(
            teacher, factors, stats, images, progress=True, families=space.ops
        )
        atomic_write_json(paths["sensitivity"], sensitivity)
    lap("sensitivity")
    workload.model.to(home)  # the caller's teacher goes back where it was


def _latency_table(
    run: RunDir, settings: SearchSettings, teacher: nn.Module, space: SearchSpace, log: Any
) -> LatencyTable:
    from vitrank.spaces import LatencyTable, measure_latency_table

    path = _paths(run)["latency"]
    if path.exists():
        return LatencyTable.load(path)
    device = run_device(settings)
    log(f"measuring the latency table on {device} at batch {settings.batch} ...")
    table = measure_latency_table(
        teacher, device=device, batch=settings.batch, space=space, threads=1
    )
    table.save(path)
    return table


def _load_tensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as error:  # safetensors raises several types for a bad file
        raise ValueError(f"{path} is damaged or not safetensors ({error}).") from error


@contextlib.contextmanager
def damaged_cache(run: RunDir) -> Iterator[None]:
    """An error that names a file of the run's cache gets the fix: rebuild the cache.

    Everything in cache/ is computed from the teacher and the settings, so deleting it and
    resuming recomputes it; the study (every scored trial) is kept.
    """
    try:
        yield
    except (ValueError, OSError, KeyError) as error:
        if not any(str(cache) in str(error) for cache in (run.cache, run.cache.resolve())):
            raise
        raise ValueError(
            f"{error} The run's cache is damaged: delete {run.cache} and rerun with --resume "
            "(it is rebuilt from the teacher; no trial is lost)."
        ) from error


def check_cache(run: RunDir) -> None:
    """Open every file of the run's cache once (safetensors checks that its header covers
    the file; JSON is parsed), so a damaged one is refused before the first trial."""
    from safetensors import safe_open

    for path in sorted(run.cache.iterdir()) if run.cache.is_dir() else ():
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt"):
                    pass
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception as error:  # safetensors and json raise several types
            raise ValueError(f"{path} is damaged ({error}).") from error


def _same_teacher(run: RunDir, teacher: nn.Module, name: str) -> dict[str, Any]:
    """The digest of the teacher's weights; a resumed run refuses a teacher that changed.

    The trials were scored against the cached teacher: a local-dir checkpoint replaced
    since the start would silently be ignored (or, recomputed, mix two teachers).
    """
    from vitrank.core.factorize import weights_digest

    digest = weights_digest(teacher)
    meta_path = _paths(run)["teacher_meta"]
    if _paths(run)["teacher"].exists() and meta_path.exists():
        recorded = json.loads(meta_path.read_text()).get("weights")
        if recorded is not None and recorded != digest:
            raise ValueError(
                f"the weights of {name} changed since this run started; a resumed run keeps "
                "the teacher its trials were scored with: restore the weights, or start a new "
                "search with another --out."
            )
    return {"weights": digest}


def load_teacher(run: RunDir) -> tuple[nn.Module, dict[str, Any]]:
    import timm
    from vitrank.core.io import check_architecture
    from vitrank.core.structure import first_non_finite

    paths = _paths(run)
    meta = json.loads(paths["teacher_meta"].read_text())
    check_architecture(meta["model_name"], meta["model_args"], paths["teacher_meta"])
    teacher = timm.create_model(meta["model_name"], pretrained=False, **meta["model_args"])
    state = _load_tensors(paths["teacher"])
    found = first_non_finite(state)
    if found is not None:  # checked when it was written: the file changed since
        raise ValueError(f"{paths['teacher']} holds {found[1]} NaN/Inf values in {found[0]}.")
    teacher.load_state_dict(state)
    return teacher.eval(), meta


def load_problem(run: RunDir) -> Problem:
    from vitrank.core.device import resolve_dtype
    from vitrank.core.stats import CalibrationStats
    from vitrank.spaces import SpaceFunction

    settings = SearchSettings.load(run.settings)
    paths = _paths(run)
    teacher, meta = load_teacher(run)
    device = run_device(settings)
    space = make_space(settings, teacher, meta)
    budget = make_budget(settings)
    table = None
    if needs_latency_table(settings):
        from vitrank.spaces import LatencyTable

        table = LatencyTable.load(paths["latency"])
    heldout = _load_tensors(paths["heldout"])
    with torch.no_grad():
        stats = CalibrationStats.load(paths["stats"])
    # Proxies, winners and latency run in the run's dtype on its device; statistics and
    # factors stay fp64 and are cast when a candidate is built.
    dtype = resolve_dtype(settings.dtype, device)
    reference = None
    if dtype != torch.float32:
        import copy

        reference, teacher = teacher, copy.deepcopy(teacher)
    teacher = teacher.to(device=device, dtype=dtype)
    return Problem(
        run=run,
        settings=settings,
        teacher=teacher,
        space=space,
        budget=budget,
        stats=stats,
        heldout=(heldout["images"], heldout["labels"]),
        sensitivity=json.loads(paths["sensitivity"].read_text()),
        latency_table=table,
        space_fn=SpaceFunction(space, budget, settings.parametrization, table),
        reference=reference,
        sizes=DataSizes(**json.loads(paths["sizes"].read_text()))
        if paths["sizes"].exists()
        else None,
    )
