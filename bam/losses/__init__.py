"""Objectives: pure torch modules with functional cores (no Lightning imports here)."""
from bam.losses.bam_loss import BAMLoss, balanced_target, bam_loss, keep_top_k
from bam.losses.bam_objective import BAMObjective, positive_mask
from bam.losses.deepcluster_loss import DeepClusterV2Loss, DeepClusterV2Objective, deepcluster_loss
from bam.losses.dino_loss import DINOLoss, DINOObjective, batch_center, dino_loss, dino_targets
from bam.losses.sela_loss import SeLaLoss, SeLaObjective, optimal_labels, self_label_loss
from bam.losses.swav_loss import SwAVLoss, SwAVObjective, swapped_prediction, swav_codes, swav_loss

__all__ = [
    "BAMObjective", "BAMLoss", "bam_loss", "balanced_target", "keep_top_k", "positive_mask",
    "SwAVObjective", "SwAVLoss", "swav_loss", "swav_codes", "swapped_prediction",
    "DINOObjective", "DINOLoss", "dino_loss", "dino_targets", "batch_center",
    "DeepClusterV2Objective", "DeepClusterV2Loss", "deepcluster_loss",
    "SeLaObjective", "SeLaLoss", "optimal_labels", "self_label_loss",
]
