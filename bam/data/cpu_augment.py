"""Per-image driver of the augmentation operations on the CPU (the "cpu" path).

DataLoader workers run ``CPUMultiCrop`` on one uint8 image tensor ``(3, H, W)`` at a time. It
makes torchvision's augmentation pipeline (RandomResizedCrop, flip, ColorJitter, RandomGrayscale, GaussianBlur,
RandomSolarize, Normalize: the same parameter distributions and, except for hue and blur, the
same arithmetic) from the operations of ``bam.data.augment_ops``, the ones the device driver
applies to whole batches.

It is hand-written rather than a ``v2.Compose`` per view because of its measured speed:
``tests/benchmarks/bench_data.py`` runs both on the same JPEGs, and this path makes the full
augmentation several times faster per CPU core than torchvision's per-image pipeline. What it saves:

- crops are cut and resized in uint8, where torchvision's antialiased resize has a fast kernel,
  and their boxes drawn by ``augment_ops.sample_crop_boxes`` (torchvision's sampler, vectorised;
  with ContrastiveCrop regions too), one call for all views of the same size;
- the views of the same size are stacked and go to float32 once; the per-view colour operations
  then work in place on their row, the per-view choices (grey, blur, solarise) are drawn for all
  rows at once, and normalisation is one operation per size;
- hue, the costly step, is ``augment_ops.shift_hue`` (a fraction of torchvision's time), and the
  blur ``augment_ops.gaussian_blur_image`` (banded matrix products, a fraction of a convolution);
  the measured figures are in docs/results-cost.md.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import bam.data.augment_ops as ops
from bam.data.config import MultiCropConfig, ViewGroup
from bam.data.contrastive_crop import CropBoxes


def color_jitter_(image: Tensor, params: dict[str, Any]) -> Tensor:
    """Apply ColorJitter's ``params`` (from ``v2.ColorJitter.make_params``) to a float image in place."""
    names = list(ops.JITTER_OPS)  # torchvision's numbering of the four operations
    for index in params["fn_idx"].tolist():
        factor = params[f"{names[index]}_factor"]
        if factor is not None:
            image.copy_(ops.JITTER_OPS[names[index]](image, factor))  # a no-op copy for in-place ops
    return image


class ColorJitter(v2.ColorJitter):
    """torchvision's ColorJitter (its factor sampling and per-call random order), faster hue step.

    Expects float images; returns a new image (``color_jitter_`` works in place).
    """

    def transform(self, inpt: Tensor, params: dict[str, Any]) -> Tensor:
        return color_jitter_(inpt.clone(), params)


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
        self.groups = crops.view_groups()
        ranges = crops.jitter_ranges()
        self.jitter = ColorJitter(**ranges) if crops.color_jitter_prob > 0 and ranges else None

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

    def _group(self, image: Tensor, group: ViewGroup, region: Tensor | None) -> Tensor:
        crops, n = self.crops, group.count
        x = self._cropped(image, group, region)
        if self.jitter is not None:
            for row in ops.chosen_rows(crops.color_jitter_prob, n).tolist():
                color_jitter_(x[row], self.jitter.make_params([]))
        if crops.grayscale_prob > 0:
            for row in ops.chosen_rows(crops.grayscale_prob, n).tolist():
                ops.grayscale_(x[row])
        rows = ops.chosen_rows(torch.tensor(group.blur_probs), n)
        if rows.numel():
            sigma = ops.sample_uniform(*crops.blur_sigma, (rows.numel(),))
            for row, s in zip(rows.tolist(), sigma.tolist()):
                x[row] = ops.gaussian_blur_image(x[row], s, group.blur_kernel)
        for row in ops.chosen_rows(torch.tensor(group.solarize_probs), n).tolist():
            ops.solarize_(x[row])
        return ops.normalize_(x, crops.mean, crops.std)

    def _cropped(self, image: Tensor, group: ViewGroup, region: Tensor | None) -> Tensor:
        """The group's crops of ``image``, resized in uint8, flipped, as one float stack in [0, 1]."""
        n, (height, width) = group.count, image.shape[-2:]
        regions = None if region is None else region.view(1, 4).expand(n, 4)
        boxes = ops.sample_crop_boxes(n, height, width, group.scale, self.crops.ratio, regions=regions, alpha=self.alpha)
        flips = (torch.rand(n) < self.crops.flip_prob).tolist()
        resized = []
        for (x0, y0, x1, y1), flip in zip(boxes.int().tolist(), flips):
            view = TF.resized_crop(image, y0, x0, y1 - y0, x1 - x0, [group.size, group.size], antialias=True)
            resized.append(view.flip(-1) if flip else view)
        return TF.to_dtype(torch.stack(resized), torch.float32, scale=True)
