"""bam: self-supervised visual pretraining with Balanced self-Attention Matching.

The objectives (`BAMLoss`, `SwAVLoss`) are importable without Lightning; the training, evaluation and
checkpoint APIs are loaded on first use so that `import bam` stays light. Importing bam registers its
architectures (`bam_cnn4`, `bam_caformer_m36`, ...) in timm, so that `timm.create_model` builds them
and loads their exports (`"local-dir:DIR"`).
"""
from __future__ import annotations

import importlib
from typing import Any

import bam.models.backbones  # noqa: F401  (registers bam's architectures in timm's registry)
from bam.losses import BAMLoss, SwAVLoss, balanced_target, bam_loss, positive_mask

__version__ = "0.1.0"

# public name -> module that defines it (imported lazily, on first attribute access)
_LAZY = {
    "BAMModule": "bam.methods.bam",
    "SwAVModule": "bam.methods.swav",
    "build_backbone": "bam.models.backbones",
    "Projector": "bam.models.projector",
    "load_backbone": "bam.io.export",
    "export_backbone": "bam.io.export",
    "LinearProbe": "bam.evaluation.linear",
    "FineTune": "bam.evaluation.finetune",
    "run_knn": "bam.evaluation.knn_stage",
    "run_clustering": "bam.evaluation.cluster",
    "bpa": "bam.transforms.bpa",
    "BPA": "bam.transforms.bpa",
    "GSPPool": "bam.models.gsp",
    "ContrastiveCrop": "bam.callbacks.contrastive_crop",
    "trainer_extras": "bam.callbacks.extras",
    "DataRecipe": "bam.recipe",
}

__all__ = ["BAMLoss", "SwAVLoss", "bam_loss", "balanced_target", "positive_mask", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bam' has no attribute {name!r}")
