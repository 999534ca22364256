"""Backbone + projector, applied to a list of crops of several resolutions."""
from __future__ import annotations

import contextlib
from itertools import groupby
from typing import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class MultiCropEncoder(nn.Module):
    """Embeds a list of crop batches into one crop-major `(V * B, D)` matrix.

    Consecutive crops of the same resolution are concatenated so the backbone runs once per
    distinct resolution (e.g. twice for 2 global + 6 local crops), which keeps batch norm
    statistics per resolution and the number of kernel launches small.

    With `channels_last`, the backbone's weights and every input batch use the NHWC memory
    layout, which oneDNN (CPU) and cuDNN with mixed precision (GPU) run convolutions fastest in:
    the demo's CNN trains faster on CPU (docs/results-demo.md). Parameter names and values are unchanged.

    With `global_running_stats` (the default), batch norm layers of the backbone update their
    running statistics from the first resolution (the global crops) only. Evaluation feeds whole
    images, which look like global crops, not like the zoomed-in, smaller local crops; running
    statistics that mix both (the local crops' pass comes last in every step) normalise whole
    images with the wrong mean and variance. Training itself is unchanged (batch statistics).
    """

    def __init__(
        self, backbone: nn.Module, projector: nn.Module, channels_last: bool = False, global_running_stats: bool = True
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.global_running_stats = global_running_stats
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features of one batch of images, in the encoder's memory layout."""
        return self.backbone(images.contiguous(memory_format=self.memory_format))

    def features(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """Pooled backbone features of every crop, crop-major."""
        outputs = []
        for index, (_, group) in enumerate(groupby(crops, key=lambda crop: crop.shape[-2:])):
            frozen = index > 0 and self.global_running_stats
            with frozen_running_stats(self.backbone) if frozen else contextlib.nullcontext():
                outputs.append(self.embed_images(torch.cat(list(group))))
        return torch.cat(outputs)

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        return self.projector(self.features(crops))


@contextlib.contextmanager
def frozen_running_stats(module: nn.Module) -> Iterator[None]:
    """Batch norm layers of `module` normalise with batch statistics as usual but leave their
    running statistics unchanged (momentum 0) inside the block."""
    norms = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
