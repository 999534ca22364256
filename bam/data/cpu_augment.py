"""Per-image multi-crop augmentation with torchvision transforms v2 (the "cpu" path).

DataLoader workers run this on one uint8 image tensor ``(3, H, W)`` at a time. Cropping and
flipping stay in uint8, where torchvision's antialiased resize has a fast kernel; the colour
operations then run in float32, which is faster than torchvision's uint8 versions (they convert
internally).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from bam.data.batch_ops import blur, shift_hue
from bam.data.config import MultiCropConfig, ViewSpec, blur_kernel_size


def _hue(image: Tensor, hue_factor: float) -> Tensor:
    return shift_hue(image.unsqueeze(0), torch.tensor([hue_factor])).squeeze(0)


# ColorJitter's operations in torchvision's numbering (its ``fn_idx`` permutes 0..3)
_JITTER_STEPS: tuple[tuple[str, Callable[[Tensor, float], Tensor]], ...] = (
    ("brightness_factor", TF.adjust_brightness),
    ("contrast_factor", TF.adjust_contrast),
    ("saturation_factor", TF.adjust_saturation),
    ("hue_factor", _hue),
)


class ColorJitter(v2.ColorJitter):
    """torchvision's ColorJitter (its factor sampling and per-call random order), faster hue step.

    torchvision's hue adjustment dominates the cost of the whole CPU recipe; ``shift_hue``
    computes the same result (to 2e-6) in half the time. Expects float images.
    """

    def transform(self, inpt: Tensor, params: dict[str, Any]) -> Tensor:
        for index in params["fn_idx"].tolist():
            name, adjust = _JITTER_STEPS[index]
            if params[name] is not None:
                inpt = adjust(inpt, params[name])
        return inpt


class GaussianBlur(nn.Module):
    """torchvision's GaussianBlur (same kernel, reflect padding), computed by ``batch_ops.blur``.

    torchvision convolves with the full 2-D kernel; on a 224-px view that alone costs more than
    the rest of the recipe, the two matrix products of ``batch_ops.blur`` a quarter of that.

    Args:
        kernel_size: Odd kernel side.
        sigma: Range of the standard deviation, drawn uniformly per call.
        prob: Probability of blurring.
    """

    def __init__(self, kernel_size: int, sigma: tuple[float, float], prob: float) -> None:
        super().__init__()
        self.kernel_size, self.sigma, self.prob = kernel_size, sigma, prob

    def forward(self, image: Tensor) -> Tensor:
        if torch.rand(()) >= self.prob:
            return image
        sigma = torch.empty(1).uniform_(*self.sigma)
        return blur(image.unsqueeze(0), sigma, self.kernel_size).squeeze(0)


def view_transform(crops: MultiCropConfig, view: ViewSpec) -> v2.Compose:
    """The torchvision v2 pipeline of one view: uint8 ``(3, H, W)`` -> normalised float32."""
    steps: list[nn.Module] = [
        v2.RandomResizedCrop(view.size, scale=view.scale, ratio=crops.ratio, antialias=True),
        v2.RandomHorizontalFlip(crops.flip_prob),
        v2.ToDtype(torch.float32, scale=True),
    ]
    ranges = crops.jitter_ranges()
    if crops.color_jitter_prob > 0 and ranges:
        jitter = ColorJitter(**ranges)
        steps.append(v2.RandomApply([jitter], p=crops.color_jitter_prob))
    if crops.grayscale_prob > 0:
        steps.append(v2.RandomGrayscale(crops.grayscale_prob))
    if view.blur_prob > 0:
        kernel = blur_kernel_size(crops.blur_sigma[1], view.size)
        steps.append(GaussianBlur(kernel, crops.blur_sigma, view.blur_prob))
    if view.solarize_prob > 0:
        steps.append(v2.RandomSolarize(0.5, p=view.solarize_prob))
    steps.append(v2.Normalize(list(crops.mean), list(crops.std)))
    return v2.Compose(steps)


class CPUMultiCrop:
    """Callable mapping one uint8 image ``(3, H, W)`` to the list of views of the recipe.

    Args:
        crops: The augmentation recipe.
    """

    def __init__(self, crops: MultiCropConfig) -> None:
        self.crops = crops
        self.transforms = [view_transform(crops, view) for view in crops.views()]

    def __call__(self, image: Tensor) -> list[Tensor]:
        return [transform(image) for transform in self.transforms]

