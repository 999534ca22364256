"""ContrastiveCrop (Peng et al., CVPR 2022): crops sampled around each image's salient region.

Plain random-resized crops of object-centric images often miss the object (two views of
background are a false positive pair). ContrastiveCrop localises the object with the model being
trained and then samples crops around it:

1. every ``loc_interval`` epochs after a warm-up, the current backbone makes a heat map of every
   training image at its base resolution, without augmentation (``heatmap``): ViTs the last
   block's class-token attention to the patches (mean over heads), CNNs and MetaFormers (CAFormer)
   the channel sum of their last feature map;
2. the heat map, upsampled to the image size and min-max normalised to [0, 1], is thresholded at
   ``box_thresh``; the bounding box of what is above is the image's box, in normalised
   ``x0, y0, x1, y1`` (``heatmap_boxes``);
3. crops keep RandomResizedCrop's area and aspect ratio, but their centre is drawn between the
   box's edges as ``edge0 + (edge1 - edge0) * Beta(alpha, alpha)`` per axis (``alpha`` < 1 favours
   the box's edges, i.e. more varied crops still overlapping the object), restricted to centres
   that keep the crop inside the image (``augment_ops.sample_crop_boxes(regions=...)``).

Until the first update the crops are torchvision's RandomResizedCrop exactly (``CropBoxes.active``
is off). Everything here is pure torch; ``bam.callbacks.ContrastiveCrop`` runs the schedule.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bam.ops import is_vit

BOX_DIM = 4  # x0, y0, x1, y1, normalised to [0, 1]
SUPPORTED = "timm VisionTransformer-like models (class token + qkv attention), CNNs and MetaFormers " \
            "(any model whose forward_features returns a (B, C, h, w) or (B, h, w, C) feature map)"


# -- heat maps --------------------------------------------------------------------------------
def _has_class_attention(model: nn.Module) -> bool:
    """A ViT whose last block's attention the heat map can recompute (it needs `blocks`)."""
    return is_vit(model) and hasattr(model, "blocks")


@torch.no_grad()
def vit_class_attention(model: nn.Module, images: Tensor) -> Tensor:
    """Class-token attention to the patch tokens in the last block, mean over heads: ``(B, h, w)``.

    timm's Attention usually runs fused (``scaled_dot_product_attention``), which never forms the
    attention matrix, so the matrix is recomputed here from the last block's own ``qkv`` (and its
    q/k norms) applied to that block's attention input, captured with a forward pre-hook.
    """
    attn = getattr(model.blocks[-1], "attn", None)
    if attn is None or not all(hasattr(attn, name) for name in ("qkv", "num_heads", "scale")):
        raise TypeError(f"{type(model).__name__}: the last block has no timm-style attention (attn.qkv, "
                        f"attn.num_heads, attn.scale), so its class-token attention cannot be read; "
                        f"supported: {SUPPORTED}")
    images = _resize_to_patch_multiple(model, images)
    captured: list[Tensor] = []
    handle = attn.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
    try:
        model.forward_features(images)
    finally:
        handle.remove()
    tokens = captured[-1]
    batch, count, _ = tokens.shape
    qkv = attn.qkv(tokens).reshape(batch, count, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    q, k = getattr(attn, "q_norm", nn.Identity())(q), getattr(attn, "k_norm", nn.Identity())(k)
    weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)  # (B, heads, 1, N)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    cls_to_patches = weights[:, :, 0, prefix:].mean(dim=1)  # (B, patches)
    height, width = _patch_grid(model, images)
    if height * width != cls_to_patches.shape[1]:
        raise ValueError(f"{type(model).__name__}: {cls_to_patches.shape[1]} patch tokens do not form the "
                         f"{height}x{width} grid of a {tuple(images.shape[-2:])} image")
    return cls_to_patches.reshape(batch, height, width)


def _patch_size(model: nn.Module) -> tuple[int, int]:
    patch = model.patch_embed.patch_size
    return tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)


def _resize_to_patch_multiple(model: nn.Module, images: Tensor) -> Tensor:
    """Images whose sides are not whole patches (a base size of 40 px for 16-px patches) are
    resized down to whole patches: boxes are fractions of the image, so the map means the same."""
    patch = _patch_size(model)
    size = tuple(max(p, s // p * p) for s, p in zip(images.shape[-2:], patch))
    if size == tuple(images.shape[-2:]):
        return images
    return nn.functional.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


def _patch_grid(model: nn.Module, images: Tensor) -> tuple[int, int]:
    size = tuple(images.shape[-2:])
    embed = model.patch_embed
    if hasattr(embed, "dynamic_feat_size"):
        return tuple(int(s) for s in embed.dynamic_feat_size(size))
    patch = _patch_size(model)
    return size[0] // patch[0], size[1] // patch[1]


@torch.no_grad()
def feature_map_energy(model: nn.Module, images: Tensor) -> Tensor:
    """Channel sum of the last feature map (CNNs, MetaFormer/CAFormer): ``(B, h, w)``.

    ``forward_features`` of timm's CNNs and MetaFormers (and bam's ``bam_cnn4``) returns NCHW;
    channels-last outputs (e.g. Swin) are recognised by their last dimension being the width.
    """
    if not hasattr(model, "forward_features"):
        raise TypeError(f"{type(model).__name__} has no forward_features; supported: {SUPPORTED}")
    features = model.forward_features(images)
    if features.dim() != 4:
        raise TypeError(f"{type(model).__name__}.forward_features returned shape {tuple(features.shape)}, not a "
                        f"4-D feature map; supported: {SUPPORTED}")
    width = getattr(model, "num_features", None)
    channels_last = features.shape[1] != width and features.shape[-1] == width
    return features.float().sum(dim=-1 if channels_last else 1)


def heatmap(model: nn.Module, images: Tensor) -> Tensor:
    """Saliency of every pixel region of normalised float images ``(B, 3, H, W)``: ``(B, h, w)``.

    ViTs: last-block class-token attention; anything with a spatial ``forward_features``
    (timm CNNs, MetaFormer/CAFormer, ``bam_cnn4``): channel-summed last feature map.
    """
    if _has_class_attention(model):
        return vit_class_attention(model, images)
    return feature_map_energy(model, images)


def heatmap_boxes(maps: Tensor, image_size: tuple[int, int], thresh: float) -> Tensor:
    """Normalised boxes ``(B, 4)`` ``x0, y0, x1, y1`` of the region where the heat map >= ``thresh``.

    Each map is upsampled (bilinear) to ``image_size``, so boxes are not quantised to the feature
    grid, then min-max normalised to [0, 1]. A flat map (no salient region) gives the whole image.
    """
    if not 0 <= thresh < 1:
        raise ValueError(f"box_thresh must be in [0, 1), got {thresh}")
    maps = F.interpolate(maps.float().unsqueeze(1), size=image_size, mode="bilinear", align_corners=False)[:, 0]
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    flat = span.flatten() <= 1e-12
    above = (maps - low) / span.clamp_min(1e-12) >= thresh
    above[flat] = True
    x0, x1 = _extent(above.any(dim=1))  # columns holding an above-threshold pixel
    y0, y1 = _extent(above.any(dim=2))
    height, width = image_size
    return torch.stack([x0 / width, y0 / height, x1 / width, y1 / height], dim=1)


def _extent(occupied: Tensor) -> tuple[Tensor, Tensor]:
    """First index and last index + 1 of the True entries of each row of ``occupied (B, L)``."""
    length = occupied.shape[1]
    positions = torch.arange(length, device=occupied.device).expand_as(occupied)
    first = torch.where(occupied, positions, length).amin(dim=1)
    last = torch.where(occupied, positions, -1).amax(dim=1) + 1
    return first.float(), last.float()


@torch.no_grad()
def compute_boxes(model: nn.Module, images: Tensor, thresh: float) -> Tensor:
    """Heat map -> threshold -> box for normalised float images ``(B, 3, H, W)``: ``(B, 4)``."""
    return heatmap_boxes(heatmap(model, images), tuple(images.shape[-2:]), thresh)


# -- centre sampling ----------------------------------------------------------------------------
def sample_beta(alpha: float, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """``Beta(alpha, alpha)`` samples on ``device`` (alpha = 1 is the uniform distribution)."""
    concentration = torch.full(shape, float(alpha), device=device)
    return torch.distributions.Beta(concentration, concentration, validate_args=False).sample()


# -- the box store ------------------------------------------------------------------------------
class CropBoxes:
    """Every training image's box, in shared memory so DataLoader workers see updates.

    ``boxes`` ``(N, 4)`` and the ``active`` flag are ``share_memory_()`` tensors created before
    any worker starts and only ever written in place: forked workers map the same pages and
    spawned ones receive a handle to them, so persistent workers read the boxes of the latest
    update without being restarted. Row ``i`` belongs to index ``i`` of the training dataset.

    Args:
        num_images: Size of the training dataset (the index range of the loader).
    """

    def __init__(self, num_images: int) -> None:
        if num_images < 1:
            raise ValueError(f"CropBoxes needs at least one image, got {num_images}")
        self.boxes = whole_image_boxes(num_images).share_memory_()
        self.active = torch.zeros(1, dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def is_active(self) -> bool:
        """False until the first update: crops are then plain RandomResizedCrop."""
        return bool(self.active.item())

    def lookup(self, indices: Tensor | int) -> Tensor | None:
        """Boxes of the dataset ``indices`` (``(4,)`` for an int), or None before the first update."""
        if not self.is_active:
            return None
        if isinstance(indices, int):
            return self.boxes[indices].clone()
        return self.boxes[indices.to(device="cpu", dtype=torch.long)]

    def update(self, boxes: Tensor, indices: Tensor | None = None) -> None:
        """Write ``boxes`` (all rows, or the rows ``indices``) in place and switch the boxes on."""
        boxes = boxes.detach().to(device="cpu", dtype=self.boxes.dtype)
        if indices is None:
            if boxes.shape != self.boxes.shape:
                raise ValueError(f"expected boxes of shape {tuple(self.boxes.shape)}, got {tuple(boxes.shape)}")
            self.boxes.copy_(boxes)
        else:
            self.boxes[indices.to(device="cpu", dtype=torch.long)] = boxes
        self.active.fill_(1)

    def state_dict(self) -> dict[str, Any]:
        return {"boxes": self.boxes.clone(), "active": self.is_active}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        boxes = torch.as_tensor(state["boxes"], dtype=self.boxes.dtype)
        if boxes.shape != self.boxes.shape:
            raise ValueError(f"checkpoint holds boxes for {len(boxes)} images but the training set has "
                             f"{len(self.boxes)}: resume with the same data (fraction, split) as the saved run")
        self.boxes.copy_(boxes)
        self.active.fill_(int(bool(state["active"])))


def whole_image_boxes(num_images: int) -> Tensor:
    """``(N, 4)`` boxes covering every image entirely."""
    return torch.tensor([0.0, 0.0, 1.0, 1.0]).repeat(num_images, 1)
