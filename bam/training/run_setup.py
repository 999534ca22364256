"""What a run folder holds besides checkpoints, set up alike for `bam pretrain`, `bam linear` and
`bam finetune`: the loggers (CSV and TensorBoard in sub-folders of the run directory, so that both
get the same `version_N`) and the checkpoint callback's cadence."""
from __future__ import annotations

from typing import Any

from jsonargparse import Namespace
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

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
