from __future__ import annotations

import dataclasses

import pytest
import torch
from vitrank.core.operators import OPERATORS
from vitrank.core.spec import AttentionSpec, BlockSpec, MlpSpec
from vitrank.evaluators import create_proxy, proxy_names
from vitrank.evaluators.proxies import (
    LogitsProxy,
    ProxyInputs,
    SpectralProxy,
    get_proxy,
    heldout_batch,
    measure_sensitivity,
)

# Every factorization/decomposition a proxy call must not run (they belong to the cache).
_FORBIDDEN = [
    (torch.linalg, "svd"),
    (torch.linalg, "svdvals"),
    (torch.linalg, "cholesky"),
    (torch.linalg, "cholesky_ex"),
    (torch.linalg, "eigh"),
    (torch.linalg, "eigvalsh"),
    (torch, "svd"),
    (torch, "svd_lowrank"),
    (torch, "pca_lowrank"),
    (torch, "cholesky"),
]


@pytest.fixture
def count_decompositions(monkeypatch):
    calls = []
    for owner, name in _FORBIDDEN:
        original = getattr(owner, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
    return calls


def _only(space, index: int, spec: BlockSpec):
    blocks = [BlockSpec() for _ in space.blocks]
    blocks[index] = spec
    return space.config(blocks)


def test_registry_lists_known_names_and_builds_each(tiny_setup):
    assert sorted(proxy_names()) == ["logits", "spectral"]
    with pytest.raises(ValueError, match="unknown proxy 'flops'; known: .*logits"):
        get_proxy("flops")
    inputs = ProxyInputs(
        tiny_setup.teacher, tiny_setup.factors, tiny_setup.stats,
        tiny_setup.images, tiny_setup.labels,
    )  # fmt: skip
    dense = tiny_setup.space.dense()
    for name in proxy_names():
        proxy = create_proxy(name, inputs)
        assert proxy.name == name
        assert proxy.score(dense) == pytest.approx(0.0, abs=1e-12)
        assert proxy.metric in proxy.evaluate(dense)


def test_no_svd_or_cholesky_inside_proxy_calls(tiny_setup, random_configs, count_decompositions):
    from vitrank.core.factorize import FactorCache

    s = tiny_setup
    spectral = SpectralProxy(s.factors, None, teacher=s.teacher, stats=s.stats)
    logits = LogitsProxy(s.teacher, s.factors, s.stats, s.images, s.labels)
    configs = random_configs(s.space, 12, seed=1)
    ops = {(b.attn.op, b.mlp.op) for c in configs for b in c.blocks}
    assert {a for a, _ in ops} >= {"lowrank", "heads", "prune"}
    assert {m for _, m in ops} >= {"lowrank", "prune"}
    for config in configs:
        spectral.evaluate(config)
        logits.evaluate(config)
    assert count_decompositions == []
    # The counters do count: building a cache runs them.
    FactorCache(s.teacher, s.stats)
    assert count_decompositions


def test_logits_proxy_of_dense_and_exact_configs_matches_the_teacher(tiny_setup):
    s = tiny_setup
    proxy = LogitsProxy(s.teacher, s.factors, s.stats, s.images, s.labels, batch_size=10)
    with torch.no_grad():
        teacher_accuracy = (s.teacher(s.images).argmax(-1) == s.labels).double().mean().item()
    dense = proxy.evaluate(s.space.dense())
    assert dense == {"kl": 0.0, "agreement": 1.0, "accuracy": pytest.approx(teacher_accuracy)}
    assert teacher_accuracy == pytest.approx(0.75)
    # Full ranks reproduce every Linear: the candidate is built and run, and matches.
    shape = s.space.fingerprint.blocks[0]
    d, hidden = shape.dim, shape.mlp_hidden
    exact = BlockSpec(
        AttentionSpec("lowrank", qkv_rank=d, proj_rank=d),
        MlpSpec("lowrank", fc1_rank=d, fc2_rank=d),
    )
    assert hidden >= d
    result = proxy.evaluate(s.space.config([exact, exact]))
    assert result["kl"] < 1e-5
    assert result["agreement"] == 1.0


def test_logits_proxy_reacts_to_compression_and_keeps_the_teacher_intact(tiny_setup):
    s = tiny_setup
    before = {k: v.clone() for k, v in s.teacher.state_dict().items()}
    proxy = LogitsProxy(s.teacher, s.factors, s.stats, s.images, s.labels)
    mild = _only(s.space, 1, BlockSpec(mlp=MlpSpec("prune", hidden_kept=120)))
    harsh = s.space.config(
        [
            BlockSpec(
                AttentionSpec("heads", qk_rank=4, vo_rank=4), MlpSpec("prune", hidden_kept=8), 0.25
            )
        ]
        * 2
    )
    first = proxy.evaluate(harsh)
    assert 0 < proxy.evaluate(mild)["kl"] < first["kl"]
    assert proxy.evaluate(harsh) == first  # candidates share nothing that they change
    assert proxy.evaluate(s.space.dense())["kl"] == 0.0
    # Keeping only the first block's input (a tiny cache) runs every block: same answers.
    uncached = LogitsProxy(s.teacher, s.factors, s.stats, s.images, s.labels, cache_bytes=1)
    for config in (mild, harsh):
        found, expected = uncached.evaluate(config), proxy.evaluate(config)
        assert found["kl"] == pytest.approx(expected["kl"], rel=1e-4, abs=1e-7)
        assert found["agreement"] == expected["agreement"]
    dense = uncached.evaluate(s.space.dense())
    assert dense["kl"] == pytest.approx(0.0, abs=1e-7) and dense["agreement"] == 1.0
    for key, value in s.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_spectral_more_compression_discards_more_energy(tiny_setup):
    s = tiny_setup
    proxy = SpectralProxy(s.factors, None, teacher=s.teacher, stats=s.stats)
    choices = s.space.blocks[0]

    def scores(make, values):
        return [proxy.score(_only(s.space, 0, make(v))) for v in values]

    ladders = [
        (
            lambda r: BlockSpec(AttentionSpec("lowrank", qkv_rank=r)),
            choices.grid("attn", "lowrank", "qkv_rank"),
        ),
        (
            lambda r: BlockSpec(AttentionSpec("heads", qk_rank=r, vo_rank=r)),
            choices.grid("attn", "heads", "qk_rank"),
        ),
        (
            lambda r: BlockSpec(mlp=MlpSpec("lowrank", fc1_rank=r, fc2_rank=r)),
            choices.grid("mlp", "lowrank", "fc1_rank"),
        ),
        (
            lambda k: BlockSpec(mlp=MlpSpec("prune", hidden_kept=k)),
            choices.grid("mlp", "prune", "hidden_kept"),
        ),
        (lambda r: BlockSpec(merge_ratio=r), choices.merge_ratios[::-1]),
    ]
    for make, values in ladders:
        values = sorted(values) if make(values[0]).merge_ratio == 0 else values
        found = scores(make, values)  # least compressed last
        assert all(a >= b for a, b in zip(found, found[1:], strict=False)), found
        assert found[0] > found[-1] >= 0.0
    assert proxy.score(s.space.dense()) == 0.0
    # Every term is a discarded share: at most 1 per term with unit weights.
    assert proxy.score(s.space.smallest()) <= 4 * len(s.space.blocks)


def test_spectral_weights_scale_their_terms(tiny_setup):
    s = tiny_setup
    spec = BlockSpec(AttentionSpec("lowrank", qkv_rank=8), MlpSpec("prune", hidden_kept=64))
    config = _only(s.space, 1, spec)
    unit = SpectralProxy(s.factors, None, teacher=s.teacher, stats=s.stats).score(config)
    weights = {"blocks.1.attn.qkv": 3.0, "blocks.1.mlp.hidden": 3.0}
    weighted = SpectralProxy(s.factors, weights, teacher=s.teacher, stats=s.stats).score(config)
    assert weighted == pytest.approx(3.0 * unit)
    other = SpectralProxy(s.factors, {"blocks.0.attn.qkv": 9.0}, teacher=s.teacher, stats=s.stats)
    assert other.score(config) == pytest.approx(unit)
    with pytest.raises(ValueError, match="teacher` and `stats`"):
        SpectralProxy(s.factors).score(config)


def test_sensitivity_reproduces_the_measured_kl_at_the_reference(tiny_setup):
    s = tiny_setup
    sensitivity = measure_sensitivity(s.teacher, s.factors, s.stats, s.images)
    terms = {"attn.qkv", "attn.proj", "attn.qk", "attn.vo", "mlp.fc1", "mlp.fc2", "mlp.hidden"}
    for i in range(2):
        assert {f"blocks.{i}.{t}" for t in terms} <= set(sensitivity)
    assert all(w >= 0 and w == w for w in sensitivity.values())
    proxy = SpectralProxy(s.factors, sensitivity, teacher=s.teacher, stats=s.stats)
    logits = LogitsProxy(s.teacher, s.factors, s.stats, s.images)
    fc1 = s.factors.max_rank("blocks.0.mlp.fc1") // 2
    config = _only(s.space, 0, BlockSpec(mlp=MlpSpec("lowrank", fc1_rank=fc1)))
    assert proxy.score(config) == pytest.approx(logits.evaluate(config)["kl"], rel=1e-6)
    assert "accuracy" not in logits.evaluate(config)


def test_proxies_refuse_configs_for_other_factors_or_models(tiny_setup):
    s = tiny_setup
    plain = s.space.dense().replace(svd="plain")
    logits = LogitsProxy(s.teacher, s.factors, s.stats, s.images, s.labels)
    with pytest.raises(ValueError, match="svd='plain'"):
        SpectralProxy(s.factors).evaluate(plain)
    with pytest.raises(ValueError, match="svd='plain'"):
        logits.evaluate(plain)
    other = dataclasses.replace(s.space.fingerprint, num_classes=7)
    with pytest.raises(ValueError, match="num_classes"):
        logits.evaluate(s.space.dense().replace(fingerprint=other))


def test_heldout_batch_avoids_calibration_images():
    from torch.utils.data import Subset, TensorDataset

    images = torch.arange(20, dtype=torch.float32).reshape(20, 1, 1, 1)
    train = TensorDataset(images, torch.arange(20) % 3)
    calib = Subset(train, list(range(0, 20, 2)))
    workload = type("W", (), {"train": train, "calib": calib})()
    batch, labels = heldout_batch(workload, size=6, seed=0)
    chosen = batch.flatten().long().tolist()
    assert len(chosen) == 6 and all(i % 2 == 1 for i in chosen)
    assert labels.tolist() == [i % 3 for i in chosen]
    assert heldout_batch(workload, size=6, seed=0)[0].equal(batch)
    everything = type("W", (), {"train": train, "calib": Subset(train, list(range(20)))})()
    with pytest.raises(ValueError, match="calib_size"):
        heldout_batch(everything)


@pytest.mark.parametrize("key", OPERATORS.names())
@pytest.mark.parametrize("name", ["spectral", "logits"])
def test_every_registered_operator_scores_and_more_compression_scores_worse(tiny_setup, key, name):
    """Each operator alone, at the bottom and the top of its grids, in every block."""
    from vitrank.core.operators import operator

    part, op_name = key.split(".")
    space = tiny_setup.space
    inputs = ProxyInputs(
        tiny_setup.teacher, tiny_setup.factors, tiny_setup.stats,
        tiny_setup.images, tiny_setup.labels,
    )  # fmt: skip
    proxy = create_proxy(name, inputs)

    def config(pick: int):
        specs = []
        for choice in space.blocks:
            grids = choice.grids(part, op_name)
            spec = operator(part, op_name).spec(**{k: g[pick] for k, g in grids.items()})
            specs.append(BlockSpec(attn=spec) if part == "attn" else BlockSpec(mlp=spec))
        return space.config(specs)

    low, high = proxy.score(config(0)), proxy.score(config(-1))
    assert all(v == v and v >= -1e-12 for v in (low, high))  # not NaN, never negative
    if op_name == "dense":
        assert low == pytest.approx(0.0, abs=1e-9)
    elif any(len(g) > 1 for g in space.blocks[0].grids(part, op_name).values()):
        assert low > high >= -1e-12  # the smallest knobs discard the most
