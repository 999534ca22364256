"""Multi-crop augmentation of a whole uint8 batch on the training device (the "device" path)."""
from __future__ import annotations

from itertools import groupby

import torch
from torch import Tensor, nn

from bam.data import batch_ops
from bam.data.config import MultiCropConfig, ViewSpec, blur_kernel_size


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
        # step wait for a descheduled thread: a 4,000-image MNIST epoch took 10-20 s of CPU
        # with 2 threads on a loaded 2-core machine, 0.6 s with one.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._views(images, regions)
        finally:
            torch.set_num_threads(threads)

    def _views(self, images: Tensor, regions: Tensor | None) -> list[Tensor]:
        pixels = images.float()  # 0..255; crops are scaled to [0, 1] after resizing (fewer pixels)
        views: list[Tensor] = []
        for _, group in groupby(self.crops.views(), key=lambda v: (v.size, v.scale)):
            specs = list(group)
            views.extend(self._augment_group(pixels, specs, regions).chunk(len(specs)))
        return views

    def _augment_group(self, pixels: Tensor, specs: list[ViewSpec], regions: Tensor | None) -> Tensor:
        """Augment ``len(specs)`` views of equal size and scale as one batch, view-major rows."""
        batch, _, height, width = pixels.shape
        crops, device = self.crops, pixels.device
        rows = len(specs) * batch
        source = torch.arange(batch, device=device).repeat(len(specs))
        regions = None if regions is None else regions.to(device)[source]
        boxes = batch_ops.sample_crop_boxes(rows, height, width, specs[0].scale, crops.ratio, device,
                                            regions=regions, alpha=self.alpha)
        x = batch_ops.crop_resize(pixels, boxes, source, specs[0].size).div_(255.0)
        x = batch_ops.horizontal_flip(x, crops.flip_prob)
        x = batch_ops.color_jitter(x, crops.color_jitter_prob, crops.jitter_ranges())
        x = batch_ops.random_grayscale(x, crops.grayscale_prob)
        blur_prob = self._per_row([s.blur_prob for s in specs], batch, device)
        kernel = blur_kernel_size(crops.blur_sigma[1], specs[0].size)
        x = batch_ops.gaussian_blur(x, blur_prob, crops.blur_sigma, kernel)
        x = batch_ops.solarize(x, self._per_row([s.solarize_prob for s in specs], batch, device))
        return batch_ops.normalize(x, crops.mean, crops.std)

    @staticmethod
    def _per_row(probs: list[float], batch: int, device: torch.device) -> Tensor:
        """Expand one probability per view to one per row (rows are view-major)."""
        return torch.tensor(probs, device=device).repeat_interleave(batch)
