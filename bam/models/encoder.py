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
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def features(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """Pooled backbone features of every crop, crop-major."""
        outputs = []
        for _, group in groupby(crops, key=lambda crop: crop.shape[-2:]):
            outputs.append(self.backbone(torch.cat(list(group))))
        return torch.cat(outputs)

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        return self.projector(self.features(crops))
