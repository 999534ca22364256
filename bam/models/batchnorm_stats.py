"""Batch norm running statistics re-estimated on clean images ("precise BN").

During self-supervised training, batch norm layers track running statistics of augmented crops
under weights that keep changing (an EMA of the last ~10 steps). Evaluation feeds whole,
unaugmented images to the final weights: re-estimating the statistics once on such images, as
an exact average over many batches, makes evaluation see the normalisation it should.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def batch_norms(module: nn.Module) -> list[_BatchNorm]:
    """The batch norm layers of `module` that keep running statistics."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batchnorm_stats(module: nn.Module, batches: Iterable[Tensor], max_images: int | None = None) -> int:
    """Replace the running mean and variance of every batch norm layer in `module` by their
    average over `batches` of images (weighted by batch size); return the number of images used.

    Only running statistics change: weights, biases and the module's train/eval mode stay as they
    were. A module without batch norm is left untouched (returns 0).
    """
    norms = batch_norms(module)
    if not norms:
        return 0
    saved = [(norm.momentum, norm.training) for norm in norms]
    was_training = module.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches seen since the reset
    module.train()  # the batch norm layers update their statistics; nothing else learns here
    seen = 0
    try:
        for images in batches:
            if max_images is not None and seen >= max_images:
                break
            module(images)
            seen += len(images)
    finally:
        module.train(was_training)
        for norm, (momentum, training) in zip(norms, saved):
            norm.momentum = momentum
            norm.train(training)
    if seen == 0:
        raise ValueError("recompute_batchnorm_stats got no images: pass a non-empty iterable of batches")
    return seen
