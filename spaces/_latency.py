"""Latency tables: per-operator times measured on the target device, summed to predict.

A table holds, for the shapes a space can produce, the median time of each operator a
compressed block runs — every Linear (dense or one factor of a low-rank pair), the
attention kernel (fused, or with the proportional-attention size bias once tokens have
merged), ToMe's matching and merge, the norms and the activation — at a grid of token
counts, ranks and keeps. `predict_latency` sums a config's operators, interpolating
linearly between measured ranks and token counts, plus the parts outside the blocks and
a measured per-model offset (Python and framework overhead: the dense model's measured
time minus the sum of its operators).
"""

from __future__ import annotations

import datetime
import functools
import json
import random
import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from vitrank.core.config import CompressionConfig
from vitrank.core.files import atomic_write_text
from vitrank.core.spec import BlockSpec, token_schedule
from vitrank.core.structure import BlockShape, Fingerprint, inspect_vit
from vitrank.core.timing import machine_info, time_runs

from ._cost import attention_core, attention_linears, mlp_linears
from ._space import SearchSpace, build_space

TABLE_VERSION = 1


@dataclass
class LatencyTable:
    device: str  # torch device the times were measured on
    batch: int  # images per forward pass
    threads: int  # torch intra-op threads during measurement
    fingerprint_digest: str  # the architecture the table is for
    tokens: list[int]  # token counts every entry was measured at (ascending)
    # "linear/{in}/{out}", "attend/{heads}/{width}/{fused|sized}", "merge/{dim}",
    # "norm/{dim}", "gelu/{width}" -> median ms at each token count.
    entries: dict[str, list[float]]
    outside_ms: float  # patch embedding, positions, final norm, pooling and head
    # Whole models run slower than their operators alone (framework overhead; weights that
    # no longer sit in cache): measured = offset_ms + scale * (sum of operators), fitted
    # by least squares over whole calibration models (dense, smallest, random configs).
    offset_ms: float
    dense_ms: float  # measured dense model (built as `apply` builds it)
    scale: float = 1.0
    calibration: list[list[float]] = field(default_factory=list)  # [operator sum, measured]
    repeats: int = 20
    warmup: int = 5
    clock: str = "wall"  # "wall" or "thread" (CPU time of one thread), see `time_ms`
    machine: dict[str, Any] = field(default_factory=dict)
    date: str = ""
    version: int = TABLE_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        if data.get("version") != TABLE_VERSION:
            raise ValueError(
                f"`version == {TABLE_VERSION}` must hold for a latency table, but got "
                f"version={data.get('version')!r}; measure the table again."
            )
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: damaged latency table ({error}).") from error
        return cls.from_dict(data)

    # ---- lookups ---------------------------------------------------------------------

    def _at_tokens(self, key: str, n: int) -> float:
        return _interp(self.tokens, self.entries[key], n)

    def _lookup(self, family: str, a: float, b: float, rest: str, n: int) -> float:
        """Time of `family/a/b[/rest]` at n tokens, interpolating over a or b if unmeasured."""
        suffix = f"/{rest}" if rest else ""
        key = f"{family}/{_fmt(a)}/{_fmt(b)}{suffix}"
        if key in self.entries:
            return self._at_tokens(key, n)
        same_a, same_b = [], []
        for other in self.entries:
            parts = other.split("/")
            if parts[0] != family or "/".join(parts[3:]) != rest:
                continue
            x, y = float(parts[1]), float(parts[2])
            if x == a:
                same_a.append((y, other))
            if y == b:
                same_b.append((x, other))
        for points, at in ((same_a, b), (same_b, a)):
            if len(points) >= 2:
                points.sort()
                values = [self._at_tokens(k, n) for _, k in points]
                return _interp([p for p, _ in points], values, at)
        raise KeyError(
            f"The latency table has no measurement near {key}; measure a table for this "
            "space (spaces.measure_latency_table with the same space)."
        )

    def linear(self, in_features: int, out_features: int, n: int) -> float:
        return self._lookup("linear", in_features, out_features, "", n)

    def attend(self, heads: int, qk_dim: int, v_dim: int, sized: bool, n: int) -> float:
        # Kernel time follows the mean of the query-key and value widths closely enough.
        width = (qk_dim + v_dim) / 2
        return self._lookup("attend", heads, width, "sized" if sized else "fused", n)

    def merge(self, dim: int, n: int) -> float:
        return self._at_tokens(f"merge/{dim}", n)

    def norm(self, dim: int, n: int) -> float:
        return self._at_tokens(f"norm/{dim}", n)

    def gelu(self, width: int, n: int) -> float:
        return self._lookup("gelu", width, 0, "", n)

    def glue(self, part: str, op: str, dim: int, n: int, sized: bool = False) -> float:
        """What a real attention/MLP module takes beyond its operators (reshapes, copies)."""
        tag = "/sized" if sized else ""
        key = f"glue/{part}/{op}/{dim}{tag}"
        return self._at_tokens(key, n) if key in self.entries else 0.0


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _interp(xs: list[float] | list[int], ys: list[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), extended linearly past the ends, never below 0."""
    if len(xs) == 1:
        return ys[0]
    i = 1
    while i < len(xs) - 1 and xs[i] < x:
        i += 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    value = y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 != x0 else y0
    return max(value, 0.0)


def _attention_part(
    table: LatencyTable, shape: BlockShape, spec: BlockSpec, n: int, sized: bool
) -> float:
    """The attention module's operators on n tokens (sized: with the size bias)."""
    linears = attention_linears(shape, spec.attn, spec.merge_ratio > 0)
    total = sum(table.linear(lin.in_features, lin.out_features, n) for lin in linears)
    core = attention_core(shape, spec.attn)
    return total + table.attend(core.heads, core.qk_dim, core.v_dim, sized, n)


def _mlp_part(table: LatencyTable, shape: BlockShape, spec: BlockSpec, m: int) -> float:
    linears = mlp_linears(shape, spec.mlp)
    total = sum(table.linear(lin.in_features, lin.out_features, m) for lin in linears)
    return total + table.gelu(linears[0].out_features, m)


def _block_latency(
    table: LatencyTable, shape: BlockShape, spec: BlockSpec, n: int, m: int, sized: bool
) -> float:
    """One block: attention on n tokens (sized: with the size bias), MLP on m tokens."""
    dim = shape.dim
    total = table.norm(dim, n) + _attention_part(table, shape, spec, n, sized)
    total += table.glue("attn", spec.attn.op, dim, n, sized)
    if m < n:
        total += table.merge(dim, n)
    total += table.norm(dim, m) + _mlp_part(table, shape, spec, m)
    total += table.glue("mlp", spec.mlp.op, dim, m)
    # The block's own work around its modules: residuals, sizes, and merging when it merges.
    return total + table.glue("block", "merged" if m < n else "plain", dim, n)


def predict_latency(config: CompressionConfig, table: LatencyTable) -> float:
    """Predicted milliseconds of one forward pass at the table's batch size and device."""
    fp = config.fingerprint
    if fp.digest != table.fingerprint_digest:
        raise ValueError(
            f"The latency table was measured for fingerprint {table.fingerprint_digest}, but the "
            f"config is for {fp.digest} ({fp.architecture}); measure a table for this model."
        )
    return table.offset_ms + table.scale * operator_sum(config, table)


def operator_sum(config: CompressionConfig, table: LatencyTable) -> float:
    """The config's operators' measured times, summed (before the whole-model fit)."""
    fp = config.fingerprint
    tokens = config.token_schedule
    total = table.outside_ms
    for i, (shape, spec) in enumerate(zip(fp.blocks, config.blocks, strict=True)):
        # Sizes differ (proportional attention) once any earlier block has merged.
        sized = tokens[i] < tokens[0]
        total += _block_latency(table, shape, spec, tokens[i], tokens[i + 1], sized)
    return total


def _fit_line(points: list[list[float]]) -> tuple[float, float]:
    """(offset, scale) of measured ≈ offset + scale · sum, by least squares."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    scale = (
        sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / var if var else 0
    )
    if scale <= 0:  # too few or too noisy points for a slope: a constant offset only
        scale = 1.0
    return mean_y - scale * mean_x, scale


# ---- measurement ---------------------------------------------------------------------


def time_ms(
    fn: Callable[[], Any],
    device: str | torch.device = "cpu",
    warmup: int = 5,
    repeats: int = 20,
    clock: str = "wall",
) -> float:
    """Median milliseconds of `fn()` over `repeats` runs after `warmup` runs (see `time_runs`)."""
    return statistics.median(time_runs(fn, device, warmup, repeats, clock))


def _samples(grid: Iterable[int], points: int) -> list[int]:
    """Up to `points` values of an ascending grid, evenly spread, both ends included."""
    values = sorted(set(grid))
    if len(values) <= points:
        return values
    picks = {values[round(i * (len(values) - 1) / (points - 1))] for i in range(points)}
    return sorted(picks)


def _token_grid(fingerprint: Fingerprint, space: SearchSpace, points: int) -> list[int]:
    most = [max(c.merge_ratios) for c in space.blocks]
    fewest = token_schedule(most, fingerprint.num_tokens, fingerprint.num_prefix_tokens)[-1]
    top = fingerprint.num_tokens
    if fewest == top:
        return [top]
    grid = {round(fewest + i * (top - fewest) / (points - 1)) for i in range(points)}
    return sorted(grid)


def _operators(space: SearchSpace, shape: BlockShape, index: int, points: int) -> dict:
    """Linear shapes, attention kernels and activation widths the block's choices run: the
    dense block's, and those of each offered operator's `latency_specs` (the operators
    declare what a table must measure; none is named here)."""
    from vitrank.core.operators import PARTS, operator

    d, inner, hidden = shape.dim, shape.attn_inner, shape.mlp_hidden
    choice = space.blocks[index]
    linears = {(d, 3 * inner), (inner, d), (d, hidden), (hidden, d)}
    attends = {(shape.num_heads, shape.head_dim)}
    gelus = {hidden}
    for part in PARTS:
        for name in choice.ops(part):
            op = operator(part, name)
            grids = choice.options[part][name]
            for spec in op.latency_specs(grids, lambda grid: _samples(grid, points)):
                # merges=True: a block that merges runs its extra maps too (they are timed)
                linears |= {(x.in_features, x.out_features) for x in op.linears(shape, spec, True)}
                if part == "attn":
                    core = op.core(shape, spec)
                    attends.add((core.heads, core.qk_dim))
                else:
                    gelus.add(op.activation_width(shape, spec))
    return {"linear": linears, "attend": attends, "gelu": gelus}


def measure_latency_table(
    model: nn.Module,
    fingerprint: Fingerprint | None = None,
    device: str | torch.device = "cpu",
    batch: int = 1,
    threads: int | None = None,
    space: SearchSpace | None = None,
    *,
    token_points: int = 6,
    rank_points: int = 4,
    warmup: int = 5,
    repeats: int = 20,
    clock: str = "auto",
    calibrate: int = 10,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> LatencyTable:
    """Measure every operator `space` (default: the full space of `model`) can run.

    Times are medians of `repeats` runs after `warmup`, at `batch` images, with torch's
    intra-op threads fixed to `threads` (default: the current count), restored afterwards.
    ``clock="auto"`` counts thread CPU time on a single-threaded CPU (robust to other jobs on
    a shared machine) and wall time otherwise; see `time_ms`. `calibrate` whole models (the
    dense one, the smallest, random configs drawn with `seed`) fit the line from operator
    sums to whole-model times.
    """
    from timm.layers import get_act_layer
    from vitrank.core.attention import attend
    from vitrank.core.merge import match_tokens, merge_weighted
    from vitrank.core.spec import merge_count

    fingerprint = fingerprint or inspect_vit(model)
    space = space or build_space(fingerprint)
    if space.fingerprint != fingerprint:
        raise ValueError(
            "The space was built for another architecture: "
            f"{space.fingerprint.describe_difference(fingerprint)}."
        )
    device = torch.device(device)
    previous = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"`threads >= 1` must hold, but got {threads=}.")
        torch.set_num_threads(threads)
    used_threads = torch.get_num_threads()
    if clock == "auto":
        clock = "thread" if device.type == "cpu" and used_threads == 1 else "wall"
    timer = functools.partial(time_ms, device=device, warmup=warmup, repeats=repeats, clock=clock)
    tokens = _token_grid(fingerprint, space, token_points)
    entries: dict[str, list[float]] = {}
    dtype = next(model.parameters()).dtype

    def measure(key: str, make: Callable[[int], Callable[[], Any]]) -> None:
        if key in entries:
            return
        entries[key] = [timer(make(n)) for n in tokens]
        if progress is not None:
            progress(key)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    def measure_module(fn: Callable[..., Any], *shape: int, sized: bool = False) -> list[float]:
        times = []
        for n in tokens:
            x = rand(batch, n, *shape)
            if sized:
                log_size = (rand(batch, n).abs() + 1).log()
                times.append(timer(functools.partial(fn, x, log_size)))
            else:
                times.append(timer(functools.partial(fn, x)))
        return times

    def on_tokens(fn: Callable[[torch.Tensor], Any], width: int) -> Callable[[int], Any]:
        # A maker: given a token count, a call of `fn` on a fixed random (batch, n, width).
        return lambda n: functools.partial(fn, rand(batch, n, width))

    try:
        with torch.inference_mode():
            for index, shape in enumerate(fingerprint.blocks):
                ops = _operators(space, shape, index, rank_points)
                for a, b in sorted(ops["linear"]):
                    layer = nn.Linear(a, b, device=device, dtype=dtype)
                    measure(f"linear/{a}/{b}", on_tokens(layer, a))
                for heads, width in sorted(ops["attend"]):
                    scale = shape.head_dim**-0.5
                    for sized in (False, True):

                        def make(n: int, heads=heads, width=width, sized=sized, scale=scale):
                            q, k, v = (rand(batch, heads, n, width) for _ in range(3))
                            size = rand(batch, n).abs() + 1 if sized else None

                            def run() -> Any:
                                log_size = None if size is None else size.log()
                                return attend(q, k, v, scale, log_size)

                            return run

                        tag = "sized" if sized else "fused"
                        measure(f"attend/{heads}/{width}/{tag}", make)
                act = get_act_layer("gelu")()
                for width in sorted(ops["gelu"]):
                    measure(f"gelu/{width}/0", on_tokens(act, width))
                norm = nn.LayerNorm(shape.dim, device=device, dtype=dtype)
                # A norm and the residual add that follows each sub-layer.
                measure(
                    f"norm/{shape.dim}", on_tokens(functools.partial(_norm_add, norm), shape.dim)
                )

                def make_merge(n: int, shape=shape) -> Callable[[], Any]:
                    x, keys = rand(batch, n, shape.dim), rand(batch, n, shape.head_dim)
                    r = max(1, merge_count(0.1, n, fingerprint.num_prefix_tokens))

                    def run() -> Any:
                        return merge_weighted(
                            x, None, match_tokens(keys, r, fingerprint.num_prefix_tokens)
                        )

                    return run

                if any(max(c.merge_ratios) > 0 for c in space.blocks):
                    measure(f"merge/{shape.dim}", make_merge)
            partial = LatencyTable(
                str(device), batch, used_threads, fingerprint.digest, tokens, entries, 0, 0, 0
            )
            for key, values in _measure_glue(model, space, partial, rand, measure_module):
                entries[key] = values
                if progress is not None:
                    progress(key)
            for key, values in _measure_block_glue(model, space, partial, rand, timer):
                entries[key] = values
                if progress is not None:
                    progress(key)
            outside_ms = _outside_ms(model, device, batch, timer)
            images = rand(batch, *_input_shape(model))
            rng = random.Random(seed)
            configs = [space.dense(), space.smallest("flops")]
            configs += [space.random_config(rng) for _ in range(max(0, calibrate - 2))]
            measured = []
            for config in configs:
                whole = random_weight_model(model, config).to(device).eval()
                measured.append(timer(functools.partial(whole, images)))
    finally:
        torch.set_num_threads(previous)
    table = LatencyTable(
        device=str(device),
        batch=batch,
        threads=used_threads,
        fingerprint_digest=fingerprint.digest,
        tokens=tokens,
        entries=entries,
        outside_ms=outside_ms,
        offset_ms=0.0,
        dense_ms=measured[0],
        repeats=repeats,
        warmup=warmup,
        clock=clock,
        machine=machine_info(device),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    table.calibration = [
        [operator_sum(c, table), ms] for c, ms in zip(configs, measured, strict=True)
    ]
    table.offset_ms, table.scale = _fit_line(table.calibration)
    return table


def random_weight_model(model: nn.Module, config: CompressionConfig) -> nn.Module:
    """The model `apply` builds for `config`, with random weights (timing needs no factors)."""
    from vitrank.core.apply import apply_specs

    built = apply_specs(model, config.blocks, None, None, structure_only=True)
    for layer in built.modules():
        if isinstance(layer, nn.Linear):
            layer.reset_parameters()  # structure_only leaves memory uninitialised
    return built


def _middle(grids: dict[str, tuple[int, ...]]) -> dict[str, int]:
    return {key: grid[len(grid) // 2] for key, grid in grids.items()}


def _measure_glue(
    model: nn.Module,
    space: SearchSpace,
    table: LatencyTable,
    rand: Callable[..., torch.Tensor],
    measure_module: Callable[..., list[float]],
) -> Iterable[tuple[str, list[float]]]:
    """Per operator: a real module's time minus the sum of its measured operators.

    The modules are built as `apply` builds them (random weights), one model per operator
    pair, and timed alone on random tokens, at a middle setting of their grids.
    """
    from itertools import zip_longest

    from vitrank.core.spec import AttentionSpec, MlpSpec

    fingerprint = space.fingerprint
    seen: set[tuple[str, str, int]] = set()
    for index, (shape, choice) in enumerate(zip(fingerprint.blocks, space.blocks, strict=True)):
        pairs = zip_longest(choice.attention_ops, choice.mlp_ops, fillvalue="dense")
        for attn_op, mlp_op in pairs:
            todo = [("attn", attn_op), ("mlp", mlp_op)]
            todo = [(part, op) for part, op in todo if (part, op, shape.dim) not in seen]
            if not todo:
                continue
            attn = AttentionSpec(attn_op, **_middle(choice.attention_grids(attn_op)))
            mlp = MlpSpec(mlp_op, **_middle(choice.mlp_grids(mlp_op)))
            specs = [BlockSpec() for _ in fingerprint.blocks]
            specs[index] = BlockSpec(attn, mlp)
            built = random_weight_model(model, space.config(specs))
            blocks: Any = built.blocks
            block = blocks[index].to(rand(1).device).eval()
            for part, op in todo:
                seen.add((part, op, shape.dim))
                if part == "attn":
                    spec = BlockSpec(attn=attn)
                    merging = f"merge/{shape.dim}" in table.entries
                    sized_tags = (False, True) if merging else (False,)
                    for sized in sized_tags:
                        real = measure_module(block.attn, shape.dim, sized=sized)
                        parts = [
                            _attention_part(table, shape, spec, n, sized) for n in table.tokens
                        ]
                        tag = "/sized" if sized else ""
                        yield (
                            f"glue/attn/{op}/{shape.dim}{tag}",
                            [r - p for r, p in zip(real, parts, strict=True)],
                        )
                else:
                    spec = BlockSpec(mlp=mlp)
                    real = measure_module(block.mlp, shape.dim)
                    parts = [_mlp_part(table, shape, spec, n) for n in table.tokens]
                    yield (
                        f"glue/mlp/{op}/{shape.dim}",
                        [r - p for r, p in zip(real, parts, strict=True)],
                    )


def _measure_block_glue(
    model: nn.Module,
    space: SearchSpace,
    table: LatencyTable,
    rand: Callable[..., torch.Tensor],
    timer: Callable[[Callable], float],
) -> Iterable[tuple[str, list[float]]]:
    """Per block width: a real dense block's time minus its operators and module glue.

    Once without merging ("plain") and once merging a tenth of the tokens with sizes
    already unequal ("merged"), so what merging costs beyond matching and the weighted
    mean (sizes, the log-size bias, bookkeeping) is counted.
    """
    fingerprint = space.fingerprint
    merging = any(max(c.merge_ratios) > 0 for c in space.blocks)
    seen: set[int] = set()
    for index, shape in enumerate(fingerprint.blocks):
        if shape.dim in seen:
            continue
        seen.add(shape.dim)
        variants = [("plain", 0.0)] + ([("merged", 0.1)] if merging else [])
        for tag, ratio in variants:
            specs = [BlockSpec() for _ in fingerprint.blocks]
            specs[index] = BlockSpec(merge_ratio=ratio)
            blocks: Any = random_weight_model(model, space.config(specs)).blocks
            block = blocks[index].to(rand(1).device).eval()
            glue = []
            for n in table.tokens:
                x = rand(table.batch, n, shape.dim)
                size = rand(table.batch, n).abs() + 1 if tag == "merged" else None
                real = timer(functools.partial(block, x, size, None))
                out = block(x, size, None)[0].shape[1]
                parts = _block_latency(table, shape, specs[index], n, out, tag == "merged")
                glue.append(real - parts)
            yield f"glue/block/{tag}/{shape.dim}", glue


def _norm_add(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x + norm(x)


def _input_shape(model: nn.Module) -> tuple[int, int, int]:
    embed: Any = model.patch_embed
    height, width = embed.img_size
    return (embed.proj.in_channels, height, width)


def _outside_ms(
    model: nn.Module, device: torch.device, batch: int, timer: Callable[[Callable], float]
) -> float:
    """Everything but the blocks: the model with its blocks swapped for an identity."""
    blocks = model.blocks
    images = torch.randn(batch, *_input_shape(model), device=device)
    was = model.training
    try:
        model.blocks = nn.Sequential()
        model.to(device).eval()
        return timer(lambda: model(images))
    finally:
        model.blocks = blocks
        model.train(was)
