"""Per-step hyperparameter schedules, as pure functions of the step index.

Everything a resumed run needs to continue a schedule is the global step, which Lightning
checkpoints. timm's lr scheduler does keep state (its peak and final values), so a resumed run
drops the checkpoint's copy and sets the lr from the configured settings (`rebuild_lr_schedule_on_resume`
and `apply_lr_schedule`): a changed `lr` or `min_lr` on resume is the one used.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler


def cosine(start: float, end: float, step: int, total_steps: int) -> float:
    """Half-cosine from `start` (step 0) to `end` (step `total_steps`), constant after."""
    progress = min(max(step, 0) / max(total_steps, 1), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear_ramp(start: float, end: float, step: int, ramp_steps: int) -> float:
    """Linear from `start` to `end` over `ramp_steps`, constant after (the `reg` warm-up)."""
    if ramp_steps <= 0:
        return end
    progress = min(max(step, 0) / ramp_steps, 1.0)
    return start + (end - start) * progress


def warmup_cosine_lr(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr: float) -> CosineLRScheduler:
    """timm's per-step schedule: linear warm-up from 0 over `warmup_steps`, then cosine to
    `min_lr` at `total_steps`. Step it with `step_update(num_updates=global_step)`; it honours each
    parameter group's `lr_scale` (layer-wise lr decay)."""
    return CosineLRScheduler(
        optimizer,
        # at least 2: timm warns that a 1-step cosine does nothing, and the steps a run has (at most
        # one after the warm-up) get the same learning rates either way
        t_initial=max(total_steps - warmup_steps, 2),
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_prefix=True,
        t_in_epochs=False,
    )


def warmup_step_decay_lr(
    optimizer: torch.optim.Optimizer, decay_steps: list[int], decay_rate: float, warmup_steps: int
) -> MultiStepLRScheduler:
    """timm's per-step schedule: linear warm-up from 0 over `warmup_steps`, then the peak lr times
    `decay_rate` once for every step of `decay_steps` (counted from the start of the run) already
    reached: SwAV's semi-supervised schedule (`MultiStepLR` at epochs 12 and 16) at step resolution.
    It honours each parameter group's own peak lr and `lr_scale`."""
    return MultiStepLRScheduler(
        optimizer,
        # timm applies a milestone m from index m - 1 on: shift by one so that the decay starts at step m
        decay_t=[step + 1 for step in sorted(decay_steps)],
        decay_rate=decay_rate,
        warmup_t=warmup_steps,
        warmup_prefix=False,
        t_in_epochs=False,
    )


def rebuild_lr_schedule_on_resume(checkpoint: dict[str, Any]) -> None:
    """Call from `on_load_checkpoint`: the lr schedulers are not restored from the checkpoint, so
    they keep the values of the settings this run was started with."""
    if "lr_schedulers" in checkpoint:
        checkpoint["lr_schedulers"] = []


def apply_lr_schedule(module: Any) -> None:
    """Call from `on_train_start`: set each optimiser's lr for the coming step from its scheduler
    (a resumed optimiser state carries the lr of the settings it was saved with)."""
    for config in module.trainer.lr_scheduler_configs:
        config.scheduler.step_update(num_updates=module.global_step)


def global_batch_size(trainer: Any) -> int:
    """Images per optimiser step over all processes: the batch the learning rate is scaled by.

    The per-process batch is the data module's `batch_size`, else the training DataLoader's (a
    plain `trainer.fit(model, train_dataloaders=loader)`)."""
    batch_size = getattr(trainer.datamodule, "batch_size", None)
    if batch_size is None:
        if trainer.train_dataloader is None:  # not loaded yet when max_steps bounds the run
            trainer.fit_loop.setup_data()
        batch_size = getattr(trainer.train_dataloader, "batch_size", None)
    if batch_size is None:
        raise ValueError(
            "cannot tell the batch size the learning rate is scaled by: give the data module a `batch_size` "
            "attribute, or train from a DataLoader built with batch_size= (not a batch_sampler)"
        )
    return batch_size * trainer.world_size * trainer.accumulate_grad_batches
