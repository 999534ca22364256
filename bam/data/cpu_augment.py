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

from bam.data.batch_ops import blur, sample_crop_boxes, shift_hue
from bam.data.config import MultiCropConfig, ViewSpec, blur_kernel_size
from bam.data.contrastive_crop import CropBoxes


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


class RegionResizedCrop(nn.Module):
    """RandomResizedCrop whose centre is drawn around a region of the image (ContrastiveCrop).

    ``forward(image, region)``: with ``region`` None it is torchvision's RandomResizedCrop;
    with a normalised ``x0, y0, x1, y1`` region the box comes from
    ``batch_ops.sample_crop_boxes(regions=...)``, the sampler of the on-device path, so both
    paths draw the same crop geometry.

    Args:
        size: Output side.
        scale, ratio: RandomResizedCrop's area and aspect-ratio ranges.
        alpha: Beta(alpha, alpha) parameter of the centre's position between the region's edges.
    """

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float], alpha: float) -> None:
        super().__init__()
        self.plain = v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True)
        self.size, self.scale, self.ratio, self.alpha = size, scale, ratio, alpha

    def forward(self, image: Tensor, region: Tensor | None = None) -> Tensor:
        if region is None:
            return self.plain(image)
        height, width = image.shape[-2:]
        box = sample_crop_boxes(1, height, width, self.scale, self.ratio, regions=region.view(1, 4), alpha=self.alpha)
        x0, y0, x1, y1 = (int(v) for v in box[0].tolist())
        return TF.resized_crop(image, y0, x0, y1 - y0, x1 - x0, [self.size, self.size], antialias=True)


def view_transform(crops: MultiCropConfig, view: ViewSpec, crop: bool = True) -> v2.Compose:
    """The torchvision v2 pipeline of one view: uint8 ``(3, H, W)`` -> normalised float32.

    ``crop=False`` leaves out the first step, the random resized crop (ContrastiveCrop makes it).
    """
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
    return v2.Compose(steps if crop else steps[1:])


class CPUMultiCrop:
    """Callable mapping one uint8 image ``(3, H, W)`` to the list of views of the recipe.

    Args:
        crops: The augmentation recipe.
        boxes: ContrastiveCrop's box store (None: plain RandomResizedCrop). With it, call
            ``multicrop(image, index)``: the crops of dataset image ``index`` are centred around
            its box once the store is active (see ``bam.data.contrastive_crop``).
        alpha: Beta(alpha, alpha) parameter of the crop centres between the box edges.
    """

    def __init__(self, crops: MultiCropConfig, boxes: CropBoxes | None = None, alpha: float = 0.6) -> None:
        self.crops, self.boxes = crops, boxes
        self.transforms = [view_transform(crops, view) for view in crops.views()]
        if boxes is not None:
            self.region_crops = [RegionResizedCrop(v.size, v.scale, crops.ratio, alpha) for v in crops.views()]
            self.after_crop = [view_transform(crops, view, crop=False) for view in crops.views()]

    def __call__(self, image: Tensor, index: int | None = None) -> list[Tensor]:
        if self.boxes is None:
            return [transform(image) for transform in self.transforms]
        if index is None:
            raise ValueError("CPUMultiCrop with ContrastiveCrop boxes needs the image's dataset index: multicrop(image, index)")
        region = self.boxes.lookup(int(index))
        return [rest(crop(image, region)) for crop, rest in zip(self.region_crops, self.after_crop)]

