"""The augmentation operations of the multi-crop recipe, one implementation of each.

Two drivers apply them: ``CPUMultiCrop`` (``bam.data.cpu_augment``) per image in DataLoader
workers, and ``DeviceMultiCrop`` (``bam.data.device_augment``) to a whole batch on the training
device. Every operation therefore takes float images in [0, 1] as either one image ``(3, H, W)``
or a batch ``(N, 3, H, W)``, and a parameter that is a float (the same for every image) or a
tensor ``(N,)`` (one per image of the batch). Each reproduces the torchvision operation of the
same name: the same parameter distribution and the same formulas (torchvision's ``_blend`` for
brightness, contrast and saturation, its ITU-R 601-2 luma, its Gaussian kernel and reflect
borders), which ``tests/data/test_data_augment.py`` checks op by op.

Operations whose name ends in ``_`` work in place and return their input; the others return a
new tensor. Hue and blur are written here rather than taken from torchvision or kornia because
they are the costly steps of the augmentation on CPU (see their docstrings, and
``tests/benchmarks/bench_data.py`` for the measured throughput of both drivers).
"""
from __future__ import annotations

import math
from typing import Callable, Union

import torch
from torch import Tensor
from torchvision.ops import roi_align

from bam.data.contrastive_crop import sample_beta

Factor = Union[float, Tensor]  # one value for every image, or one per image of a batch (N,)
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's ITU-R 601-2 weights (kornia's differ in the 4th decimal)
_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 boxes before falling back


# -- random choices shared by both drivers ------------------------------------------------------
def sample_uniform(low: float, high: float, shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """Samples uniform in ``[low, high)`` on ``device``."""
    return torch.empty(shape, device=device).uniform_(low, high)


def chosen_rows(prob: Factor, n: int, device: torch.device | str = "cpu") -> Tensor:
    """Indices of the rows (views or images) an operation applies to, each with (its) ``prob``."""
    return torch.nonzero(torch.rand(n, device=device) < prob).flatten()


# -- geometry ----------------------------------------------------------------------------------
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
    area = height * width * sample_uniform(scale[0], scale[1], shape, device)
    aspect = torch.exp(sample_uniform(math.log(ratio[0]), math.log(ratio[1]), shape, device))
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


# -- colour ------------------------------------------------------------------------------------
def _per_image(factor: Factor, images: Tensor) -> Factor:
    """``factor`` shaped to broadcast over ``images``: a float as is, ``(N,)`` as ``(N, 1, 1, 1)``."""
    return factor.view(-1, *([1] * (images.dim() - 1))) if isinstance(factor, Tensor) else factor


def luma(images: Tensor) -> Tensor:
    """Grey level ``(..., 1, H, W)`` of RGB images ``(..., 3, H, W)``, torchvision's arithmetic."""
    r, g, b = images.unbind(-3)
    return r.mul(LUMA_WEIGHTS[0]).add_(g, alpha=LUMA_WEIGHTS[1]).add_(b, alpha=LUMA_WEIGHTS[2]).unsqueeze(-3)


def grayscale_(images: Tensor) -> Tensor:
    """Replace each image by its luma on all three channels (torchvision's RandomGrayscale)."""
    return images.copy_(luma(images).expand_as(images))


def adjust_brightness_(images: Tensor, factor: Factor) -> Tensor:
    """torchvision's ``adjust_brightness``: ``clamp(factor * x, 0, 1)``."""
    return images.mul_(_per_image(factor, images)).clamp_(0, 1)


def adjust_contrast_(images: Tensor, factor: Factor) -> Tensor:
    """torchvision's ``adjust_contrast``: blend with the image's mean grey level."""
    factor = _per_image(factor, images)
    mean = luma(images).mean(dim=(-3, -2, -1), keepdim=True)
    return images.mul_(factor).add_(mean.mul_(1 - factor)).clamp_(0, 1)


def adjust_saturation_(images: Tensor, factor: Factor) -> Tensor:
    """torchvision's ``adjust_saturation``: blend with the image's grey version."""
    factor = _per_image(factor, images)
    grey = luma(images).mul_(1 - factor)
    return images.mul_(factor).add_(grey).clamp_(0, 1)


_TINY = torch.finfo(torch.float32).tiny
# channel n of an HSV colour (n = 5, 3, 1 for R, G, B) is v - chroma * clamp(2 - |k - 2|, 0, 1)
# with k = (n + hue) mod 6; these are n - 2, so that y = hue + offset, wrapped to [-3, 3], is k - 2
_HUE_OFFSETS = torch.tensor([3.0, 1.0, -1.0]).view(3, 1, 1)


def shift_hue(image: Tensor, turns: Factor) -> Tensor:
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


# ColorJitter's operations by name, in torchvision's numbering (its ``fn_idx`` permutes 0..3).
# Each returns the adjusted images (in place where it can); the drivers look them up here at
# call time, so a test can swap one and see both drivers change.
JITTER_OPS: dict[str, Callable[[Tensor, Factor], Tensor]] = {
    "brightness": adjust_brightness_,
    "contrast": adjust_contrast_,
    "saturation": adjust_saturation_,
    "hue": shift_hue,
}


def solarize_(images: Tensor) -> Tensor:
    """torchvision's ``solarize`` at 0.5 (128 of 255): pixels ``v >= 0.5`` become ``1 - v``."""
    return torch.minimum(images, 1 - images, out=images)


def normalize_(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Subtract ``mean`` and divide by ``std`` per channel."""
    return images.sub_(images.new_tensor(mean).view(-1, 1, 1)).div_(images.new_tensor(std).view(-1, 1, 1))


# -- blur --------------------------------------------------------------------------------------
def gaussian_taps(sigma: Tensor, kernel_size: int) -> Tensor:
    """torchvision's normalised Gaussian kernels ``(n, kernel_size)``, one per ``sigma (n,)``."""
    half = kernel_size // 2
    taps = torch.arange(-half, half + 1, device=sigma.device, dtype=torch.float32)
    weights = torch.exp(-0.5 * (taps / sigma.view(-1, 1)) ** 2)
    # far taps of a narrow kernel are subnormal floats, which make CPU matrix products ~50x slower
    weights = weights.masked_fill_(weights < 1e-12, 0.0)
    return weights / weights.sum(dim=1, keepdim=True)


def _reflect_blur_matrices(sigma: Tensor, kernel_size: int, size: int) -> Tensor:
    """Matrices ``(n, size, size)`` whose product with a line blurs it like torchvision's GaussianBlur.

    Row ``j`` holds the Gaussian taps for ``sigma[i]`` around ``j``, with the taps that fall
    outside the line folded back as reflect padding does.
    """
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, device=sigma.device)
    source = (torch.arange(size, device=sigma.device).view(-1, 1) + offsets).abs()  # reflect at 0
    source = torch.where(source > size - 1, 2 * (size - 1) - source, source)  # reflect at the end
    weights = gaussian_taps(sigma, kernel_size)
    matrices = torch.zeros(len(sigma), size, size, device=sigma.device)
    return matrices.scatter_add_(2, source.expand(len(sigma), -1, -1), weights.unsqueeze(1).expand(-1, size, -1))


def gaussian_blur_batch(images: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Blur of each image of ``images (n, C, H, W)`` with its own ``sigma (n,)``, reflect borders.

    Two matrix products (columns, then rows) instead of a convolution: on CPU 3-4 times faster
    than PyTorch's depthwise convolution, and torchvision's result (to 1e-6).
    """
    rows = _reflect_blur_matrices(sigma, kernel_size, images.shape[-2])
    square = images.shape[-1] == images.shape[-2]
    columns = rows if square else _reflect_blur_matrices(sigma, kernel_size, images.shape[-1])
    return rows.unsqueeze(1) @ images @ columns.transpose(1, 2).unsqueeze(1)


def _block_side(length: int) -> int | None:
    """Rows per block of the banded blur: a divisor of ``length`` near 32, or None (dense blur)."""
    divisors = [side for side in range(16, 65) if length % side == 0]
    if divisors:
        return min(divisors, key=lambda side: abs(side - 32))
    return length if length <= 64 else None


def _band(taps: Tensor, block: int) -> Tensor:
    """``(block + kernel_size - 1, block)`` matrix whose column ``j`` holds ``taps`` at rows ``j..``."""
    kernel_size = len(taps)
    band = torch.zeros(block + kernel_size - 1, block)
    band.as_strided((block, kernel_size), (block + 1, block)).copy_(taps.expand(block, kernel_size))
    return band


def _reflect_pad(image: Tensor, half: int, dim: int) -> Tensor:
    """``image`` with ``half`` reflected pixels added at both ends of ``dim`` (torchvision's reflect)."""
    length = image.shape[dim]
    before = image.narrow(dim, 1, half).flip(dim)
    after = image.narrow(dim, length - half - 1, half).flip(dim)
    return torch.cat([before, image, after], dim=dim)


def gaussian_blur_image(image: Tensor, sigma: float, kernel_size: int) -> Tensor:
    """Blur of one float image ``(C, H, W)`` with ``sigma``: torchvision's GaussianBlur (to 1e-6).

    The CPU driver's blur, hand-written for speed: separable, each direction one matrix product
    with a banded matrix. The reflect-padded lines are cut into overlapping blocks of
    ``block + kernel_size - 1`` pixels, each blurred to ``block`` pixels, so a product costs
    ``kernel_size + block`` multiply-adds per pixel instead of the line length of
    ``gaussian_blur_batch``'s dense matrices, which for a long side is far fewer. Sides without a
    divisor in 16..64 use ``gaussian_blur_batch``.
    """
    half = kernel_size // 2
    channels, height, width = image.shape
    block_h, block_w = _block_side(height), _block_side(width)
    if block_h is None or block_w is None:
        return gaussian_blur_batch(image.unsqueeze(0), torch.tensor([sigma]), kernel_size)[0]
    taps = gaussian_taps(torch.tensor([sigma]), kernel_size)[0]
    band_w = _band(taps, block_w)
    band_h = band_w if block_h == block_w else _band(taps, block_h)
    # columns: rows of the reflect-padded image in overlapping blocks, (block, taps) @ (taps, width)
    padded = _reflect_pad(image, half, 1)
    blocks = padded.as_strided((channels, height // block_h, block_h + 2 * half, width),
                               ((height + 2 * half) * width, block_h * width, width, 1))
    out = torch.matmul(band_h.t(), blocks).view(channels, height, width)
    # rows: overlapping blocks of every padded row, (pixels, taps) @ (taps, block)
    padded = _reflect_pad(out, half, 2)
    blocks = padded.as_strided((channels * height, width // block_w, block_w + 2 * half),
                               (width + 2 * half, block_w, 1))
    return (blocks.reshape(-1, block_w + 2 * half) @ band_w).view(channels, height, width)
