"""Writing a backbone export (`bam.io.export_layout`): the weights and `config.json` of a
checkpoint's backbone, written as a pair or not at all.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import save_model
from torch import nn

from bam._version import __version__
from bam.io.backbone_reader import read_spec
from bam.io.export_layout import CONFIG_FILE, EXPORT_FORMAT, EXPORT_FORMAT_VERSION, WEIGHTS_FILE
from bam.io.safe_load import PathLike, load_checkpoint_file
from bam.io.state import BackboneSpec, CheckpointFormatError, _classifier_name
from bam.models.backbones import feature_dim, timm_equivalent, timm_kwargs
from bam.recipe import DataRecipe


def export_backbone(
    checkpoint_path: PathLike,
    output_dir: PathLike,
    encoder: str | None = None,
    arch: str | None = None,
    source_format: str | None = None,
    recipe: DataRecipe | None = None,
) -> Path:
    """Write the backbone of a bam or released checkpoint to `output_dir`; return the directory.

    `encoder`: "teacher" or "student" of a pretraining checkpoint (None: the teacher when there is
    one, as the published numbers use it); "ema" or "model" of a fine-tuning checkpoint (None: the
    average when it was kept), exported with its classifier. `arch` overrides the architecture
    recorded in the checkpoint; `recipe` the data recipe (by default the checkpoint's, else
    ImageNet's mean and std at 224 px).
    """
    spec = read_spec(load_checkpoint_file(checkpoint_path), encoder, arch, source_format)
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
