"""Every registered operator keeps the operator contract (one test run per registry entry).

Adding an operator to `vitrank.core.operators.OPERATORS` runs it through these tests, and
through the registry-parametrised tests of apply (test_apply.py), cost (spaces/test_cost.py)
and the spectral proxy (evaluators/test_proxies.py).
"""

from __future__ import annotations

import pytest
import torch
from _compress_cases import build, calibration, count_params, full_rank, images
from vitrank.core.apply import apply_specs, validate_block
from vitrank.core.factorize import FactorCache
from vitrank.core.operators import OPERATORS, PARTS, Operator, of, operator, operator_names
from vitrank.core.registry import Registry, UnknownNameError
from vitrank.core.spec import BlockSpec
from vitrank.core.structure import inspect_vit

KEYS = OPERATORS.names()


@pytest.fixture(scope="module")
def teacher():
    model = build("vit")
    stats = calibration(model)
    return model, stats, FactorCache(model, stats)


def _block(key: str, shape, knobs: dict[str, int] | None = None) -> BlockSpec:
    part, name = key.split(".")
    op = operator(part, name)
    spec = op.spec(**(knobs if knobs is not None else {}))
    return BlockSpec(attn=spec) if part == "attn" else BlockSpec(mlp=spec)  # type: ignore[arg-type]


def test_the_registry_knows_both_parts_and_lists_names_on_a_miss() -> None:
    assert set(PARTS) == {key.split(".")[0] for key in KEYS}
    for part in PARTS:
        assert operator_names(part)[0] == "dense"
    with pytest.raises(ValueError, match=r"unknown attention operator 'svd'; known: dense, "):
        operator("attn", "svd")
    registry: Registry[int] = Registry("thing")
    registry.add("one", 1)
    with pytest.raises(UnknownNameError, match=r"unknown thing 'onr'; known: one\. Did you mean"):
        registry.get("onr")
    with pytest.raises(ValueError, match="registered twice"):
        registry.add("one", 2)


@pytest.mark.parametrize("key", KEYS)
def test_declared_knobs_limits_and_grids_agree(key: str, teacher) -> None:
    model, _, _ = teacher
    shape = inspect_vit(model).blocks[0]
    op = OPERATORS.get(key)
    assert isinstance(op, Operator) and f"{op.part}.{op.name}" == key
    assert set(op.limits(shape)) == set(op.knobs)
    grids = op.grids(shape, granularity=4)
    assert grids is not None, "every operator is offered on the tiny ViT"
    assert set(grids) == set(op.knobs)
    for knob, grid in grids.items():
        low, high = op.limits(shape)[knob]
        assert list(grid) == sorted(grid) and all(low <= v < high or v == high for v in grid)
    # Every grid point is buildable and spends fewer parameters than the dense part.
    dense = sum(lin.params for lin in operator(op.part, "dense").linears(shape, of_dense(op)))
    middle = {k: g[len(g) // 2] for k, g in grids.items()}
    spec = op.spec(**middle)
    validate_block(_block(key, shape, middle), shape)
    if op.knobs:
        assert sum(lin.params for lin in op.linears(shape, spec)) < dense
    assert isinstance(op.describe(spec, shape), str) and op.describe(spec, shape)
    assert op.brief(spec).startswith(op.name)
    assert 0 < op.keep_ratio(spec, shape) <= 1
    # Neighbours are one grid step on one knob, in the asked direction of cost.
    cost = sum(lin.params for lin in op.linears(shape, spec))
    for up in (True, False):
        for other in op.neighbours(spec, grids, up):
            assert of(other) is op
            moved = [k for k in op.knobs if getattr(other, k) != getattr(spec, k)]
            assert len(moved) == 1 and getattr(other, moved[0]) in grids[moved[0]]
            after = sum(lin.params for lin in op.linears(shape, other))
            assert (after > cost) if up else (after < cost)


def of_dense(op: Operator):
    return operator(op.part, "dense").spec()


@pytest.mark.parametrize("key", KEYS)
def test_built_part_has_the_declared_parameters_and_full_limits_reproduce(key, teacher) -> None:
    model, stats, factors = teacher
    fp = inspect_vit(model)
    part, name = key.split(".")
    op = OPERATORS.get(key)
    grids = op.grids(fp.blocks[0], granularity=4) or {}
    middle = [_block(key, s, {k: g[len(g) // 2] for k, g in grids.items()}) for s in fp.blocks]
    student = apply_specs(model, middle, factors, stats)
    built = count_params(student)
    declared = fp.other_params + sum(
        s.fixed_params
        + sum(lin.params for lin in of(b.attn).linears(s, b.attn))
        + sum(lin.params for lin in of(b.mlp).linears(s, b.mlp))
        for s, b in zip(fp.blocks, middle, strict=True)
    )
    assert built == declared
    # At the top of its limits the operator is the teacher's part again.
    other = "dense"
    specs = [
        full_rank(s, name if part == "attn" else other, name if part == "mlp" else other)
        for s in fp.blocks
    ]
    x = images()
    with torch.no_grad():
        ref, got = model(x), apply_specs(model, specs, factors, stats)(x)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
    # The structure alone (what loading fills) has the same shapes.
    skeleton = apply_specs(model, middle, None, None, structure_only=True)
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {
        k: v.shape for k, v in student.state_dict().items()
    }
