"""Per-image multi-crop augmentation on the CPU (the "cpu" path).

DataLoader workers run ``CPUMultiCrop`` on one uint8 image tensor ``(3, H, W)`` at a time. It
makes torchvision's recipe (RandomResizedCrop, flip, ColorJitter, RandomGrayscale, GaussianBlur,
RandomSolarize, Normalize: the same parameter distributions and, except for hue and blur, the
same arithmetic) with less overhead than a ``v2.Compose`` per view:

- crops are cut and resized in uint8, where torchvision's antialiased resize has a fast kernel,
  and their boxes drawn by ``batch_ops.sample_crop_boxes`` (torchvision's sampler, vectorised;
  with ContrastiveCrop regions too), one call for all views of the same size;
- the views of the same size are stacked and go to float32 once; the per-view colour operations
  then work in place on their row, the per-view choices (grey, blur, solarise) are drawn for all
  rows at once, and normalisation is one operation per size;
- hue, the costly step, is computed by ``batch_ops.shift_hue`` in a fifth of torchvision's time, and
  the blur by two banded matrix products (``gaussian_blur``), a fraction of a 2-D convolution.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from bam.data.batch_ops import blur, sample_crop_boxes, shift_hue
from bam.data.config import MultiCropConfig, ViewSpec, blur_kernel_size
from bam.data.contrastive_crop import CropBoxes

def _block_side(length: int) -> int | None:
    """Rows per block of the banded blur: a divisor of ``length`` near 32, or None (dense blur)."""
    divisors = [side for side in range(16, 65) if length % side == 0]
    if divisors:
        return min(divisors, key=lambda side: abs(side - 32))
    return length if length <= 64 else None


def _band(sigma: float, kernel_size: int, block: int) -> Tensor:
    """``(block + kernel_size - 1, block)`` matrix whose column ``j`` holds the Gaussian taps at rows ``j..``."""
    half = kernel_size // 2
    pdf = [math.exp(-0.5 * (tap / sigma) ** 2) for tap in range(-half, half + 1)]
    pdf = [p if p >= 1e-12 else 0.0 for p in pdf]  # subnormal floats make matrix products ~50x slower
    taps = torch.tensor(pdf) / sum(pdf)
    band = torch.zeros(block + 2 * half, block)
    band.as_strided((block, kernel_size), (block + 1, block)).copy_(taps.expand(block, kernel_size))
    return band


def gaussian_blur(image: Tensor, sigma: float, kernel_size: int) -> Tensor:
    """torchvision's GaussianBlur of a float ``(C, H, W)`` image (same kernel, reflect borders).

    Separable, each direction one matrix product with a banded matrix: the reflect-padded lines
    are cut into overlapping blocks of ``block + kernel_size - 1`` pixels, each blurred to
    ``block`` pixels, so the product costs ``kernel_size + block`` multiply-adds per pixel instead
    of the line length of ``batch_ops.blur``'s dense matrices (2x faster on a 224-px view). Same
    result as torchvision's (to 1e-6); sides without a divisor in 16..64 use ``batch_ops.blur``.
    """
    half = kernel_size // 2
    channels, height, width = image.shape
    block_h, block_w = _block_side(height), _block_side(width)
    if block_h is None or block_w is None:
        return blur(image.unsqueeze(0), torch.tensor([sigma]), kernel_size)[0]
    band_w = _band(sigma, kernel_size, block_w)
    band_h = band_w if block_h == block_w else _band(sigma, kernel_size, block_h)
    # columns: rows of the reflect-padded image in overlapping blocks, (block, taps) @ (taps, width)
    padded = torch.cat([image[:, 1 : half + 1].flip(1), image, image[:, height - half - 1 : height - 1].flip(1)], dim=1)
    blocks = padded.as_strided((channels, height // block_h, block_h + 2 * half, width),
                               ((height + 2 * half) * width, block_h * width, width, 1))
    out = torch.matmul(band_h.t(), blocks).view(channels, height, width)
    # rows: overlapping blocks of every padded row, (pixels, taps) @ (taps, block)
    padded = torch.cat([out[..., 1 : half + 1].flip(-1), out, out[..., width - half - 1 : width - 1].flip(-1)], dim=-1)
    blocks = padded.as_strided((channels * height, width // block_w, block_w + 2 * half),
                               (width + 2 * half, block_w, 1))
    return (blocks.reshape(-1, block_w + 2 * half) @ band_w).view(channels, height, width)


def _luma(image: Tensor) -> Tensor:
    """torchvision's grey level ``(1, H, W)`` of a float RGB image (same weights, same arithmetic)."""
    r, g, b = image.unbind(-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def _brightness_(image: Tensor, factor: float) -> None:
    image.mul_(factor).clamp_(0, 1)


def _contrast_(image: Tensor, factor: float) -> None:
    mean = _luma(image).mean()
    image.mul_(factor).add_(mean, alpha=1.0 - factor).clamp_(0, 1)


def _saturation_(image: Tensor, factor: float) -> None:
    grey = _luma(image)
    image.mul_(factor).add_(grey, alpha=1.0 - factor).clamp_(0, 1)


def _hue_(image: Tensor, turns: float) -> None:
    image.copy_(shift_hue(image, turns))


# ColorJitter's operations in torchvision's numbering (its ``fn_idx`` permutes 0..3), in place;
# brightness, contrast and saturation are torchvision's ``_blend`` formulas operation for operation
_JITTER_STEPS: tuple[tuple[str, Callable[[Tensor, float], None]], ...] = (
    ("brightness_factor", _brightness_),
    ("contrast_factor", _contrast_),
    ("saturation_factor", _saturation_),
    ("hue_factor", _hue_),
)


def color_jitter_(image: Tensor, params: dict[str, Any]) -> Tensor:
    """Apply ColorJitter's ``params`` (from ``v2.ColorJitter.make_params``) to a float image in place."""
    for index in params["fn_idx"].tolist():
        name, adjust = _JITTER_STEPS[index]
        if params[name] is not None:
            adjust(image, params[name])
    return image


class ColorJitter(v2.ColorJitter):
    """torchvision's ColorJitter (its factor sampling and per-call random order), faster hue step.

    Expects float images; returns a new image (``color_jitter_`` works in place).
    """

    def transform(self, inpt: Tensor, params: dict[str, Any]) -> Tensor:
        return color_jitter_(inpt.clone(), params)


class _ViewGroup:
    """Consecutive views of the recipe with the same size and scale, processed as one stack."""

    def __init__(self, crops: MultiCropConfig, views: list[ViewSpec]) -> None:
        self.size, self.scale, self.count = views[0].size, views[0].scale, len(views)
        self.ratio = crops.ratio
        self.blur_prob = torch.tensor([v.blur_prob for v in views])
        self.solarize_prob = torch.tensor([v.solarize_prob for v in views])
        self.kernel = blur_kernel_size(crops.blur_sigma[1], self.size)


class CPUMultiCrop:
    """Callable mapping one uint8 image ``(3, H, W)`` to the list of float32 views of the recipe.

    Args:
        crops: The augmentation recipe.
        boxes: ContrastiveCrop's box store (None: plain RandomResizedCrop). With it, call
            ``multicrop(image, index)``: the crops of dataset image ``index`` are centred around
            its box once the store is active (see ``bam.data.contrastive_crop``).
        alpha: Beta(alpha, alpha) parameter of the crop centres between the box edges.
    """

    def __init__(self, crops: MultiCropConfig, boxes: CropBoxes | None = None, alpha: float = 0.6) -> None:
        self.crops, self.boxes, self.alpha = crops, boxes, alpha
        self.groups: list[_ViewGroup] = []
        views = crops.views()
        start = 0
        for end in range(1, len(views) + 1):
            if end == len(views) or (views[end].size, views[end].scale) != (views[start].size, views[start].scale):
                self.groups.append(_ViewGroup(crops, views[start:end]))
                start = end
        ranges = crops.jitter_ranges()
        self.jitter = ColorJitter(**ranges) if crops.color_jitter_prob > 0 and ranges else None
        self.mean = torch.tensor(crops.mean).view(3, 1, 1)
        self.std = torch.tensor(crops.std).view(3, 1, 1)

    def __call__(self, image: Tensor, index: int | None = None) -> list[Tensor]:
        region = None
        if self.boxes is not None:
            if index is None:
                raise ValueError("CPUMultiCrop with ContrastiveCrop boxes needs the image's dataset index: multicrop(image, index)")
            region = self.boxes.lookup(int(index))
        views: list[Tensor] = []
        for group in self.groups:
            views.extend(self._group(image, group, region).unbind(0))
        return views

    def _group(self, image: Tensor, group: _ViewGroup, region: Tensor | None) -> Tensor:
        crops, n = self.crops, group.count
        height, width = image.shape[-2:]
        regions = None if region is None else region.view(1, 4).expand(n, 4)
        boxes = sample_crop_boxes(n, height, width, group.scale, group.ratio, regions=regions, alpha=self.alpha)
        flips = (torch.rand(n) < crops.flip_prob).tolist()
        resized = []
        for (x0, y0, x1, y1), flip in zip(boxes.int().tolist(), flips):
            view = TF.resized_crop(image, y0, x0, y1 - y0, x1 - x0, [group.size, group.size], antialias=True)
            resized.append(view.flip(-1) if flip else view)
        x = TF.to_dtype(torch.stack(resized), torch.float32, scale=True)
        if self.jitter is not None:
            for row in torch.nonzero(torch.rand(n) < crops.color_jitter_prob).flatten().tolist():
                color_jitter_(x[row], self.jitter.make_params([]))
        if crops.grayscale_prob > 0:
            for row in torch.nonzero(torch.rand(n) < crops.grayscale_prob).flatten().tolist():
                x[row].copy_(_luma(x[row]).expand(3, -1, -1))
        rows = torch.nonzero(torch.rand(n) < group.blur_prob).flatten()
        if rows.numel():
            sigma = torch.empty(rows.numel()).uniform_(*crops.blur_sigma)
            for row, s in zip(rows.tolist(), sigma.tolist()):
                x[row] = gaussian_blur(x[row], s, group.kernel)
        for row in torch.nonzero(torch.rand(n) < group.solarize_prob).flatten().tolist():
            view = x[row]
            torch.minimum(view, 1 - view, out=view)  # torchvision's solarise at 0.5: v >= 0.5 -> 1 - v
        return x.sub_(self.mean).div_(self.std)
