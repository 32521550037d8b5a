"""FactorCache on tiny random ViTs: exact errors on the calibration tokens, slicing only."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset
from vitrank.core.factorize import FactorCache
from vitrank.core.stats import LINEAR_KEYS
from vitrank.evaluators.calibration import calibrate

ARCHS = [
    ("vit_small_patch16_224", {"qkv_bias": True}),
    ("vit_small_patch16_224", {"qkv_bias": False, "class_token": False, "global_pool": "avg"}),
    ("deit_tiny_distilled_patch16_224", {}),
    ("vit_base_patch16_reg4_gap_256", {}),
]


def _images(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(
        n, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def _dataset(images: torch.Tensor) -> TensorDataset:
    return TensorDataset(images, torch.zeros(len(images), dtype=torch.long))


@torch.no_grad()
def _inputs(model, images) -> dict[str, torch.Tensor]:
    """Every block Linear's input tokens (n, in) and each block's attention input (B, N, d)."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        layers = {"attn.qkv": block.attn.qkv, "attn.proj": block.attn.proj}
        layers.update({"mlp.fc1": block.mlp.fc1, "mlp.fc2": block.mlp.fc2, "attn": block.attn})
        for name, layer in layers.items():

            def hook(module, args, key=f"blocks.{i}.{name}"):
                captured[key] = args[0].detach()

            handles.append(layer.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return captured


@pytest.fixture(scope="module")
def calibrated(request):
    from tests.conftest import make_tiny_vit

    model = make_tiny_vit(**{"qkv_bias": True}).double()
    images = _images()
    stats = calibrate(model, _dataset(images), batch_size=5, progress=False)
    return model, images, stats


def _close(closed_form: float, measured: float, energy: float) -> bool:
    """Relative difference <= 1e-6; errors at fp64 round-off level (1e-12 of the layer's
    energy, e.g. the null direction of a LayerNorm output) count as equal."""
    return abs(closed_form - measured) <= 1e-6 * measured + 1e-12 * energy


@torch.no_grad()
def test_linear_errors_equal_measured_output_error_on_calibration_tokens(calibrated):
    model, images, stats = calibrated
    inputs = _inputs(model, images)
    for whitening in (True, False):
        cache = FactorCache(model, stats, whitening=whitening)
        for i, block in enumerate(model.blocks):
            layers = dict(
                zip(
                    LINEAR_KEYS,
                    [block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2],
                    strict=True,
                )
            )
            for name, layer in layers.items():
                key = f"blocks.{i}.{name}"
                X = inputs[key].reshape(-1, layer.in_features)
                for rank in (1, cache.max_rank(key) // 2, cache.max_rank(key) - 1):
                    down, up, bias = cache.linear(key, rank)
                    measured = float((X @ (layer.weight - up @ down).T).square().sum() / len(X))
                    assert _close(cache.error(key, rank), measured, cache.energy(key)), (key, rank)


@torch.no_grad()
def test_head_errors_equal_measured_errors_on_calibration_tokens(calibrated):
    model, images, stats = calibrated
    inputs = _inputs(model, images)
    cache = FactorCache(model, stats)
    for i, block in enumerate(model.blocks):
        attn = block.attn
        H, dh = attn.num_heads, attn.head_dim
        x = inputs[f"blocks.{i}.attn"]
        X = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1).reshape(-1, x.shape[-1] + 1)
        W = torch.cat([attn.qkv.weight, attn.qkv.bias[:, None]], 1)
        q = (X @ W[: H * dh].T).reshape(-1, H, dh).transpose(0, 1)
        k = (X @ W[H * dh : 2 * H * dh].T).reshape(-1, H, dh).transpose(0, 1)
        logits = q @ k.transpose(-1, -2)
        for rank in (1, dh - 1):
            P, Q = cache.qk(i, rank)
            measured = (
                float((logits - (X @ P) @ (X @ Q).transpose(-1, -2)).square().sum()) / len(X) ** 2
            )
            key = f"blocks.{i}.attn.qk"
            assert _close(cache.error(key, rank), measured, cache.energy(key))
        # value/output: per-head outputs (A_h x) N_h, A_h from timm's explicit attention.
        qkv = attn.qkv(x).reshape(*x.shape[:2], 3, H, dh).permute(2, 0, 3, 1, 4)
        A = (qkv[0] @ qkv[1].transpose(-1, -2) * attn.scale).softmax(-1)
        Ax = A @ x.unsqueeze(1)
        Wv, Wo = attn.qkv.weight[2 * H * dh :], attn.proj.weight
        N = Wv.reshape(H, dh, -1).transpose(-1, -2) @ Wo.T.reshape(H, dh, -1)
        for rank in (1, dh - 1):
            V, O_h, _ = cache.vo(i, rank)
            measured = float((Ax @ (N - V @ O_h)).square().sum()) / (x.shape[0] * x.shape[1])
            key = f"blocks.{i}.attn.vo"
            assert _close(cache.error(key, rank), measured, cache.energy(key))


@pytest.mark.parametrize(("arch", "overrides"), ARCHS)
@torch.no_grad()
def test_full_rank_products_reproduce_the_attention_exactly(arch, overrides):
    from tests.conftest import make_tiny_vit

    model = make_tiny_vit(arch, **overrides).double()
    images = _images(4)
    stats = calibrate(model, _dataset(images), progress=False)
    cache = FactorCache(model, stats)
    inputs = _inputs(model, images)
    for i, block in enumerate(model.blocks):
        attn = block.attn
        x = inputs[f"blocks.{i}.attn"]
        x_bar = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1).unsqueeze(1)
        P, Q = cache.qk(i, attn.head_dim)
        A = ((x_bar @ P) @ (x_bar @ Q).transpose(-1, -2) * attn.scale).softmax(-1)
        V, O_h, out_bias = cache.vo(i, attn.head_dim)
        out = (A @ x.unsqueeze(1) @ V @ O_h).sum(1) + (0 if out_bias is None else out_bias)
        torch.testing.assert_close(out, attn(x), rtol=1e-9, atol=1e-9)
        for name in LINEAR_KEYS:
            key = f"blocks.{i}.{name}"
            down, up, bias = cache.linear(key, cache.max_rank(key))
            layer = model.get_submodule(key)
            torch.testing.assert_close(up @ down, layer.weight, rtol=1e-9, atol=1e-9)


def test_whitened_errors_never_above_plain(calibrated):
    model, _, stats = calibrated
    whitened, plain = FactorCache(model, stats), FactorCache(model, stats, whitening=False)
    for key in whitened.layer_keys():
        w, p = whitened.errors(key), plain.errors(key)
        assert bool((w <= p * (1 + 1e-9) + 1e-15).all()), key
        assert whitened.energy(key) == pytest.approx(plain.energy(key), rel=1e-9)


def test_no_svd_or_cholesky_after_construction(calibrated, monkeypatch, tmp_path):
    model, _, stats = calibrated
    cache = FactorCache(model, stats)
    calls = []
    for name in ("svd", "cholesky", "cholesky_ex", "qr", "eigh", "eigvalsh", "svdvals"):
        original = getattr(torch.linalg, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, counted)
    for key in cache.layer_keys():
        for rank in range(1 if key.endswith(("qk", "vo")) else 1, cache.max_rank(key) + 1):
            cache.error(key, rank)
        cache.spectrum(key)
    for i in range(len(model.blocks)):
        cache.qk(i, 3), cache.vo(i, 2), cache.linear(f"blocks.{i}.mlp.fc1", 5)
    cache.save(tmp_path / "factors.safetensors")
    loaded = FactorCache.load(tmp_path / "factors.safetensors", model)
    assert calls == []
    for key in cache.layer_keys():
        assert torch.equal(loaded.errors(key), cache.errors(key))
    assert all(torch.equal(a, b) for a, b in zip(loaded.vo(1, 3), cache.vo(1, 3), strict=True))


def test_plain_cache_without_statistics_and_shapes():
    from tests.conftest import make_tiny_vit

    model = make_tiny_vit(qkv_bias=False)
    cache = FactorCache(model, None)
    assert not cache.whitening
    W = model.blocks[0].mlp.fc1.weight
    down, up, bias = cache.linear("blocks.0.mlp.fc1", 7)
    assert down.shape == (7, 32) and up.shape == (128, 7) and down.dtype == torch.float32
    sigma = torch.linalg.svdvals(W.detach().double())
    assert cache.error("blocks.0.mlp.fc1", 7) == pytest.approx(
        float(sigma[7:].square().sum()), rel=1e-9
    )
    P, Q = cache.qk(1, 5)
    assert P.shape == Q.shape == (2, 33, 5)
    V, O_h, out_bias = cache.vo(1, 5)
    assert V.shape == (2, 32, 5) and O_h.shape == (2, 5, 32) and out_bias.shape == (32,)
    assert cache.spectrum("blocks.0.attn.qk").shape == (2, 16)


def test_refusals_name_the_rule_and_the_value(calibrated, tmp_path):
    from tests.conftest import make_tiny_vit

    model, _, stats = calibrated
    cache = FactorCache(model, stats)
    with pytest.raises(
        ValueError, match=r"blocks.0.attn.qk: `1 <= rank <= 16` must hold, but got rank=17"
    ):
        cache.qk(0, 17)
    with pytest.raises(ValueError, match="rank <= 32"):
        cache.linear("blocks.1.mlp.fc2", 33)
    with pytest.raises(KeyError, match="2 blocks"):
        cache.linear("blocks.5.mlp.fc2", 3)
    normed = make_tiny_vit(qk_norm=True)
    with pytest.raises(ValueError, match="qk_norm"):
        FactorCache(normed, None).qk(0, 2)
    cache.save(tmp_path / "f.safetensors")
    other = make_tiny_vit(seed=1, qkv_bias=True).double()
    with pytest.raises(ValueError, match="other weights"):
        FactorCache.load(tmp_path / "f.safetensors", other)


def test_non_finite_weights_or_statistics_are_reported(calibrated):
    model, _, stats = calibrated
    broken = {k: v.clone() for k, v in stats.gram.items()}
    broken["blocks.1.mlp.fc1"][2, 3] = float("nan")
    bad_stats = type(stats)(broken, stats.head_gram, stats.hidden_abs_mean, stats.head_abs_mean)
    with pytest.raises(ValueError, match="gram.blocks.1.mlp.fc1 holds 1 NaN/Inf"):
        FactorCache(model, bad_stats)
    import copy

    bad_model = copy.deepcopy(model)
    with torch.no_grad():
        bad_model.blocks[0].attn.proj.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="blocks.0.attn.proj: `W` must be finite"):
        FactorCache(bad_model, stats)


def test_construction_decomposes_only_small_matrices(calibrated, monkeypatch):
    """SVDs run on d_h × d_h head cores, eigensolvers on min(out, in)² Grams (d_h² per
    head), and the only Choleskys are of the d × d inputs of the tall Linears (none of
    fc2's hidden width, of x̄ or of the per-head covariances): the cost grows gently."""
    model, _, stats = calibrated
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for name in ("svd", "eigh", "cholesky_ex", "qr"):
        original = getattr(torch.linalg, name)

        def recorded(A, *args, _name=name, _original=original, **kwargs):
            shapes.setdefault(_name, []).append(tuple(A.shape))
            return _original(A, *args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, recorded)
    FactorCache(model, stats)
    FactorCache(model, None, whitening=False)
    attn = model.blocks[0].attn
    dim = attn.num_heads * attn.head_dim
    assert {s for s in shapes["svd"]} == {(attn.num_heads, attn.head_dim, attn.head_dim)}
    assert {s[-1] for s in shapes["eigh"]} == {dim, attn.head_dim}
    assert {s[-2:] for s in shapes["cholesky_ex"]} == {(dim, dim)}
    assert len(shapes["cholesky_ex"]) == 3 * len(model.blocks)  # qkv, proj, fc1; once each
    assert "qr" not in shapes  # no Householder QR of the tall thin head factors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_models_get_fp64_statistics_and_the_same_factors(dtype):
    import copy

    from tests.conftest import make_tiny_vit

    model = make_tiny_vit(qkv_bias=True).to(dtype)
    stats = calibrate(model, _dataset(_images().to(dtype)), batch_size=6, progress=False)
    assert all(g.dtype == torch.float64 for g in [*stats.gram.values(), *stats.head_gram.values()])
    half = FactorCache(model, stats)
    single = FactorCache(copy.deepcopy(model).float(), stats, dtype=dtype)
    for key in half.layer_keys():  # fp64 factorization of the same values
        assert half.errors(key).dtype == torch.float64
        assert torch.equal(half.errors(key), single.errors(key)), key
    tensors = [*half.linear("blocks.0.mlp.fc1", 5), *half.qk(0, 3), *half.vo(1, 2)]
    assert {t.dtype for t in tensors} == {dtype}
    assert all(torch.equal(a, b) for a, b in zip(half.vo(1, 2), single.vo(1, 2), strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_statistics_read_back_from_file_build_every_operator(tmp_path, dtype):
    from _compress_cases import build, calibration, full_rank, images
    from vitrank.core.apply import apply_specs
    from vitrank.core.operators import OPERATORS
    from vitrank.core.spec import BlockSpec
    from vitrank.core.stats import CalibrationStats
    from vitrank.core.structure import inspect_vit

    teacher = build("vit").to(dtype)
    stats = calibration(teacher)
    stats.save(tmp_path / "calibration.safetensors")
    loaded = CalibrationStats.load(tmp_path / "calibration.safetensors")
    assert (loaded.num_images, loaded.meta) == (stats.num_images, stats.meta)
    for table in ("gram", "head_gram", "hidden_abs_mean", "head_abs_mean"):
        saved, read = getattr(stats, table), getattr(loaded, table)
        assert saved.keys() == read.keys() and all(torch.equal(saved[k], read[k]) for k in saved)
    factors, reference = FactorCache(teacher, loaded), FactorCache(teacher, stats)
    for key in reference.layer_keys():
        assert torch.equal(factors.errors(key), reference.errors(key)), key
    shapes = inspect_vit(teacher).blocks
    x = images().to(dtype)
    with torch.no_grad():
        dense = teacher(x).float()
    tolerance = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    for key in OPERATORS.names():
        part, name = key.split(".")
        op = OPERATORS.get(key)
        grids = op.grids(shapes[0], granularity=4) or {}
        spec = op.spec(**{knob: grid[len(grid) // 2] for knob, grid in grids.items()})
        middle = [BlockSpec(**{part: spec}) for _ in shapes]  # type: ignore[arg-type]
        top = [
            full_rank(s, name if part == "attn" else "dense", name if part == "mlp" else "dense")
            for s in shapes
        ]
        with torch.no_grad():
            student = apply_specs(teacher, middle, factors, loaded)
            out = student(x)
            exact = apply_specs(teacher, top, factors, loaded)(x).float()
        assert {p.dtype for p in student.parameters()} == {dtype}, key
        assert out.dtype == dtype and bool(torch.isfinite(out).all()), key
        assert float((exact - dense).abs().max()) <= tolerance * float(dense.abs().max()), key


def test_layers_factorized_side_by_side_give_the_sequential_factors(calibrated, tmp_path):
    """On the CPU the layers are factorized by `torch.get_num_threads()` workers with one
    thread each; the factors are the same bits as one layer after another on one thread,
    the caller's thread count comes back, and the first failing layer is the one named."""
    model, _, stats = calibrated
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        sequential = FactorCache(model, stats)
        torch.set_num_threads(2)
        parallel = FactorCache(model, stats, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    sequential.save(tmp_path / "a.safetensors")
    parallel.save(tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    import copy

    bad_model = copy.deepcopy(model)
    with torch.no_grad():
        bad_model.blocks[0].mlp.fc2.weight[0, 0] = float("nan")
        bad_model.blocks[1].attn.qkv.weight[0, 0] = float("nan")
    try:
        torch.set_num_threads(2)
        with pytest.raises(ValueError, match="blocks.0.mlp.fc2: `W` must be finite"):
            FactorCache(bad_model, stats)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_factorization_reports_its_progress(calibrated, capsys):
    model, _, stats = calibrated
    FactorCache(model, stats, progress=True)
    err = capsys.readouterr().err
    layers = 6 * len(model.blocks)
    assert f"factorizing (whitened): {layers}/{layers}" in err
