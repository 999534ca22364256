"""Export a trained backbone to safetensors, and load it (or a checkpoint) back as a timm model.

An export is a directory with `backbone.safetensors` (the timm model's weights) and
`bam_backbone.json` (how to rebuild it: timm model name and kwargs, feature width, input size and
normalisation, source checkpoint and encoder). It is read without unpickling anything.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_model, save_model
from torch import nn

import bam
from bam.io.bam_checkpoint import bam_checkpoint_spec, is_bam_checkpoint
from bam.io.released import RELEASED_ARCHS, is_released_checkpoint, released_spec
from bam.io.safe_load import PathLike, UnsafeCheckpointError, load_checkpoint_file
from bam.io.state import ENCODERS, BackboneSpec, CheckpointFormatError, CheckpointMismatchError
from bam.models.backbones import build_backbone, feature_dim

WEIGHTS_FILE = "backbone.safetensors"
METADATA_FILE = "bam_backbone.json"
EXPORT_FORMAT = "bam-backbone"
EXPORT_FORMAT_VERSION = 1

Detector = Callable[[Mapping[str, Any]], bool]
SpecReader = Callable[[Mapping[str, Any], str | None, str | None], BackboneSpec]  # (checkpoint, which, arch)

# checkpoint format -> (recognises the top-level keys, reads the backbone spec)
CHECKPOINT_FORMATS: dict[str, tuple[Detector, SpecReader]] = {
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
    checkpoint: Mapping[str, Any], which: str | None = None, arch: str | None = None, source_format: str | None = None
) -> BackboneSpec:
    """The backbone spec of a loaded checkpoint; `source_format` (detected when None) must match."""
    detected = detect_format(checkpoint)
    if source_format is not None and source_format != detected:
        raise CheckpointFormatError(f"expected a {source_format!r} checkpoint, but this is a {detected!r} one")
    return CHECKPOINT_FORMATS[detected][1](checkpoint, which, arch)


def export_backbone(
    checkpoint_path: PathLike,
    output_dir: PathLike,
    which: str | None = None,
    arch: str | None = None,
    source_format: str | None = None,
) -> Path:
    """Write the backbone of a bam or released checkpoint to `output_dir`; return the directory.

    `which`: "teacher" or "student"; None takes the teacher when there is one (the published
    numbers use it). `arch` overrides the architecture recorded in the checkpoint.
    """
    spec = read_spec(load_checkpoint_file(checkpoint_path), which, arch, source_format)
    model = spec.build()
    metadata = _metadata(spec, model, Path(checkpoint_path))
    text = _to_json(metadata)  # before writing anything: kwargs must be JSON values
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    save_model(model, str(output / WEIGHTS_FILE))  # handles tied weights, unlike save_file
    (output / METADATA_FILE).write_text(text)
    return output


def _metadata(spec: BackboneSpec, model: nn.Module, source: Path) -> dict[str, Any]:
    channels = spec.model_kwargs.get("in_chans", 3)
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "model": spec.model_name,
        "model_kwargs": spec.model_kwargs,
        "feature_dim": feature_dim(model),
        "input_size": [channels, spec.image_size, spec.image_size],
        "mean": list(spec.mean),
        "std": list(spec.std),
        "encoder": spec.encoder,
        "source": str(source.resolve()),
        "source_format": spec.source_format,
        "bam_version": bam.__version__,
    }


def _to_json(metadata: dict[str, Any]) -> str:
    try:
        return json.dumps(metadata, indent=2)
    except TypeError as error:
        kwargs = metadata["model_kwargs"]
        raise CheckpointFormatError(f"backbone kwargs {kwargs!r} cannot be exported as JSON: {error}") from error


# the file a path names -> (weights file, metadata file) of its export
_EXPORT_FILES: dict[str, Callable[[Path], tuple[Path, Path]]] = {
    ".safetensors": lambda path: (path, path.parent / METADATA_FILE),
    ".json": lambda path: (path.parent / WEIGHTS_FILE, path),
}


def _export_files(path: Path) -> tuple[Path, Path] | None:
    """(weights, metadata) when `path` names an export (its directory or one of its files)."""
    if path.is_dir():
        return path / WEIGHTS_FILE, path / METADATA_FILE
    locate = _EXPORT_FILES.get(path.suffix)
    return locate(path) if locate else None


def load_backbone(path: PathLike, which: str | None = None, arch: str | None = None) -> nn.Module:
    """A timm backbone in eval mode, from an export (directory, `.safetensors` or `.json`), a bam
    Lightning checkpoint or the authors' released file.

    `which` and `arch` choose the encoder and architecture of a checkpoint (see `export_backbone`);
    an export holds one backbone, so they must be left out for it.
    """
    files = _export_files(Path(path))
    if files is None:
        return read_spec(load_checkpoint_file(path), which, arch).build()
    if which is not None or arch is not None:
        raise ValueError(f"{str(path)!r} is an export of one backbone: which= and arch= apply to checkpoints only")
    return _load_export(*files)


def _load_export(weights: Path, metadata_file: Path) -> nn.Module:
    for required in (weights, metadata_file):
        if not required.is_file():
            raise FileNotFoundError(f"backbone export file not found: {str(required)!r}")
    metadata = json.loads(metadata_file.read_text())
    if metadata.get("format") != EXPORT_FORMAT:
        raise CheckpointFormatError(
            f"{str(metadata_file)!r} is not a bam backbone export (its \"format\" is not \"{EXPORT_FORMAT}\")"
        )
    model = build_backbone(metadata["model"], **metadata["model_kwargs"])
    load_model(model, str(weights), strict=True)
    return model.eval()


# errors that the command line reports as a message instead of a traceback
CLI_ERRORS = (FileNotFoundError, UnsafeCheckpointError, CheckpointFormatError, CheckpointMismatchError)


def build_parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """The arguments shared by `bam export` and `bam convert`."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", type=Path, help="checkpoint file to read (loaded weights-only: no code from it runs)"
    )
    parser.add_argument(
        "--output", "-o", type=Path, required=True,
        help=f"directory to write {WEIGHTS_FILE} and {METADATA_FILE} into (created if needed)",
    )
    parser.add_argument(
        "--which", choices=ENCODERS, default=None,
        help="encoder to export; default: the teacher when the checkpoint has one (the published numbers use "
        "it), else the student",
    )
    parser.add_argument(
        "--arch", default=None,
        help=f"architecture to load the weights into, instead of the one the checkpoint records: one of the authors' "
        f"names {sorted(RELEASED_ARCHS)} or a timm model name",
    )
    return parser


def run_export(args: argparse.Namespace, prog: str, source_format: str | None = None) -> Path:
    """Export as the parsed command line says, reporting expected failures without a traceback."""
    try:
        output = export_backbone(args.checkpoint, args.output, args.which, args.arch, source_format)
    except CLI_ERRORS as error:
        raise SystemExit(f"{prog}: error: {error}") from error
    metadata = json.loads((output / METADATA_FILE).read_text())
    print(
        f"{prog}: wrote the {metadata['encoder']} backbone ({metadata['model']}, {metadata['feature_dim']}-d features) "
        f"to {output / WEIGHTS_FILE} and {output / METADATA_FILE}"
    )
    return output


EXPORT_EPILOG = """\
The export is read back with bam.load_backbone(DIR), which returns a timm model in eval mode:
    model = bam.load_backbone("DIR"); features = model(images)  # (N, feature_dim)

examples:
    bam export runs/bam/last.ckpt --output exported/vit_s16
    bam export runs/bam/last.ckpt --output exported/student --which student"""


def main(argv: list[str] | None = None) -> None:
    """`bam export CKPT --output DIR [--which teacher|student] [--arch NAME]`."""
    prog = "bam export"
    parser = build_parser(
        prog,
        "Export the backbone of a pretraining checkpoint (bam's Lightning checkpoint or the authors' released "
        f"file, detected from its contents) as {WEIGHTS_FILE} plus {METADATA_FILE}.",
        EXPORT_EPILOG,
    )
    run_export(parser.parse_args(argv), prog)
