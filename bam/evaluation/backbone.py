"""The backbone an evaluation stage starts from: an export, a checkpoint or a timm model name.

Every stage names its backbone with one string, as `bam.load_backbone` accepts it (an export
directory or file, a bam Lightning checkpoint, the authors' released file), plus a timm model name
for a randomly initialised baseline. Stages work from a `BackboneSpec` (architecture + weights)
rather than a built model, because fine-tuning must rebuild the architecture with other arguments
(drop path) before loading the weights.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import timm
from torch import nn

from bam.io import BackboneSpec, load_state_strict
from bam.io.backbone_reader import read_backbone
from bam.models.backbones import build_backbone


class RandomInitWarning(UserWarning):
    """The backbone named is a timm architecture without weights (no such path exists)."""


def resolve_backbone(backbone: str, which: str | None = None, arch: str | None = None) -> BackboneSpec:
    """The architecture, weights and data recipe named by `backbone`.

    `which` ("teacher"/"student") and `arch` apply to checkpoints, as in `bam.load_backbone`. A
    timm model name that is not an existing path gives a randomly initialised backbone
    (`state` empty, no recipe), the baseline every trained backbone should beat.
    """
    if not Path(backbone).exists() and timm.is_model(backbone):
        warnings.warn(
            f"{backbone!r} is no file or folder here ({Path.cwd()}): evaluating a randomly initialised {backbone} "
            "(timm's architecture of that name), the baseline a trained backbone should beat. If you meant a path, "
            "check it",
            RandomInitWarning,
            stacklevel=2,
        )
        return BackboneSpec(backbone, {}, {}, encoder="random init", source_format="timm")
    return read_backbone(backbone, which, arch)


def build_from_spec(spec: BackboneSpec, **overrides: Any) -> nn.Module:
    """The spec's feature extractor (no classifier) with `overrides` added to its timm kwargs and
    its weights loaded strictly (a random-init spec has none), in eval mode."""
    model = build_backbone(spec.model_name, pretrained=False, **{**spec.model_kwargs, **overrides})
    if spec.state:
        load_state_strict(model, spec.state, spec.model_name)
    return model.eval()
