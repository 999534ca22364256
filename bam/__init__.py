"""bam: self-supervised visual pretraining with Balanced self-Attention Matching.

The public face for using and extending bam. Every name below is loaded on first use, so that
`import bam` stays light (the objectives need no Lightning); the `TYPE_CHECKING` imports let
editors and type checkers see them. To add a method, subclass `SSLMethod` and implement
`compute_loss`; to add data, subclass `SSLDataModule` (crops described by a `MultiCropConfig`).

Importing bam registers its architectures (`bam_cnn4`, `bam_caformer_m36`, ...) in timm, so that
`timm.create_model` builds them and loads their exports (`"local-dir:DIR"`).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import bam.models.backbones  # noqa: F401  (registers bam's architectures in timm's registry)
from bam._version import __version__

if TYPE_CHECKING:
    from bam.callbacks.contrastive_crop import ContrastiveCrop
    from bam.callbacks.extras import pretrain_trainer_arguments, trainer_extras
    from bam.data import MultiCropConfig, SSLDataModule
    from bam.evaluation.cluster import run_clustering
    from bam.evaluation.embed import run_embed
    from bam.evaluation.finetune import FineTune
    from bam.evaluation.knn_stage import run_knn
    from bam.evaluation.linear import LinearProbe
    from bam.io.backbone_reader import load_backbone
    from bam.io.export_writer import export_backbone
    from bam.losses import BAMLoss, BAMObjective, DeepClusterV2Loss, DeepClusterV2Objective, DINOLoss, DINOObjective, SeLaLoss, SeLaObjective, SwAVLoss, SwAVObjective, balanced_target, bam_loss, positive_mask
    from bam.methods.bam import BAMModule
    from bam.methods.base import SSLMethod
    from bam.methods.deepcluster import DeepClusterV2Module
    from bam.methods.dino import DINOModule
    from bam.methods.sela import SeLaModule
    from bam.methods.swav import SwAVModule
    from bam.models.backbones import build_backbone
    from bam.models.gsp import GSPPool
    from bam.models.projector import Projector, ProjectorSettings
    from bam.ops import sinkhorn_blocked, sinkhorn_differentiable, sinkhorn_distributed, sinkhorn_distributed_
    from bam.recipe import DataRecipe
    from bam.transforms.bpa import BPA, bpa

# public name -> module that defines it (imported on first attribute access)
_LAZY = {
    # objectives (pure torch)
    "BAMObjective": "bam.losses",
    "BAMLoss": "bam.losses",
    "SwAVObjective": "bam.losses",
    "SwAVLoss": "bam.losses",
    "DINOObjective": "bam.losses",
    "DINOLoss": "bam.losses",
    "DeepClusterV2Objective": "bam.losses",
    "DeepClusterV2Loss": "bam.losses",
    "SeLaObjective": "bam.losses",
    "SeLaLoss": "bam.losses",
    "bam_loss": "bam.losses",
    "balanced_target": "bam.losses",
    "positive_mask": "bam.losses",
    # the one Sinkhorn, in the forms named by what they do (bam.ops.sinkhorn explains each)
    "sinkhorn_distributed_": "bam.ops",
    "sinkhorn_distributed": "bam.ops",
    "sinkhorn_blocked": "bam.ops",
    "sinkhorn_differentiable": "bam.ops",
    # extending bam: a method, its data, the crops
    "SSLMethod": "bam.methods.base",
    "SSLDataModule": "bam.data",
    "MultiCropConfig": "bam.data",
    # methods, models, transforms
    "BAMModule": "bam.methods.bam",
    "SwAVModule": "bam.methods.swav",
    "DINOModule": "bam.methods.dino",
    "DeepClusterV2Module": "bam.methods.deepcluster",
    "SeLaModule": "bam.methods.sela",
    "build_backbone": "bam.models.backbones",
    "Projector": "bam.models.projector",
    "ProjectorSettings": "bam.models.projector",
    "GSPPool": "bam.models.gsp",
    "bpa": "bam.transforms.bpa",
    "BPA": "bam.transforms.bpa",
    "DataRecipe": "bam.recipe",
    # training and evaluation
    "pretrain_trainer_arguments": "bam.callbacks.extras",
    "trainer_extras": "bam.callbacks.extras",  # its name before: warns, then answers
    "ContrastiveCrop": "bam.callbacks.contrastive_crop",
    "load_backbone": "bam.io.backbone_reader",
    "export_backbone": "bam.io.export_writer",
    "LinearProbe": "bam.evaluation.linear",
    "FineTune": "bam.evaluation.finetune",
    "run_knn": "bam.evaluation.knn_stage",
    "run_clustering": "bam.evaluation.cluster",
    "run_embed": "bam.evaluation.embed",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bam' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
