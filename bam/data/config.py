"""The multi-crop augmentation settings, shared by the CPU and the on-device augmentation paths.

Defaults are DINO's multi-crop settings as used by BAM: 2 global crops of 224 px (scale 0.25-1) and 6 local crops
of 96 px (scale 0.05-0.25), each flipped, colour-jittered, possibly made grey, blurred and (second
global crop only) solarised, then normalised with the ImageNet mean and std. Every number can be
changed from a config file; setting a probability to 0 removes that operation (e.g. the colour
operations for grey digit images).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import groupby

from bam.ops.crops import check_crop_counts
from bam.recipe import IMAGENET_MEAN, IMAGENET_STD, check_std


@dataclass(frozen=True)
class ViewSpec:
    """What one crop of the settings needs: output size, area range and per-view probabilities."""

    size: int
    scale: tuple[float, float]
    blur_prob: float
    solarize_prob: float


@dataclass(frozen=True)
class ViewGroup:
    """Consecutive views of the settings with the same size and scale: both augmentation drivers
    crop and augment them as one stack, with one blur kernel and per-view probabilities."""

    size: int
    scale: tuple[float, float]
    blur_probs: tuple[float, ...]
    solarize_probs: tuple[float, ...]
    blur_kernel: int

    @property
    def count(self) -> int:
        """Number of views in the group."""
        return len(self.blur_probs)


@dataclass(frozen=True)
class MultiCropConfig:
    """The multi-crop augmentation settings (DINO's numbers as defaults).

    Args:
        num_global_crops: Number of large crops; they come first in the list of views.
        global_size: Output side of a global crop in pixels.
        global_scale: Range of the crop area as a fraction of the image area, global crops.
        num_local_crops: Number of small crops (0 for none).
        local_size: Output side of a local crop in pixels.
        local_scale: Range of the crop area as a fraction of the image area, local crops.
        ratio: Range of the crop aspect ratio (sampled log-uniformly, as torchvision does).
        flip_prob: Probability of a horizontal flip.
        color_jitter_prob: Probability of applying colour jitter (0 turns it off).
        brightness: Brightness factor range is ``[max(0, 1 - b), 1 + b]``.
        contrast: Contrast factor range is ``[max(0, 1 - c), 1 + c]``.
        saturation: Saturation factor range is ``[max(0, 1 - s), 1 + s]``.
        hue: Hue shift range is ``[-hue, hue]`` in turns (at most 0.5).
        grayscale_prob: Probability of converting to grey (3 equal channels).
        global_blur_prob: Gaussian blur probability of global crop ``i`` is entry ``i % len``.
        local_blur_prob: Gaussian blur probability of every local crop.
        blur_sigma: Range of the blur's standard deviation in output pixels.
        global_solarize_prob: Solarisation probability of global crop ``i`` is entry ``i % len``.
        local_solarize_prob: Solarisation probability of every local crop.
        mean: Per-channel mean subtracted after augmentation (images scaled to [0, 1]).
        std: Per-channel standard deviation divided by after augmentation.
    """

    num_global_crops: int = 2
    global_size: int = 224
    global_scale: tuple[float, float] = (0.25, 1.0)
    num_local_crops: int = 6
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.25)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    global_blur_prob: tuple[float, ...] = (1.0, 0.1)
    local_blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    global_solarize_prob: tuple[float, ...] = (0.0, 0.2)
    local_solarize_prob: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        check_crop_counts(self.num_global_crops, self.num_local_crops)
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5] turns, got {self.hue}")
        check_std(self.std, "crops std")
        if not self.global_blur_prob or not self.global_solarize_prob:
            raise ValueError("global_blur_prob and global_solarize_prob need at least one entry")
        for name in ("global_scale", "local_scale", "ratio", "blur_sigma"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(f"{name} must be an increasing pair of positive numbers, got {(low, high)}")

    @property
    def num_views(self) -> int:
        """Global plus local crops."""
        return self.num_global_crops + self.num_local_crops

    def views(self) -> list[ViewSpec]:
        """One spec per view, global crops first (the order of the views handed to the model)."""
        specs = [
            ViewSpec(
                self.global_size,
                tuple(self.global_scale),
                self.global_blur_prob[i % len(self.global_blur_prob)],
                self.global_solarize_prob[i % len(self.global_solarize_prob)],
            )
            for i in range(self.num_global_crops)
        ]
        local = ViewSpec(self.local_size, tuple(self.local_scale), self.local_blur_prob, self.local_solarize_prob)
        return specs + [local] * self.num_local_crops

    def view_groups(self) -> list[ViewGroup]:
        """``views()`` as runs of equal size and scale, in order (global crops, then local crops)."""
        groups = []
        for (size, scale), run in groupby(self.views(), key=lambda view: (view.size, view.scale)):
            specs = list(run)
            groups.append(ViewGroup(size, scale, tuple(v.blur_prob for v in specs),
                                    tuple(v.solarize_prob for v in specs), blur_kernel_size(self.blur_sigma[1], size)))
        return groups

    def jitter_ranges(self) -> dict[str, tuple[float, float]]:
        """Factor ranges of the colour-jitter operations that are switched on (torchvision's semantics)."""
        ranges = {
            "brightness": (max(0.0, 1 - self.brightness), 1 + self.brightness),
            "contrast": (max(0.0, 1 - self.contrast), 1 + self.contrast),
            "saturation": (max(0.0, 1 - self.saturation), 1 + self.saturation),
            "hue": (-self.hue, self.hue),
        }
        strengths = {"brightness": self.brightness, "contrast": self.contrast,
                     "saturation": self.saturation, "hue": self.hue}
        return {name: ranges[name] for name, strength in strengths.items() if strength > 0}


def blur_kernel_size(sigma_max: float, image_size: int) -> int:
    """Odd kernel side covering +-3 sigma, but small enough for reflect padding of the image.

    Both augmentation paths use this so their blurs are the same filter; PIL's blur (DINO's
    original) likewise extends to about 3 sigma.
    """
    size = 2 * math.ceil(3 * sigma_max) + 1
    return max(1, min(size, 2 * image_size - 1))
