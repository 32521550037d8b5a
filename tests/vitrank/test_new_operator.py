"""A new operator is its class plus its registry line: registered here, in this file only,
an operator with a knob no built-in one has shows up in the search space, the exact cost,
the spectral proxy and its sensitivity terms, the latency table, the space description,
the report's block map, a saved config and `vitrank search --ops`."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from typing import Any

import pytest
import torch
from _compress_cases import build, calibration, images
from torch import nn
from vitrank.core.apply import apply_specs
from vitrank.core.factorize import FactorCache
from vitrank.core.lowrank import linear_from
from vitrank.core.operators import OPERATORS, BuildContext, Linear, Operator, TermContext
from vitrank.core.spec import BlockSpec
from vitrank.core.structure import BlockShape, inspect_vit
from vitrank.evaluators.proxies import SpectralProxy, measure_sensitivity
from vitrank.reports import block_map
from vitrank.spaces import (
    CompressionConfig,
    build_space,
    count_params,
    measure_latency_table,
    predict_latency,
    search_families,
)


class FirstUnitsOp(Operator):
    """The MLP's first `first_units` hidden units kept, the rest cut (a toy truncation)."""

    name, part, family = "first", "mlp", "toy"
    knobs = ("first_units",)

    def limits(self, shape: BlockShape) -> dict[str, tuple[int, int]]:
        return {"first_units": (1, shape.mlp_hidden)}

    def grids(self, shape: BlockShape, granularity: int) -> dict[str, tuple[int, ...]]:
        return {"first_units": tuple(range(granularity, shape.mlp_hidden, granularity))}

    def linears(self, shape: BlockShape, spec: Any, merges: bool = False) -> list[Linear]:
        d, kept = shape.dim, spec.first_units
        return [Linear("fc1", d, kept, shape.fc1_bias), Linear("fc2", kept, d, shape.fc2_bias)]

    def activation_width(self, shape: BlockShape, spec: Any) -> int:
        return int(spec.first_units)

    def proxy_terms(self, spec: Any) -> tuple[tuple[str, int], ...]:
        return (("first", spec.first_units),)

    def proxy_tables(self, ctx: TermContext) -> dict[str, list[float] | str]:
        if ctx.block is None:
            return {"first": "the toy operator reads the teacher's fc2."}
        mass = ctx.block.mlp.fc2.weight.double().square().sum(0)
        kept = torch.cat([mass.new_zeros(1), mass.cumsum(0)])
        return {"first": (1 - kept / kept[-1]).tolist()}

    def reference_specs(self, ctx: TermContext, reference: float) -> list[tuple[str, Any]]:
        assert ctx.shape is not None
        return [("first", self.spec(first_units=round(reference * ctx.shape.mlp_hidden)))]

    def replaced(self, teacher_part: Any, spec: Any) -> list[nn.Module]:
        return [teacher_part.fc1, teacher_part.fc2]

    def build(self, ctx: BuildContext, teacher: Any, copied: Any, spec: Any) -> nn.Module:
        kept, fc1, fc2 = spec.first_units, teacher.fc1, teacher.fc2
        copied.fc1 = linear_from(fc1.weight[:kept].clone(), fc1.bias[:kept].clone())
        copied.fc2 = linear_from(fc2.weight[:, :kept].clone(), fc2.bias.clone())
        return copied

    def describe(self, spec: Any, shape: BlockShape) -> str:
        return f"first {spec.first_units}/{shape.mlp_hidden} units"


@pytest.fixture(scope="module")
def toy():
    OPERATORS.add("mlp.first", FirstUnitsOp())
    model = build("vit")
    stats = calibration(model)
    yield model, stats, FactorCache(model, stats)
    OPERATORS.remove("mlp.first")


def _config(space, units: int) -> CompressionConfig:
    blocks = [BlockSpec()] * len(space.blocks)
    blocks[0] = BlockSpec(mlp=space.blocks[0].spec("mlp", "first", first_units=units))
    return space.dense().replace(blocks=tuple(blocks))


def test_the_space_offers_it_and_its_exact_cost_is_the_built_models(toy) -> None:
    model, stats, factors = toy
    assert "toy" in search_families()
    space = build_space(model, ops="lowrank,toy", granularity=8)
    hidden = inspect_vit(model).blocks[0].mlp_hidden
    assert space.blocks[0].grid("mlp", "first", "first_units") == tuple(range(8, hidden, 8))
    assert "first first_units" in space.describe()  # the description has its column
    config = _config(space, 16)
    built = apply_specs(model, config.blocks, factors, stats)
    assert count_params(config) == sum(p.numel() for p in built.parameters())
    assert built(images(2)).shape == model(images(2)).shape
    # a saved config names the knob and loads back equal
    assert CompressionConfig.from_json(config.to_json()) == config
    assert '"first_units": 16' in config.to_json()


def test_the_spectral_proxy_and_the_sensitivity_read_its_terms(toy) -> None:
    model, stats, factors = toy
    space = build_space(model, ops="toy", granularity=8)
    proxy = SpectralProxy(factors, teacher=model, stats=stats)
    fewer, more = proxy.score(_config(space, 8)), proxy.score(_config(space, 40))
    assert fewer > more > 0.0  # cutting more units discards more of fc2's energy
    weights = measure_sensitivity(model, factors, stats, images(4), families=("toy",))
    assert set(weights) == {"blocks.0.mlp.first", "blocks.1.mlp.first"}
    weighted = SpectralProxy(factors, weights, teacher=model, stats=stats)
    assert weighted.score(_config(space, 8)) == pytest.approx(weights["blocks.0.mlp.first"] * fewer)


def test_the_latency_table_times_its_kernels(toy) -> None:
    model, _, _ = toy
    space = build_space(model, ops="toy", granularity=8)
    table = measure_latency_table(
        model, space.fingerprint, "cpu", batch=1, threads=1, space=space,
        token_points=2, rank_points=2, warmup=0, repeats=1,
    )  # fmt: skip
    d, grid = space.fingerprint.blocks[0].dim, space.blocks[0].grid("mlp", "first", "first_units")
    for units in (grid[0], grid[-1]):
        assert f"linear/{d}/{units}" in table.entries and f"gelu/{units}/0" in table.entries
    assert predict_latency(_config(space, grid[0]), table) > 0


def test_the_report_and_the_command_line_show_it(toy) -> None:
    model, _, _ = toy
    space = build_space(model, ops="toy", granularity=8)
    table = block_map({"winner": _config(space, 16)})
    row = table[(table.block == 0) & (table.part == "mlp")].iloc[0]
    assert row.op == "first" and row.first_units == 16 and row.choice == "first 16/96 units"
    from vitrank.cli import main

    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        main(["search", "--help"])
    help_text = out.getvalue().split("\n  --ops OPS", 1)[1].split("\n  --", 1)[0]
    assert "toy" in help_text
