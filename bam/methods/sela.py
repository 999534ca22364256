"""SeLa and SeLa-v2 pretraining on the same module structure as BAM, SwAV and DINO: the method is
its objective (classification heads and whole-data-set pseudo-labels, `bam.losses.sela_loss`) and
the schedule of its label optimisations; encoders, optimiser, schedules and multi-crop come from
`SSLMethod`."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from bam.losses import SeLaLoss, SeLaObjective
from bam.methods.base import SSLMethod, dataset_indices_of
from bam.models import ProjectorSettings
from bam.models.projector import SWAV_PROJECTOR
from bam.training.optim import StepBudget

CHECKPOINT_LABELS_KEY = "sela_labels"


def _quadratic(budget: StepBudget, count: int) -> set[int]:
    # SeLa's spacing: optimisation i of n at the fraction (i / n)^2 of training, dense early on
    return {round(budget.total_steps * (i / count) ** 2) for i in range(count)}


def _every_epoch(budget: StepBudget, count: int) -> set[int]:
    # SeLa-v2 (SwAV's DeepCluster-v2 loop): at the start of every epoch, from the previous epoch's bank
    epochs = budget.total_steps // budget.steps_per_epoch
    return {budget.steps(epoch) for epoch in range(epochs)}


LABEL_SCHEDULES: dict[str, Callable[[StepBudget, int], set[int]]] = {"quadratic": _quadratic, "every_epoch": _every_epoch}


class SeLaModule(SSLMethod):
    """Self-labelling via simultaneous clustering and representation learning (Asano et al., ICLR
    2020) and its SwAV-era variant SeLa-v2, as a LightningModule.

    Every training image has a pseudo-label per head; the heads are trained to predict them from
    every crop (cross-entropy), and at scheduled steps the labels of the whole data set are
    re-optimised by a float64 Sinkhorn over the `N x K` matrix of each head's predictions, rows
    shared out over the processes (see `bam.losses.sela_loss`). The predictions come from a bank of
    each image's latest head input, recorded as training sees the image. Labels and bank are in
    every checkpoint and the same on every process.

    Args:
        num_local_crops: local crops per image, none by default (SeLa's one crop); the bank
            records the first of the `num_global_crops` global crops (`SSLMethod`'s crop counts).
        objective: the objective's settings (`SeLaObjective`: `num_clusters`, `num_heads`, `lam`,
            `sinkhorn_iterations`, `temperature`, `cosine_heads`); in a config `objective.lam` etc.
        label_updates: how many label optimisations the `quadratic` schedule spreads over training.
        label_schedule: `quadratic` (SeLa: optimisation `i` of `label_updates` after the fraction
            `(i / label_updates)^2` of the steps) or `every_epoch` (SeLa-v2: at each epoch's start,
            `label_updates` unused).
        label_seed: seed of the first, random labels.
        projector: the projection head's settings (`bam.models.ProjectorSettings`): by default
            `num_layers: 0`, which puts the heads on the backbone's features (SeLa's ResNet); 1 or
            more puts a `Projector` between (SeLa-v2: SwAV's 2 layers, 2048 -> 128, batch norm,
            ReLU, the other defaults); in a config `projector.num_layers` etc.
        **kwargs: the shared arguments of `SSLMethod` (backbone, optimiser, schedules), except
            `momentum_teacher`: SeLa's labels come from the network itself.

    SeLa-v2 is this module with `projector.num_layers: 2`, `objective.cosine_heads: true`,
    `objective.temperature: 0.1` and `label_schedule: every_epoch` (see configs/pretrain/sela_v2_demo.yaml).
    The heads are trained in their own parameter group: cosine heads without weight decay (like
    SwAV's prototypes, they are re-normalised every step), linear heads with the optimiser's.
    """

    def __init__(
        self,
        num_local_crops: int = 0,
        objective: SeLaObjective = SeLaObjective(),
        label_updates: int = 100,
        label_schedule: str = "quadratic",
        label_seed: int = 0,
        projector: ProjectorSettings = dataclasses.replace(SWAV_PROJECTOR, num_layers=0),
        **kwargs: Any,
    ) -> None:
        self.refuse_momentum_teacher(kwargs, "SeLa", "its labels come from the network's own heads")
        if label_schedule not in LABEL_SCHEDULES:
            raise ValueError(f"unknown label_schedule {label_schedule!r}; choose one of {sorted(LABEL_SCHEDULES)}")
        if label_updates < 1:
            raise ValueError(f"label_updates={label_updates} must be >= 1")
        super().__init__(num_local_crops=num_local_crops, projector=projector, **kwargs)
        objective = self.record_objective(SeLaObjective, objective)
        self.loss_fn = SeLaLoss(self.head_dim, self.num_crops, objective)
        self._label_steps: set[int] | None = None

    def make_head(self, in_dim: int) -> nn.Module:
        layers = self.projector_settings.num_layers
        self.head_dim = self.projector_settings.out_dim if layers else in_dim
        return super().make_head(in_dim) if layers else nn.Identity()

    # ----------------------------------------------------------------- method interface
    def step_loss(self, crops: list[torch.Tensor], batch: Any) -> torch.Tensor:
        self.check_crop_count(crops, self.loss_fn.num_crops)
        self.loss_fn.normalize_heads_()  # cosine heads back onto the unit sphere; the same on every process
        indices = dataset_indices_of(batch, "SeLa's pseudo-labels")
        return self.loss_fn(self.student(crops), indices.to(self.device))

    def chance_level(self, batch_size: int) -> float:
        return self.loss_fn.chance_level()

    def extra_param_groups(self) -> list[dict[str, Any]]:
        group: dict[str, Any] = {"params": list(self.loss_fn.heads.parameters())}
        if self.loss_fn.objective.cosine_heads:
            group["weight_decay"] = 0.0
        return [group]

    # ----------------------------------------------------------------- labels
    def label_steps(self) -> set[int]:
        """The optimiser steps at whose start the labels are re-optimised."""
        if self._label_steps is None:
            schedule = LABEL_SCHEDULES[self.hparams.label_schedule]
            self._label_steps = schedule(self.step_budget, self.hparams.label_updates)
        return self._label_steps

    def on_train_start(self) -> None:
        super().on_train_start()
        images = self._training_set_size()
        if self.loss_fn.num_images == 0:  # a new run (a resumed one has its checkpoint's labels)
            self.loss_fn.start(images, self.hparams.label_seed)
        elif self.loss_fn.num_images != images:
            raise ValueError(
                f"the checkpoint holds SeLa labels of {self.loss_fn.num_images} training images but the data has "
                f"{images}; resume with the data it was trained on, or start a new run from its weights "
                "(--model.init_args.init_weights CHECKPOINT)"
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self.global_step in self.label_steps():
            relabelled = self.loss_fn.optimize_labels()
            self.log("train/relabelled_images", float(relabelled))

    def _training_set_size(self) -> int:
        size = getattr(self.trainer.datamodule, "training_set_size", None)
        return size() if callable(size) else len(self.trainer.train_dataloader.dataset)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_LABELS_KEY] = self.loss_fn.label_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if CHECKPOINT_LABELS_KEY in checkpoint:
            self.loss_fn.load_label_state(checkpoint[CHECKPOINT_LABELS_KEY])
