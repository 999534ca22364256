"""Reading a backbone back as a timm model: from an export (`bam.io.export_layout`), read
without unpickling anything, or from a checkpoint of any format bam knows (detected from its
top-level keys: `CHECKPOINT_FORMATS`).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model
from torch import nn

from bam.io.bam_checkpoint import bam_checkpoint_spec, is_bam_checkpoint
from bam.io.export_layout import CONFIG_FILE, EXPORT_FORMAT, LEGACY_FILES, WEIGHTS_FILE, export_dir
from bam.io.finetune_checkpoint import finetune_spec, is_finetune_checkpoint
from bam.io.released import is_released_checkpoint, released_spec
from bam.io.safe_load import PathLike, load_checkpoint_file
from bam.io.state import (
    BackboneSpec,
    CheckpointFormatError,
    CheckpointMismatchError,
    _mismatch_message,
    network_options,
)
from bam.models.backbones import build_backbone
from bam.moved_keys import MovedKey
from bam.recipe import DataRecipe

# the option choosing a checkpoint's encoder was named `which` before it was named for what it
# picks; every command with the option reads the old name (config files too) with a one-line note
ENCODER_MOVED_KEY = MovedKey("which", "encoder")


Detector = Callable[[Mapping[str, Any]], bool]
SpecReader = Callable[[Mapping[str, Any], str | None, str | None], BackboneSpec]  # (checkpoint, encoder, arch)

# checkpoint format -> (recognises the top-level keys, reads the backbone spec); first match wins
CHECKPOINT_FORMATS: dict[str, tuple[Detector, SpecReader]] = {
    "finetune": (is_finetune_checkpoint, lambda checkpoint, encoder, arch: finetune_spec(
        checkpoint, encoder, arch, read_start=read_backbone)),
    "bam": (is_bam_checkpoint, bam_checkpoint_spec),
    "released": (is_released_checkpoint, released_spec),
}


def detect_format(checkpoint: Mapping[str, Any]) -> str:
    """Name of the checkpoint's format (a key of `CHECKPOINT_FORMATS`), from its top-level keys."""
    for name, (detect, _) in CHECKPOINT_FORMATS.items():
        if detect(checkpoint):
            return name
    raise CheckpointFormatError(
        f"unrecognised checkpoint (top-level keys {sorted(checkpoint)}): expected a bam Lightning checkpoint "
        "('state_dict', 'hyper_parameters') or the authors' released file ('model', 'args', ...)"
    )


def read_spec(
    checkpoint: Mapping[str, Any], encoder: str | None = None, arch: str | None = None, source_format: str | None = None
) -> BackboneSpec:
    """The backbone spec of a loaded checkpoint; `source_format` (detected when None) must match."""
    detected = detect_format(checkpoint)
    if source_format is not None and source_format != detected:
        raise CheckpointFormatError(f"expected a {source_format!r} checkpoint, but this is a {detected!r} one")
    return CHECKPOINT_FORMATS[detected][1](checkpoint, encoder, arch)


def load_backbone(path: PathLike, encoder: str | None = None, arch: str | None = None) -> nn.Module:
    """A timm backbone in eval mode, from an export (directory or one of its files), a bam
    Lightning checkpoint (pretraining or fine-tuning) or the authors' released file.

    `encoder` and `arch` choose the encoder and architecture of a checkpoint (see `export_backbone`);
    an export holds one backbone, so they must be left out for it.
    """
    if export_dir(Path(path)) is not None and (encoder is not None or arch is not None):
        raise ValueError(f"{str(path)!r} is an export of one backbone: encoder= and arch= apply to checkpoints only")
    return read_backbone(path, encoder, arch).build()


def read_backbone(path: PathLike, encoder: str | None = None, arch: str | None = None) -> BackboneSpec:
    """The architecture, weights and data recipe of an export or a checkpoint."""
    directory = export_dir(Path(path))
    if directory is None:
        return read_spec(load_checkpoint_file(path), encoder, arch)
    if (directory / CONFIG_FILE).is_file() or not (directory / LEGACY_FILES[1]).is_file():
        return _read_export(directory / WEIGHTS_FILE, directory / CONFIG_FILE)
    return _read_legacy_export(directory / LEGACY_FILES[0], directory / LEGACY_FILES[1])


def _read_export(weights: Path, config_file: Path) -> BackboneSpec:
    config = _read_json(config_file, weights, ("architecture", "model_args"))
    provenance = config.get("bam", {})
    model_args = network_options(config["architecture"], config["model_args"], f"{str(config_file)!r} (model_args)")
    num_classes = int(model_args.pop("num_classes", 0))
    try:
        recipe = DataRecipe.from_pretrained_cfg(config.get("pretrained_cfg", {}))
    except ValueError as error:  # e.g. a zero std
        raise _damaged(config_file, f"holds a data recipe that cannot be used ({error})") from None
    return _spec_from_weights(
        config["architecture"], model_args, weights, provenance.get("encoder", "export"),
        provenance.get("source_format", "export"), recipe, num_classes,
    )


def _read_legacy_export(weights: Path, metadata_file: Path) -> BackboneSpec:
    required = ("model", "model_kwargs", "mean", "std", "input_size", "encoder", "source_format")
    metadata = _read_json(metadata_file, weights, required)
    if metadata.get("format") != EXPORT_FORMAT:
        raise CheckpointFormatError(
            f"{str(metadata_file)!r} is not a bam backbone export (its \"format\" is not \"{EXPORT_FORMAT}\")"
        )
    recipe = DataRecipe(metadata["mean"], metadata["std"], int(metadata["input_size"][-1]))
    where = f"{str(metadata_file)!r} (model_kwargs)"
    model_kwargs = network_options(metadata["model"], metadata["model_kwargs"], where)
    return _spec_from_weights(
        metadata["model"], model_kwargs, weights, metadata["encoder"], metadata["source_format"], recipe
    )


def _read_json(config_file: Path, weights: Path, required_keys: tuple[str, ...]) -> dict[str, Any]:
    """The export's JSON file, with its `required_keys`; any other content is a one-line error."""
    for required in (weights, config_file):
        if not required.is_file():
            raise FileNotFoundError(f"backbone export file not found: {str(required)!r}")
    try:
        config = json.loads(config_file.read_bytes())
    except ValueError as error:  # not JSON, or not UTF-8
        raise _damaged(config_file, f"is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise _damaged(config_file, f"is not a JSON object (it holds a {type(config).__name__})")
    missing = [key for key in required_keys if key not in config]
    if missing:
        raise _damaged(config_file, f"lacks {', '.join(map(repr, missing))}")
    return config


def _damaged(config_file: Path, problem: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{str(config_file)!r} {problem}: the export is damaged; export the checkpoint again")


def _spec_from_weights(
    name: str, kwargs: dict[str, Any], weights: Path, encoder: str, source_format: str,
    recipe: DataRecipe, num_classes: int = 0,
) -> BackboneSpec:
    """Load the safetensors file strictly into the architecture, and describe the result. The file's
    header is checked against the architecture described on the meta device first: a config.json
    asking for another (or a far larger) network costs no memory and no time."""
    with torch.device("meta"):
        described = build_backbone(name, pretrained=False, num_classes=num_classes, **kwargs)
    _check_header(weights, described.state_dict(), name)
    model = build_backbone(name, pretrained=False, num_classes=num_classes, **kwargs)
    load_model(model, str(weights), strict=True)
    return BackboneSpec(name, kwargs, model.state_dict(), encoder, source_format, recipe, num_classes)


def _check_header(weights: Path, expected: Mapping[str, torch.Tensor], arch: str) -> None:
    """Compare the tensors the safetensors header lists with the model's (keys, shapes, and no
    integers where the model has floating-point weights) without reading any weights."""
    try:
        with safe_open(str(weights), framework="pt") as file:
            header = {key: file.get_slice(key) for key in file.keys()}
            found = {key: (tuple(part.get_shape()), part.get_dtype()) for key, part in header.items()}
    except SafetensorError as error:
        raise CheckpointFormatError(f"{str(weights)!r} is not a readable safetensors file ({error}); export the "
                                    "checkpoint again") from None
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    reshaped = [f"{key} (file {found[key][0]}, model {tuple(expected[key].shape)})"
                for key in sorted(set(expected) & set(found)) if found[key][0] != tuple(expected[key].shape)]
    if missing or unexpected or reshaped:
        raise CheckpointMismatchError(_mismatch_message(arch, missing, unexpected, reshaped))
    integers = [f"{key}: {found[key][1]}" for key in sorted(found)
                if expected[key].is_floating_point() and not found[key][1].startswith(("F", "BF"))]
    if integers:
        raise CheckpointFormatError(
            f"{str(weights)!r} stores {len(integers)} floating-point weight{'s' if len(integers) > 1 else ''} of the "
            f"model as integers ({', '.join(integers)}): they would be cast silently; the export is damaged or was "
            "written by other code, export it again"
        )
