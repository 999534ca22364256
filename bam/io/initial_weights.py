"""Released weights to start a new run from (`init_weights` of the pretraining methods).

Unlike resuming (`--ckpt_path`), only the backbone's weights are taken: the run starts at epoch
0 with a new optimiser, new schedules and a new projector. The file may be

- a bam export (its folder, `model.safetensors` or `config.json`),
- a timm or Hugging Face state dict: `.safetensors`, or `.pth`/`.pt`/`.bin` (plain, or under
  `state_dict` as timm's training script saves it), `module.` prefixes of DDP included,
- a bam pretraining checkpoint or the authors' released file: the teacher's backbone (else the
  student's), as `bam export` takes it.

Everything is loaded weights-only (`load_checkpoint_file`, safetensors), and strictly: a key or
shape that does not fit the run's backbone is an error listing the keys.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor, nn

from bam.io.backbone_reader import read_backbone
from bam.io.export_layout import CONFIG_FILE, WEIGHTS_FILE
from bam.io.safe_load import PathLike, load_checkpoint_file
from bam.io.state import (
    ENCODERS,
    CheckpointFormatError,
    CheckpointMismatchError,
    load_state_strict,
    select_encoder,
    submodule_state,
)

# where checkpoints that are not plain state dicts keep their weights: Lightning and timm's
# training script (`state_dict`), the authors' released files (`model`)
NESTED_WEIGHTS = ("state_dict", "model")


def initial_backbone_state(path: PathLike) -> dict[str, Tensor]:
    """The backbone weights in `path` (see the module's notes for the formats), keyed as the
    backbone's own `state_dict()`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"init_weights file not found: {str(path)!r}")
    if path.is_dir() or path.name == CONFIG_FILE or (path.name == WEIGHTS_FILE and (path.parent / CONFIG_FILE).is_file()):
        return read_backbone(path).state
    if path.suffix == ".safetensors":
        return _backbone_part(load_file(str(path)))
    return _backbone_part(load_checkpoint_file(path))


def _backbone_part(loaded: Mapping[str, Any]) -> dict[str, Tensor]:
    """A checkpoint's backbone: an encoder's (`teacher.backbone.*`, else `student.backbone.*`) when
    the weights are a method's, else all of them, without wrapper prefixes."""
    nested = next((loaded[key] for key in NESTED_WEIGHTS if isinstance(loaded.get(key), Mapping)), None)
    state = nested if nested is not None else loaded
    tensors = {key: value for key, value in state.items() if isinstance(value, Tensor)}
    if not tensors:
        raise CheckpointFormatError(f"no weights found (top-level keys: {sorted(loaded)[:8]})")
    if any(submodule_state(tensors, (encoder, "backbone")) for encoder in ENCODERS):
        return select_encoder(tensors)[1]
    return submodule_state(tensors, ())


def load_initial_weights(backbone: nn.Module, path: PathLike, architecture: str) -> int:
    """Load the backbone weights of `path` strictly into `backbone` (built as `architecture`);
    return the number of tensors loaded."""
    state = initial_backbone_state(path)
    try:
        load_state_strict(backbone, state, architecture)
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(
            f"init_weights {str(path)!r}: {error} For init_weights that is model.init_args.backbone and backbone_kwargs."
        ) from None
    return len(state)
