"""LightningCLI of the supervised evaluation stages (`bam linear`, `bam finetune`).

As for `bam pretrain`, a run lives in `trainer.default_root_dir` (default `runs/<stage>`): CSV and
TensorBoard logs (`csv/version_N`, `tensorboard/version_N`), `checkpoints/last.ckpt` (resume with `--ckpt_path last`), `results.json` and the
accuracy and loss curves as `plots/*.png`.
The number of classes is taken from the data, so configs never repeat it.
"""
from __future__ import annotations

from typing import Any

from pytorch_lightning.cli import LightningArgumentParser

from bam.evaluation.classifier import ClassificationStage
from bam.evaluation.data import ClassificationDataModule, LabelSetError
from bam.features.extract import NonFiniteFeaturesError
from bam.io.backbone_reader import ENCODER_MOVED_KEY
from bam.moved_keys import MovedKey, read_moved_keys
from bam.ops.distributed import leave_process_group
from bam.shipped_configs import with_config_names
from bam.training.fault_tolerance import RunCheckpoint
from bam.training.plots import CurvePlots
from bam.training.run_cli import SafeRunCLI, one_line_errors
from bam.warning_filters import expected_warnings_silenced


# the optimiser settings were flat model keys (`model.lr`, ...) before they became one
# `model.optimizer` group (`bam.training.optim.OptimizerSettings`); `model.optimizer` itself was its name
OPTIMIZER_MOVED_KEYS = (
    MovedKey("model.optimizer", "model.optimizer.name", lambda value: isinstance(value, str)),
    *(MovedKey(f"model.{key}", f"model.optimizer.{key}") for key in (
        "lr", "min_lr", "warmup_epochs", "weight_decay", "momentum", "lr_schedule", "lr_decay_epochs", "lr_decay_rate",
    )),
)
# what the classifier stages read at a new place: the optimiser settings and the checkpoint's encoder
CLASSIFIER_MOVED_KEYS = (*OPTIMIZER_MOVED_KEYS, ENCODER_MOVED_KEY.under("model"))


class EvalCLI(SafeRunCLI):
    """LightningCLI with a run directory per stage, a last-checkpoint callback, the class count
    linked from the data module to the model, and the safe-run behaviour of `SafeRunCLI`."""

    def __init__(self, *args: Any, stage: str, **kwargs: Any) -> None:
        self.stage = stage
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})
        parser.add_lightning_class_args(CurvePlots, "plots")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        self.set_up_run_folder(config, self.stage)
        self.resolve_resume(config)


def run_stage(model_class: type[ClassificationStage], stage: str, description: str, argv: list[str]) -> EvalCLI:
    """Parse `argv` (config files and overrides) and fit `model_class` on the configured data."""
    with one_line_errors(f"bam {stage}", also=(NonFiniteFeaturesError, LabelSetError)), expected_warnings_silenced():
        cli = EvalCLI(
            model_class,
            ClassificationDataModule,
            subclass_mode_model=False,
            subclass_mode_data=True,
            stage=stage,
            program=f"bam {stage}",
            argv=read_moved_keys(with_config_names(stage, argv), CLASSIFIER_MOVED_KEYS, f"bam {stage}"),
            save_config_kwargs={"overwrite": True},
            seed_everything_default=0,
            parser_kwargs={"fit": {"description": description}},
        )
    leave_process_group()
    return cli
