"""Find an encoder's backbone weights in a checkpoint and load them strictly into a timm model.

Checkpoint keys carry the path of the module that owned each tensor: `teacher.backbone.blocks...`,
plus wrapper levels that training added: `module.` (DistributedDataParallel) and `_orig_mod.`
(`torch.compile`), at any level. Prefixes are removed as whole strings, never with `str.lstrip`,
which strips a *character set* (`"backbone.bn1.weight".lstrip("backbone.") == "1.weight"`).
Weights are matched strictly: a mismatch is reported with the keys, never silently skipped.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from bam.models.backbones import build_backbone, loader_options
from bam.recipe import DataRecipe

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
ENCODERS = ("teacher", "student")  # order of preference: the published numbers use the teacher
MAX_LISTED_KEYS = 8


class CheckpointFormatError(ValueError):
    """The checkpoint does not have the layout that was expected (keys or entries missing)."""


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's weights do not fit the architecture they were loaded into."""


class UntrustedOptionError(CheckpointFormatError):
    """A file's metadata asks timm for more than the network's shape: a download, a file to load."""


def network_options(name: str, options: Mapping[str, Any], where: str) -> dict[str, Any]:
    """`options` (the timm arguments that a checkpoint or an export records for architecture
    `name`, read from `where`) as a new dict, when they only shape the network.

    Metadata is as untrusted as the file: timm honours `pretrained`, `pretrained_cfg_overlay`
    (a `url`, `file` or `hf_hub_id`), `checkpoint_path`, `cache_dir` and a `hf-hub:` or
    `local-dir:` source in the name, which download files or read other ones, and older timm
    releases unpickled them without restriction. The weights come from the file itself, so such
    options are refused (`UntrustedOptionError`), never dropped silently.
    """
    if ":" in name:
        raise UntrustedOptionError(
            f"{where} names the architecture {name!r}, a model source that timm would read a configuration from "
            "(and download from); bam builds models from metadata by timm model name only: write the name alone"
        )
    refused = loader_options(options)
    if refused:
        raise UntrustedOptionError(
            f"{where} asks timm for {', '.join(refused)}, which download or load files (and loading one can run "
            "code): refused. bam builds a model from metadata with network options only and takes its weights from "
            "the file itself; remove these options from it"
        )
    return dict(options)


def strip_prefix(key: str, prefix: str) -> str | None:
    """`key` without the leading string `prefix`, or None when `key` does not start with it."""
    return key[len(prefix):] if key.startswith(prefix) else None


def _unwrap(key: str) -> str:
    """`key` without the wrapper levels (`module.`, `_orig_mod.`) at its start."""
    for prefix in WRAPPER_PREFIXES:
        rest = strip_prefix(key, prefix)
        if rest is not None:
            return _unwrap(rest)
    return key


def _relative_key(key: str, path: Sequence[str]) -> str | None:
    """`key` relative to the module at `path` (names of nested modules), or None if outside it."""
    rest: str | None = _unwrap(key)
    for name in path:
        rest = strip_prefix(rest, f"{name}.")
        if rest is None:
            return None
        rest = _unwrap(rest)
    return rest


def submodule_state(state: Mapping[str, Tensor], path: Sequence[str]) -> dict[str, Tensor]:
    """The entries of `state` that belong to the module at `path`, e.g. `("teacher", "backbone")`,
    keyed relative to it. Wrapper levels are skipped wherever they appear along the path."""
    relative = ((_relative_key(key, path), value) for key, value in state.items())
    return {key: value for key, value in relative if key is not None}


def select_encoder(
    state: Mapping[str, Tensor], encoder: str | None = None, part: str = "backbone"
) -> tuple[str, dict[str, Tensor]]:
    """The `part` weights of `encoder` ("teacher" or "student"), as (the encoder chosen, state).

    `encoder=None` takes the teacher when the checkpoint has one, else the student. An explicit
    encoder that the checkpoint lacks is an error (a silent fallback would report numbers of the
    wrong network).
    """
    if encoder is not None and encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS} or None, got {encoder!r}")
    found = {name: submodule_state(state, (name, part)) for name in ENCODERS}
    present = [name for name in ENCODERS if found[name]]
    if not present or (encoder is not None and encoder not in present):
        wanted = encoder or " or ".join(ENCODERS)
        raise CheckpointFormatError(
            f"the checkpoint has no {wanted} {part} weights (encoders found: {present or 'none'}); "
            f"its keys look like: {_listing(sorted(state))}"
        )
    chosen = encoder or present[0]
    return chosen, found[chosen]


def _listing(keys: Sequence[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    more = len(keys) - MAX_LISTED_KEYS
    return f"{shown}, ... (+{more} more)" if more > 0 else shown


def _classifier_name(model: nn.Module) -> str | None:
    """Qualified name of timm's classifier module (`head` for ViTs, `head.fc` for MetaFormers)."""
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        return None
    classifier = get_classifier()
    return next((name for name, module in model.named_modules() if module is classifier), None)


def _without_classifier(model: nn.Module, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop classifier weights that the feature extractor (built with num_classes=0) has no place
    for; everything else, a MetaFormer's `head.norm` included, still has to match."""
    name = _classifier_name(model)
    expected = model.state_dict()
    dropped = [key for key in state if name and key.startswith(f"{name}.") and key not in expected]
    if dropped:
        warnings.warn(
            f"ignoring {len(dropped)} classifier weights ({_listing(dropped)}): "
            "bam loads backbones without a classifier"
        )
    return {key: value for key, value in state.items() if key not in dropped}


def load_state_strict(model: nn.Module, state: Mapping[str, Tensor], arch: str) -> None:
    """Load `state` into `model` (built as `arch`), requiring every key and shape to match.

    Raises `CheckpointMismatchError` listing missing, unexpected and reshaped keys (with counts).
    """
    state = _without_classifier(model, state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    reshaped = [
        f"{key} (file {tuple(state[key].shape)}, model {tuple(expected[key].shape)})"
        for key in sorted(set(expected) & set(state))
        if state[key].shape != expected[key].shape
    ]
    if missing or unexpected or reshaped:
        raise CheckpointMismatchError(_mismatch_message(arch, missing, unexpected, reshaped))
    model.load_state_dict(state, strict=True)


def _mismatch_message(arch: str, missing: list[str], unexpected: list[str], reshaped: list[str]) -> str:
    groups = {
        "missing (in the model, not in the file)": missing,
        "unexpected (in the file, not in the model)": unexpected,
        "shape mismatch": reshaped,
    }
    lines = [f"  {len(keys)} {title}: {_listing(keys)}" for title, keys in groups.items() if keys]
    return (
        f"the checkpoint's backbone weights do not fit architecture {arch!r}:\n" + "\n".join(lines)
        + "\nLoad it as the architecture that wrote it (arch= / --arch)."
    )


@dataclass
class BackboneSpec:
    """Everything needed to rebuild one trained backbone: the timm model, its weights and the data
    recipe it was trained with (None when its source records none: ImageNet's, as the authors')."""

    model_name: str
    model_kwargs: dict[str, Any]
    state: dict[str, Tensor]
    encoder: str
    source_format: str
    recipe: DataRecipe | None = None
    num_classes: int = 0  # a fine-tuned model's classifier (0: features only)

    @property
    def data_recipe(self) -> DataRecipe:
        """The recorded recipe, or the default (ImageNet normalisation, 224 px)."""
        return self.recipe or DataRecipe()

    def build(self) -> nn.Module:
        """The timm model (feature extractor, or classifier with `num_classes`) with these weights
        loaded strictly, in eval mode."""
        kwargs = {"num_classes": self.num_classes, **self.model_kwargs}
        model = build_backbone(self.model_name, pretrained=False, **kwargs)
        load_state_strict(model, self.state, self.model_name)
        return model.eval()
