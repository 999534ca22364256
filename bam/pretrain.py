"""`bam pretrain`: LightningCLI over any `SSLMethod` and any `SSLDataModule`.

A run lives in one directory, `trainer.default_root_dir`: the loggers (CSV and TensorBoard by
default) write there and checkpoints go to `<run dir>/checkpoints`, so re-running the same
command with `--ckpt_path last` resumes where the run stopped, also in the middle of an epoch
after a SIGTERM/SIGUSR1 (see `bam.training.fault_tolerance`).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from pytorch_lightning.cli import LightningArgumentParser

from bam.callbacks import ContrastiveCrop, CurvePlots, EmbeddingPictures, FileReport, OnlineKNN, PreciseBatchNorm
from bam.data import MultiCropConfig, SSLDataModule
from bam.data.recipe_fit import recipe_misfits, sample_images, too_few_images
from bam.losses import BAMObjective
from bam.methods import SSLMethod
from bam.methods.base import constructor_default
from bam.models.projector import FLAT_PROJECTOR_KEYS
from bam.shipped_configs import CONFIG_OPTION, with_config_names
from bam.training import PreemptionCheckpoint, RunCheckpoint, check_slurm_allocation
from bam.training.run_setup import CHECKPOINT_DEFAULTS
from bam.training.launch_plan import check_launch_plan
from bam.moved_keys import MovedKey, read_moved_keys
from bam.ops.distributed import leave_process_group
from bam.training.run_cli import SafeRunCLI, SettingError, launch_rank_is_zero, one_line_errors
from bam.training.health import explain_divergence
from bam.training.slurm import devices_per_node
from bam.warning_filters import expected_warnings_silenced


CROP_COUNTS = ("num_global_crops", "num_local_crops")
# Keys that moved since configs (a run's saved config.yaml among them) may have been written: the
# projector's settings, gathered into one `model.init_args.projector` (`bam.models.ProjectorSettings`;
# `--model.proj_*` too, jsonargparse's short form), and the file report's callback group.
PRETRAIN_MOVED_KEYS = (
    *(MovedKey(f"{prefix}{old}", f"{prefix}projector.{new}")
      for prefix in ("model.init_args.", "model.") for old, new in FLAT_PROJECTOR_KEYS.items()),
    MovedKey("data_account.enabled", "file_report.enabled"),
)


class PretrainCLI(SafeRunCLI):
    """LightningCLI with bam's checkpointing, online k-NN, curve plots and ContrastiveCrop as named,
    configurable groups, and the safe-run behaviour of `SafeRunCLI` (resume, lock, checkpoint I/O)."""

    # the crop counts are set once, in the data's crop settings (`data.crops`), and given to the method
    derived_settings = {f"model.init_args.{count}": f"data.init_args.crops.{count}" for count in CROP_COUNTS}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({f"checkpoint.{name}": value for name, value in CHECKPOINT_DEFAULTS.items()})
        # before the k-NN group: the last k-NN evaluation must see the re-estimated statistics
        parser.add_lightning_class_args(PreciseBatchNorm, "precise_bn")
        parser.add_lightning_class_args(OnlineKNN, "knn")
        parser.add_lightning_class_args(PreemptionCheckpoint, "preemption")
        parser.add_lightning_class_args(CurvePlots, "plots")
        parser.add_lightning_class_args(EmbeddingPictures, "pictures")  # off unless enabled: true
        parser.add_lightning_class_args(ContrastiveCrop, "contrastive_crop")  # off unless enabled: true
        parser.add_lightning_class_args(FileReport, "file_report")  # last: after the final k-NN reads
        for count in CROP_COUNTS:  # see `derived_settings`
            parser.link_arguments(
                ("data.init_args.crops", "model.class_path", f"model.init_args.{count}"), f"model.init_args.{count}",
                compute_fn=functools.partial(_crop_count, count), apply_on="parse",
            )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        self.set_up_run_folder(config, "pretrain")
        trainer = config.trainer
        _check_slurm(trainer)  # first: under SLURM, the allocation's numbers say more
        check_launch_plan(trainer.accelerator, trainer.devices, trainer.num_nodes, trainer.precision)
        self.resolve_resume(config)

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        if self.subcommand:  # a run, not only the objects (`pretrain_cli(..., run=False)`)
            processes = self.trainer.num_devices * self.trainer.num_nodes
            _check_batch(self.model, self.datamodule, processes)
            _check_data_fits(self.datamodule, processes)


def _crop_count(name: str, crops: Any, model_class: str, model_value: Any) -> int:
    """The crop count `name` of the parsed `data.crops` (a class_path/init_args namespace, None for
    the defaults), which the method gets; a different value set under `model` is an error (the
    method's own default is not a setting)."""
    values = {} if crops is None else crops.get("init_args", crops)
    count = values.get(name, getattr(MultiCropConfig(), name))
    module, _, class_name = model_class.rpartition(".")
    default = constructor_default(getattr(importlib.import_module(module), class_name), name)
    if model_value not in (count, default):
        raise ValueError(
            f"model.init_args.{name}={model_value} disagrees with data.init_args.crops.{name}={count}: the crop "
            f"counts are set once, under data.init_args.crops (the model is given them); remove model.init_args.{name}"
        )
    return count


def _check_slurm(trainer: Namespace) -> None:
    """Stop before any process waits for peers when the SLURM allocation disagrees with the trainer."""
    uses_gpus = trainer.accelerator in ("gpu", "cuda") or (trainer.accelerator == "auto" and torch.cuda.is_available())
    devices = devices_per_node(trainer.devices, torch.cuda.device_count() if uses_gpus else 0)
    if devices is not None:
        check_slurm_allocation(trainer.num_nodes, devices, uses_gpus)


def _check_batch(model: Any, datamodule: Any, processes: int) -> None:
    """Stop before training when the method cannot learn from batches of the global size."""
    batch_size = getattr(datamodule, "batch_size", None)
    if not isinstance(model, SSLMethod) or batch_size is None:
        return
    problem = model.batch_problem(batch_size * processes)
    if problem:
        raise SettingError(
            f"data.init_args.batch_size={batch_size} x {processes} process(es) makes a global batch of "
            f"{batch_size * processes} image(s): {problem}; set a larger --data.init_args.batch_size"
        )


def _check_data_fits(datamodule: Any, processes: int) -> None:
    """Stop when no training step could run (a batch larger than the data); warn, naming both, when
    the recipe's normalisation, channels or crop sizes do not fit the images."""
    if not isinstance(datamodule, SSLDataModule):
        return
    datamodule.setup()
    source = datamodule.train_source
    if source is None:  # data kept elsewhere (FFCV): nothing to look at before the loaders exist
        return
    problem = too_few_images(len(source), datamodule.batch_size, processes)
    if problem:
        raise SettingError(problem)
    if launch_rank_is_zero():
        for misfit in recipe_misfits(sample_images(source), datamodule.crops):
            print(f"bam pretrain: warning: {misfit}", file=sys.stderr, flush=True)


OBJECTIVE_FIELDS = {field.name for field in dataclasses.fields(BAMObjective)}


def refuse_moved_objective_keys(argv: list[str]) -> None:
    """The objective's settings moved under `model.init_args.objective` (one `BAMObjective`); a
    config or command line written before would otherwise get jsonargparse's page-long error."""
    moved = [arg.split("=")[0] for arg in argv if arg.lstrip("-").split("=")[0].split(".")[-1] in OBJECTIVE_FIELDS
             and arg.startswith(("--model.init_args.", "--model.")) and ".objective." not in arg]
    for config in _config_files(argv):
        init_args = (yaml.safe_load(config.read_text()) or {}).get("model", {}).get("init_args", {}) or {}
        moved += [f"{config}: model.init_args.{key}" for key in init_args if key in OBJECTIVE_FIELDS]
    if moved:
        raise SettingError(f"{', '.join(moved)}: the objective's settings now live under "
                           "model.init_args.objective (e.g. --model.init_args.objective.reg 0.05)")


def _config_files(argv: list[str]) -> list[Path]:
    values = [later for earlier, later in zip(argv, argv[1:]) if earlier == CONFIG_OPTION]
    values += [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"{CONFIG_OPTION}=")]
    return [Path(value) for value in values if Path(value).is_file()]


def pretrain_cli(argv: list[str], run: bool = True) -> PretrainCLI:
    """Parse `argv` as `bam pretrain` does and build everything; with `run`, also train."""
    argv = read_moved_keys(with_config_names("pretrain", argv), PRETRAIN_MOVED_KEYS, "bam pretrain")
    refuse_moved_objective_keys(argv)
    return PretrainCLI(
        SSLMethod,
        SSLDataModule,
        program="bam pretrain",
        argv=argv,
        run=run,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # methods own their optimiser and schedules
        seed_everything_default=0,
        parser_kwargs={"fit": {"description": "Pretrain an encoder with a self-supervised method (BAM by default)."}},
    )


def main(argv: list[str]) -> None:
    """`bam pretrain [--config FILE|NAME] [--ckpt_path last] [--print_config] [overrides]`."""
    with one_line_errors("bam pretrain"), explain_divergence("bam pretrain", argv), expected_warnings_silenced():
        pretrain_cli(argv)
    leave_process_group()
