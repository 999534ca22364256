"""Backbone + projector, applied to a list of crops of several resolutions."""
from __future__ import annotations

from itertools import groupby

import torch
from torch import nn


class MultiCropEncoder(nn.Module):
    """Embeds a list of crop batches into one crop-major `(V * B, D)` matrix.

    Consecutive crops of the same resolution are concatenated so the backbone runs once per
    distinct resolution (e.g. twice for 2 global + 6 local crops), which keeps batch norm
    statistics per resolution and the number of kernel launches small.

    With `channels_last`, the backbone's weights and every input batch use the NHWC memory
    layout, which oneDNN (CPU) and cuDNN with mixed precision (GPU) run convolutions fastest in:
    the demo's CNN trains ~1.5-2x faster on CPU. Parameter names and values are unchanged.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of one batch of images, in the encoder's memory layout."""
        return self.backbone(images.contiguous(memory_format=self.memory_format))

    def features(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """Pooled backbone features of every crop, crop-major."""
        outputs = []
        for _, group in groupby(crops, key=lambda crop: crop.shape[-2:]):
            outputs.append(self.embed_images(torch.cat(list(group))))
        return torch.cat(outputs)

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        return self.projector(self.features(crops))
