"""Synthetic videos in the DAVIS-2017 layout (no download): textured shapes moving at known,
constant speeds over a static textured background, with their indexed-PNG annotations.

    root/JPEGImages/480p/<sequence>/00000.jpg ...
    root/Annotations/480p/<sequence>/00000.png ...   (0 background, 1..K the objects)
    root/ImageSets/2017/val.txt                     (one sequence name a line)

The `bam vos` demo evaluates on it, and its tests know where every object is in every frame.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class MovingShape:
    """A disc (`square=False`) or square of half-size `radius` px starting at `(row, column)` and
    moving `velocity` px per frame (rows, columns), filled with a two-colour checkerboard."""

    row: float
    column: float
    velocity: tuple[float, float]
    radius: float
    colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    square: bool = False

    def mask(self, frame: int, height: int, width: int) -> np.ndarray:
        rows, columns = np.mgrid[:height, :width]
        dy = rows - (self.row + self.velocity[0] * frame)
        dx = columns - (self.column + self.velocity[1] * frame)
        if self.square:
            return np.maximum(np.abs(dx), np.abs(dy)) <= self.radius
        return dx**2 + dy**2 <= self.radius**2


DEFAULT_SHAPES = (
    MovingShape(30, 30, (0.0, 3.0), 14, ((230, 40, 40), (250, 220, 60))),
    MovingShape(70, 100, (-1.5, -2.0), 12, ((40, 80, 230), (60, 230, 230)), square=True),
)


def _texture(shape: MovingShape, frame: int, height: int, width: int) -> np.ndarray:
    """The shape's checkerboard, moving with it (4-px cells)."""
    rows, columns = np.mgrid[:height, :width]
    cells = ((rows - shape.velocity[0] * frame) // 4 + (columns - shape.velocity[1] * frame) // 4).astype(int) % 2
    return np.asarray(shape.colours, dtype=np.float64)[cells]


def _background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth grey-green noise: coarse random values upsampled, static over the video."""
    coarse = rng.uniform(60, 140, size=(height // 16 + 2, width // 16 + 2, 3))
    image = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BILINEAR)
    return np.asarray(image, dtype=np.float64) * np.array([0.8, 1.0, 0.8])


def write_synthetic_davis(
    root: str | Path,
    num_sequences: int = 2,
    num_frames: int = 16,
    height: int = 96,
    width: int = 128,
    shapes: Sequence[MovingShape] = DEFAULT_SHAPES,
    seed: int = 0,
) -> list[str]:
    """Write `num_sequences` videos of `shapes` (later shapes in front) into `root`; return their names.

    Sequence `i` has its own background (seed `seed + i`) and its shapes' velocities scaled by
    `1 + i / 2`, so the sequences differ in speed as well as in look."""
    names = [f"synthetic{index}" for index in range(num_sequences)]
    for index, name in enumerate(names):
        rng = np.random.default_rng(seed + index)
        background = _background(height, width, rng)
        scaled = [
            MovingShape(s.row, s.column, (s.velocity[0] * (1 + index / 2), s.velocity[1] * (1 + index / 2)), s.radius,
                        s.colours, s.square)
            for s in shapes
        ]
        frames_dir = Path(root) / "JPEGImages" / "480p" / name
        masks_dir = Path(root) / "Annotations" / "480p" / name
        frames_dir.mkdir(parents=True, exist_ok=True)
        masks_dir.mkdir(parents=True, exist_ok=True)
        for frame in range(num_frames):
            image, labels = background.copy(), np.zeros((height, width), dtype=np.uint8)
            for number, shape in enumerate(scaled, start=1):
                inside = shape.mask(frame, height, width)
                image[inside] = _texture(shape, frame, height, width)[inside]
                labels[inside] = number
            noisy = image + rng.normal(0, 4, size=image.shape)
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(frames_dir / f"{frame:05d}.jpg", quality=95)
            write_indexed_png(masks_dir / f"{frame:05d}.png", labels)
    lists = Path(root) / "ImageSets" / "2017"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "val.txt").write_text("".join(f"{name}\n" for name in names))
    return names


def davis_palette() -> np.ndarray:
    """The 256 x 3 uint8 colour table of DAVIS annotations (that of PASCAL VOC): the bits of an
    index, read three at a time, fill red, green and blue from their most significant bit down."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, colour = index, [0, 0, 0]
        for bit in range(7, -1, -1):
            for channel in range(3):
                colour[channel] |= ((value >> channel) & 1) << bit
            value >>= 3
        palette[index] = colour
    return palette


def write_indexed_png(path: str | Path, labels: np.ndarray) -> None:
    """`labels` (H, W) uint8 as a palette PNG with the DAVIS colours, as DAVIS stores annotations."""
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette(davis_palette().ravel().tolist())
    image.save(path)
