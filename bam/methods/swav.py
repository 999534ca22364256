"""SwAV pretraining on the same module structure as BAM: the method is the objective, its
prototypes and their freeze; encoders, optimiser, schedules and multi-crop come from `SSLMethod`.
"""
from __future__ import annotations

from typing import Any

import torch

from bam.losses import SwAVLoss, SwAVObjective
from bam.methods.base import SSLMethod
from bam.models import ProjectorSettings
from bam.models.projector import SWAV_PROJECTOR


class SwAVModule(SSLMethod):
    """Swapping Assignments between Views (Caron et al., NeurIPS 2020) as a LightningModule.

    Every global crop's embedding is assigned a code over `num_prototypes` learnable prototypes by
    bam's Sinkhorn (equipartition over the global batch, no gradient), and every other crop of the
    same image is trained to predict that code (see `bam.losses.swav_loss`), optionally with SwAV's
    queue of past embeddings.

    The codes come from the `num_global_crops` global crops (`SSLMethod`'s crop counts, 2 + 6 by
    default).

    Args:
        objective: the objective's settings (`SwAVObjective`: `num_prototypes`, `reg`,
            `temperature`, `sinkhorn_iterations`); in a config `objective.num_prototypes` etc.
        freeze_prototypes_epochs: the prototypes receive no update for this many (possibly
            fractional) epochs: early on, while the embeddings are still near-random, updating the
            prototypes makes the codes chase them and the paper found training less stable.
        queue_length: SwAV's queue of past global-crop embeddings of the global batch (0: none;
            SwAV uses 3840 at a global batch of 256), a multiple of the number of processes. It is
            filled from `queue_start_epoch` (possibly fractional) on and balanced with the batch's
            codes once full; it is part of the checkpoint and the same on every process.
        projector: the projection head's settings (`bam.models.ProjectorSettings`), SwAV's by
            default (2048 -> 128, 2 layers, batch norm, ReLU); in a config `projector.out_dim` etc.
        **kwargs: the shared arguments of `SSLMethod` (crop counts, backbone, optimiser, schedules), except
            `momentum_teacher`: SwAV's codes come from the network itself.

    The prototypes (`self.loss_fn.prototypes`, a bias-free linear layer) are re-normalised at the
    start of every step and trained in their own parameter group without weight decay, like the
    biases and 1-D parameters in `SSLMethod`: decaying unit vectors that are re-normalised after
    every step would only rescale their learning rate.
    """

    def __init__(
        self,
        objective: SwAVObjective = SwAVObjective(),
        freeze_prototypes_epochs: float = 1,
        queue_length: int = 0,
        queue_start_epoch: float = 15,
        projector: ProjectorSettings = SWAV_PROJECTOR,
        **kwargs: Any,
    ) -> None:
        self.refuse_momentum_teacher(kwargs, "SwAV", "its codes come from the network's own global crops")
        if freeze_prototypes_epochs < 0:
            raise ValueError(f"freeze_prototypes_epochs={freeze_prototypes_epochs} must be >= 0")
        if queue_start_epoch < 0:
            raise ValueError(f"queue_start_epoch={queue_start_epoch} must be >= 0")
        super().__init__(projector=projector, **kwargs)
        objective = self.record_objective(SwAVObjective, objective)
        self.loss_fn = SwAVLoss(self.num_crops, self.hparams.num_global_crops, self.projector_settings.out_dim, objective,
                                queue_length=queue_length)

    # ----------------------------------------------------------------- method interface
    def compute_loss(self, crops: list[torch.Tensor]) -> torch.Tensor:
        self.check_crop_count(crops, self.loss_fn.num_crops)
        # Back onto the unit sphere after the previous step's update; the same on every process.
        self.loss_fn.normalize_prototypes_()
        return self.loss_fn(self.student(crops))

    def chance_level(self, batch_size: int) -> float:
        return self.loss_fn.chance_level()

    def on_schedule(self, step: int) -> dict[str, float]:
        values = {"prototypes_frozen": float(self.prototypes_frozen(step))}
        if self.loss_fn.queue_length:
            self.loss_fn.queue_enabled = step >= self.step_budget.steps(self.hparams.queue_start_epoch)
            values["queue_rows"] = float(self.loss_fn.queue_rows)
        return values

    # ----------------------------------------------------------------- prototypes
    def prototypes_frozen(self, step: int) -> bool:
        """Whether optimiser step `step` leaves the prototypes unchanged."""
        return step < self.step_budget.steps(self.hparams.freeze_prototypes_epochs)

    def on_after_backward(self) -> None:
        # No gradient at all (not a zero one): the optimiser then skips the prototypes entirely,
        # so neither momentum nor weight decay can move them. Runs after DDP's all-reduce, on
        # every process alike.
        if self.prototypes_frozen(self.global_step):
            self.loss_fn.prototypes.weight.grad = None

    def extra_param_groups(self) -> list[dict[str, Any]]:
        """The prototypes, in a group of their own without weight decay (peak lr: the optimiser's)."""
        return [{"params": [self.loss_fn.prototypes.weight], "weight_decay": 0.0}]
