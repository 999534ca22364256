"""What `bam linear` and `bam finetune` share: a classifier trained with timm's optimiser factory
and a per-step cosine schedule, top-1/top-5 accuracy (torchmetrics) every epoch, and a report of
the best and last accuracies at the end of training (printed and written to
`<run dir>/results.json`).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from timm.scheduler import CosineLRScheduler
import torch
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from bam.data.file_report import SKIPPED_LOG, report_files
from bam.io.safe_load import secure_checkpoint_loading
from bam.ops.errors import UserInputError
from bam.recipe import DataRecipe
from bam.losses.settings import settings_of
from bam.training.optim import OptimizerSettings, optimizer_with_schedule
from bam.training.health import TrainingDiverged, check_and_record, checkpoint_directory
from bam.training.schedules import apply_lr_schedule, global_batch_size, rebuild_lr_schedule_on_resume

RESULTS_FILE = "results.json"


class NonFiniteLossError(TrainingDiverged):
    """The training loss of an evaluation stage is NaN or infinite."""


def accuracy_metrics(num_classes: int) -> MetricCollection:
    """Top-1 and top-5 accuracy (top-5 becomes top-`num_classes` with fewer than 5 classes)."""
    return MetricCollection({
        f"top{k}": MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro") for k in (1, 5)
    })


class ClassificationStage(pl.LightningModule):
    """Base of the supervised evaluation stages.

    Subclasses call `save_hyperparameters()` with these arguments among theirs, then
    `record_optimizer()`, and implement `trainable` (the module the optimiser updates),
    `training_step` and `classify` (the logits of each evaluated model, e.g. `{"val": ..., "val_ema": ...}`).

    Args:
        num_classes: Number of classes (the CLI takes it from the data).
        evaluated: Names of the models `classify` returns logits for.
        optimizer: The optimiser and lr schedule (`bam.training.optim.OptimizerSettings`; a mapping
            of its fields too, as a checkpoint holds them).
    """

    def __init__(
        self,
        num_classes: int,
        evaluated: tuple[str, ...] = ("val",),
        optimizer: OptimizerSettings | Mapping[str, Any] = OptimizerSettings(),
    ) -> None:
        super().__init__()
        self.optimizer_settings = settings_of(OptimizerSettings, optimizer, {})
        self.val_metrics = nn.ModuleDict({name: accuracy_metrics(num_classes) for name in evaluated})
        self.history: list[dict[str, float]] = []  # one entry per validated epoch
        self.last_loss: Tensor | None = None  # the latest finite training loss (recorded in checkpoints)
        self.recipe: DataRecipe | None = None  # the evaluated backbone's data recipe, if it records one

    def record_optimizer(self) -> None:
        """Keep the optimiser settings in the hyperparameters as plain values (checkpoints then load
        without unpickling any class); call after `save_hyperparameters()`."""
        self.hparams["optimizer"] = dataclasses.asdict(self.optimizer_settings)

    # ----------------------------------------------------------------- subclass interface
    def trainable(self) -> nn.Module:
        """The module whose parameters the optimiser updates."""
        raise NotImplementedError

    def classify(self, inputs: Tensor) -> dict[str, Tensor]:
        """Logits of every evaluated model (keys: the `evaluated` names)."""
        raise NotImplementedError

    def optimizer_options(self) -> dict[str, Any]:
        """Extra keyword arguments of `timm.optim.create_optimizer_v2` (e.g. `layer_decay`)."""
        return {}

    def own_lr(self) -> tuple[list[nn.Parameter], float] | None:
        """Parameters trained at a peak lr of their own (per 256 images), e.g. a new head's; None: none."""
        return None

    def batch_problem(self, batch_size: int) -> str | None:
        """Why training batches of `batch_size` images per process cannot work (None: they can)."""
        return None

    # ----------------------------------------------------------------- data
    def setup(self, stage: str) -> None:
        """Refuse a batch size the stage cannot train with (`batch_problem`), and give the data
        module the backbone's data recipe (`self.recipe`, set by the subclass) for the settings it
        leaves unset, before any loader is built."""
        secure_checkpoint_loading(self.trainer)  # before Lightning loads `ckpt_path`
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        problem = None if batch_size is None else self.batch_problem(batch_size)
        if problem:
            raise UserInputError(f"data.init_args.batch_size={batch_size} per process: {problem}")
        apply_recipe = getattr(self.trainer.datamodule, "apply_recipe", None)
        if apply_recipe is not None:
            apply_recipe(self.recipe, self.hparams.get("backbone", "the backbone"))

    # ----------------------------------------------------------------- evaluation
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        inputs, labels = batch
        for name, logits in self.classify(inputs).items():
            self.val_metrics[name].update(logits, labels)

    def on_validation_epoch_end(self) -> None:
        # torchmetrics sums over processes here, once per epoch (no collective per batch)
        values = {
            f"{name}/{metric}": round(100.0 * value.item(), 4)
            for name, collection in self.val_metrics.items()
            for metric, value in collection.compute().items()
        }
        for collection in self.val_metrics.values():
            collection.reset()
        if self.trainer.sanity_checking:
            return
        self.log_dict(values, sync_dist=True)  # already global: the same on every process, so is their mean
        self.history.append({"epoch": self.current_epoch + 1, **values})

    def summary(self) -> dict[str, dict[str, float]]:
        """Per evaluated model: best top-1 (with the top-5 and epoch it came with) and last top-1/top-5."""
        report = {}
        for name in self.val_metrics:
            best = max(self.history, key=lambda entry: entry[f"{name}/top1"])
            last = self.history[-1]
            report[name] = {
                "best_top1": best[f"{name}/top1"], "best_top5": best[f"{name}/top5"], "best_epoch": best["epoch"],
                "last_top1": last[f"{name}/top1"], "last_top5": last[f"{name}/top5"], "last_epoch": last["epoch"],
            }
        return report

    def on_fit_end(self) -> None:
        run_dir = Path(self.trainer.default_root_dir)
        files = self._file_report(run_dir)  # a collective: before any rank can return
        if not self.history:
            return
        summary = self.summary()
        path = run_dir / RESULTS_FILE
        lines = [f"{'':<14} {'top-1':>7} {'top-5':>7}  epoch"]
        for name, result in summary.items():
            for epoch in ("best", "last"):
                lines.append(
                    f"{epoch + ' ' + name:<14} {result[epoch + '_top1']:>6.2f}% {result[epoch + '_top5']:>6.2f}%  "
                    f"{result[epoch + '_epoch']}"
                )
        rank_zero_info("\n".join([*lines, f"(written to {path})"]))
        if self.trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**summary, "files": files, "history": self.history}, indent=2))

    def _file_report(self, run_dir: Path) -> dict[str, Any] | None:
        """Files found, read and skipped by the data module, summed over processes (None for data
        in memory); printed and the skipped paths written to `<run dir>/skipped_files.tsv`."""
        statuses = getattr(self.trainer.datamodule, "file_statuses", None)
        return None if statuses is None else report_files(statuses(), run_dir / SKIPPED_LOG, self.trainer.strategy.root_device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["eval_history"] = self.history  # so a resumed run still knows its best epoch
        # a head or model with NaN in it is never saved: resuming or exporting it gives nonsense
        last_loss = None if self.last_loss is None else self.last_loss.item()
        check_and_record(checkpoint, self.global_step, last_loss, checkpoint_directory(self._trainer))

    def on_before_backward(self, loss: Tensor) -> None:
        """Stop before a non-finite loss reaches the weights (every process decides together, so
        none waits for the others at the next collective)."""
        non_finite = not bool(torch.isfinite(loss))
        if self._trainer is not None and self.trainer.strategy.reduce_boolean_decision(non_finite, all=False):
            raise NonFiniteLossError(
                f"the training loss is not finite ({loss.item()}) at step {self.global_step}: from the first step, "
                "this means a backbone or data giving NaN or infinity (a diverged run's checkpoint); later, lower the "
                "learning rate. Nothing was saved from this step on"
            )
        self.last_loss = loss.detach()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get("eval_history", []))
        rebuild_lr_schedule_on_resume(checkpoint)  # the settings given for this run win

    def on_train_start(self) -> None:
        apply_lr_schedule(self)

    # ----------------------------------------------------------------- optimisation
    def global_batch_size(self) -> int:
        return global_batch_size(self.trainer)

    def configure_optimizers(self) -> dict[str, Any]:
        """bam's optimiser setup (`bam.training.optim`): timm optimiser at `lr * global batch / 256`
        and a per-step warm-up + cosine schedule. timm's schedulers multiply each group's learning
        rate by its `lr_scale` (layer-wise decay) every time they set it, so per-group scales take
        effect from the first step."""
        settings = self.optimizer_settings
        return optimizer_with_schedule(
            self.trainer, self.trainable(), self.global_batch_size(), settings.name, settings.lr, settings.min_lr,
            settings.warmup_epochs, settings.weight_decay, settings.momentum, schedule=settings.schedule(),
            own_lr=self.own_lr(), **self.optimizer_options(),
        )

    def lr_scheduler_step(self, scheduler: CosineLRScheduler, metric: Any = None) -> None:
        scheduler.step_update(num_updates=self.global_step)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.log("train/lr", self.trainer.optimizers[0].param_groups[-1]["lr"])
