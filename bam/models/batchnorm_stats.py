"""Batch norm running statistics re-estimated on clean images ("precise BN").

During self-supervised training, batch norm layers track running statistics of augmented crops
under weights that keep changing (an EMA of the last ~10 steps). Evaluation feeds whole,
unaugmented images to the final weights: re-estimating the statistics once on such images, as
an exact average over many batches, makes evaluation see the normalisation it should.
"""
from __future__ import annotations

from typing import Iterable, Iterator

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import update_bn


def batch_norms(module: nn.Module) -> list[_BatchNorm]:
    """The batch norm layers of `module` that keep running statistics."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


class _CountedBatches:
    """The batches up to `max_images` images, counting the images handed out."""

    def __init__(self, batches: Iterable[Tensor], max_images: int | None) -> None:
        self.batches, self.max_images, self.seen = batches, max_images, 0

    def __iter__(self) -> Iterator[Tensor]:
        for images in self.batches:
            if self.max_images is not None and self.seen >= self.max_images:
                return
            self.seen += len(images)
            yield images


def recompute_batchnorm_stats(module: nn.Module, batches: Iterable[Tensor], max_images: int | None = None) -> int:
    """Replace the running mean and variance of every batch norm layer in `module` by their
    average over `batches` of images (weighted by batch size); return the number of images used.

    The averaging is torch's own (`torch.optim.swa_utils.update_bn`); around it this keeps each
    batch norm layer's train/eval mode as it was (update_bn restores only the module's), stops after
    `max_images`, and refuses an empty iterable, which would leave the statistics reset. Weights
    and biases never change. A module without batch norm is left untouched (returns 0).
    """
    norms = batch_norms(module)
    if not norms:
        return 0
    modes = [norm.training for norm in norms]
    counted = _CountedBatches(batches, max_images)
    try:
        update_bn(counted, module)
    finally:
        for norm, training in zip(norms, modes):
            norm.train(training)
    if counted.seen == 0:
        raise ValueError("recompute_batchnorm_stats got no images: pass a non-empty iterable of batches")
    return counted.seen
