"""The layout of a backbone export (a directory timm and the Hugging Face Hub read): its file
names, format tag, and how to tell that a path names one.

An export is a directory with `model.safetensors` (the timm model's weights) and `config.json`:
`architecture` and `model_args` (the timm model that rebuilds it), `pretrained_cfg` (the data
recipe it was trained with: input size, mean, std, crop, interpolation, which
`timm.data.resolve_data_config` reads) and `bam` (where it came from). So
`timm.create_model("local-dir:DIR", pretrained=True)` loads it: without bam for architectures timm
has (bam's 12-head ViT-S is written as timm's `vit_small_patch16_224` with `num_heads: 12`), after
`import bam` for bam's own (`bam_cnn4`, `bam_caformer_m36`); the folder can be uploaded to the Hub
as it is. Exports of bam 0.1 (`backbone.safetensors` + `bam_backbone.json`) are still read.
"""
from __future__ import annotations

from pathlib import Path


WEIGHTS_FILE = "model.safetensors"  # the names timm and the Hub look for
CONFIG_FILE = "config.json"
LEGACY_FILES = ("backbone.safetensors", "bam_backbone.json")  # bam 0.1's export
EXPORT_FORMAT = "bam-backbone"
EXPORT_FORMAT_VERSION = 2


def export_dir(path: Path) -> Path | None:
    """The export directory `path` names (the directory or one of its files), or None."""
    directory = path if path.is_dir() else path.parent
    names = (WEIGHTS_FILE, CONFIG_FILE, *LEGACY_FILES)
    if path.is_dir() or path.name in names:
        return directory
    return None
