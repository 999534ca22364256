"""The authors' released pretraining files.

Such a file is a pickle (loaded weights-only) with top-level keys `model`, `optimizer`, `epoch`,
`args` (an argparse Namespace: `arch`, `patch_size`, ...), `fp16_scaler` and possibly `boxes`.
`model` holds `student.module.backbone.*`, `student.module.proj_head.projector.*`,
`teacher.backbone.*` and `teacher.proj_head.projector.*` (`module.` from DDP; `_orig_mod.` wherever
`torch.compile` wrapped a module). The backbone keys are timm's, for the models in
`RELEASED_ARCHS`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import timm

from bam.io.state import BackboneSpec, CheckpointFormatError, select_encoder

# the authors' `args.arch` (with `/patch_size` for ViTs) -> timm model name (bam registers the
# `bam_*` variants: the authors' ViT-S has 12 heads, timm's 6; their CAFormer uses GELU and no
# scale parameters)
RELEASED_ARCHS: dict[str, str] = {
    "vit_small/16": "bam_vit_small_patch16_224",
    "vit_base/16": "vit_base_patch16_224",
    "caformer_m36": "bam_caformer_m36",
}
DEFAULT_PATCH_SIZE = 16  # the authors' command-line default, for files whose args lack it


def is_released_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """True for the authors' layout (weights under `model`, not Lightning's `state_dict`)."""
    return "model" in checkpoint and "state_dict" not in checkpoint


def _fields(args: Any) -> dict[str, Any]:
    """The options of `args` (an argparse Namespace, a dict, or absent) as a dict."""
    if args is None:
        return {}
    return dict(args) if isinstance(args, Mapping) else vars(args)


def resolve_released_arch(args: Any = None, arch: str | None = None) -> str:
    """timm model name for a released file.

    `arch` overrides the file: one of the authors' names (keys of `RELEASED_ARCHS`, the patch
    size may be left out: `vit_small`) or any timm model name. Without it the name comes from
    `args.arch` and `args.patch_size`; only the authors' names are accepted there, so that a
    file is never loaded into a look-alike (timm's 6-head ViT-S loads the 12-head weights).
    """
    fields = _fields(args)
    name = arch if arch is not None else fields.get("arch")
    patch_size = fields.get("patch_size", DEFAULT_PATCH_SIZE)
    for candidate in (f"{name}/{patch_size}", name):
        if candidate in RELEASED_ARCHS:
            return RELEASED_ARCHS[candidate]
    if arch is not None and timm.is_model(arch):
        return arch
    source = "arch" if arch is not None else "the checkpoint's args.arch"
    raise CheckpointFormatError(
        f"cannot map {source}={name!r} (patch size {patch_size}) to a model; known architectures: "
        f"{sorted(RELEASED_ARCHS)}; pass arch= / --arch with one of them or with a timm model name"
    )


def released_spec(checkpoint: Mapping[str, Any], encoder: str | None = None, arch: str | None = None) -> BackboneSpec:
    """The backbone of `encoder` (the teacher by default) of a released file."""
    model_name = resolve_released_arch(checkpoint.get("args"), arch)
    chosen, state = select_encoder(checkpoint["model"], encoder)
    return BackboneSpec(model_name, {}, state, chosen, source_format="released")
