"""bam's own pretraining checkpoints (written by Lightning).

Layout: `{'state_dict': ..., 'hyper_parameters': ..., 'epoch': ..., 'global_step': ..., ...}`.
`state_dict` holds `student.backbone.*`, `student.projector.*` and, with a momentum teacher,
`teacher.backbone.*`, `teacher.projector.*`. `hyper_parameters` names the backbone:
`backbone` (timm model name) and `backbone_kwargs` (dict or None). `data_recipe` (top level,
`bam.recipe.DataRecipe` as a dict) is how its images were prepared; older checkpoints lack it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bam.io.state import BackboneSpec, CheckpointFormatError, network_options, select_encoder
from bam.recipe import CHECKPOINT_KEY, DataRecipe


def is_bam_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """True for a Lightning checkpoint (weights under `state_dict`, with `hyper_parameters`)."""
    return "state_dict" in checkpoint and "hyper_parameters" in checkpoint


def bam_checkpoint_spec(
    checkpoint: Mapping[str, Any], encoder: str | None = None, arch: str | None = None
) -> BackboneSpec:
    """The backbone of `encoder` (the teacher when present by default) of a bam checkpoint.

    `arch` overrides the timm model name stored in the hyper-parameters.
    """
    hparams = checkpoint["hyper_parameters"]
    model_name = arch if arch is not None else hparams.get("backbone")
    if not isinstance(model_name, str):
        raise CheckpointFormatError(
            f"the checkpoint's hyper_parameters name no backbone (a timm model name under 'backbone'; "
            f"found keys {sorted(hparams)}); pass arch= / --arch"
        )
    chosen, state = select_encoder(checkpoint["state_dict"], encoder)
    return BackboneSpec(
        model_name,
        network_options(
            model_name, hparams.get("backbone_kwargs") or {}, "the checkpoint's hyper_parameters['backbone_kwargs']"
        ),
        state,
        chosen,
        source_format="bam",
        recipe=checkpoint_recipe(checkpoint),
    )


def checkpoint_recipe(checkpoint: Mapping[str, Any]) -> DataRecipe | None:
    """The data recipe a Lightning checkpoint records (None for checkpoints written without one)."""
    values = checkpoint.get(CHECKPOINT_KEY)
    return DataRecipe.from_dict(values) if values else None
