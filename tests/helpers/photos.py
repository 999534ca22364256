"""A labelled folder of small colour photos (JPEG) for the tests of what users do with their own
images: class folders of smooth colour gradients with noise, of one size (a camera's aspect)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PHOTO_SIZE = (150, 200)  # height, width


def write_photo_folder(root: Path, classes: int = 2, per_class: int = 12, size: tuple[int, int] = PHOTO_SIZE) -> Path:
    """`root/<class k>/<i>.jpg`: `classes` x `per_class` RGB photos of `size`; each class has its own
    dominant colour, so the three channels differ as in real photos."""
    rng = np.random.default_rng(0)
    height, width = size
    ramp = np.linspace(0.0, 1.0, width)[None, :, None]
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        tint = np.roll(np.array([0.8, 0.45, 0.2]), label)
        for index in range(per_class):
            pixels = 255 * (tint * ramp + 0.35 * rng.random((height, width, 3)))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{index}.jpg")
    return root
