"""What vitrank can compress: reading a timm ViT's structure into a fingerprint.

The fingerprint (block shapes, token counts, the parameters outside the blocks) is all
that the cost models need, and it is what a saved configuration is checked against
before it is applied to a model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn


class UnsupportedModelError(ValueError):
    """The model is not a timm Vision Transformer that vitrank knows how to compress."""


@dataclass(frozen=True)
class BlockShape:
    name: str  # module path, e.g. "blocks.3"
    dim: int  # embedding width d
    num_heads: int
    head_dim: int
    mlp_hidden: int
    qkv_bias: bool
    proj_bias: bool
    fc1_bias: bool
    fc2_bias: bool
    qk_norm: bool  # per-head LayerNorm on q and k (rules out head-level factorization)
    # Parameters of the block that no operator touches (norms, layer scales, qk norms).
    fixed_params: int

    @property
    def attn_inner(self) -> int:
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class Fingerprint:
    architecture: str  # timm model class (and name when known)
    num_tokens: int  # tokens entering the first block, prefix tokens included
    num_prefix_tokens: int  # cls + distillation + register tokens (never merged)
    patch_dim: int  # in_chans * patch_h * patch_w
    num_classes: int
    head_inputs: int  # 1 for a token head, 2 for a distilled model's two heads
    other_params: int  # parameters outside the blocks (embeddings, final norm, heads)
    blocks: tuple[BlockShape, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Fingerprint:
        blocks = tuple(BlockShape(**b) for b in data["blocks"])
        return cls(**{**data, "blocks": blocks})

    @property
    def digest(self) -> str:
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe_difference(self, other: Fingerprint) -> str:
        """One line naming the first thing that differs, for error messages."""
        mine, theirs = self.to_dict(), other.to_dict()
        for key in mine:
            if key == "blocks":
                continue
            if mine[key] != theirs[key]:
                return f"{key}: {mine[key]!r} != {theirs[key]!r}"
        if len(self.blocks) != len(other.blocks):
            return f"number of blocks: {len(self.blocks)} != {len(other.blocks)}"
        for a, b in zip(self.blocks, other.blocks, strict=True):
            if a != b:
                for key, value in asdict(a).items():
                    if value != getattr(b, key):
                        return f"{a.name}.{key}: {value!r} != {getattr(b, key)!r}"
        return "identical"


def _count(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters())


def _block_shape(name: str, block: nn.Module) -> BlockShape:
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, Block

    if type(block) is not Block:
        raise UnsupportedModelError(
            f"{name} is a {type(block).__name__}; vitrank compresses timm "
            "vision_transformer.Block blocks (pre-norm attention + MLP)."
        )
    attn, mlp = block.attn, block.mlp
    if type(attn) is not Attention:
        raise UnsupportedModelError(
            f"{name}.attn is a {type(attn).__name__}; vitrank supports timm's Attention."
        )
    if type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear):
        raise UnsupportedModelError(
            f"{name}.mlp is a {type(mlp).__name__}; vitrank supports timm's Mlp "
            "(fc1 -> activation -> fc2), not gated or convolutional MLPs."
        )
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity) or not isinstance(
        getattr(mlp, "norm", nn.Identity()), nn.Identity
    ):
        raise UnsupportedModelError(
            f"{name} uses an inner scale norm (attention or MLP), which vitrank does not support."
        )
    if getattr(attn, "gate", None) is not None:
        raise UnsupportedModelError(
            f"{name}.attn is gated (sigmoid output gate), which vitrank does not support."
        )
    dim = attn.qkv.in_features
    qk_norm = not isinstance(attn.q_norm, nn.Identity)
    touched = [attn.qkv, attn.proj, mlp.fc1, mlp.fc2]
    fixed = _count(block) - sum(_count(m) for m in touched)
    return BlockShape(
        name=name,
        dim=dim,
        num_heads=attn.num_heads,
        head_dim=attn.head_dim,
        mlp_hidden=mlp.fc1.out_features,
        qkv_bias=attn.qkv.bias is not None,
        proj_bias=attn.proj.bias is not None,
        fc1_bias=mlp.fc1.bias is not None,
        fc2_bias=mlp.fc2.bias is not None,
        qk_norm=qk_norm,
        fixed_params=fixed,
    )


def check_teacher(model: nn.Module, name: str | None = None) -> None:
    """Refuse a teacher whose compression could not be scored: no head, one class, or
    weights (parameters or buffers) holding NaN/Inf, named by their state-dict key.

    Calibration sees only the blocks' inputs; a NaN in the head (or in one weight that
    happens to give finite statistics) would surface as "no feasible trial" much later.
    """
    label = name or type(model).__name__
    classes = getattr(model, "num_classes", None)
    if classes == 0:
        raise UnsupportedModelError(
            f"{label} has no classification head (num_classes=0): vitrank scores a "
            "compressed model by its class logits against the teacher's, so `num_classes "
            ">= 2` must hold; pass the classifier with its head."
        )
    if classes == 1:
        raise UnsupportedModelError(
            f"{label} has one class: its softmax is 1 for every image, so every proxy would "
            "be 0 and accuracy 100 %; `num_classes >= 2` must hold."
        )
    found = first_non_finite(dict([*model.named_parameters(), *model.named_buffers()]))
    if found is not None:
        raise ValueError(
            f"{label}: the teacher's weights must be finite, but {found[0]} holds {found[1]} "
            "NaN/Inf values; fix or re-export the checkpoint before compressing it."
        )


def first_non_finite(tensors: dict[str, Tensor]) -> tuple[str, int] | None:
    """(key, count) of the first floating tensor holding NaN or Inf, else None."""
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return key, int((~torch.isfinite(tensor)).sum())
    return None


# What vitrank compresses, in one place: the refusals say it, and the README shows it.
SUPPORTED_MODELS = (
    "timm VisionTransformer models with standard blocks (pre-norm attention + MLP): plain "
    "ViT and DeiT (distilled ones too), DeiT-III (layer scale), DINOv2 and other ViTs with "
    "register tokens, token-, average- or max-pooled ViTs, FlexiViT and the ResNet-stem "
    "hybrids, with or without q/k normalisation, e.g. deit_small_patch16_224"
)
# The block kind that stops timm's other ViT-like classes, by class name.
_BLOCK_KINDS = {
    "Eva": "blocks apply rotary position embeddings to q and k and use SwiGLU MLPs (EVA-02, "
    "the RoPE ViTs, DINOv3)",
    "VisionTransformerRelPos": "blocks add a relative position bias to the attention",
    "Beit": "blocks add a relative position bias to the attention",
    "SwinTransformer": "blocks attend in shifted windows, with patch merging between stages",
    "SwinTransformerV2": "blocks attend in shifted windows, with patch merging between stages",
    "Levit": "blocks are convolutional attention, with downsampling stages",
    "PoolingVisionTransformer": "blocks sit in stages with pooling between them",
    "Xcit": "blocks use cross-covariance attention",
    "Cait": "blocks use class attention and talking heads",
    "MultiScaleVit": "blocks use multiscale pooling attention",
}


def _not_a_vit(label: str, model: nn.Module) -> str:
    """Why `model` is refused: its class and the block kind that stops it, then what works."""
    kind = type(model).__name__
    blocks = _BLOCK_KINDS.get(kind)
    if blocks is None:
        found = next(
            (type(m).__name__ for m in model.modules() if "Block" in type(m).__name__), None
        )
        blocks = f"blocks are {found}s" if found else "layers hold no transformer blocks"
    return (
        f"{label} is a {kind}, whose {blocks}; vitrank cannot compress it. vitrank "
        f"compresses {SUPPORTED_MODELS}."
    )


def inspect_vit(model: nn.Module, name: str | None = None) -> Fingerprint:
    """Read a timm VisionTransformer's structure; raise `UnsupportedModelError` otherwise."""
    from timm.models.vision_transformer import VisionTransformer

    label = name or type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(_not_a_vit(label, model))
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise UnsupportedModelError(f"{label} has no `blocks` sequence of transformer blocks.")
    if getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError(
            f"{label} pools with attention (global_pool='map'); vitrank supports 'token' and "
            "'avg' pooling."
        )
    shapes = tuple(_block_shape(f"blocks.{i}", b) for i, b in enumerate(blocks))
    embed = model.patch_embed
    proj = embed.proj
    patch_dim = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    num_patches = embed.num_patches
    heads = 2 if getattr(model, "head_dist", None) is not None else 1
    return Fingerprint(
        architecture=name or type(model).__name__,
        num_tokens=num_patches + model.num_prefix_tokens,
        num_prefix_tokens=model.num_prefix_tokens,
        patch_dim=patch_dim,
        num_classes=model.num_classes,
        head_inputs=heads,
        other_params=_count(model) - _count(blocks),
        blocks=shapes,
    )
