"""Questions about a network's architecture that several floors ask (models, data, evaluation)."""
from __future__ import annotations

from torch import nn


def is_vit(model: nn.Module) -> bool:
    """True for timm VisionTransformer-like models (a class token and patch embedding)."""
    return hasattr(model, "patch_embed") and hasattr(model, "cls_token")
