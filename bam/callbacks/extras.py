"""What `bam pretrain` adds to a Lightning Trainer, as one call for Python users.

`pretrain_trainer_arguments(run_dir)` returns the Trainer arguments the command line sets up: the run
directory, the CSV and TensorBoard loggers (their `version_N` folders agree), periodic and
last checkpoints written atomically, batch-norm re-estimation and online k-NN at the end,
preemption handling and the curve plots:

    trainer = pl.Trainer(max_epochs=100, **bam.pretrain_trainer_arguments("runs/bam"))
"""
from __future__ import annotations

import os
import warnings
from typing import Any

from pytorch_lightning.callbacks import Callback

from bam.callbacks.batchnorm_stats import PreciseBatchNorm
from bam.callbacks.knn import OnlineKNN
from bam.training.fault_tolerance import AtomicCheckpointIO, PreemptionCheckpoint, RunCheckpoint
from bam.training.plots import CurvePlots
from bam.training.run_setup import CHECKPOINT_DEFAULTS, DEFAULT_LOGGERS


def pretrain_trainer_arguments(
    run_dir: str = os.path.join("runs", "pretrain"),
    knn: bool = True,
    knn_every_n_epochs: int = 1,
    compare_baselines: bool = False,
    precise_bn: bool = True,
    plots: bool = True,
    loggers: bool = True,
) -> dict[str, Any]:
    """Keyword arguments for `pl.Trainer` with what `bam pretrain` adds, at its defaults.

    Args:
        run_dir: The run directory (`default_root_dir`): logs, `checkpoints/`, `plots/`.
        knn: Online k-NN accuracy (needs a bam data module, which provides `knn_dataloaders`).
        knn_every_n_epochs: Epochs between k-NN evaluations (and after the last epoch).
        compare_baselines: At the end, k-NN of a random-init backbone and of raw pixels too.
        precise_bn: Re-estimate batch-norm statistics on clean images after the last epoch (needs
            a bam data module).
        plots: PNG curves and the run's summary figure in `run_dir/plots` at the end.
        loggers: CSV and TensorBoard loggers in `run_dir` (False: leave `logger` to the caller;
            the plots need a CSV logger among the loggers).

    Returns:
        `default_root_dir`, `callbacks`, `plugins` (atomic checkpoint writes) and `logger`.
    """
    callbacks: list[Callback] = [RunCheckpoint(dirpath=os.path.join(run_dir, "checkpoints"), **CHECKPOINT_DEFAULTS)]
    if precise_bn:  # before k-NN: the last evaluation must see the re-estimated statistics
        callbacks.append(PreciseBatchNorm())
    if knn:
        callbacks.append(OnlineKNN(every_n_epochs=knn_every_n_epochs, compare_baselines=compare_baselines))
    callbacks.append(PreemptionCheckpoint())
    if plots:
        callbacks.append(CurvePlots())
    extras: dict[str, Any] = {"default_root_dir": run_dir, "callbacks": callbacks, "plugins": [AtomicCheckpointIO()]}
    if loggers:
        extras["logger"] = [cls(save_dir=run_dir, name=name) for cls, name in DEFAULT_LOGGERS.items()]
    return extras


def trainer_extras(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """The name `pretrain_trainer_arguments` had before: still answers, with one warning line."""
    warnings.warn("bam.trainer_extras is now called bam.pretrain_trainer_arguments (same arguments); "
                  "the old name will go in a later release", FutureWarning, stacklevel=2)
    return pretrain_trainer_arguments(*args, **kwargs)
