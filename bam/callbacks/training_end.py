"""When is an epoch end the last one of a run? Callbacks that finish a run (re-estimated batch norm
statistics, the final k-NN row) must fire whether `max_epochs` or `max_steps` (or an early stop)
ended it."""
from __future__ import annotations

import pytorch_lightning as pl


def is_final_epoch_end(trainer: pl.Trainer) -> bool:
    """True in `on_train_epoch_end` of the epoch after which fitting stops.

    Every rank computes the same answer from its own trainer state (no collective)."""
    if trainer.should_stop:
        return True
    if trainer.max_steps is not None and trainer.max_steps >= 0 and trainer.global_step >= trainer.max_steps:
        return True
    return trainer.max_epochs is not None and trainer.max_epochs >= 0 and trainer.current_epoch + 1 >= trainer.max_epochs
