"""Backbones are timm models, built by name with their classifier removed.

Architectures that timm does not name directly are registered in timm's own registry here, so
that `timm.create_model` builds them like any other model (after `import bam.models`):

- `bam_vit_small_patch16_224`: ViT-S/16 with 12 heads, as in the authors' release (timm's
  `vit_small_patch16_224` has 6 heads: it loads the same keys and computes something else).
- `bam_caformer_m36`: CAFormer-M36 with GELU activations and no layer/residual scales, the
  variant whose parameter names match the authors' checkpoints.
- `bam_cnn4`: a 4-layer CNN for 28-px images, used by the CPU demo.
"""
from __future__ import annotations

import difflib
from typing import Any

import timm
import torch
from timm.models import register_model
from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv
from torch import nn


def _without_factory_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    # timm.create_model passes its pretrained-config bookkeeping to every model function.
    factory_only = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
    return {key: value for key, value in kwargs.items() if key not in factory_only}


@register_model
def bam_vit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT-S/16 with 12 attention heads of dimension 32 (the authors' ViT-S)."""
    kwargs.setdefault("num_heads", 12)
    return timm.create_model("vit_small_patch16_224", pretrained=pretrained, **kwargs)


class GeluSepConv(SepConv):
    """CAFormer's separable-conv token mixer with GELU instead of StarReLU (timm needs a class
    here, not a partial: it tells convolutional from attention mixers with issubclass)."""

    def __init__(self, dim: int, **kwargs: Any) -> None:
        kwargs.setdefault("act1_layer", nn.GELU)
        super().__init__(dim, **kwargs)


@register_model
def bam_caformer_m36(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """CAFormer-M36 with GELU everywhere and without layer/residual scale parameters."""
    if pretrained:
        raise ValueError("bam_caformer_m36 has no timm weights; load the authors' file with bam.load_backbone")
    kwargs = _without_factory_kwargs(kwargs)
    kwargs.setdefault("res_scale_init_values", None)
    kwargs.setdefault("layer_scale_init_values", None)
    return MetaFormer(
        depths=(3, 12, 18, 3),
        dims=(96, 192, 384, 576),
        token_mixers=(GeluSepConv, GeluSepConv, Attention, Attention),
        norm_layers=(LayerNorm2dNoBias,) * 2 + (LayerNormNoBias,) * 2,
        mlp_act=nn.GELU,
        **kwargs,
    )


class SmallCNN(nn.Module):
    """Four 3x3 conv blocks (conv, batch norm, ReLU; stride 2 from the second on), then average
    pooling to a `pool_size` x `pool_size` grid, flattened. Resolution-agnostic, so 28-px global
    and 14-px local crops share one network; a 2x2 grid keeps where strokes are, which a single
    global average (pool_size 1) throws away and digits need."""

    def __init__(
        self, in_chans: int = 3, width: int = 64, num_classes: int = 0, global_pool: str = "avg", pool_size: int = 1
    ) -> None:
        super().__init__()
        channels = [in_chans, width, width * 2, width * 2, width * 4]
        blocks = []
        for index, (cin, cout) in enumerate(zip(channels, channels[1:])):
            blocks += [
                nn.Conv2d(cin, cout, 3, stride=1 if index == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(pool_size)
        self.num_features = channels[-1] * pool_size**2
        self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x).flatten(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()


@register_model
def bam_cnn4(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """The CPU demo's 4-layer CNN (no timm weights)."""
    if pretrained:
        raise ValueError("bam_cnn4 has no pretrained weights")
    return SmallCNN(**_without_factory_kwargs(kwargs))


def is_vit(model: nn.Module) -> bool:
    """True for timm VisionTransformer-like models (a class token and patch embedding)."""
    return hasattr(model, "patch_embed") and hasattr(model, "cls_token")


def build_backbone(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build the timm model `name` as a feature extractor (`num_classes=0`).

    ViTs are built with `dynamic_img_size=True` so that local crops of a smaller resolution go
    through the same network (position embeddings are interpolated).
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ValueError(f"unknown backbone {name!r}; timm models with a similar name: {close}")
    kwargs.setdefault("num_classes", 0)
    if "vit" in name or "deit" in name:
        kwargs.setdefault("dynamic_img_size", True)
    return timm.create_model(name, pretrained=pretrained, **kwargs)


def feature_dim(backbone: nn.Module) -> int:
    """Width of the pooled features `backbone(x)` returns."""
    return int(getattr(backbone, "num_features"))
