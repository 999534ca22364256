"""Faults injected into real `bam pretrain` runs, as callbacks the command line can add:

    PYTHONPATH=<repo>:<repo>/tests bam pretrain ... \
        --trainer.callbacks+=cli_faults.SignalAtStep --trainer.callbacks.init_args.step=8
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch


class SignalAtStep(pl.Callback):
    """Sends `signal_name` to this process when global step `step` starts (as a preemption would)."""

    def __init__(self, step: int, signal_name: str = "SIGTERM") -> None:
        self.step, self.signum = step, signal.Signals[signal_name]

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class NaNOnce(pl.Callback):
    """A transient fault: at global step `step`, a NaN lands in the student's projector, once.

    `marker` is created when it fires; a run that finds it (the resumed one) is left alone, like
    a fault that does not recur. `target="optimizer"` puts the NaN into the optimiser's moments
    after the step instead (parameters and loss stay finite until the next step).
    """

    def __init__(self, step: int, marker: str, target: str = "weights") -> None:
        if target not in ("weights", "optimizer"):
            raise ValueError(f"target must be 'weights' or 'optimizer', got {target!r}")
        self.step, self.marker, self.target = step, Path(marker), target

    def _fires(self, trainer: pl.Trainer, step: int) -> bool:
        if trainer.global_step != step or self.marker.exists():
            return False
        self.marker.touch()
        return True

    @torch.no_grad()
    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.target == "weights" and self._fires(trainer, self.step):
            next(module.student.projector.parameters()).fill_(float("nan"))

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # global_step already counts this batch's optimiser step here
        if self.target == "optimizer" and self._fires(trainer, self.step + 1):
            state = trainer.optimizers[0].state
            next(iter(state.values()))["exp_avg_sq"].fill_(float("nan"))
