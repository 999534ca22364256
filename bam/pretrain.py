"""`bam pretrain`: LightningCLI over any `SSLMethod` and any `SSLDataModule`.

A run lives in one directory, `trainer.default_root_dir`: the loggers (CSV and TensorBoard by
default) write there and checkpoints go to `<run dir>/checkpoints`, so re-running the same
command with `--ckpt_path last` resumes where the run stopped, also in the middle of an epoch
after a SIGTERM/SIGUSR1 (see `bam.training.fault_tolerance`).
"""
from __future__ import annotations

import os

import torch
from jsonargparse import Namespace
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from bam.callbacks import ContrastiveCrop, CurvePlots, OnlineKNN, PreciseBatchNorm
from bam.cli import stage_argv
from bam.data import SSLDataModule
from bam.methods import SSLMethod
from bam.training import AtomicCheckpointIO, PreemptionCheckpoint, check_slurm_allocation
from bam.training.health import explain_divergence
from bam.training.slurm import devices_per_node

# logger class -> its sub-folder of the run directory (distinct, so both get the same version_N)
DEFAULT_LOGGERS = {"pytorch_lightning.loggers.CSVLogger": "csv", "pytorch_lightning.loggers.TensorBoardLogger": "tensorboard"}


class PretrainCLI(LightningCLI):
    """LightningCLI with bam's checkpointing, online k-NN, curve plots and ContrastiveCrop as named,
    configurable groups."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": -1, "checkpoint.every_n_epochs": 10})
        # before the k-NN group: the last k-NN evaluation must see the re-estimated statistics
        parser.add_lightning_class_args(PreciseBatchNorm, "precise_bn")
        parser.add_lightning_class_args(OnlineKNN, "knn")
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
        parser.add_lightning_class_args(CurvePlots, "plots")
        parser.add_lightning_class_args(ContrastiveCrop, "contrastive_crop")  # off unless enabled: true

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        run_dir = config.trainer.default_root_dir or os.path.join("runs", "pretrain")
        config.trainer.default_root_dir = run_dir
        if config.trainer.logger in (None, True):
            config.trainer.logger = [
                Namespace(class_path=path, init_args=Namespace(save_dir=run_dir, name=name))
                for path, name in DEFAULT_LOGGERS.items()
            ]
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = os.path.join(run_dir, "checkpoints")
        _check_slurm(config.trainer)

    def before_fit(self) -> None:
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # not when the user chose another
            strategy.checkpoint_io = AtomicCheckpointIO()


def _check_slurm(trainer: Namespace) -> None:
    """Stop before any process waits for peers when the SLURM allocation disagrees with the trainer."""
    uses_gpus = trainer.accelerator in ("gpu", "cuda") or (trainer.accelerator == "auto" and torch.cuda.is_available())
    devices = devices_per_node(trainer.devices, torch.cuda.device_count() if uses_gpus else 0)
    if devices is not None:
        check_slurm_allocation(trainer.num_nodes, devices, uses_gpus)


def main(argv: list[str]) -> None:
    """`bam pretrain [--config FILE] [--ckpt_path last] [--print_config] [overrides]`."""
    with stage_argv("bam pretrain"), explain_divergence("bam pretrain", argv):
        PretrainCLI(
            SSLMethod,
            SSLDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=["fit", *argv],
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,  # methods own their optimiser and schedules
            seed_everything_default=0,
            parser_kwargs={"fit": {"description": "Pretrain an encoder with a self-supervised method (BAM by default)."}},
        )
