"""Does a data recipe fit the images it is given? Checked at start-up of pretraining.

A shipped config reused on other images keeps its numbers silently: the demo's MNIST statistics
(one grey value for all three channels) and 28-px crops on colour photos train, and export, a
network that saw 28-px crops normalised for digits. These checks look at a few images and name
each setting that does not fit them next to what the images are. They warn; a config can be
meant that way. `too_few_images` is an error: a batch larger than the data gives no step at all.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from bam.data.config import MultiCropConfig

SAMPLED_IMAGES = 16
# a recipe's mean more than this far (images scaled to [0, 1]) from the images' own, or its std
# more than this factor off, normalises the images far from zero mean and unit variance
MEAN_TOLERANCE = 0.3
STD_FACTOR = 3.0
COLOUR_THRESHOLD = 0.03  # mean |R - G| + |G - B| of colour photos is above it, of grey images 0
# global crops smaller than this and a quarter of the images' short side throw most of their detail
# away (the demo's 28 px on photos); crops more than twice the short side only upsample
SMALL_CROP = 96
DOWNSCALE_LIMIT = 4
UPSCALE_LIMIT = 2


def sample_images(source: Sequence, count: int = SAMPLED_IMAGES) -> list[Tensor]:
    """Up to `count` readable uint8 images `(C, H, W)` spread evenly over `source` (items
    `(image, label)`, None for an unreadable file)."""
    if len(source) == 0:
        return []
    positions = torch.linspace(0, len(source) - 1, min(count, len(source))).round().long().unique()
    items = (source[int(position)] for position in positions)
    return [item[0] for item in items if item is not None]


def recipe_misfits(images: list[Tensor], crops: MultiCropConfig) -> list[str]:
    """One sentence per setting of `crops` that does not fit `images`, naming both."""
    if not images:
        return []
    problems = _channel_misfits(images, crops) or _statistics_misfits(images, crops)
    return problems + _size_misfits(images, crops)


def _rounded(values: Sequence[float]) -> list[float]:
    return [round(float(value), 3) for value in values]


def _channel_misfits(images: list[Tensor], crops: MultiCropConfig) -> list[str]:
    channels = {image.shape[0] for image in images}
    if channels != {len(crops.mean)}:
        return [f"the recipe normalises {len(crops.mean)} channel(s) (data.init_args.crops.mean {_rounded(crops.mean)}) "
                f"but the images have {sorted(channels)}"]
    grey_statistics = len(set(crops.mean)) == 1 and len(set(crops.std)) == 1 and len(crops.mean) > 1
    colour = torch.stack([(image[:-1].float() - image[1:].float()).abs().mean() / 255 for image in images]).mean()
    if grey_statistics and colour > COLOUR_THRESHOLD:
        return [f"the recipe normalises with one grey value for every channel (data.init_args.crops.mean "
                f"{_rounded(crops.mean)}, std {_rounded(crops.std)}) but the images are in colour "
                f"(mean {_rounded(_mean(images))}, std {_rounded(_std(images))}); for photos use ImageNet's "
                "statistics (--data.init_args.crops.mean [0.485,0.456,0.406] --data.init_args.crops.std [0.229,0.224,0.225])"]
    return []


def _statistics_misfits(images: list[Tensor], crops: MultiCropConfig) -> list[str]:
    mean, std = _mean(images), _std(images)
    far_mean = (mean - torch.tensor(crops.mean)).abs().max() > MEAN_TOLERANCE
    ratio = std / torch.tensor(crops.std)
    if far_mean or (ratio > STD_FACTOR).any() or (ratio < 1 / STD_FACTOR).any():
        return [f"the recipe's normalisation (data.init_args.crops.mean {_rounded(crops.mean)}, std "
                f"{_rounded(crops.std)}) is far from the images' own (mean {_rounded(mean)}, std {_rounded(std)})"]
    return []


def _size_misfits(images: list[Tensor], crops: MultiCropConfig) -> list[str]:
    short_side = int(torch.tensor([min(image.shape[-2:]) for image in images]).median())
    size = crops.global_size
    if size < SMALL_CROP and size * DOWNSCALE_LIMIT <= short_side:
        return [f"the global crops are {size} px (data.init_args.crops.global_size; local "
                f"{crops.local_size} px) but the images' short side is {short_side} px: the network sees "
                f"them {short_side // size}x reduced; set the crop sizes for these images"]
    if size > UPSCALE_LIMIT * short_side:
        return [f"the global crops are {size} px (data.init_args.crops.global_size) but the images' short side "
                f"is only {short_side} px: every crop is an upsampled blur; set smaller crop sizes"]
    return []


def _pixels(images: list[Tensor]) -> Tensor:
    """(channels, pixels) of every sampled image, scaled to [0, 1]."""
    return torch.cat([image.flatten(1).float() / 255 for image in images], dim=1)


def _mean(images: list[Tensor]) -> Tensor:
    return _pixels(images).mean(dim=1)


def _std(images: list[Tensor]) -> Tensor:
    return _pixels(images).std(dim=1)


def too_few_images(images: int, batch_size: int, processes: int) -> str | None:
    """Why a training epoch of `images` has no full batch, or None when it has one (the last
    partial batch is dropped, so an epoch needs `batch_size` images on every process)."""
    if images // processes >= batch_size:
        return None
    largest = images // processes
    # a global batch of one image is never a remedy: the objectives match each image to the others
    remedy = f"set --data.init_args.batch_size {largest} or less, or add images" if largest * processes >= 2 else "add images"
    return (f"the training set has {images} images but a step takes data.init_args.batch_size={batch_size} per process "
            f"x {processes} process(es) = {batch_size * processes} (global batch): no training step would run; {remedy}")
