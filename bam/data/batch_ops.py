"""Batched augmentation operations with independent random parameters per image.

These run on whatever device the batch is on (the training GPU, or the CPU in the main process).
Each reproduces the torchvision operation of the same name in distribution: the same parameter
sampling, the same formulas. Brightness, contrast, saturation and solarisation come from
``kornia.enhance`` (whose ``*_accumulative``/``*_with_*_subtraction`` variants are torchvision's
formulas), but kornia's own ``ColorJitter`` draws one order of the four jitters per batch,
whereas torchvision draws one per image; ``color_jitter`` below draws it per image. Hue and blur
are written here because they are the two costly steps of the recipe on CPU (see their notes).

Operations that apply to a random subset of rows compute only on that subset (index, compute,
write back), so their cost scales with the probability.
"""
from __future__ import annotations

import math
from typing import Callable

import kornia
import torch
from torch import Tensor
from torchvision.ops import roi_align

from bam.data.contrastive_crop import sample_beta

# torchvision's ITU-R 601-2 luma weights (kornia's differ in the 4th decimal)
_LUMA = (0.2989, 0.587, 0.114)
_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before falling back


def _uniform(low: float, high: float, shape: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.empty(shape, device=device).uniform_(low, high)


def _rows(prob: Tensor | float, n: int, device: torch.device) -> Tensor:
    """Indices of the rows selected with (per-row) probability ``prob``."""
    return torch.nonzero(torch.rand(n, device=device) < prob).flatten()


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    device: torch.device | str = "cpu",
    regions: Tensor | None = None,
    alpha: float = 1.0,
) -> Tensor:
    """Crop boxes ``(n, 4)`` as ``x0, y0, x1, y1`` pixel edges, drawn as torchvision's RandomResizedCrop.

    Like torchvision: area fraction uniform in ``scale``, log aspect ratio uniform in ``log(ratio)``,
    integer sides by rounding, first of 10 attempts that fits, else a centre crop with the ratio
    clamped; the top-left corner is uniform over the integer positions that keep the box inside.

    ``regions`` ``(n, 4)`` (normalised ``x0, y0, x1, y1``, one per crop) switches on
    ContrastiveCrop: per axis the crop's centre is drawn between the region's edges as
    ``edge0 + (edge1 - edge0) * Beta(alpha, alpha)``, among the centres that keep the crop inside
    the image (see ``_position_in_region``). With whole-image regions and ``alpha = 1`` this is
    the uniform placement above.
    """
    device = torch.device(device)
    shape = (n, _CROP_ATTEMPTS)
    area = height * width * _uniform(scale[0], scale[1], shape, device)
    aspect = torch.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), shape, device))
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)

    fallback_w, fallback_h = _fallback_size(height, width, ratio)
    found = fits.any(dim=1)
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    if regions is None:
        x0 = torch.floor(torch.rand(n, device=device) * (width - w + 1))
        y0 = torch.floor(torch.rand(n, device=device) * (height - h + 1))
    else:
        regions = regions.to(device=device, dtype=w.dtype)
        draws = sample_beta(alpha, (2, n), device)
        x0 = _position_in_region(regions[:, 0] * width, regions[:, 2] * width, w, width, draws[0])
        y0 = _position_in_region(regions[:, 1] * height, regions[:, 3] * height, h, height, draws[1])
    x0 = torch.where(found, x0, torch.div(width - w, 2, rounding_mode="floor"))
    y0 = torch.where(found, y0, torch.div(height - h, 2, rounding_mode="floor"))
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def _position_in_region(edge0: Tensor, edge1: Tensor, side: Tensor, length: int, draw: Tensor) -> Tensor:
    """Integer start of crops of ``side`` pixels whose centre lies between ``edge0`` and ``edge1``.

    The centre's range is clipped to the centres that keep the crop inside ``[0, length]``, i.e.
    the start ranges over ``[lo, hi] = clip([edge0 - side / 2, edge1 - side / 2], 0, length - side)``;
    ``draw`` in [0, 1] (a Beta sample) picks ``floor(lo + draw * (hi - lo + 1))``, which for the
    whole image and a uniform draw is torchvision's uniform integer start.
    """
    room = length - side
    low = (edge0 - side / 2).clamp(min=0).minimum(room)
    high = (edge1 - side / 2).clamp(min=0).minimum(room)
    return torch.floor(low + draw * (high - low + 1)).minimum(high.floor())


def _fallback_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's centre-crop fallback: the whole image, aspect clamped into ``ratio``."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return width, int(round(width / ratio[0]))
    if in_ratio > ratio[1]:
        return int(round(height * ratio[1])), height
    return width, height


def crop_resize(images: Tensor, boxes: Tensor, source: Tensor, size: int) -> Tensor:
    """Cut ``boxes`` (pixel edges) out of ``images[source]`` and resize each to ``size x size``.

    ``roi_align`` with pixel-centre alignment samples exactly where bilinear resizing does when
    upscaling; when downscaling it averages ``ceil(box / size)^2`` bilinear samples per output
    pixel, an area filter in place of torchvision's antialiasing triangle filter.
    """
    rois = torch.cat([source.to(boxes.dtype).unsqueeze(1), boxes], dim=1)
    return roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def horizontal_flip(x: Tensor, prob: float) -> Tensor:
    """Mirror each image left-right with probability ``prob`` (in place)."""
    rows = _rows(prob, x.shape[0], x.device)
    x[rows] = x[rows].flip(-1)
    return x


def _brightness(x: Tensor, factor: Tensor) -> Tensor:
    return kornia.enhance.adjust_brightness_accumulative(x, factor)


def _contrast(x: Tensor, factor: Tensor) -> Tensor:
    return kornia.enhance.adjust_contrast_with_mean_subtraction(x, factor)


def _saturation(x: Tensor, factor: Tensor) -> Tensor:
    return kornia.enhance.adjust_saturation_with_gray_subtraction(x, factor)


_TINY = torch.finfo(torch.float32).tiny
# channel n of an HSV colour (n = 5, 3, 1 for R, G, B) is v - chroma * clamp(2 - |k - 2|, 0, 1)
# with k = (n + hue) mod 6; these are n - 2, so that y = hue + offset, wrapped to [-3, 3], is k - 2
_HUE_OFFSETS = torch.tensor([3.0, 1.0, -1.0]).view(3, 1, 1)


def shift_hue(image: Tensor, turns: Tensor | float) -> Tensor:
    """torchvision's ``adjust_hue`` (RGB -> HSV, hue + ``turns``, back to RGB) of float images in [0, 1].

    ``image`` is ``(3, H, W)`` with a float ``turns``, or ``(N, 3, H, W)`` with ``turns`` a float
    or one value per image ``(N,)`` (the device path). Same result as torchvision's and kornia's
    (to 2e-6) at about 20% of torchvision's cost: on CPU ``torch.where``, comparisons to bool and ``remainder`` cost several
    times a plain arithmetic pass, so the HSV hue is assembled with ``ceil`` masks
    (``ceil(value - r)`` is 0 where red is the largest channel, 1 elsewhere, as values lie in
    [0, 1]) and the periodic HSV -> RGB ramp is a triangle of the hue wrapped by ``round``. Value
    and chroma, which a hue shift keeps, give each channel as ``v - chroma * ramp``.
    """
    r, g, b = image.unbind(-3)
    value = torch.maximum(r, g)
    torch.maximum(value, b, out=value)
    chroma = torch.minimum(r, g)
    torch.minimum(chroma, b, out=chroma)
    torch.sub(value, chroma, out=chroma)
    not_red = (value - r).ceil_()
    not_green = (value - g).ceil_()
    # hue in sixths of a turn times chroma, as torchvision: red largest (g - b), else green
    # largest 2 chroma + (b - r), else 4 chroma + (r - g)
    hue = g - b
    green = (b - r).add_(chroma, alpha=2)
    blue = (r - g).add_(chroma, alpha=4)
    green.addcmul_(not_green, blue.sub_(green))
    hue.addcmul_(not_red, green.sub_(hue))
    hue.div_(chroma.clamp_min(_TINY))  # grey pixels: 0 / tiny, any hue gives the same colour
    if isinstance(turns, Tensor):
        turns = turns.view(-1, 1, 1, 1)
    y = hue.unsqueeze(-3) + (_HUE_OFFSETS.to(image.device) + 6 * turns)
    y.sub_(torch.round(y * (1 / 6)), alpha=6)
    ramp = y.abs_().neg_().add_(2).clamp_(0, 1)
    return torch.addcmul(value.unsqueeze(-3), chroma.unsqueeze(-3), ramp, value=-1)


JITTER_OPS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "brightness": _brightness,
    "contrast": _contrast,
    "saturation": _saturation,
    "hue": shift_hue,
}


def color_jitter(x: Tensor, prob: float, ranges: dict[str, tuple[float, float]]) -> Tensor:
    """torchvision's ColorJitter, applied with probability ``prob`` per image (in place).

    Each selected image gets its own factors (uniform in ``ranges``) and its own random order of
    the operations, as torchvision draws a fresh permutation for every call (every image).
    """
    rows = _rows(prob, x.shape[0], x.device)
    if rows.numel() == 0 or not ranges:
        return x
    names = list(ranges)
    n = rows.numel()
    factors = torch.stack([_uniform(*ranges[name], (n,), x.device) for name in names], dim=1)
    order = torch.argsort(torch.rand(n, len(names), device=x.device), dim=1)
    for step in range(len(names)):
        for op_index, name in enumerate(names):
            chosen = torch.nonzero(order[:, step] == op_index).flatten()
            x[rows[chosen]] = JITTER_OPS[name](x[rows[chosen]], factors[chosen, op_index])
    return x


def to_grayscale(x: Tensor) -> Tensor:
    """Luma replicated to 3 channels (torchvision's weights)."""
    weights = x.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True).expand_as(x)


def random_grayscale(x: Tensor, prob: float) -> Tensor:
    """Make each image grey with probability ``prob`` (in place)."""
    rows = _rows(prob, x.shape[0], x.device)
    x[rows] = to_grayscale(x[rows])
    return x


def gaussian_blur_matrices(sigma: Tensor, kernel_size: int, size: int) -> Tensor:
    """Matrices ``(n, size, size)`` whose product with a line blurs it like torchvision's GaussianBlur.

    Row ``j`` holds the ``kernel_size`` Gaussian weights (torchvision's kernel for ``sigma[i]``)
    around ``j``, with the taps that fall outside the line folded back as reflect padding does.
    """
    half = kernel_size // 2
    taps = torch.arange(-half, half + 1, device=sigma.device)
    weights = torch.exp(-0.5 * (taps.float() / sigma.view(-1, 1)) ** 2)
    # far taps of a narrow kernel are subnormal floats, which make CPU matrix products ~50x slower
    weights = weights.masked_fill_(weights < 1e-12, 0.0)
    weights = weights / weights.sum(dim=1, keepdim=True)
    source = (torch.arange(size, device=sigma.device).view(-1, 1) + taps).abs()  # reflect at 0
    source = torch.where(source > size - 1, 2 * (size - 1) - source, source)  # reflect at the end
    matrices = torch.zeros(len(sigma), size, size, device=sigma.device)
    index = source.expand(len(sigma), -1, -1)
    return matrices.scatter_add_(2, index, weights.unsqueeze(1).expand(-1, size, -1))


def blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Gaussian blur of each image of ``x (n, C, H, W)`` with its own ``sigma (n,)``, reflect borders.

    Two matrix products (columns, then rows) instead of a convolution: on CPU 3-4 times faster
    than PyTorch's depthwise convolution, and the same result as torchvision's blur (to 1e-6).
    """
    rows = gaussian_blur_matrices(sigma, kernel_size, x.shape[-2])
    columns = rows if x.shape[-1] == x.shape[-2] else gaussian_blur_matrices(sigma, kernel_size, x.shape[-1])
    return rows.unsqueeze(1) @ x @ columns.transpose(1, 2).unsqueeze(1)


def gaussian_blur(x: Tensor, prob: Tensor | float, sigma: tuple[float, float], kernel_size: int) -> Tensor:
    """Blur each image with probability ``prob`` (per row), sigma uniform in ``sigma`` (in place)."""
    rows = _rows(prob, x.shape[0], x.device)
    if rows.numel() == 0:
        return x
    x[rows] = blur(x[rows], _uniform(sigma[0], sigma[1], (rows.numel(),), x.device), kernel_size)
    return x


def solarize(x: Tensor, prob: Tensor | float) -> Tensor:
    """Invert pixels >= 0.5 (128 of 255) with probability ``prob`` per row (in place)."""
    rows = _rows(prob, x.shape[0], x.device)
    if rows.numel() == 0:
        return x
    x[rows] = kornia.enhance.solarize(x[rows], thresholds=0.5)
    return x


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Subtract ``mean`` and divide by ``std`` per channel (in place)."""
    x.sub_(x.new_tensor(mean).view(1, -1, 1, 1)).div_(x.new_tensor(std).view(1, -1, 1, 1))
    return x
