"""The backbone an evaluation stage starts from: an export, a checkpoint or a timm model name.

Every stage names its backbone with one string, as `bam.load_backbone` accepts it (an export
directory or file, a bam Lightning checkpoint, the authors' released file), plus a timm model name
for a randomly initialised baseline. Stages work from a `BackboneSpec` (architecture + weights)
rather than a built model, because fine-tuning must rebuild the architecture with other arguments
(drop path) before loading the weights.

A stage that does not store its backbone in its checkpoints (the linear probe reads it again
from `backbone` when resuming) records the backbone's `weights_fingerprint` there instead, and
refuses to resume on a backbone whose weights changed since (`check_same_backbone`).
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from bam.io import BackboneSpec, load_state_strict
from bam.io.backbone_reader import read_backbone
from bam.models.backbones import build_backbone
from bam.ops.errors import UserInputError

# where checkpoints keep the backbone's name and `weights_fingerprint`
FINGERPRINT_KEY = "backbone_fingerprint"


class RandomInitWarning(UserWarning):
    """The backbone named is a timm architecture without weights (no such path exists)."""


class BackboneChangedError(UserInputError):
    """A run is resumed on a backbone whose weights differ from the ones it started with."""


def resolve_backbone(backbone: str, encoder: str | None = None, arch: str | None = None) -> BackboneSpec:
    """The architecture, weights and data recipe named by `backbone`.

    `encoder` ("teacher"/"student") and `arch` apply to checkpoints, as in `bam.load_backbone`. A
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
    return read_backbone(backbone, encoder, arch)


def build_from_spec(spec: BackboneSpec, **overrides: Any) -> nn.Module:
    """The spec's feature extractor (no classifier) with `overrides` added to its timm kwargs and
    its weights loaded strictly (a random-init spec has none), in eval mode."""
    model = build_backbone(spec.model_name, pretrained=False, **{**spec.model_kwargs, **overrides})
    if spec.state:
        load_state_strict(model, spec.state, spec.model_name)
    return model.eval()


def weights_fingerprint(model: nn.Module) -> str:
    """A short SHA-256 of every tensor of `model`'s state (names, dtypes, shapes and bytes): equal
    for the same weights however they were stored (export, checkpoint, random init with a seed)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def record_backbone(checkpoint: dict[str, Any], backbone: str, fingerprint: str) -> None:
    """Write which backbone (as named, and its `weights_fingerprint`) a checkpoint was trained on."""
    checkpoint[FINGERPRINT_KEY] = {"backbone": backbone, "fingerprint": fingerprint}


def check_same_backbone(checkpoint: dict[str, Any], backbone: str, fingerprint: str, checkpoint_path: Any) -> None:
    """Refuse (`BackboneChangedError`) to resume `checkpoint` (read from `checkpoint_path`) on
    `backbone` when its weights are not the ones recorded; checkpoints without a record (written
    before bam recorded it) are resumed as they are."""
    recorded = checkpoint.get(FINGERPRINT_KEY)
    if recorded is None or recorded["fingerprint"] == fingerprint:
        return
    raise BackboneChangedError(
        f"the backbone changed since {checkpoint_path} was written: its head was trained on {recorded['backbone']} "
        f"with weights fingerprint {recorded['fingerprint']}, which now has fingerprint {fingerprint}. Resume with "
        "the backbone the run started from, or probe this one in a new run folder (--trainer.default_root_dir "
        "NEW_FOLDER)"
    )
