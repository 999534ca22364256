"""The one optimiser recipe of bam's training stages (pretraining methods and supervised
evaluation alike): timm's optimiser factory at `lr * global batch / 256`, momentum given to exactly
the optimisers timm's registry says take one, and timm's per-step warm-up + cosine lr schedule.

Weight decay is never applied to biases and 1-D parameters (timm's factory puts them in a group of
their own); each group keeps its `initial_weight_decay` so that a weight-decay schedule can scale it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from timm.optim import create_optimizer_v2, get_optimizer_info
from torch import nn

from bam.training.schedules import warmup_cosine_lr


@dataclass(frozen=True)
class StepBudget:
    """How many optimiser steps a run makes, known once the trainer has its data."""

    total_steps: int
    steps_per_epoch: int

    @classmethod
    def of(cls, trainer: Any) -> "StepBudget":
        total = max(int(trainer.estimated_stepping_batches), 1)
        return cls(total, max(total // max(trainer.max_epochs or 1, 1), 1))

    def steps(self, epochs: float) -> int:
        """Whole optimiser steps in `epochs` (possibly fractional) epochs."""
        return int(epochs * self.steps_per_epoch)


def takes_momentum(optimizer: str) -> bool:
    """Whether timm's optimiser `optimizer` has a momentum argument (sgd, lars, ...; adamw has not)."""
    return get_optimizer_info(optimizer).has_momentum


def create_optimizer(
    model: nn.Module,
    optimizer: str,
    lr: float,
    weight_decay: float,
    momentum: float,
    extra_groups: list[dict[str, Any]] = (),
    **options: Any,
) -> torch.optim.Optimizer:
    """timm's optimiser `optimizer` over `model` at peak learning rate `lr`; `extra_groups` are
    added after the model's groups (missing settings taken from the optimiser's defaults), so that
    the lr schedule built afterwards drives them too."""
    if takes_momentum(optimizer):
        options["momentum"] = momentum
    built = create_optimizer_v2(model, optimizer, lr=lr, weight_decay=weight_decay, **options)
    for group in extra_groups:
        built.add_param_group(dict(group))
    for group in built.param_groups:
        group["initial_weight_decay"] = group.get("weight_decay", 0.0)
    return built


def optimizer_with_schedule(
    trainer: Any,
    model: nn.Module,
    global_batch: int,
    optimizer: str,
    lr: float,
    min_lr: float,
    warmup_epochs: float,
    weight_decay: float,
    momentum: float,
    extra_groups: list[dict[str, Any]] = (),
    **options: Any,
) -> dict[str, Any]:
    """`configure_optimizers`' return value for training `model` under `trainer`: the optimiser at
    `lr * global_batch / 256` (`lr` is per 256 images) and a per-step warm-up + cosine schedule to
    `min_lr`."""
    budget = StepBudget.of(trainer)
    peak_lr = lr * global_batch / 256
    built = create_optimizer(model, optimizer, peak_lr, weight_decay, momentum, extra_groups, **options)
    scheduler = warmup_cosine_lr(built, budget.total_steps, budget.steps(warmup_epochs), min_lr)
    return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
