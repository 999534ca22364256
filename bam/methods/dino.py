"""DINO pretraining on the same module structure as BAM and SwAV: the method is its objective (with
the centre), its head and its two schedules; encoders, momentum teacher, optimiser, the other
schedules and multi-crop come from `SSLMethod`."""
from __future__ import annotations

from typing import Any

import torch
from timm.layers import DropPath
from torch import nn

from bam.losses import DINOLoss, DINOObjective
from bam.methods.base import SSLMethod
from bam.models import DINOHead, ProjectorSettings
from bam.models.projector import DINO_PROJECTOR
from bam.training.schedules import linear_ramp


class DINOModule(SSLMethod):
    """Self-distillation with no labels (Caron et al., ICCV 2021) as a LightningModule.

    The student embeds every crop, the momentum teacher (an EMA of the student, always on) the
    global crops only; every student crop predicts the centred, sharpened output of every other
    global crop of the same image (see `bam.losses.dino_loss`). The centre is a buffer of the loss
    (`self.loss_fn.center`): it is in every checkpoint and the same on every process.

    Args:
        num_local_crops: local crops per image, 8 by default (DINO's); the teacher sees only the
            `num_global_crops` global ones (`SSLMethod`'s crop counts).
        objective: the objective's settings (`DINOObjective`: `student_temperature` 0.1,
            `teacher_temperature` 0.04 at the start, `center_momentum` 0.9); in a config
            `objective.student_temperature` etc.
        teacher_temperature_final: the teacher temperature reached, linearly (per step), after
            `teacher_temperature_warmup_epochs` epochs, then kept.
        teacher_temperature_warmup_epochs: length of that warm-up, in epochs.
        out_dim: the DINO head's output dimension `K` (65536 on ImageNet).
        norm_last_layer: fix the gains of the head's weight-normalised last layer at 1.
        freeze_last_layer_epochs: the head's last layer receives no update for this many (possibly
            fractional) epochs: the paper's remedy for an unstable start.
        projector: the head's MLP (`bam.models.ProjectorSettings`; DINO's by default: 2048 wide,
            3 layers, GELU, no batch norm, `init: trunc_normal`) and its bottleneck
            (`projector.out_dim`, 256); in a config `projector.hidden_dim` etc.
        teacher_momentum, lr: DINO's values by default (0.996 -> 1; 5e-4 per 256 images).
        **kwargs: the shared arguments of `SSLMethod` (backbone, optimiser, schedules); the
            teacher is DINO's own, so `momentum_teacher: false` is refused.

    The teacher runs without stochastic depth (timm's `DropPath` disabled in its copy): DINO's
    teacher is built without it, only the student is regularised.
    """

    def __init__(
        self,
        num_local_crops: int = 8,
        objective: DINOObjective = DINOObjective(),
        teacher_temperature_final: float = 0.07,
        teacher_temperature_warmup_epochs: float = 30,
        out_dim: int = 65536,
        norm_last_layer: bool = True,
        freeze_last_layer_epochs: float = 1,
        projector: ProjectorSettings = DINO_PROJECTOR,
        teacher_momentum: float = 0.996,
        lr: float = 5e-4,
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("momentum_teacher", True) is not True:
            raise ValueError("DINO distils a momentum teacher into the student; remove momentum_teacher: false")
        if teacher_temperature_final <= 0:
            raise ValueError(f"teacher_temperature_final={teacher_temperature_final} must be positive")
        if freeze_last_layer_epochs < 0:
            raise ValueError(f"freeze_last_layer_epochs={freeze_last_layer_epochs} must be >= 0")
        super().__init__(num_local_crops=num_local_crops, projector=projector, momentum_teacher=True,
                         teacher_momentum=teacher_momentum, lr=lr, **kwargs)
        objective = self.record_objective(DINOObjective, objective)
        self.loss_fn = DINOLoss(out_dim, self.num_crops, self.hparams.num_global_crops, objective)
        _disable_stochastic_depth(self.teacher)

    def make_head(self, in_dim: int) -> nn.Module:
        return DINOHead(in_dim, self.hparams.out_dim, self.projector_settings, self.hparams.norm_last_layer)

    # ----------------------------------------------------------------- method interface
    def compute_loss(self, crops: list[torch.Tensor]) -> torch.Tensor:
        self.check_crop_count(crops, self.loss_fn.num_crops)
        teacher = self.teacher_embeddings(crops[: self.loss_fn.num_global_crops])
        return self.loss_fn(self.student(crops), teacher)

    def chance_level(self, batch_size: int) -> float:
        return self.loss_fn.chance_level()

    def on_schedule(self, step: int) -> dict[str, float]:
        self.loss_fn.teacher_temperature = self.teacher_temperature_at(step)
        return {"teacher_temperature": self.loss_fn.teacher_temperature,
                "last_layer_frozen": float(self.last_layer_frozen(step))}

    # ----------------------------------------------------------------- schedules
    def teacher_temperature_at(self, step: int) -> float:
        """Linear from `objective.teacher_temperature` to `teacher_temperature_final` over the
        warm-up epochs, counted in the trainer's optimiser steps."""
        hp = self.hparams
        ramp = self.step_budget.steps(hp.teacher_temperature_warmup_epochs)
        return linear_ramp(hp.objective["teacher_temperature"], hp.teacher_temperature_final, step, ramp)

    def last_layer_frozen(self, step: int) -> bool:
        """Whether optimiser step `step` leaves the head's last layer unchanged."""
        return step < self.step_budget.steps(self.hparams.freeze_last_layer_epochs)

    def on_after_backward(self) -> None:
        # No gradient at all (not a zero one): the optimiser then skips the layer entirely, so
        # neither momentum nor weight decay moves it. After DDP's all-reduce, on every process alike.
        if self.last_layer_frozen(self.global_step):
            for parameter in self.student.projector.last_layer.parameters():
                parameter.grad = None


def _disable_stochastic_depth(module: nn.Module) -> None:
    for layer in module.modules():
        if isinstance(layer, DropPath):
            layer.drop_prob = 0.0
