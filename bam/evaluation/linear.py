"""`bam linear`: a linear classifier on the features of a frozen backbone (the authors' protocol).

Features (`feature: auto`): ViTs give the class tokens of the last `n_last_blocks` blocks and the
mean patch token of the last block, each after the final norm (`n_last_blocks=1`: the authors'
ViT-B [CLS, mean patch]); `feature: cls_blocks` leaves the patch token out (the authors' ViT-S
protocol, `n_last_blocks=4`); other architectures give their pooled features. Head: BatchNorm1d
without affine parameters (`bn_head`, eps `bn_eps`, the authors' 1e-6), then a linear layer.
SGD (momentum 0.9, no weight decay) at `0.002 * batch / 256`, cosine to 0; training images get
RandomResizedCrop + flip, validation images a bicubic resize and centre crop (the data module's
defaults). The best and last top-1/top-5 are reported.

With `cache_features`, the backbone embeds the training and validation images once, without
augmentation, and the head trains on those features: the same head training as on-the-fly
features of un-augmented images, at the cost of one forward pass per image for the whole run
(for quick sweeps of the learning rate or the number of epochs).
"""
from __future__ import annotations

from typing import Any, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from bam.evaluation.backbone import (
    build_from_spec,
    check_same_backbone,
    record_backbone,
    resolve_backbone,
    weights_fingerprint,
)
from bam.evaluation.classifier import ClassificationStage
from bam.evaluation.data import ClassificationDataModule
from bam.evaluation.stage_cli import run_stage
from bam.features.extract import FeatureExtractor, embed_dataset, require_finite, resolve_readout
from bam.training.optim import OptimizerSettings

BACKBONE_PREFIX = "extractor."


class LinearProbe(ClassificationStage):
    """Linear probe of a frozen backbone.

    Args:
        backbone: Export directory or file, bam pretraining checkpoint, the authors' released
            file, or a timm model name (random initialisation, a baseline).
        num_classes: Number of classes (the CLI takes it from the data).
        encoder: The encoder of a checkpoint to evaluate ("teacher" or "student"; default: the teacher).
        arch: Architecture of a checkpoint, instead of the one it records.
        feature: Feature readout (`bam.features.extract`): `auto` ([CLS tokens, mean patch token]
            for ViTs, pooled features otherwise), `cls_blocks` (CLS tokens only: the authors'
            ViT-S protocol with `n_last_blocks` 4), `cls_patch_mean`, `cls` or `pooled`.
        n_last_blocks: Blocks whose class tokens a ViT's features include.
        bn_head: Normalise the features with a BatchNorm1d without affine parameters before the
            linear layer (the authors' `--bn_head`; their ViT-B script sets it, their default is off).
        bn_eps: Epsilon of that BatchNorm1d (the authors': 1e-6).
        cache_features: Embed every image once (no augmentation) and train on those features.
        optimizer: The optimiser and lr schedule (`bam.training.optim.OptimizerSettings`; here by
            default SGD, momentum 0.9, no weight decay, lr 0.002 per 256 images, cosine to 0).
    """

    def __init__(
        self,
        backbone: str,
        num_classes: int = 1000,
        encoder: Optional[str] = None,
        arch: Optional[str] = None,
        feature: str = "auto",
        n_last_blocks: int = 1,
        bn_head: bool = True,
        bn_eps: float = 1e-6,
        cache_features: bool = False,
        optimizer: OptimizerSettings = OptimizerSettings(),
    ) -> None:
        super().__init__(num_classes, ("val",), optimizer)
        self.save_hyperparameters()
        self.record_optimizer()
        spec = resolve_backbone(backbone, encoder, arch)
        self.recipe = spec.recipe
        net = build_from_spec(spec)
        self.backbone_fingerprint = weights_fingerprint(net)  # checkpoints keep it instead of the backbone
        readout = resolve_readout(feature, net, vit_default="cls_patch_mean")
        self.extractor = FeatureExtractor(net, readout, n_last_blocks)
        self.cache_features = cache_features
        linear = nn.Linear(self.extractor.out_dim, num_classes)
        nn.init.normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        if bn_eps <= 0:
            raise ValueError(f"bn_eps must be positive, got {bn_eps}")
        norm = nn.BatchNorm1d(self.extractor.out_dim, eps=bn_eps, affine=False) if bn_head else nn.Identity()
        self.head = nn.Sequential(norm, linear)

    def trainable(self) -> nn.Module:
        return self.head

    def batch_problem(self, batch_size: int) -> str | None:
        if batch_size >= 2 or not self.hparams.bn_head:
            return None
        return ("the head's batch norm (bn_head) normalises each feature over the images of a batch, which needs 2 or "
                "more; set a larger --data.init_args.batch_size (or --model.bn_head false)")

    def features(self, inputs: Tensor) -> Tensor:
        """Backbone features of images, or the inputs themselves in cached mode (already features)."""
        return inputs if self.cache_features else self.extractor(inputs)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.features(inputs))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        inputs, labels = batch
        loss = F.cross_entropy(self(inputs), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def classify(self, inputs: Tensor) -> dict[str, Tensor]:
        return {"val": self(inputs)}

    def setup(self, stage: str) -> None:
        """In cached mode, embed both splits once and have the data module serve the features.

        Runs after the process group exists and before any loader is built; every process gets
        the complete caches, in dataset order (see `embed_dataset`).
        """
        super().setup(stage)
        if not self.cache_features:
            return
        data = self.trainer.datamodule
        if not isinstance(data, ClassificationDataModule):
            raise TypeError("cache_features needs a ClassificationDataModule (it serves the cached features)")
        if data.cache:
            return
        device = self.trainer.strategy.root_device
        self.extractor.to(device)
        splits = []
        for split in ("train", "val"):
            features, labels = embed_dataset(
                data.eval_dataset(split), self.extractor, device, data.batch_size, data.num_workers
            )
            splits.append((require_finite(features, split), labels))
        data.use_features(*splits)

    # The frozen backbone is not stored in checkpoints (it is read again from `backbone`, and must
    # still have the weights the head was trained on): a probe's checkpoint is the size of its
    # head, and resuming still loads the state strictly.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [key for key in state if key.startswith(BACKBONE_PREFIX)]:
            del state[key]
        record_backbone(checkpoint, self.hparams.backbone, self.backbone_fingerprint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_same_backbone(checkpoint, self.hparams.backbone, self.backbone_fingerprint, self.trainer.ckpt_path)
        super().on_load_checkpoint(checkpoint)
        frozen = {BACKBONE_PREFIX + key: value for key, value in self.extractor.state_dict().items()}
        checkpoint["state_dict"].update(frozen)


def main(argv: list[str]) -> None:
    """`bam linear [--config FILE] [--ckpt_path last] [--print_config] [overrides]`."""
    run_stage(LinearProbe, "linear", "Train a linear classifier on the features of a frozen backbone.", argv)
