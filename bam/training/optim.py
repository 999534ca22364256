"""The one optimiser setup of bam's training stages (pretraining methods and supervised
evaluation alike): timm's optimiser factory at `lr * global batch / 256`, momentum given to exactly
the optimisers timm's registry says take one, and a per-step lr schedule from `LR_SCHEDULES`
(timm's warm-up + cosine by default, or warm-up + step decay at given epochs).

Weight decay is never applied to biases and 1-D parameters (timm's factory puts them in a group of
their own); each group keeps its `initial_weight_decay` so that a weight-decay schedule can scale it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from timm.optim import create_optimizer_v2, get_optimizer_info
from timm.scheduler.scheduler import Scheduler
from torch import nn

from bam.training.schedules import warmup_cosine_lr, warmup_step_decay_lr


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


@dataclass(frozen=True)
class LrSchedule:
    """How the learning rate moves after the warm-up: `name` is a key of `LR_SCHEDULES`; `min_lr`
    is where `cosine` ends; `decay_epochs` and `decay_rate` are `step`'s (the lr is multiplied by
    `decay_rate` at the start of each of those epochs)."""

    name: str = "cosine"
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    decay_epochs: Sequence[float] = ()
    decay_rate: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in LR_SCHEDULES:
            raise ValueError(f"unknown lr schedule {self.name!r}; choose one of {sorted(LR_SCHEDULES)}")
        if self.name == "step" and not self.decay_epochs:
            raise ValueError("the step lr schedule needs lr_decay_epochs, e.g. [12, 16]")
        if any(epoch <= 0 for epoch in self.decay_epochs):
            raise ValueError(f"lr_decay_epochs must be positive epochs, got {list(self.decay_epochs)}")


def _cosine(optimizer: torch.optim.Optimizer, budget: "StepBudget", schedule: LrSchedule) -> Scheduler:
    return warmup_cosine_lr(optimizer, budget.total_steps, budget.steps(schedule.warmup_epochs), schedule.min_lr)


def _step(optimizer: torch.optim.Optimizer, budget: "StepBudget", schedule: LrSchedule) -> Scheduler:
    decay_steps = [budget.steps(epoch) for epoch in schedule.decay_epochs]
    return warmup_step_decay_lr(optimizer, decay_steps, schedule.decay_rate, budget.steps(schedule.warmup_epochs))


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimiser and learning-rate schedule of a classifier stage (`bam linear`, `bam finetune`);
    in a config or on the command line `model.optimizer.name`, `model.optimizer.lr`, ...

    Args:
        name: Any optimiser timm's factory knows (sgd, adamw, lars, ...).
        lr: Peak learning rate per 256 images; the peak used is `lr * global batch / 256`.
        min_lr: Learning rate at the end of the cosine decay.
        warmup_epochs: Linear warm-up from 0, in epochs (applied per step).
        weight_decay: Weight decay (never on biases and 1-D parameters).
        momentum: Momentum of SGD-like optimisers.
        lr_schedule: After the warm-up, "cosine" (to `min_lr`) or "step" (the lr times
            `lr_decay_rate` at the start of each of `lr_decay_epochs`: SwAV's semi-supervised recipe).
        lr_decay_epochs: Epochs at which the "step" schedule decays the lr, e.g. [12, 16].
        lr_decay_rate: Factor of each "step" decay.
    """

    name: str = "sgd"
    lr: float = 0.002
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.9
    lr_schedule: str = "cosine"
    lr_decay_epochs: tuple[float, ...] = ()
    lr_decay_rate: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_decay_epochs", tuple(self.lr_decay_epochs or ()))
        self.schedule()  # an unknown schedule or bad decay epochs is refused when the settings are made

    def schedule(self) -> LrSchedule:
        """The lr schedule these settings describe."""
        return LrSchedule(self.lr_schedule, self.warmup_epochs, self.min_lr, self.lr_decay_epochs, self.lr_decay_rate)


# lr schedule name -> builder of its per-step timm scheduler
LR_SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, "StepBudget", LrSchedule], Scheduler]] = {
    "cosine": _cosine,
    "step": _step,
}


def with_own_lr(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter], lr: float) -> None:
    """Give `params` the peak learning rate `lr` (e.g. a new classifier's, higher than the
    pretrained trunk's): they leave their groups for copies of them (same weight decay and
    `lr_scale`) at `lr`. Call before the lr scheduler is built, which reads every group's peak."""
    chosen = {id(param) for param in params}
    for group in list(optimizer.param_groups):
        moved = [param for param in group["params"] if id(param) in chosen]
        if moved:
            group["params"] = [param for param in group["params"] if id(param) not in chosen]
            optimizer.add_param_group({**group, "params": moved, "lr": lr})
    optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]


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
    schedule: LrSchedule | None = None,
    own_lr: tuple[Sequence[nn.Parameter], float] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """`configure_optimizers`' return value for training `model` under `trainer`: the optimiser at
    `lr * global_batch / 256` (`lr` is per 256 images) and a per-step lr schedule: `schedule`, by
    default a warm-up over `warmup_epochs` + cosine to `min_lr`. `own_lr` = (parameters, their lr
    per 256 images) gives some parameters a peak lr of their own (`with_own_lr`)."""
    budget = StepBudget.of(trainer)
    scale = global_batch / 256
    built = create_optimizer(model, optimizer, lr * scale, weight_decay, momentum, extra_groups, **options)
    if own_lr is not None:
        with_own_lr(built, own_lr[0], own_lr[1] * scale)
    schedule = schedule or LrSchedule("cosine", warmup_epochs, min_lr)
    scheduler = LR_SCHEDULES[schedule.name](built, budget, schedule)
    return {"optimizer": built, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
