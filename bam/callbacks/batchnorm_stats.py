"""Re-estimate batch norm statistics on clean training images at the end of pretraining."""
from __future__ import annotations

from typing import Iterator

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from bam.callbacks.training_end import is_final_epoch_end
from bam.models.batchnorm_stats import batch_norms, recompute_batchnorm_stats
from bam.models.encoder import MultiCropEncoder
from bam.training.fault_tolerance import epoch_end_evaluation


class PreciseBatchNorm(pl.Callback):
    """After the last training epoch (ended by `max_epochs`, `max_steps` or a stop), before the final k-NN evaluation and checkpoint, replace the
    running statistics of every batch norm layer of the student's and teacher's backbones by their
    exact average over up to `max_images` un-augmented training images (the data module's k-NN
    bank loader). Backbones without batch norm (ViTs) are untouched.

    Why: the running statistics tracked during training describe augmented crops under weights
    that kept moving; evaluation and exported backbones see whole images under the final weights.
    It costs one pass over those images, without gradients (its effect on the demo's k-NN:
    docs/results-demo.md).

    Every process runs the same images, so the statistics (and SyncBatchNorm's collectives) agree
    across processes.

    Args:
        enabled: re-estimate at the end of training.
        max_images: images used (the first ones of the bank loader).
    """

    def __init__(self, enabled: bool = True, max_images: int = 4096) -> None:
        if max_images < 1:
            raise ValueError(f"max_images must be positive, got {max_images}")
        self.enabled = enabled
        self.max_images = max_images

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or not is_final_epoch_end(trainer):
            return
        encoders = [(name, getattr(pl_module, name, None)) for name in ("student", "teacher")]
        encoders = [(name, encoder) for name, encoder in encoders
                    if isinstance(encoder, MultiCropEncoder) and batch_norms(encoder.backbone)]
        if not encoders or not self._has_clean_images(trainer):
            return
        device = trainer.strategy.root_device
        with epoch_end_evaluation(trainer, "precise batch norm"):
            loader = trainer.datamodule.knn_dataloaders()[0]
            for name, encoder in encoders:
                used = recompute_batchnorm_stats(encoder.backbone, _images(loader, encoder, device), self.max_images)
                rank_zero_info(f"PreciseBatchNorm: {name} backbone's batch norm statistics re-estimated on {used} clean images")

    @staticmethod
    def _has_clean_images(trainer: pl.Trainer) -> bool:
        """Whether the data module can give un-augmented training images (its k-NN bank loader)."""
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "knn_dataloaders"):
            rank_zero_warn(
                f"PreciseBatchNorm: {type(datamodule).__name__} has no knn_dataloaders() to read clean "
                "training images from; batch norm statistics are left as tracked during training"
            )
            return False
        return True


def _images(loader: DataLoader, encoder: MultiCropEncoder, device: torch.device) -> Iterator[Tensor]:
    for images, _ in loader:
        yield images.to(device).contiguous(memory_format=encoder.memory_format)
