"""The base LightningModule every pretraining method builds on.

It owns what methods share: the student encoder (timm backbone + projector) and its optional
momentum teacher, the optimiser (timm's factory, no weight decay on biases and 1-D parameters),
the per-step schedules (lr warm-up + cosine, cosine weight decay, cosine teacher momentum), the
multi-crop plumbing and the loss health checks. A method implements `compute_loss` only.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from timm.scheduler import CosineLRScheduler
from torch import nn

from bam.io.initial_weights import load_initial_weights
from bam.io.safe_load import secure_checkpoint_loading
from bam.methods.monitoring import LossMonitor, NonFiniteLossError
from bam.losses.settings import Settings, settings_of
from bam.models import Projector, ProjectorSettings, build_backbone, feature_dim
from bam.models.projector import FLAT_PROJECTOR_KEYS, with_projector_gathered
from bam.models.encoder import MultiCropEncoder
from bam.ops.errors import UserInputError
from bam.ops.crops import check_crop_counts
from bam.recipe import CHECKPOINT_KEY, DataRecipe
from bam.training.health import check_and_record, checkpoint_directory, diverged
from bam.training.optim import StepBudget, optimizer_with_schedule
from bam.training.schedules import apply_lr_schedule, cosine, global_batch_size, rebuild_lr_schedule_on_resume
from bam.training.sync_batchnorm import convert_sync_batchnorm


class SSLMethod(pl.LightningModule):
    """Shared training logic of the self-supervised methods.

    Batches are `(crops, labels, dataset indices)`, `(crops, labels)` or just `crops`: `crops` is a
    list of `num_global_crops + num_local_crops` float tensors `(B, C, H, W)`, already augmented
    and normalised, global crops first (they may be larger than the local ones); labels are
    ignored, and the indices read only by methods with a state per image (DeepCluster-v2's bank, SeLa's labels). bam's
    data modules make them; a plain `DataLoader` whose dataset returns `(list of crops, label)` works as well:
    `trainer.fit(model, train_dataloaders=loader)`. Checkpoints store the data recipe (mean, std,
    input size: see `bam.recipe.DataRecipe`) of bam's data modules; with other data, set
    `model.data_recipe` so that exports carry it.

    Args:
        num_global_crops: global crops per image (the crops the targets come from; `bam
            pretrain` sets both counts from `data.init_args.crops`).
        num_local_crops: local crops per image (a method may have its own default).
        backbone: timm model name (bam's presets included, see `bam.models.backbones`).
        backbone_kwargs: extra keyword arguments for `timm.create_model`.
        init_weights: start the backbone from these weights instead of a random initialisation: a
            bam export, a timm state dict (`.safetensors`, `.pth`), a bam checkpoint or the authors'
            released file (see `bam.io.initial_weights`), loaded weights-only and strictly. Only
            the backbone: the projector, optimiser and schedules start anew, unlike `--ckpt_path`.
        projector: the projector MLP's settings (`bam.models.ProjectorSettings`: `hidden_dim`,
            `out_dim`, `num_layers`, `activation`, `batch_norm`, `last_batch_norm`, `bias`,
            `init`; `init="trunc_normal"` is the authors' initialisation); in a config
            `projector.hidden_dim` etc.
        momentum_teacher: keep an EMA copy of the student that embeds the targets.
        teacher_momentum, teacher_momentum_final: cosine EMA momentum schedule over all steps.
        optimizer: any name timm's optimiser factory knows (adamw, sgd, lars, lamb, ...).
        lr: peak learning rate per 256 images; the peak used is `lr * global_batch / 256`.
        min_lr: final learning rate of the cosine decay (absolute: not scaled by the batch size).
        warmup_epochs: linear learning-rate warm-up, in epochs (applied per step).
        weight_decay, weight_decay_final: cosine weight-decay schedule (biases and 1-D parameters
            are never decayed).
        sgd_momentum: momentum of SGD-like optimisers (sgd, lars).
        gradient_checkpointing: recompute backbone activations in backward to save memory.
        compile_backbone: `torch.compile` the student backbone in place (keys stay unchanged).
        channels_last: run the backbone in the NHWC memory layout (faster convolutions on CPU
            and with mixed precision on GPU; keys and values stay unchanged).
        bn_stats_from_global_crops: batch norm running statistics (used at evaluation) come from
            the global crops only, not from the local crops' different distribution.
        sync_batchnorm: convert batch norm to SyncBatchNorm when training on several processes.
        stuck_loss_patience: steps at log(N) before warning that nothing is learned (0 = off).
        **flat_projector_keys: the projector's settings under their names of before
            (`proj_hidden_dim`, ...: `bam.models.projector.FLAT_PROJECTOR_KEYS`), as checkpoints
            written before hold them: read into `projector`.
    """

    def __init__(
        self,
        num_global_crops: int = 2,
        num_local_crops: int = 6,
        backbone: str = "bam_vit_small_patch16_224",
        backbone_kwargs: dict[str, Any] | None = None,
        init_weights: str | None = None,
        projector: ProjectorSettings = ProjectorSettings(),
        momentum_teacher: bool = False,
        teacher_momentum: float = 0.995,
        teacher_momentum_final: float = 1.0,
        optimizer: str = "adamw",
        lr: float = 3e-4,
        min_lr: float = 1e-6,
        warmup_epochs: float = 10,
        weight_decay: float = 0.04,
        weight_decay_final: float = 0.4,
        sgd_momentum: float = 0.9,
        gradient_checkpointing: bool = False,
        compile_backbone: bool = False,
        channels_last: bool = False,
        bn_stats_from_global_crops: bool = True,
        sync_batchnorm: bool = True,
        stuck_loss_patience: int = 200,
        **flat_projector_keys: Any,
    ) -> None:
        super().__init__()
        check_crop_counts(num_global_crops, num_local_crops, prefix="model ")
        projector = _projector_settings(projector, flat_projector_keys, type(self))
        # Called here so that the subclass's arguments (collected from its __init__ frame too)
        # and every default end up in the checkpoint's hyper_parameters; the settings groups as
        # plain values (loadable without unpickling any class), the flat keys of before only there.
        self.save_hyperparameters(ignore=list(flat_projector_keys))
        self.hparams["projector"] = dataclasses.asdict(projector)
        net = build_backbone(backbone, **(backbone_kwargs or {}))
        if init_weights:  # before the teacher copies the student: both start from these weights
            loaded = load_initial_weights(net, init_weights, backbone)
            rank_zero_info(f"bam: backbone {backbone} initialised from {init_weights} ({loaded} tensors)")
        if gradient_checkpointing:
            _enable_gradient_checkpointing(net, backbone)
        self.student = MultiCropEncoder(net, self.make_head(feature_dim(net)), channels_last, bn_stats_from_global_crops)
        # Created here (never later) so every checkpoint has the teacher's keys and resumes fit.
        self.teacher = copy.deepcopy(self.student).requires_grad_(False) if momentum_teacher else None
        if compile_backbone:
            self.student.backbone.compile()
        self.loss_monitor = LossMonitor(patience=stuck_loss_patience)
        self.data_recipe: DataRecipe | None = None  # for data without a `data_recipe()` method

    # ----------------------------------------------------------------- method interface
    def make_head(self, in_dim: int) -> nn.Module:
        """The head on the backbone's `in_dim` features: the `Projector` of `projector_settings`
        (a method with another head, e.g. DINO's, overrides this)."""
        return Projector(in_dim, self.projector_settings)

    def record_objective(self, kind: type[Settings], given: Settings | Mapping[str, Any]) -> Settings:
        """The objective's settings `given` (a `kind`, or a mapping: a YAML config's or a
        checkpoint's), recorded in the hyper-parameters as plain values (lists for tuples), so that
        a checkpoint loads without unpickling any class."""
        objective = settings_of(kind, given, {})
        fields = dataclasses.asdict(objective)
        self.hparams["objective"] = {key: list(value) if isinstance(value, tuple) else value for key, value in fields.items()}
        return objective

    @property
    def projector_settings(self) -> ProjectorSettings:
        """The projector's settings (`projector`), from the hyper-parameters."""
        return ProjectorSettings(**self.hparams["projector"])

    def compute_loss(self, crops: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def step_loss(self, crops: list[torch.Tensor], batch: Any) -> torch.Tensor:
        """The loss of a training batch: `compute_loss` of its crops. A method that needs more of
        the batch (DeepCluster-v2, SeLa: the dataset indices, see `dataset_indices_of`) overrides this."""
        return self.compute_loss(crops)

    @classmethod
    def refuse_momentum_teacher(cls, kwargs: dict[str, Any], method: str, targets_from: str) -> None:
        """A method whose targets do not come from a momentum teacher refuses `momentum_teacher`,
        saying where its targets come from instead."""
        if kwargs.get("momentum_teacher"):
            raise ValueError(f"{method} has no momentum teacher ({targets_from}); "
                             f"remove momentum_teacher from the {cls.__name__} arguments")

    @property
    def num_crops(self) -> int:
        """Crops per image: global and local."""
        return self.hparams.num_global_crops + self.hparams.num_local_crops

    @staticmethod
    def check_crop_count(crops: list[torch.Tensor], expected: int) -> None:
        """Fail with both numbers when the data's crops per image differ from the method's."""
        if len(crops) != expected:
            raise ValueError(
                f"the data provides {len(crops)} crops per image but the model expects {expected} "
                "(num_global_crops + num_local_crops); make the data and model crop counts agree"
            )

    def chance_level(self, batch_size: int) -> float:
        """Loss value of an untrained (uniform) model for a per-process batch of `batch_size`
        images; `nan` disables the stuck-loss check."""
        return float("nan")

    def batch_problem(self, global_batch: int) -> str | None:
        """Why the method cannot learn from global batches (all processes together) of
        `global_batch` images; None: it can. Checked at start-up."""
        return None

    def on_schedule(self, step: int) -> dict[str, float]:
        """Set method-specific scheduled values for `step`; return them for logging."""
        return {}

    # ----------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        crops = _crops_of(batch)
        loss = self.step_loss(crops, batch)
        try:
            self.loss_monitor.update(loss.item(), self.global_step, self.chance_level(len(crops[0])))
        except NonFiniteLossError as error:  # add the way back: the newest sound checkpoint
            raise diverged(NonFiniteLossError, str(error), checkpoint_directory(self._trainer), self.hparams.lr) from None
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to save a non-finite state (`NonFiniteStateError`); record the last loss and the
        training data's recipe (what exports and evaluation normalise with)."""
        check_and_record(checkpoint, self.global_step, self.loss_monitor.last_finite,
                         checkpoint_directory(self._trainer), self.hparams.lr)
        recipe = self.recipe_of_data()
        if recipe is not None:
            checkpoint[CHECKPOINT_KEY] = recipe.to_dict()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        values = {"weight_decay": self._set_weight_decay(step), **self.on_schedule(step)}
        if self.teacher is not None:
            values["teacher_momentum"] = self.teacher_momentum_at(step)
        values["lr"] = self.trainer.optimizers[0].param_groups[-1]["lr"]
        self.log_dict({f"train/{name}": value for name, value in values.items()})

    def teacher_embeddings(self, crops: list[torch.Tensor]) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        with torch.no_grad():
            return self.teacher(crops)

    @torch.no_grad()
    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features used for evaluation: the teacher's when there is one."""
        encoder = self.teacher if self.teacher is not None else self.student
        return encoder.embed_images(images)

    @torch.no_grad()
    def student_features(self, images: torch.Tensor) -> torch.Tensor:
        """The student's backbone features (online k-NN compares them with the teacher's)."""
        return self.student.embed_images(images)

    # ----------------------------------------------------------------- schedules
    def teacher_momentum_at(self, step: int) -> float:
        hp = self.hparams
        return cosine(hp.teacher_momentum, hp.teacher_momentum_final, step, self.step_budget.total_steps)

    def weight_decay_at(self, step: int) -> float:
        hp = self.hparams
        return cosine(hp.weight_decay, hp.weight_decay_final, step, self.step_budget.total_steps)

    def _set_weight_decay(self, step: int) -> float:
        value = self.weight_decay_at(step)
        for group in self.trainer.optimizers[0].param_groups:
            if group.get("initial_weight_decay", 0.0) > 0:
                group["weight_decay"] = value
        return value

    def _update_teacher(self, *_: Any) -> None:
        """EMA step, run as the optimiser's post-step hook: only after a step really happened
        (a step skipped by the fp16 grad scaler or an accumulation step does not move it)."""
        self.move_teacher(self.teacher_momentum_at(self.global_step))

    @torch.no_grad()
    def move_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
        teacher = list(self.teacher.parameters())
        student = [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, student, alpha=1.0 - momentum)

    # ----------------------------------------------------------------- optimisation
    @property
    def step_budget(self) -> StepBudget:
        """The run's optimiser steps, asked of the trainer when a schedule needs them (it knows them
        once it has its data), never cached from an earlier call."""
        return StepBudget.of(self.trainer)

    def global_batch_size(self) -> int:
        return global_batch_size(self.trainer)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        config = optimizer_with_schedule(
            self.trainer, self.student, self.global_batch_size(), hp.optimizer, hp.lr, hp.min_lr, hp.warmup_epochs,
            hp.weight_decay, hp.sgd_momentum, self.extra_param_groups(),
        )
        if self.teacher is not None:
            config["optimizer"].register_step_post_hook(self._update_teacher)
        return config

    def extra_param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups a method trains beside the student's (e.g. SwAV's prototypes); settings
        left out are the optimiser's. They are added before the lr schedule is built, so it drives them."""
        return []

    def lr_scheduler_step(self, scheduler: CosineLRScheduler, metric: Any = None) -> None:
        scheduler.step_update(num_updates=self.global_step)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rebuild_lr_schedule_on_resume(checkpoint)  # the settings given for this run win

    def on_train_start(self) -> None:
        apply_lr_schedule(self)

    def recipe_of_data(self) -> DataRecipe | None:
        """The training data's recipe: the data module's `data_recipe()`, else `self.data_recipe`."""
        describe = getattr(self.trainer.datamodule, "data_recipe", None) if self._trainer else None
        return describe() if callable(describe) else self.data_recipe

    def setup(self, stage: str) -> None:
        secure_checkpoint_loading(self.trainer)  # before Lightning loads `ckpt_path`
        if self.hparams.sync_batchnorm and self.trainer.world_size > 1:
            # torch's SyncBatchNorm on GPUs; on CPU processes (gloo) bam's, as torch's refuses CPU.
            device = self.trainer.strategy.root_device.type
            self.student = convert_sync_batchnorm(self.student, device)
            if self.teacher is not None:
                self.teacher = convert_sync_batchnorm(self.teacher, device)


def _projector_settings(
    given: ProjectorSettings | Mapping[str, Any], flat: dict[str, Any], method: type
) -> ProjectorSettings:
    """The method's projector settings: `given`, where a mapping (a YAML config's, a checkpoint's)
    and the flat `proj_*` keys of before (`flat`) change only the settings they name of the
    method's own defaults (its `projector` default); another unknown keyword is refused as Python
    refuses it."""
    unknown = sorted(set(flat) - set(FLAT_PROJECTOR_KEYS))
    if unknown:
        raise TypeError(f"{method.__name__}.__init__() got an unexpected keyword argument {unknown[0]!r}")
    gathered = with_projector_gathered({"projector": given, **flat})["projector"]
    if isinstance(gathered, Mapping):
        gathered = {**vars(_default_projector(method)), **gathered}
    return settings_of(ProjectorSettings, gathered, {}, what="projector")


def _default_projector(method: type) -> ProjectorSettings:
    default = constructor_default(method, "projector")
    return default if isinstance(default, ProjectorSettings) else ProjectorSettings()


def constructor_default(method: type, name: str) -> Any:
    """The default of `method`'s argument `name`: its own constructor's, or that of the nearest
    base class whose constructor has it (the argument passed on in `**kwargs`)."""
    for owner in method.__mro__:
        parameter = inspect.signature(owner.__init__).parameters.get(name)
        if parameter is not None:
            return parameter.default
    raise KeyError(f"{method.__name__} has no argument {name!r}")


def _crops_of(batch: Any) -> list[torch.Tensor]:
    """The list of crops of a batch `(crops, labels)` or `crops`."""
    crops = batch[0] if isinstance(batch, (list, tuple)) and isinstance(batch[0], (list, tuple)) else batch
    if not (isinstance(crops, (list, tuple)) and all(isinstance(crop, torch.Tensor) and crop.dim() == 4 for crop in crops)):
        raise TypeError(
            "a training batch must be (crops, labels) or crops, where crops is a list of (B, C, H, W) tensors "
            f"with the global crops first; got a {type(batch).__name__}"
        )
    return list(crops)


def dataset_indices_of(batch: Any, needed_by: str) -> torch.Tensor:
    """The dataset indices `(B,)` of a batch `(crops, labels, indices)`; `needed_by` names what
    needs them in the error for a batch without them."""
    if isinstance(batch, (list, tuple)) and len(batch) == 3 and isinstance(batch[2], torch.Tensor) and batch[2].dim() == 1:
        return batch[2]
    raise UserInputError(
        f"{needed_by} needs each image's dataset index: training batches must be (crops, labels, indices), as "
        "bam's data modules make them (FFCV data without ContrastiveCrop carries none)"
    )


def _enable_gradient_checkpointing(backbone: nn.Module, name: str) -> None:
    try:
        backbone.set_grad_checkpointing(True)
    except (AttributeError, AssertionError, NotImplementedError) as error:
        raise ValueError(f"backbone {name!r} does not support gradient checkpointing ({error})") from error
