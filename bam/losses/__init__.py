"""Objectives: pure torch modules with functional cores (no Lightning imports here)."""
from bam.losses.bam_loss import BAMLoss, balanced_target, bam_loss, keep_top_k, positive_mask
from bam.losses.sinkhorn import sinkhorn_log

__all__ = ["BAMLoss", "bam_loss", "balanced_target", "keep_top_k", "positive_mask", "sinkhorn_log"]
