"""Batched driver of the augmentation operations on the training device (the "device" path).

``DeviceMultiCrop`` applies the operations of ``bam.data.augment_ops`` (the ones the CPU driver
applies per image) to a whole uint8 batch, with independent random parameters per image. Each
random choice is drawn for all rows at once, and an operation that applies to a random subset
of rows computes only on that subset (index, compute, write back), so its cost scales with its
probability.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

import bam.data.augment_ops as ops
from bam.data.config import MultiCropConfig, ViewGroup


class DeviceMultiCrop(nn.Module):
    """Turn uint8 images ``(B, 3, S, S)`` into the list of normalised float views of the recipe.

    Every image gets independent random parameters in every view. Views of the same size and
    scale (the global crops, the local crops) are augmented together as one batch of
    ``views * B`` rows, with per-row blur and solarisation probabilities, so the number of
    kernel launches does not grow with the number of views.

    Args:
        crops: The augmentation recipe.
        alpha: ContrastiveCrop's Beta(alpha, alpha) parameter, used when ``forward`` gets regions.
    """

    def __init__(self, crops: MultiCropConfig, alpha: float = 0.6) -> None:
        super().__init__()
        self.crops = crops
        self.alpha = alpha

    @torch.no_grad()
    def forward(self, images: Tensor, regions: Tensor | None = None) -> list[Tensor]:
        """Return ``crops.num_views`` tensors ``(B, 3, size, size)``, global crops first.

        ``regions`` ``(B, 4)``: ContrastiveCrop boxes (normalised ``x0, y0, x1, y1``) around which
        every crop of the image is centred; None: RandomResizedCrop.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got shape {tuple(images.shape)}")
        if regions is not None and regions.shape != (images.shape[0], 4):
            raise ValueError(f"expected one region (x0, y0, x1, y1) per image, got shape {tuple(regions.shape)}")
        if images.device.type != "cpu":
            return self._views(images, regions)
        # On CPU, one thread: these many small element-wise steps gain little from intra-op
        # threads, and when a core is busy elsewhere (other jobs) OpenMP's barriers make each
        # step wait for a descheduled thread, which multiplies the CPU time of an epoch
        # (docs/results-cost.md, "Data paths").
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._views(images, regions)
        finally:
            torch.set_num_threads(threads)

    def _views(self, images: Tensor, regions: Tensor | None) -> list[Tensor]:
        pixels = images.float()  # 0..255; crops are scaled to [0, 1] after resizing (fewer pixels)
        views: list[Tensor] = []
        for group in self.crops.view_groups():
            views.extend(self._augment_group(pixels, group, regions).chunk(group.count))
        return views

    def _augment_group(self, pixels: Tensor, group: ViewGroup, regions: Tensor | None) -> Tensor:
        """Augment the group's views as one batch, view-major rows."""
        batch, _, height, width = pixels.shape
        crops, device = self.crops, pixels.device
        rows = group.count * batch
        source = torch.arange(batch, device=device).repeat(group.count)
        regions = None if regions is None else regions.to(device)[source]
        boxes = ops.sample_crop_boxes(rows, height, width, group.scale, crops.ratio, device,
                                      regions=regions, alpha=self.alpha)
        x = ops.crop_resize(pixels, boxes, source, group.size).div_(255.0)
        _random_rows(x, crops.flip_prob, lambda chosen: chosen.flip(-1))
        random_color_jitter(x, crops.color_jitter_prob, crops.jitter_ranges())
        _random_rows(x, crops.grayscale_prob, ops.grayscale_)
        blur_prob = _per_row(group.blur_probs, batch, device)
        _random_rows(x, blur_prob, lambda chosen: ops.gaussian_blur_batch(
            chosen, ops.sample_uniform(*crops.blur_sigma, (len(chosen),), device), group.blur_kernel))
        _random_rows(x, _per_row(group.solarize_probs, batch, device), ops.solarize_)
        return ops.normalize_(x, crops.mean, crops.std)


def _random_rows(x: Tensor, prob: Tensor | float, operation: Callable[[Tensor], Tensor]) -> Tensor:
    """Apply ``operation`` to the rows of ``x`` chosen with (per-row) ``prob``, in place."""
    rows = ops.chosen_rows(prob, x.shape[0], x.device)
    if rows.numel():
        x[rows] = operation(x[rows])
    return x


def _per_row(probs: tuple[float, ...], batch: int, device: torch.device) -> Tensor:
    """Expand one probability per view to one per row (rows are view-major)."""
    return torch.tensor(probs, device=device).repeat_interleave(batch)


def random_color_jitter(x: Tensor, prob: float, ranges: dict[str, tuple[float, float]]) -> Tensor:
    """torchvision's ColorJitter, applied to each image of ``x`` with probability ``prob`` (in place).

    Each selected image gets its own factors (uniform in ``ranges``) and its own random order of
    the operations, as torchvision draws a fresh permutation for every call (every image);
    kornia's ``ColorJitter`` draws one order per batch.
    """
    rows = ops.chosen_rows(prob, x.shape[0], x.device)
    if rows.numel() == 0 or not ranges:
        return x
    names = list(ranges)
    n = rows.numel()
    factors = torch.stack([ops.sample_uniform(*ranges[name], (n,), x.device) for name in names], dim=1)
    order = torch.argsort(torch.rand(n, len(names), device=x.device), dim=1)
    for step in range(len(names)):
        for op_index, name in enumerate(names):
            chosen = torch.nonzero(order[:, step] == op_index).flatten()
            x[rows[chosen]] = ops.JITTER_OPS[name](x[rows[chosen]], factors[chosen, op_index])
    return x
