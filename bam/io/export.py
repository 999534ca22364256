"""Export a trained backbone in the layout of timm and the Hugging Face Hub, and load it (or a
checkpoint) back as a timm model.

An export is a directory with `model.safetensors` (the timm model's weights) and `config.json`:
`architecture` and `model_args` (the timm model that rebuilds it), `pretrained_cfg` (the data
recipe it was trained with: input size, mean, std, crop, interpolation, which
`timm.data.resolve_data_config` reads) and `bam` (where it came from). So
`timm.create_model("local-dir:DIR", pretrained=True)` loads it: without bam for architectures timm
has (bam's 12-head ViT-S is written as timm's `vit_small_patch16_224` with `num_heads: 12`), after
`import bam` for bam's own (`bam_cnn4`, `bam_caformer_m36`); the folder can be uploaded to the Hub
as it is. It is read without unpickling anything. Exports of bam 0.1 (`backbone.safetensors` +
`bam_backbone.json`) are still read.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from bam._version import __version__
from bam.io.bam_checkpoint import bam_checkpoint_spec, is_bam_checkpoint
from bam.io.finetune_checkpoint import MODELS, finetune_spec, is_finetune_checkpoint
from bam.io.released import RELEASED_ARCHS, is_released_checkpoint, released_spec
from bam.io.safe_load import NotACheckpointError, PathLike, UnsafeCheckpointError, load_checkpoint_file
from bam.io.state import (
    ENCODERS,
    BackboneSpec,
    CheckpointFormatError,
    CheckpointMismatchError,
    _classifier_name,
    _mismatch_message,
    network_options,
)
from bam.models.backbones import build_backbone, feature_dim, timm_equivalent, timm_kwargs
from bam.recipe import DataRecipe

WEIGHTS_FILE = "model.safetensors"  # the names timm and the Hub look for
CONFIG_FILE = "config.json"
LEGACY_FILES = ("backbone.safetensors", "bam_backbone.json")  # bam 0.1's export
EXPORT_FORMAT = "bam-backbone"
EXPORT_FORMAT_VERSION = 2

Detector = Callable[[Mapping[str, Any]], bool]
SpecReader = Callable[[Mapping[str, Any], str | None, str | None], BackboneSpec]  # (checkpoint, which, arch)

# checkpoint format -> (recognises the top-level keys, reads the backbone spec); first match wins
CHECKPOINT_FORMATS: dict[str, tuple[Detector, SpecReader]] = {
    "finetune": (is_finetune_checkpoint, lambda checkpoint, which, arch: finetune_spec(
        checkpoint, which, arch, read_start=read_backbone)),
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
    recipe: DataRecipe | None = None,
) -> Path:
    """Write the backbone of a bam or released checkpoint to `output_dir`; return the directory.

    `which`: "teacher" or "student" of a pretraining checkpoint (None: the teacher when there is
    one, as the published numbers use it); "ema" or "model" of a fine-tuning checkpoint (None: the
    average when it was kept), exported with its classifier. `arch` overrides the architecture
    recorded in the checkpoint; `recipe` the data recipe (by default the checkpoint's, else
    ImageNet's mean and std at 224 px).
    """
    spec = read_spec(load_checkpoint_file(checkpoint_path), which, arch, source_format)
    if recipe is not None:
        spec.recipe = recipe
    model = spec.build()
    text = _to_json(export_config(spec, model, Path(checkpoint_path)))  # before writing: kwargs must be JSON values
    output = Path(output_dir)
    write_export(model, text, output)
    return output


class ExportWriteError(RuntimeError):
    """The export could not be written (full disk, read-only folder); nothing of it was."""


def write_export(model: nn.Module, config_text: str, output: Path) -> None:
    """Write `model`'s weights and `config_text` to `output` as a pair: both go to a temporary
    folder beside it, which is renamed to `output` (when it exists, its two files are replaced
    by the new ones). A failure leaves `output` as it was and removes the temporary folder. The
    files get the permissions the umask gives (safetensors and `mkdtemp` would give 0600/0700)."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    except OSError as error:
        raise _write_error(error, output) from None
    try:
        save_model(model, str(staging / WEIGHTS_FILE))  # handles tied weights, unlike save_file
        _write_config(staging / CONFIG_FILE, config_text)
        _follow_umask(staging)
        if output.exists():
            for name in (WEIGHTS_FILE, CONFIG_FILE):
                os.replace(staging / name, output / name)
        else:
            staging.rename(output)
    except (OSError, SafetensorError) as error:
        raise _write_error(error, output) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_config(path: Path, text: str) -> None:
    path.write_text(text)


def _follow_umask(directory: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for file in directory.iterdir():
        file.chmod(0o666 & ~umask)


def _write_error(error: Exception, output: Path) -> ExportWriteError:
    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error):
        return ExportWriteError(f"no space left on {output.parent}: nothing was written to {output} (its previous "
                                "contents are unchanged); free some space and export again")
    return ExportWriteError(f"cannot write into {output.parent} ({error}); choose an --output folder you can write to")


def export_config(spec: BackboneSpec, model: nn.Module, source: Path) -> dict[str, Any]:
    """`config.json` of an export: timm's fields, plus bam's provenance under `bam`."""
    architecture, model_args = timm_equivalent(
        spec.model_name, timm_kwargs(spec.model_name, {"num_classes": spec.num_classes, **spec.model_kwargs})
    )
    recipe = spec.data_recipe
    pretrained_cfg = {
        **recipe.pretrained_cfg(),
        "input_size": [model_args.get("in_chans", recipe.channels), recipe.input_size, recipe.input_size],
        "num_classes": spec.num_classes,
        "first_conv": _first_conv(model),
        "classifier": _classifier_name(model) or "head",
    }
    return {
        "architecture": architecture,
        "num_features": feature_dim(model),
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
        "bam": {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_FORMAT_VERSION,
            "bam_architecture": spec.model_name,
            "encoder": spec.encoder,
            "data_recipe_recorded": spec.recipe is not None,
            "train_crop_sizes": list(recipe.train_crop_sizes),  # what it trained on ([] when unrecorded)
            "source": str(source.resolve()),
            "source_format": spec.source_format,
            "bam_version": __version__,
        },
    }


def _first_conv(model: nn.Module) -> str:
    """Name of the first convolution (timm adapts it to other channel counts)."""
    return next((name for name, module in model.named_modules() if isinstance(module, nn.Conv2d)), "")


def _to_json(config: dict[str, Any]) -> str:
    try:
        return json.dumps(config, indent=2)
    except TypeError as error:
        kwargs = config["model_args"]
        raise CheckpointFormatError(f"backbone kwargs {kwargs!r} cannot be exported as JSON: {error}") from error


def _export_dir(path: Path) -> Path | None:
    """The export directory `path` names (the directory or one of its files), or None."""
    directory = path if path.is_dir() else path.parent
    names = (WEIGHTS_FILE, CONFIG_FILE, *LEGACY_FILES)
    if path.is_dir() or path.name in names:
        return directory
    return None


def load_backbone(path: PathLike, which: str | None = None, arch: str | None = None) -> nn.Module:
    """A timm backbone in eval mode, from an export (directory or one of its files), a bam
    Lightning checkpoint (pretraining or fine-tuning) or the authors' released file.

    `which` and `arch` choose the encoder and architecture of a checkpoint (see `export_backbone`);
    an export holds one backbone, so they must be left out for it.
    """
    if _export_dir(Path(path)) is not None and (which is not None or arch is not None):
        raise ValueError(f"{str(path)!r} is an export of one backbone: which= and arch= apply to checkpoints only")
    return read_backbone(path, which, arch).build()


def read_backbone(path: PathLike, which: str | None = None, arch: str | None = None) -> BackboneSpec:
    """The architecture, weights and data recipe of an export or a checkpoint."""
    directory = _export_dir(Path(path))
    if directory is None:
        return read_spec(load_checkpoint_file(path), which, arch)
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


# what an export holds, in words, by the `encoder` it records
EXPORTED_NAMES = {"model": "fine-tuned model", "ema": "fine-tuned model's weight average (EMA)"}

# errors that the command line reports as a message instead of a traceback
CLI_ERRORS = (FileNotFoundError, UnsafeCheckpointError, NotACheckpointError, CheckpointFormatError,
              CheckpointMismatchError, ExportWriteError)


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
        help=f"directory to write {WEIGHTS_FILE} and {CONFIG_FILE} into (created if needed)",
    )
    parser.add_argument(
        "--which", choices=(*ENCODERS, *MODELS), default=None,
        help="pretraining checkpoints: the encoder to export, by default the teacher when the checkpoint has one "
        "(the published numbers use it), else the student; fine-tuning checkpoints: the EMA of the weights "
        "(default, when kept) or the model, exported with its classifier",
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
    config = json.loads((output / CONFIG_FILE).read_text())
    recipe = config["pretrained_cfg"]
    encoder = config["bam"]["encoder"]
    print(
        f"{prog}: wrote the {EXPORTED_NAMES.get(encoder, encoder + ' backbone')} ({config['architecture']}, {config['num_features']}-d "
        f"features, {config['model_args']['num_classes']} classes) to {output / WEIGHTS_FILE} and "
        f"{output / CONFIG_FILE}; data recipe: {recipe['input_size'][-1]} px, mean {recipe['mean']}, std {recipe['std']}"
        + ("" if config["bam"]["data_recipe_recorded"] else " (the checkpoint records none: ImageNet's defaults)")
        + _trained_on(config["bam"]["train_crop_sizes"])
    )
    return output


def _trained_on(crop_sizes: list[int]) -> str:
    return f"; trained on {'/'.join(map(str, crop_sizes))}-px crops" if crop_sizes else ""


EXPORT_EPILOG = """\
The export is read back with bam.load_backbone(DIR), which returns a timm model in eval mode, or by
timm itself (after `import bam` for bam's own architectures such as bam_cnn4):
    model = bam.load_backbone("DIR"); features = model(images)  # (N, feature_dim)
    model = timm.create_model("local-dir:DIR", pretrained=True)

examples:
    bam export runs/bam/last.ckpt --output exported/vit_s16
    bam export runs/bam/last.ckpt --output exported/student --which student"""


def main(argv: list[str] | None = None) -> None:
    """`bam export CKPT --output DIR [--which teacher|student] [--arch NAME]`."""
    prog = "bam export"
    parser = build_parser(
        prog,
        "Export the backbone of a pretraining checkpoint (bam's Lightning checkpoint or the authors' released "
        f"file, detected from its contents) as {WEIGHTS_FILE} plus {CONFIG_FILE}, the layout of timm and the "
        "Hugging Face Hub. Fine-tuning checkpoints (bam finetune) export the whole classifier.",
        EXPORT_EPILOG,
    )
    run_export(parser.parse_args(argv), prog)
