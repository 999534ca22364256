"""Checkpoint input/output: safe (weights-only) loading, the authors' released files, and backbone
export to safetensors with `load_backbone` to read any of them back as a timm model."""
from bam.io.bam_checkpoint import bam_checkpoint_spec, is_bam_checkpoint
from bam.io.backbone_reader import detect_format, load_backbone, read_backbone, read_spec
from bam.io.export_writer import export_backbone
from bam.io.released import RELEASED_ARCHS, is_released_checkpoint, released_spec, resolve_released_arch
from bam.io.safe_load import (
    SAFE_GLOBALS,
    NotACheckpointError,
    SafeCheckpointIO,
    UnsafeCheckpointError,
    load_checkpoint_file,
)
from bam.io.state import (
    BackboneSpec,
    CheckpointFormatError,
    CheckpointMismatchError,
    load_state_strict,
    select_encoder,
    strip_prefix,
    submodule_state,
)

__all__ = [
    "BackboneSpec",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "NotACheckpointError",
    "RELEASED_ARCHS",
    "SAFE_GLOBALS",
    "SafeCheckpointIO",
    "UnsafeCheckpointError",
    "bam_checkpoint_spec",
    "detect_format",
    "export_backbone",
    "is_bam_checkpoint",
    "is_released_checkpoint",
    "load_backbone",
    "load_checkpoint_file",
    "read_backbone",
    "load_state_strict",
    "read_spec",
    "released_spec",
    "resolve_released_arch",
    "select_encoder",
    "strip_prefix",
    "submodule_state",
]
