"""Backbones are timm models, built by name with their classifier removed.

Architectures that timm does not name directly are registered in timm's own registry here, so
that `timm.create_model` builds them like any other model (after `import bam`, which imports this
module), and loads an export of them with `timm.create_model("local-dir:DIR", pretrained=True)`:

- `bam_vit_small_patch16_224`: ViT-S/16 with 12 heads, as in the authors' release (timm's
  `vit_small_patch16_224` has 6 heads: it loads the same keys and computes something else).
- `bam_caformer_m36`: CAFormer-M36 with GELU activations and no layer/residual scales, the
  variant whose parameter names match the authors' checkpoints.
- `bam_cnn4`: a 4-layer CNN for 28-px images, used by the CPU demo.
"""
from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Iterable
from typing import Any, Optional

import timm
import torch
from timm.layers import SelectAdaptivePool2d, build_sincos2d_pos_embed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.metaformer import Attention, LayerNorm2dNoBias, LayerNormNoBias, MetaFormer, SepConv
from torch import nn

from bam.models.gsp import GSPPool
from bam.ops import is_vit


# bam's name -> (timm's architecture, its arguments) of the same network: exports name the timm
# architecture, so that timm alone (without bam) loads them
TIMM_EQUIVALENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "bam_vit_small_patch16_224": ("vit_small_patch16_224", {"num_heads": 12}),
}


def timm_equivalent(name: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """`(architecture, kwargs)` that timm alone builds into the same network as bam's `name`
    (unchanged when timm has no equivalent)."""
    if name not in TIMM_EQUIVALENTS:
        return name, dict(kwargs)
    architecture, defaults = TIMM_EQUIVALENTS[name]
    return architecture, {**defaults, **kwargs}


# No downloadable weights: `pretrained=True` loads an export (timm's `local-dir:` source) only.
default_cfgs = generate_default_cfgs({
    "bam_cnn4.untrained": {"num_classes": 0, "input_size": (3, 28, 28), "first_conv": "features.0", "classifier": "head"},
    "bam_caformer_m36.untrained": {
        "num_classes": 0, "first_conv": "stem.conv", "classifier": "head.fc", "crop_pct": 1.0,
    },
})


@register_model
def bam_vit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ViT-S/16 with 12 attention heads of dimension 32 (the authors' ViT-S)."""
    architecture, kwargs = timm_equivalent("bam_vit_small_patch16_224", kwargs)
    return timm.create_model(architecture, pretrained=pretrained, **kwargs)


class GeluSepConv(SepConv):
    """CAFormer's separable-conv token mixer with GELU instead of StarReLU (timm needs a class
    here, not a partial: it tells convolutional from attention mixers with issubclass)."""

    def __init__(self, dim: int, **kwargs: Any) -> None:
        kwargs.setdefault("act1_layer", nn.GELU)
        super().__init__(dim, **kwargs)


@register_model
def bam_caformer_m36(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """CAFormer-M36 with GELU everywhere and without layer/residual scale parameters (weights:
    the authors' file through `bam.load_backbone`, or an export through timm's `local-dir:`)."""
    kwargs.setdefault("res_scale_init_values", None)
    kwargs.setdefault("layer_scale_init_values", None)
    kwargs.setdefault("depths", (3, 12, 18, 3))  # a shallower variant of the same stages when given
    kwargs.setdefault("dims", (96, 192, 384, 576))
    return build_model_with_cfg(
        MetaFormer,
        "bam_caformer_m36",
        pretrained,
        feature_cfg={"flatten_sequential": True, "out_indices": (0, 1, 2, 3)},
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
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x).flatten(1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()


@register_model
def bam_cnn4(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """The CPU demo's 4-layer CNN (weights: an export, through timm's `local-dir:` source)."""
    return build_model_with_cfg(SmallCNN, "bam_cnn4", pretrained, **kwargs)


def _factory_options() -> frozenset[str]:
    """The keyword options of timm's model factory and builder themselves (not the model's): they
    fetch or load weights, or take the configuration from elsewhere. Read from the signatures, so
    that an option a later timm adds there is covered too."""
    functions = (timm.create_model, build_model_with_cfg)
    names = {name for function in functions for name in inspect.signature(function).parameters}
    return frozenset(names - {"model_name", "model_cls", "variant", "kwargs"})


FACTORY_OPTIONS = _factory_options()  # pretrained, pretrained_cfg(_overlay), checkpoint_path, cache_dir, ...
# words that make an option a loader's wherever a model forwards it (e.g. `pretrained_backbone`)
LOADER_WORDS = frozenset({"pretrained", "checkpoint", "ckpt", "cache", "url", "hub", "file", "filename", "path",
                          "dir", "download"})


def loader_options(options: Iterable[str]) -> list[str]:
    """The names among `options` that are not the network's shape but ask timm to download or load
    something (or to configure itself from elsewhere), sorted."""
    return sorted(name for name in options
                  if name in FACTORY_OPTIONS or LOADER_WORDS & set(name.lower().split("_")))


# options of `build_backbone` that fix weights during pretraining without changing the network
TRAINING_ONLY_OPTIONS = ("sincos_pos_embed", "freeze_patch_embed")


def build_backbone(
    name: str,
    pretrained: bool = False,
    pooling: Optional[str] = None,
    pooling_kwargs: Optional[dict[str, Any]] = None,
    sincos_pos_embed: bool = False,
    freeze_patch_embed: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Build the timm model `name` as a feature extractor (`num_classes=0`).

    ViTs are built with `dynamic_img_size=True` so that local crops of a smaller resolution go
    through the same network (position embeddings are interpolated).

    `pooling="gsp"` replaces a CNN's global average pooling by generalized sum pooling
    (`bam.models.gsp.GSPPool`, its options in `pooling_kwargs`: `num_prototypes`, `mu`, `eps`,
    `iterations`); `None` keeps the model's own pooling. Both arrive here from a config's
    `backbone_kwargs` and are recorded with exported backbones, so the export rebuilds the same
    network with its learnt prototypes.

    The authors' ViT (their `models/vit.py`, MoCo v3's stability recipe) is a timm ViT with three
    settings, each an option here so that a config shows it: `weight_init="moco"` (timm's own
    argument), `sincos_pos_embed=True` (a fixed 2-D sin-cos position embedding, not trained) and
    `freeze_patch_embed=True` (the patch projection is not trained). The model stays a timm
    `VisionTransformer` with the same state-dict keys (the fixed embedding is still the
    `pos_embed` parameter, only with `requires_grad=False`), so released checkpoints load into it
    and exports of it load into plain timm.
    """
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        raise ValueError(f"unknown backbone {name!r}; timm models with a similar name: {close}")
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS} (None: the model's own)")
    if pooling_kwargs and pooling is None:
        raise ValueError("pooling_kwargs given without pooling='gsp'")
    model = timm.create_model(name, pretrained=pretrained, **timm_kwargs(name, kwargs))
    if sincos_pos_embed or freeze_patch_embed:
        _make_vit_authors_faithful(model, name, sincos_pos_embed, freeze_patch_embed)
    if pooling == "gsp":
        _install_gsp(model, name, pooling_kwargs or {})
    return model


POOLINGS = (None, "gsp")


def timm_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments `build_backbone` gives `timm.create_model` for `name` (no classifier unless
    `num_classes` says so; ViTs accept any input size), all of them explicit: what an export
    records so that timm rebuilds the same network. `TRAINING_ONLY_OPTIONS` say which weights
    pretraining keeps fixed, not what the network is: they are left out (timm would refuse them,
    and fine-tuning an export trains every weight)."""
    kwargs = {key: value for key, value in kwargs.items() if key not in TRAINING_ONLY_OPTIONS}
    defaults: dict[str, Any] = {"num_classes": 0}
    if "vit" in name or "deit" in name:
        defaults["dynamic_img_size"] = True
    return {**defaults, **kwargs}


def _make_vit_authors_faithful(model: nn.Module, name: str, sincos_pos_embed: bool, freeze_patch_embed: bool) -> None:
    if not (is_vit(model) and getattr(model, "pos_embed", None) is not None):
        raise ValueError(
            f"sincos_pos_embed and freeze_patch_embed apply to timm ViTs with a position embedding; {name} is "
            f"{type(model).__name__}"
        )
    if sincos_pos_embed:
        model.pos_embed.data.copy_(sincos_position_embedding(model))
        model.pos_embed.requires_grad_(False)
    if freeze_patch_embed:
        model.patch_embed.proj.requires_grad_(False)


def sincos_position_embedding(model: nn.Module) -> torch.Tensor:
    """The fixed 2-D sin-cos embedding of a timm ViT's patch grid, shaped like its `pos_embed`.

    Per patch at (row, column), a quarter of the width each: sin and cos of the row, then of the
    column, at frequencies `10000 ** (-k / (width / 4))` (MoCo v3's layout, which the authors
    use); the class token's entry is zero. Local crops of another size still interpolate it, as
    timm does for any absolute embedding with `dynamic_img_size`.
    """
    width = model.pos_embed.shape[-1]
    if width % 4:
        raise ValueError(f"a 2-D sin-cos position embedding needs a width divisible by 4, got {width}")
    grid = build_sincos2d_pos_embed(list(model.patch_embed.grid_size), width, interleave_sin_cos=True)
    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    return torch.cat([grid.new_zeros(prefix, width), grid]).unsqueeze(0)


def _install_gsp(model: nn.Module, name: str, options: dict[str, Any]) -> None:
    """Swap the model's global average pooling of its `(B, C, H, W)` last feature map for GSP."""
    if isinstance(model, SmallCNN):
        if model.pool.output_size not in (1, (1, 1)):
            raise ValueError(
                f"pooling='gsp' pools {name}'s feature map to one vector, in place of its "
                f"pool_size={model.pool.output_size} grid: build it with pool_size 1"
            )
        model.pool = GSPPool(model.num_features, **options)
        return
    pool = getattr(model, "global_pool", None)
    if not (isinstance(pool, SelectAdaptivePool2d) and _averages_nchw(pool)):
        raise ValueError(
            f"pooling='gsp' needs a CNN whose head averages a (B, C, H, W) map with timm's "
            f"SelectAdaptivePool2d 'avg' (ResNets, RegNets, EfficientNets, bam_cnn4); {name} has {type(pool).__name__}"
        )
    model.global_pool = GSPPool(model.num_features, **options)
    # timm's reset_classifier (fine-tuning) rebuilds the pooling from its type name: keep GSP and
    # its learnt prototypes, replace only the classifier
    model.reset_classifier = functools.partial(_reset_classifier_keeping_gsp, model)


def _averages_nchw(pool: SelectAdaptivePool2d) -> bool:
    channels_first = getattr(pool.pool, "dim", (2, 3)) in ((2, 3), (-2, -1))
    return pool.pool_type in ("avg", "fast", "fastavg") and pool.feat_mult() == 1 and channels_first


def _reset_classifier_keeping_gsp(model: nn.Module, num_classes: int, global_pool: Optional[str] = None) -> None:
    gsp = model.global_pool
    model.global_pool = SelectAdaptivePool2d(pool_type="avg", flatten=True)  # what timm's method reads
    type(model).reset_classifier(model, num_classes)
    model.global_pool = gsp


def feature_dim(backbone: nn.Module) -> int:
    """Width of the pooled features `backbone(x)` returns."""
    return int(getattr(backbone, "num_features"))
