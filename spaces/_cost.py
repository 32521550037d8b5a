"""Exact parameter and FLOP counts of a config, from the config and its fingerprint alone.

Both counts follow the modules `vitrank.compress.apply` builds, layer by layer, so they
equal the built model's `numel` sum and what `torch.utils.flop_counter` measures on it
(2 FLOPs per multiply-accumulate of linear, conv, matmul and attention; norms, softmax,
activations and merging's scatter are not counted, as the counter does not count them).
"""

from __future__ import annotations

from typing import NamedTuple

from vitrank.compress.spec import AttentionSpec, BlockSpec, MlpSpec, merge_count
from vitrank.compress.structure import BlockShape, Fingerprint

from ._config import CompressionConfig


class Linear(NamedTuple):
    """One Linear layer a compressed block runs: y = x Wᵀ (+ b), W is (out × in)."""

    name: str
    in_features: int
    out_features: int
    bias: bool

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


class AttentionCore(NamedTuple):
    """softmax(q kᵀ) v over `heads` heads with query/key width `qk_dim`, value width `v_dim`."""

    heads: int
    qk_dim: int
    v_dim: int


def _factorized(name: str, in_f: int, out_f: int, rank: int, bias: bool) -> list[Linear]:
    # Rank 0 keeps the Linear dense; otherwise B (rank × in, no bias) then A (out × rank).
    if rank == 0:
        return [Linear(name, in_f, out_f, bias)]
    return [Linear(f"{name}.B", in_f, rank, False), Linear(f"{name}.A", rank, out_f, bias)]


def attention_linears(shape: BlockShape, spec: AttentionSpec) -> list[Linear]:
    """The Linears of a block's attention under `spec`, in the order they run."""
    d, inner, h, dh = shape.dim, shape.attn_inner, shape.num_heads, shape.head_dim
    if spec.op == "dense":
        return [
            Linear("qkv", d, 3 * inner, shape.qkv_bias),
            Linear("proj", inner, d, shape.proj_bias),
        ]
    if spec.op == "lowrank":
        return _factorized("qkv", d, 3 * inner, spec.qkv_rank, shape.qkv_bias) + _factorized(
            "proj", inner, d, spec.proj_rank, shape.proj_bias
        )
    if spec.op == "heads":
        # x̄ = [x, 1] makes q' and k' affine (exact biases); the value bias folds into the
        # output bias because attention rows sum to one.
        return [
            Linear("q", d, h * spec.qk_rank, True),
            Linear("k", d, h * spec.qk_rank, True),
            Linear("v", d, h * spec.vo_rank, False),
            Linear("out", h * spec.vo_rank, d, True),
        ]
    if spec.op == "prune":
        kept = spec.heads_kept * dh
        # Pruned heads' mean output is folded into proj's bias when it has one (none added).
        return [
            Linear("qkv", d, 3 * kept, shape.qkv_bias),
            Linear("proj", kept, d, shape.proj_bias),
        ]
    raise ValueError(f"Unknown attention op {spec.op!r}.")


def attention_core(shape: BlockShape, spec: AttentionSpec) -> AttentionCore:
    if spec.op == "heads":
        return AttentionCore(shape.num_heads, spec.qk_rank, spec.vo_rank)
    if spec.op == "prune":
        return AttentionCore(spec.heads_kept, shape.head_dim, shape.head_dim)
    return AttentionCore(shape.num_heads, shape.head_dim, shape.head_dim)


def mlp_linears(shape: BlockShape, spec: MlpSpec) -> list[Linear]:
    """The Linears of a block's MLP under `spec`, in the order they run."""
    d, hidden = shape.dim, shape.mlp_hidden
    if spec.op == "dense":
        return [Linear("fc1", d, hidden, shape.fc1_bias), Linear("fc2", hidden, d, shape.fc2_bias)]
    if spec.op == "lowrank":
        return _factorized("fc1", d, hidden, spec.fc1_rank, shape.fc1_bias) + _factorized(
            "fc2", hidden, d, spec.fc2_rank, shape.fc2_bias
        )
    if spec.op == "prune":
        kept = spec.hidden_kept
        # Pruned units' mean contribution is folded into fc2's bias when it has one.
        return [Linear("fc1", d, kept, shape.fc1_bias), Linear("fc2", kept, d, shape.fc2_bias)]
    raise ValueError(f"Unknown mlp op {spec.op!r}.")


def merge_sets(tokens_in: int, num_prefix_tokens: int) -> tuple[int, int]:
    """Sizes of ToMe's two sides: even and odd patch positions (prefix tokens excluded),
    as `vitrank.compress.merge.match_tokens` splits them."""
    patches = tokens_in - num_prefix_tokens
    return (patches + 1) // 2, patches // 2


def block_params(shape: BlockShape, spec: BlockSpec) -> int:
    linears = attention_linears(shape, spec.attn) + mlp_linears(shape, spec.mlp)
    return shape.fixed_params + sum(layer.params for layer in linears)


def block_flops(shape: BlockShape, spec: BlockSpec, tokens_in: int, num_prefix_tokens: int) -> int:
    """FLOPs of one block for one image entering it with `tokens_in` tokens."""
    n = tokens_in
    flops = sum(
        2 * n * lin.in_features * lin.out_features for lin in attention_linears(shape, spec.attn)
    )
    core = attention_core(shape, spec.attn)
    flops += 2 * core.heads * n * n * (core.qk_dim + core.v_dim)
    merged = merge_count(spec.merge_ratio, n, num_prefix_tokens)
    if merged > 0:
        # Cosine similarity of head-averaged keys between the two sides (one matmul).
        side_a, side_b = merge_sets(n, num_prefix_tokens)
        flops += 2 * side_a * side_b * core.qk_dim
    m = n - merged
    flops += sum(2 * m * lin.in_features * lin.out_features for lin in mlp_linears(shape, spec.mlp))
    return flops


def count_params(config: CompressionConfig) -> int:
    """Parameters of the model `apply` builds from `config` (no model built)."""
    fp = config.fingerprint
    blocks = sum(block_params(s, b) for s, b in zip(fp.blocks, config.blocks, strict=True))
    return fp.other_params + blocks


def dense_params(fingerprint: Fingerprint) -> int:
    return fingerprint.other_params + sum(block_params(s, BlockSpec()) for s in fingerprint.blocks)


def embed_flops(fingerprint: Fingerprint) -> int:
    patches = fingerprint.num_tokens - fingerprint.num_prefix_tokens
    return 2 * patches * fingerprint.blocks[0].dim * fingerprint.patch_dim


def head_flops(fingerprint: Fingerprint) -> int:
    # The classifier(s) run on pooled token(s), one vector per head input.
    if fingerprint.num_classes <= 0:
        return 0
    return 2 * fingerprint.head_inputs * fingerprint.blocks[-1].dim * fingerprint.num_classes


def count_flops(config: CompressionConfig, batch: int = 1) -> int:
    """FLOPs of one forward pass of `batch` images, as torch.utils.flop_counter counts them."""
    if batch < 1:
        raise ValueError(f"`batch >= 1` must hold, but got {batch=}.")
    fp = config.fingerprint
    tokens = config.token_schedule
    total = embed_flops(fp) + head_flops(fp)
    for shape, spec, n in zip(fp.blocks, config.blocks, tokens, strict=False):
        total += block_flops(shape, spec, n, fp.num_prefix_tokens)
    return batch * total


def dense_flops(fingerprint: Fingerprint, batch: int = 1) -> int:
    total = embed_flops(fingerprint) + head_flops(fingerprint)
    for shape in fingerprint.blocks:
        total += block_flops(
            shape, BlockSpec(), fingerprint.num_tokens, fingerprint.num_prefix_tokens
        )
    return batch * total
