"""BAM pretraining: the method is only the objective and its `reg` schedule; everything else
(encoders, teacher, optimiser, schedules, multi-crop) comes from `SSLMethod`."""
from __future__ import annotations

from typing import Any

import torch

from bam.distributed import world_size
from bam.losses import BAMLoss
from bam.methods.base import SSLMethod
from bam.training.schedules import linear_ramp


class BAMModule(SSLMethod):
    """Balanced self-Attention Matching (Shalam & Korman, ECCV 2024) as a LightningModule.

    Args:
        num_global_crops: global crops per image (targets come from them).
        num_local_crops: local crops per image.
        num_target_crops: crops used as attention columns (default: all global crops).
        reg: entropic regularisation of the Sinkhorn target at the start of training.
        reg_final: value `reg` reaches linearly after `reg_warmup_epochs` (default: `reg`).
        reg_warmup_epochs: length of the linear `reg` schedule, in epochs.
        temperature: temperature of the source softmax.
        sinkhorn_iterations: balancing iterations of the target.
        top_k: keep each image's k strongest target columns (0 = all; the recipes use 128).
        positive_masking: exclude the other crops of the same image from the attention.
        column_block_size: compute the objective in blocks of this many target columns (0 = off);
            the same loss with memory that no longer grows with the number of processes.
        **kwargs: the shared arguments of `SSLMethod` (backbone, projector, teacher, optimiser).
    """

    def __init__(
        self,
        num_global_crops: int = 2,
        num_local_crops: int = 6,
        num_target_crops: int | None = None,
        reg: float = 0.05,
        reg_final: float | None = None,
        reg_warmup_epochs: float = 30,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        top_k: int = 0,
        positive_masking: bool = True,
        column_block_size: int = 0,
        **kwargs: Any,
    ) -> None:
        self.check_crop_settings(num_global_crops, num_local_crops)
        if reg_final is not None and reg_final <= 0:
            raise ValueError(f"reg_final must be positive (the entropic regularisation of the target), got {reg_final}")
        super().__init__(**kwargs)
        self.loss_fn = BAMLoss(
            num_crops=num_global_crops + num_local_crops,
            num_global_crops=num_global_crops,
            num_target_crops=num_target_crops,
            reg=reg,
            temperature=temperature,
            sinkhorn_iterations=sinkhorn_iterations,
            top_k=top_k,
            positive_masking=positive_masking,
            column_block_size=column_block_size,
        )

    def compute_loss(self, crops: list[torch.Tensor]) -> torch.Tensor:
        self.check_crop_count(crops, self.loss_fn.num_crops)
        return self.loss_fn(self.student(crops), self.teacher_embeddings(crops))

    def chance_level(self, batch_size: int) -> float:
        return self.loss_fn.chance_level(batch_size * world_size())

    def on_schedule(self, step: int) -> dict[str, float]:
        self.loss_fn.reg = self.reg_at(step)
        return {"reg": self.loss_fn.reg}

    def reg_at(self, step: int) -> float:
        hp = self.hparams
        final = hp.reg if hp.reg_final is None else hp.reg_final
        return linear_ramp(hp.reg, final, step, int(hp.reg_warmup_epochs * self.steps_per_epoch))
