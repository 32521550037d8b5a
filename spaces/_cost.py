"""Exact parameter and FLOP counts of a config, from the config and its fingerprint alone.

Both counts follow the modules `vitrank.core.apply` builds, layer by layer, so they
equal the built model's `numel` sum and what `torch.utils.flop_counter` measures on it
(2 FLOPs per multiply-accumulate of linear, conv, matmul and attention; norms, softmax,
activations and merging's scatter are not counted, as the counter does not count them).

The FLOP count equals the counter's under the math SDPA backend only
(`torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`), which runs attention as matmuls
the counter sees; torch does not count the fused CPU kernel, so under the default
backend the counter reports less than the attention work done. Compare there.
"""

from __future__ import annotations

from vitrank.core.config import CompressionConfig
from vitrank.core.operators import AttentionCore, Linear, operator
from vitrank.core.spec import AttentionSpec, BlockSpec, MlpSpec, merge_count
from vitrank.core.structure import BlockShape, Fingerprint


def attention_linears(shape: BlockShape, spec: AttentionSpec, merges: bool = False) -> list[Linear]:
    """The Linears of a block's attention under `spec`, in the order they run; `merges`:
    the block merges tokens (see `Operator.linears`)."""
    return operator("attn", spec.op).linears(shape, spec, merges)


def attention_core(shape: BlockShape, spec: AttentionSpec) -> AttentionCore:
    return operator("attn", spec.op).core(shape, spec)


def mlp_linears(shape: BlockShape, spec: MlpSpec) -> list[Linear]:
    """The Linears of a block's MLP under `spec`, in the order they run."""
    return operator("mlp", spec.op).linears(shape, spec)


def merge_sets(tokens_in: int, num_prefix_tokens: int) -> tuple[int, int]:
    """Sizes of ToMe's two sides, the patch tokens at even and at odd positions of the
    whole sequence (prefix tokens counted in the positions, left out of the sides), as
    `vitrank.core.merge.match_tokens` splits them."""
    patches = tokens_in - num_prefix_tokens
    first, second = (patches + 1) // 2, patches // 2
    # An odd prefix puts the first patch token at an odd position, on side B.
    return (second, first) if num_prefix_tokens % 2 else (first, second)


def block_params(shape: BlockShape, spec: BlockSpec) -> int:
    merges = spec.merge_ratio > 0
    linears = attention_linears(shape, spec.attn, merges) + mlp_linears(shape, spec.mlp)
    return shape.fixed_params + sum(layer.params for layer in linears)


def block_flops(shape: BlockShape, spec: BlockSpec, tokens_in: int, num_prefix_tokens: int) -> int:
    """FLOPs of one block for one image entering it with `tokens_in` tokens."""
    n = tokens_in
    attn = attention_linears(shape, spec.attn, spec.merge_ratio > 0)
    flops = sum(2 * n * lin.in_features * lin.out_features for lin in attn)
    core = attention_core(shape, spec.attn)
    flops += 2 * core.heads * n * n * (core.qk_dim + core.v_dim)
    merged = merge_count(spec.merge_ratio, n, num_prefix_tokens)
    if merged > 0:
        # Cosine similarity of head-averaged keys between the two sides (one matmul); the
        # keys are the teacher's width for every operator (`heads` reads them back).
        side_a, side_b = merge_sets(n, num_prefix_tokens)
        flops += 2 * side_a * side_b * shape.head_dim
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
