"""BAM pretraining: the method is only the objective and its `reg` schedule; everything else
(encoders, teacher, optimiser, schedules, multi-crop) comes from `SSLMethod`."""
from __future__ import annotations

from typing import Any

import torch

from bam.losses import BAMLoss, BAMObjective
from bam.methods.base import SSLMethod
from bam.ops.distributed import world_size
from bam.training.schedules import linear_ramp


class BAMModule(SSLMethod):
    """Balanced self-Attention Matching (Shalam & Korman, ECCV 2024) as a LightningModule.

    The targets come from the `num_global_crops` global crops (`SSLMethod`'s crop counts, 2 + 6 by
    default).

    Args:
        objective: the objective's settings (`BAMObjective`: `num_target_crops`, `reg` at the start
            of training, `temperature`, `sinkhorn_iterations`, `top_k`, `positive_masking`,
            `column_block_size`, `balance_local_rows`); in a config or on the command line
            `objective.reg` etc.
        reg_final: value `objective.reg` reaches linearly after `reg_warmup_epochs` (default: no
            schedule, `reg` stays).
        reg_warmup_epochs: length of the linear `reg` schedule, in epochs.
        **kwargs: the shared arguments of `SSLMethod` (crop counts, backbone, projector, teacher, optimiser).
    """

    def __init__(
        self,
        objective: BAMObjective = BAMObjective(),
        reg_final: float | None = None,
        reg_warmup_epochs: float = 30,
        **kwargs: Any,
    ) -> None:
        if reg_final is not None and reg_final <= 0:
            raise ValueError(f"reg_final must be positive (the entropic regularisation of the target), got {reg_final}")
        super().__init__(**kwargs)
        objective = self.record_objective(BAMObjective, objective)
        self.loss_fn = BAMLoss(self.num_crops, self.hparams.num_global_crops, objective)

    def compute_loss(self, crops: list[torch.Tensor]) -> torch.Tensor:
        self.check_crop_count(crops, self.loss_fn.num_crops)
        return self.loss_fn(self.student(crops), self.teacher_embeddings(self.teacher_inputs(crops)))

    def teacher_inputs(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        """The crops the teacher embeds: all of them, or the global ones when the local crops'
        rows take no part in the balancing (their teacher embeddings would go unused)."""
        return crops if self.loss_fn.objective.balance_local_rows else crops[: self.loss_fn.num_global_crops]

    def batch_problem(self, global_batch: int) -> str | None:
        if global_batch >= 2 or not self.loss_fn.objective.positive_masking:
            return None
        return ("BAM's objective matches each image's crops to the other images of the batch (positive masking leaves "
                "out the image's own crops), and a batch of one image has no other")

    def chance_level(self, batch_size: int) -> float:
        return self.loss_fn.chance_level(batch_size * world_size())

    def on_schedule(self, step: int) -> dict[str, float]:
        self.loss_fn.reg = self.reg_at(step)
        return {"reg": self.loss_fn.reg}

    def reg_at(self, step: int) -> float:
        """`reg` at optimiser step `step`: a linear ramp over `reg_warmup_epochs` epochs, counted in
        the trainer's optimiser steps per epoch (known once the trainer has its data)."""
        start = self.hparams.objective["reg"]
        final = self.hparams.reg_final
        if final is None or final == start:
            return start
        return linear_ramp(start, final, step, self.step_budget.steps(self.hparams.reg_warmup_epochs))

