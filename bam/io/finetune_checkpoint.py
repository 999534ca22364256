"""bam's fine-tuning checkpoints (`bam finetune`, written by Lightning): a whole classifier.

Layout: `state_dict` holds the fine-tuned timm model, classifier included, under `model.*` and,
with `ema: true`, its exponential moving average under `ema.module.*`. `bam_architecture` (top
level) records the timm architecture, its arguments and the data recipe; checkpoints written
before it existed name the starting backbone under `hyper_parameters['backbone']` instead (an
export or checkpoint path, read again to learn the architecture, or a timm model name).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import timm

from bam.io.state import BackboneSpec, CheckpointFormatError, network_options, submodule_state
from bam.recipe import DataRecipe

ARCHITECTURE_KEY = "bam_architecture"
MODELS = ("ema", "model")  # order of preference: the average when it was kept
# the EMA's own `module.` level is skipped like a DistributedDataParallel wrapper (`submodule_state`)
MODEL_PATHS = {"model": ("model",), "ema": ("ema",)}

StartReader = Callable[[str], BackboneSpec]  # the path of an export or checkpoint -> its backbone spec


def is_finetune_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """True for a Lightning checkpoint of `bam finetune` (a classifier under `model.*`)."""
    if "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        return False
    hparams = checkpoint["hyper_parameters"]
    return ARCHITECTURE_KEY in checkpoint or ("layer_decay" in hparams and "num_classes" in hparams)


def finetune_spec(
    checkpoint: Mapping[str, Any], encoder: str | None = None, arch: str | None = None, *, read_start: StartReader
) -> BackboneSpec:
    """The fine-tuned classifier `encoder` ("ema" by default when kept, else "model"). `read_start`
    reads the starting backbone (an export or a checkpoint: `bam.io.backbone_reader.read_backbone`, passed in
    because the export module reads this format), for checkpoints older than recorded architectures."""
    found = {name: submodule_state(checkpoint["state_dict"], MODEL_PATHS[name]) for name in MODELS}
    present = [name for name in MODELS if found[name]]
    if encoder is not None and encoder not in MODELS:
        raise CheckpointFormatError(
            f"a fine-tuning checkpoint holds {present}: encoder= must be one of them, not {encoder!r}"
        )
    if not present or (encoder is not None and encoder not in present):
        raise CheckpointFormatError(f"the fine-tuning checkpoint has no {encoder or 'model'} weights (found: {present})")
    chosen = encoder or present[0]
    model_name, model_kwargs, recipe = _architecture(checkpoint, arch, read_start)
    return BackboneSpec(
        model_name, model_kwargs, found[chosen], chosen, source_format="finetune", recipe=recipe,
        num_classes=int(checkpoint["hyper_parameters"]["num_classes"]),
    )


def _architecture(
    checkpoint: Mapping[str, Any], arch: str | None, read_start: StartReader
) -> tuple[str, dict[str, Any], DataRecipe | None]:
    recorded = checkpoint.get(ARCHITECTURE_KEY)
    if recorded is not None:
        recipe = DataRecipe.from_dict(recorded["data_recipe"]) if recorded.get("data_recipe") else None
        model_name = arch or recorded["model"]
        where = f"the checkpoint's {ARCHITECTURE_KEY}['model_kwargs']"
        return model_name, network_options(model_name, recorded["model_kwargs"], where), recipe
    start = checkpoint["hyper_parameters"]["backbone"]
    if arch is not None or timm.is_model(start):
        return arch or start, {}, None
    try:
        spec = read_start(start)
    except FileNotFoundError as error:
        raise CheckpointFormatError(
            f"this fine-tuning checkpoint (written before bam recorded architectures) names its starting backbone "
            f"{start!r}, which no longer exists; pass arch= / --arch with its timm model name"
        ) from error
    return spec.model_name, spec.model_kwargs, spec.recipe
