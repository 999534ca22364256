"""The data recipe of a trained backbone: how images must be prepared for it at evaluation.

Pretraining stores it in its checkpoints (`data_recipe`), every export carries it (as timm's
`pretrained_cfg`), and the evaluation stages take it from the backbone unless told otherwise, so
the normalisation and input size that a backbone was trained with are never typed twice.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms import InterpolationMode, v2

# ImageNet's statistics and crop fraction, the defaults of every recipe (pretraining's multi-crop
# normalisation included): the one copy of each
IMAGENET_MEAN: tuple[float, ...] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, ...] = tuple(IMAGENET_DEFAULT_STD)
DEFAULT_CROP_PCT = 0.875  # resize to size / 0.875, centre-crop size (224 from 256)
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")

CHECKPOINT_KEY = "data_recipe"  # where Lightning checkpoints keep it (top level)


def check_std(std: tuple[float, ...], setting: str) -> None:
    """Refuse a normalisation `std` (named `setting` in the message) with an entry that is not a
    positive number: images are divided by it, so a 0 turns its channel into infinity or NaN."""
    if not all(0 < value < float("inf") for value in std):
        raise ValueError(
            f"{setting} {list(std)} has an entry that is not a positive number: images are divided by the std, so "
            "that channel would become infinite or NaN. Give each channel's standard deviation over the images "
            "(e.g. ImageNet's [0.229, 0.224, 0.225])"
        )


@dataclass(frozen=True)
class DataRecipe:
    """Evaluation preprocessing of a backbone, in timm's terms.

    Args:
        mean: Per-channel mean subtracted from images scaled to [0, 1].
        std: Per-channel standard deviation divided by.
        input_size: Side of the square input, in pixels.
        crop_pct: Centre-crop fraction: the short side is resized to `input_size / crop_pct`
            (1.0: resized to `input_size`, no margin).
        interpolation: Resize interpolation, one of `INTERPOLATIONS`.
        train_crop_sizes: Sides of the crops the backbone was trained on (global, then local;
            empty when unknown). A record of the training, not part of the evaluation
            preprocessing: recipes that differ only here are equal.
    """

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_size: int = 224
    crop_pct: float = DEFAULT_CROP_PCT
    interpolation: str = "bicubic"
    train_crop_sizes: tuple[int, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(value) for value in self.mean))
        object.__setattr__(self, "train_crop_sizes", tuple(int(side) for side in self.train_crop_sizes))
        object.__setattr__(self, "std", tuple(float(value) for value in self.std))
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} must have one entry per channel")
        check_std(self.std, "the data recipe's std")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; choose one of {INTERPOLATIONS}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    @property
    def channels(self) -> int:
        return len(self.mean)

    @property
    def resize_size(self) -> int:
        """Short side images are resized to before the centre crop."""
        return round(self.input_size / self.crop_pct)

    def eval_transform(self, resize: bool = True) -> v2.Compose:
        """uint8 image -> normalised float, as the backbone must see it at evaluation: the short side
        resized to `resize_size` (with `interpolation`), the centre `input_size` square cropped, then
        scaled to [0, 1] and normalised. `resize=False` normalises images as they come (data whose
        images are already at the backbone's size)."""
        steps = [
            v2.Resize(self.resize_size, interpolation=InterpolationMode(self.interpolation), antialias=True),
            v2.CenterCrop(self.input_size),
        ] if resize else []
        return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(self.mean), list(self.std))])

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (lists, not tuples): what checkpoints and `config.json` store."""
        return {**dataclasses.asdict(self), "mean": list(self.mean), "std": list(self.std),
                "train_crop_sizes": list(self.train_crop_sizes)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DataRecipe":
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})

    def pretrained_cfg(self) -> dict[str, Any]:
        """The recipe as timm's `pretrained_cfg` fields (what `timm.data.resolve_data_config` reads)."""
        return {
            "input_size": [self.channels, self.input_size, self.input_size],
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "crop_mode": "center",
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_pretrained_cfg(cls, cfg: Mapping[str, Any]) -> "DataRecipe":
        """Inverse of `pretrained_cfg` (timm's defaults for fields it lacks)."""
        default = cls()
        return cls(
            mean=tuple(cfg.get("mean", default.mean)),
            std=tuple(cfg.get("std", default.std)),
            input_size=int(cfg.get("input_size", [3, default.input_size])[-1]),
            crop_pct=float(cfg.get("crop_pct", default.crop_pct)),
            interpolation=cfg.get("interpolation", default.interpolation),
        )
