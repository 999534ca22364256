"""What `bam pretrain` adds to a Lightning Trainer, as one call for Python users.

`trainer_extras(run_dir)` returns the Trainer arguments the command line sets up: the run
directory, the CSV and TensorBoard loggers (their `version_N` folders agree), periodic and
last checkpoints written atomically, batch-norm re-estimation and online k-NN at the end,
preemption handling and the curve plots:

    trainer = pl.Trainer(max_epochs=100, **bam.trainer_extras("runs/bam"))
"""
from __future__ import annotations

import os
from typing import Any

from jsonargparse import Namespace
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from bam.callbacks import CurvePlots, OnlineKNN, PreciseBatchNorm
from bam.training.fault_tolerance import AtomicCheckpointIO, PreemptionCheckpoint, RunCheckpoint

# the checkpoint callback's settings in `bam pretrain` (every 10 epochs, all kept, plus last.ckpt)
CHECKPOINT_DEFAULTS: dict[str, Any] = {"save_last": True, "save_top_k": -1, "every_n_epochs": 10}

# logger class -> its sub-folder of the run directory (distinct, so both get the same version_N)
DEFAULT_LOGGERS = {CSVLogger: "csv", TensorBoardLogger: "tensorboard"}


def logger_config(run_dir: str, current: Any) -> Any:
    """The `trainer.logger` setting of a command-line run in `run_dir`: bam's CSV and TensorBoard
    loggers by default (None or True); any other logger set (W&B, MLflow, ...) keeps a CSV logger
    beside it, which the curve plots are drawn from; False logs nothing."""
    if current in (None, True):
        return [_logger_namespace(cls, run_dir) for cls in DEFAULT_LOGGERS]
    if current is False:
        return current
    loggers = list(current) if isinstance(current, list) else [current]
    if any(_class_path(logger).endswith(".CSVLogger") for logger in loggers):
        return loggers
    return [*loggers, _logger_namespace(CSVLogger, run_dir)]


def _logger_namespace(cls: type, run_dir: str) -> Namespace:
    init_args = Namespace(save_dir=run_dir, name=DEFAULT_LOGGERS[cls])
    return Namespace(class_path=f"{cls.__module__}.{cls.__name__}", init_args=init_args)


def _class_path(logger: Any) -> str:
    """A logger's class path, from its config (`class_path`) or from the instance."""
    path = getattr(logger, "class_path", None)
    return path if isinstance(path, str) else f"{type(logger).__module__}.{type(logger).__name__}"


def trainer_extras(
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
