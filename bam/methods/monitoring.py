"""Loss health checks: stop on a non-finite loss, warn when the loss sits at chance level."""
from __future__ import annotations

import math
import warnings

from bam.training.health import TrainingDiverged


class NonFiniteLossError(TrainingDiverged):
    """Raised before the optimiser step that a NaN/inf loss would have poisoned."""


class StuckLossWarning(UserWarning):
    """The loss has stayed at log(N), the value of a uniform (untrained) attention."""


class LossMonitor:
    """Tracks the training loss step by step.

    - A non-finite loss raises `NonFiniteLossError` naming the step and the last finite loss,
      before any optimiser step, so parameters and checkpoints stay as they were.
    - A loss within `tolerance` (relative) of `chance_level` for `patience` consecutive steps
      emits one `StuckLossWarning`: the usual symptom of collapse or a saturated softmax (for small
      CNNs, typically a projector without batch norm).
    """

    def __init__(self, patience: int = 200, tolerance: float = 0.002) -> None:
        self.patience = patience
        self.tolerance = tolerance
        self.last_finite: float | None = None
        self.steps_at_chance = 0
        self.warned = False

    def update(self, loss: float, step: int, chance_level: float) -> None:
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"the loss became {loss} at step {step} (last finite loss: {self.last_finite}); "
                "stopping before the optimiser step so no parameter or checkpoint is overwritten. "
                "Try a lower learning rate, gradient clipping, bf16 instead of fp16, or a larger reg."
            )
        self.last_finite = loss
        at_chance = abs(loss - chance_level) <= self.tolerance * chance_level
        self.steps_at_chance = self.steps_at_chance + 1 if at_chance else 0
        if self.patience > 0 and self.steps_at_chance >= self.patience and not self.warned:
            self.warned = True
            warnings.warn(
                f"the loss has stayed at log(N) = {chance_level:.4f} for {self.steps_at_chance} steps "
                f"(step {step}): the attention is uniform and nothing is being learned. Typical causes: "
                "collapse, a too-high temperature, or (small CNNs) a projector without batch norm "
                "(set model.init_args.projector.batch_norm: true).",
                StuckLossWarning,
                stacklevel=2,
            )
