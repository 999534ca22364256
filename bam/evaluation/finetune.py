"""`bam finetune`: full fine-tuning of a pretrained backbone with a new classifier.

BEiT/MAE-style fine-tuning, from timm's parts: layer-wise learning-rate decay
(`create_optimizer_v2(layer_decay=...)`, whose per-group `lr_scale` the timm scheduler applies at
every step), stochastic depth (the architecture is rebuilt with `drop_path_rate` before the
pretrained weights are loaded), Mixup/CutMix with label smoothing (`timm.data.Mixup` and a
soft-target cross-entropy), and optionally an EMA of the weights (`timm.utils.ModelEmaV3`) that is
evaluated alongside the model. Training images usually get timm's RandAugment augmentation
(`data.augment: timm`, see the configs).

SwAV's semi-supervised protocol (fine-tuning on SimCLR's 1% / 10% ImageNet subsets) is the same
stage with none of those parts: SGD, a new head at a learning rate of its own (`head_lr`), and a
step schedule (`lr_schedule: step`, decays at epochs 12 and 16); see the
`finetune_imagenet_semisup_*` configs.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import Tensor, nn

from bam.evaluation.backbone import build_from_spec, resolve_backbone
from bam.evaluation.classifier import ClassificationStage
from bam.evaluation.stage_cli import run_stage
from bam.io import BackboneSpec
from bam.io.finetune_checkpoint import ARCHITECTURE_KEY
from bam.training.optim import OptimizerSettings

# BEiT/MAE-style fine-tuning: AdamW, 5 warm-up epochs, cosine to 1e-6
FINETUNE_OPTIMIZER = OptimizerSettings("adamw", lr=5e-4, min_lr=1e-6, warmup_epochs=5.0, weight_decay=0.05)


def _with_stochastic_depth(spec: BackboneSpec, drop_path_rate: float) -> nn.Module:
    """The spec's model rebuilt with `drop_path_rate`; an architecture without stochastic depth
    (its factory refuses the keyword, e.g. the demo's `bam_cnn4`) is built without it and says so,
    so the default rate works for every backbone."""
    if not drop_path_rate:
        return build_from_spec(spec)
    try:
        return build_from_spec(spec, drop_path_rate=drop_path_rate)
    except TypeError as error:
        if "drop_path_rate" not in str(error):
            raise
    warnings.warn(f"{spec.model_name} has no stochastic depth: drop_path_rate {drop_path_rate} is not used "
                  "(set --model.drop_path_rate 0 to silence this)", stacklevel=2)
    return build_from_spec(spec)


class FineTune(ClassificationStage):
    """Fine-tunes every layer of a pretrained backbone plus a new linear classifier.

    Args:
        backbone: Export directory or file, bam pretraining checkpoint, the authors' released
            file, or a timm model name (random initialisation, a baseline).
        num_classes: Number of classes (the CLI takes it from the data).
        encoder: The encoder of a checkpoint to evaluate ("teacher" or "student"; default: the teacher).
        arch: Architecture of a checkpoint, instead of the one it records.
        drop_path_rate: Stochastic-depth rate of the rebuilt architecture (0: not passed, for
            architectures without stochastic depth).
        layer_decay: Layer-wise learning-rate decay (None: one learning rate for every layer).
        mixup: Mixup alpha (0: off).
        cutmix: CutMix alpha (0: off).
        mix_prob: Probability of mixing a batch at all.
        mix_switch_prob: Probability of CutMix instead of Mixup when both are on.
        label_smoothing: Label smoothing of the (mixed or plain) targets.
        ema: Keep and evaluate an exponential moving average of the weights (its random
            generator cannot be sent to `ddp_spawn` processes: launch DDP with `ddp` or torchrun).
        ema_decay: Decay of that average per optimiser step.
        head_lr: Peak learning rate of the new classifier, per 256 images (None: `lr`, as the
            trunk); SwAV's semi-supervised protocol trains the head 10-250x faster than the trunk.
        optimizer: The optimiser and lr schedule (`bam.training.optim.OptimizerSettings`; here by
            default AdamW, lr 5e-4 per 256 images, 5 warm-up epochs, cosine to 1e-6, weight decay 0.05).
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int = 1000,
        encoder: Optional[str] = None,
        arch: Optional[str] = None,
        drop_path_rate: float = 0.1,
        layer_decay: Optional[float] = 0.65,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        mix_prob: float = 1.0,
        mix_switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        ema: bool = False,
        ema_decay: float = 0.9999,
        head_lr: Optional[float] = None,
        optimizer: OptimizerSettings = FINETUNE_OPTIMIZER,
    ) -> None:
        evaluated = ("val", "val_ema") if ema else ("val",)
        super().__init__(num_classes, evaluated, optimizer)
        self.save_hyperparameters()
        self.record_optimizer()
        if head_lr is not None and head_lr <= 0:
            raise ValueError(f"head_lr must be positive (or null: the trunk's lr), got {head_lr}")
        self.head_lr = head_lr
        self.layer_decay = layer_decay
        spec = resolve_backbone(backbone, encoder, arch)
        self.recipe = spec.recipe
        self.architecture = {"model": spec.model_name, "model_kwargs": spec.model_kwargs}
        self.model = _with_stochastic_depth(spec, drop_path_rate)
        self.model.reset_classifier(num_classes)
        self.model.train()  # Lightning keeps the modes modules are in; the loaded backbone is in eval mode
        self.mixup = _mixup(mixup, cutmix, mix_prob, mix_switch_prob, label_smoothing, num_classes)
        # Mixup's targets are already smoothed, soft one-hot vectors
        mixed = self.mixup is not None
        self.loss_fn = SoftTargetCrossEntropy() if mixed else nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        # created here, not at fit start, so that checkpoints always hold the average and resume it
        self.ema = ModelEmaV3(self.model, decay=ema_decay).requires_grad_(False) if ema else None

    def trainable(self) -> nn.Module:
        return self.model

    def optimizer_options(self) -> dict[str, Any]:
        return {"layer_decay": self.layer_decay}

    def own_lr(self) -> tuple[list[nn.Parameter], float] | None:
        if self.head_lr is None:
            return None
        return list(self.model.get_classifier().parameters()), self.head_lr

    def batch_problem(self, batch_size: int) -> str | None:
        if self.mixup is None or batch_size % 2 == 0:
            return None
        return ("Mixup/CutMix pair each image of a batch with another, which needs an even number; set an even "
                "--data.init_args.batch_size (or --model.mixup 0 --model.cutmix 0)")

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        loss = self.loss_fn(self.model(images), targets)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def classify(self, images: Tensor) -> dict[str, Tensor]:
        logits = {"val": self.model(images)}
        if self.ema is not None:
            logits["val_ema"] = self.ema.module(images)
        return logits

    def configure_optimizers(self) -> dict[str, Any]:
        config = super().configure_optimizers()
        if self.ema is not None:
            # after a step has really happened: not on steps the fp16 grad scaler skips, nor on
            # accumulation steps
            config["optimizer"].register_step_post_hook(self._update_ema)
        return config

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # what `bam export` rebuilds the classifier from, with the preprocessing it was tuned with
        describe = getattr(self.trainer.datamodule, "data_recipe", None) if self._trainer else None
        recipe = describe() if callable(describe) else self.recipe
        checkpoint[ARCHITECTURE_KEY] = {**self.architecture, "data_recipe": recipe.to_dict() if recipe else None}

    def _update_ema(self, *_: Any) -> None:
        # `step` counts updates made so far (timm's convention: the first update copies the model)
        self.ema.update(self.model, step=self.global_step + 1)


def _mixup(
    mixup: float, cutmix: float, prob: float, switch_prob: float, label_smoothing: float, num_classes: int
) -> Mixup | None:
    """timm's batch Mixup/CutMix with smoothed one-hot targets, or None when both alphas are 0."""
    if mixup <= 0 and cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=mixup, cutmix_alpha=cutmix, prob=prob, switch_prob=switch_prob,
        label_smoothing=label_smoothing, num_classes=num_classes,
    )


def main(argv: list[str]) -> None:
    """`bam finetune [--config FILE] [--ckpt_path last] [--print_config] [overrides]`."""
    run_stage(FineTune, "finetune", "Fine-tune a pretrained backbone with a new classifier.", argv)
