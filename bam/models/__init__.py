"""Models: timm backbones (with the presets registered in timm), projector heads, multi-crop."""
from bam.models.backbones import build_backbone, feature_dim, is_vit
from bam.models.projector import DINOHead, Projector, ProjectorSettings

__all__ = ["build_backbone", "feature_dim", "is_vit", "Projector", "ProjectorSettings", "DINOHead"]
