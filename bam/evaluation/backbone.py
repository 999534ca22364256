"""The backbone an evaluation stage starts from: an export, a checkpoint or a timm model name.

Every stage names its backbone with one string, as `bam.load_backbone` accepts it (an export
directory or file, a bam Lightning checkpoint, the authors' released file), plus a timm model name
for a randomly initialised baseline. Stages work from a `BackboneSpec` (architecture + weights)
rather than a built model, because fine-tuning must rebuild the architecture with other arguments
(drop path) before loading the weights.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
from torch import nn

from bam.io import BackboneSpec, load_backbone, load_checkpoint_file, load_state_strict, read_spec
from bam.io.export import _export_files
from bam.models.backbones import build_backbone


def resolve_backbone(backbone: str, which: str | None = None, arch: str | None = None) -> BackboneSpec:
    """The architecture and weights named by `backbone`.

    `which` ("teacher"/"student") and `arch` apply to checkpoints, as in `bam.load_backbone`. A
    timm model name that is not an existing path gives a randomly initialised backbone
    (`state` empty), the baseline every trained backbone should beat.
    """
    path = Path(backbone)
    if not path.exists() and timm.is_model(backbone):
        return BackboneSpec(backbone, {}, {}, encoder="random init", source_format="timm")
    files = _export_files(path)
    if files is None:
        return read_spec(load_checkpoint_file(backbone), which, arch)  # the string: an http(s) address too
    model = load_backbone(path, which, arch)  # validates the export and loads it strictly
    metadata = json.loads(files[1].read_text())
    return BackboneSpec(
        metadata["model"],
        dict(metadata["model_kwargs"]),
        model.state_dict(),
        metadata["encoder"],
        metadata["source_format"],
        image_size=int(metadata["input_size"][-1]),
        mean=tuple(metadata["mean"]),
        std=tuple(metadata["std"]),
    )


def build_from_spec(spec: BackboneSpec, **overrides: Any) -> nn.Module:
    """The spec's feature extractor (no classifier) with `overrides` added to its timm kwargs and
    its weights loaded strictly (a random-init spec has none), in eval mode."""
    model = build_backbone(spec.model_name, **{**spec.model_kwargs, **overrides})
    if spec.state:
        load_state_strict(model, spec.state, spec.model_name)
    return model.eval()
