"""Image files to upright uint8 RGB tensors ``(3, H, W)``: every image bam reads from disk for
training, evaluation, ``bam embed`` and the FFCV conversion goes through ``decode_image_file``.

Which decoder, and why (measured figures: docs/image-decoding.md). torchvision 0.29 deprecates
its image decoders (``torchvision.io.decode_image`` and the rest warn "The image decoding and
encoding capabilities of TorchVision are deprecated since torchvision 0.29 and will be removed in
a future release") and names TorchCodec, from 0.16, as their successor. TorchCodec's image
decoders are the same C libraries (libjpeg-turbo, libpng, libwebp, giflib) in a package of their
own: they need no FFmpeg (only its video and audio decoders do), apply the EXIF orientation of
JPEGs and PNGs as torchvision's did, load with torch 2.14, and ``decode_image_file`` with them
read 0.98x to 1.06x as many images per second as with torchvision's (JPEG and PNG, 64 to 1024
px, two runs). With Pillow, the other maintained decoder at hand, it read 0.54x to 0.94x as many. So:

- JPEG, PNG, WebP and GIF: TorchCodec, called per format (Pillow's header read, which the pixel
  limit needs anyway, has already named the format).
- Animated images (GIF, APNG, WebP): Pillow, which decodes the first frame only; TorchCodec would
  decode every frame to keep one (a long animation is a memory bomb the pixel limit does not see).
- Every other format Pillow opens (BMP, TIFF, PPM/PGM...), and any file TorchCodec refuses: Pillow.
- Without a loadable TorchCodec (not installed, a CUDA build of it beside a CPU-only torch, a torch
  older than it supports): Pillow for everything, said once in a warning naming the fix.

The size in the file's header is checked before anything is decoded, so a small file that claims
a huge image (a decompression bomb) costs no memory.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

# Pillow's own warning threshold: a 9459 x 9459 image, 268 MB once decoded to RGB
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS
# what a failed load of torchcodec's compiled image library raises (ImportError: not installed)
CODEC_LOAD_ERRORS = (ImportError, OSError, RuntimeError)


class UnreadableImageError(ValueError):
    """An image file that cannot or may not be decoded; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, path: str, reason: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.reason = reason


def codec_decoders() -> dict[str, Callable[..., Tensor]]:
    """TorchCodec's decoder of each format it decodes, by Pillow's name of the format; empty
    (everything decoded by Pillow, with one warning) when torchcodec cannot be loaded."""
    try:
        from torchcodec.decoders import decode_gif, decode_jpeg, decode_png, decode_webp
    except CODEC_LOAD_ERRORS as error:
        warnings.warn(
            f"torchcodec cannot be loaded ({type(error).__name__}: {str(error).splitlines()[0]}), so Pillow decodes "
            "every image (up to 2x slower); install the torchcodec build that matches torch, e.g. "
            "for a CPU-only torch: pip install torchcodec --index-url https://download.pytorch.org/whl/cpu",
            stacklevel=2,
        )
        return {}
    # MPO: a JPEG with more pictures appended (cameras' previews); decode_jpeg reads the first
    return {"JPEG": decode_jpeg, "MPO": decode_jpeg, "PNG": decode_png, "WEBP": decode_webp, "GIF": decode_gif}


CODEC_DECODERS = codec_decoders()


def decode_image_file(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Tensor:
    """Read an image file as uint8 RGB ``(3, H, W)``, turned upright by its EXIF orientation; of an
    animated image (GIF, APNG, WebP, TIFF pages) the first frame; grey, palette, CMYK and
    16-bit images converted to 8-bit RGB, an alpha channel dropped.

    Which library decodes which format: the module's docstring. The bytes are read by Python, so
    any file name the file system holds works (names need not be UTF-8).

    Raises:
        UnreadableImageError: the file is empty, is not an image, is corrupt or truncated, or has
            more than ``max_pixels`` pixels (``reason`` says which).
    """
    try:
        if os.path.getsize(path) == 0:  # Pillow would call it "cannot identify image file"
            raise UnreadableImageError(path, "empty", "empty file")
        data = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
        with _opened_header(path, max_pixels) as header:
            decode = None if getattr(header, "is_animated", False) else CODEC_DECODERS.get(header.format)
            try:
                image = decode(data, mode="RGB") if decode is not None else _pil_rgb(header)
            except RuntimeError:  # TorchCodec refuses what its libraries do not handle; Pillow may
                image = _pil_rgb(header)
    except UnreadableImageError:
        raise
    except (OSError, RuntimeError, ValueError, SyntaxError) as error:  # what the decoders raise on bad data
        raise UnreadableImageError(path, "undecodable", f"{type(error).__name__}: {error}") from error
    # an animation Pillow took for a still image comes back as (frames, 3, H, W): keep frame 0
    return image[0] if image.dim() == 4 else image


def _pil_rgb(opened: Image.Image) -> Tensor:
    """The first frame of an image Pillow has opened, upright (EXIF orientation), as uint8 ``(3, H, W)``."""
    upright = ImageOps.exif_transpose(opened)
    if upright.mode.startswith("I;16"):  # 16-bit grey: Pillow's convert clips it at 255; scale it as TorchCodec does
        upright = Image.fromarray((np.asarray(upright, dtype=np.float32) / 257).round().astype(np.uint8))
    return torch.from_numpy(np.asarray(upright.convert("RGB")).copy()).permute(2, 0, 1)


def _opened_header(path: str, max_pixels: int) -> Image.Image:
    """The file opened by Pillow, which reads only its header, once its pixel count is checked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit is ours, below
        try:
            header = Image.open(path)
        except Image.DecompressionBombError as error:  # beyond Pillow's hard limit, whatever ours is
            raise UnreadableImageError(path, "too_many_pixels", str(error)) from error
    width, height = header.size
    if width * height > max_pixels:
        header.close()
        raise UnreadableImageError(
            path, "too_many_pixels", f"{width} x {height} pixels, more than max_pixels={max_pixels}"
        )
    return header
