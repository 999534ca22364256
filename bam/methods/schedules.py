"""Per-step hyperparameter schedules, as pure functions of the step index.

Everything a resumed run needs to continue a schedule is the global step, which Lightning
checkpoints; no schedule keeps state of its own.
"""
from __future__ import annotations

import math


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
