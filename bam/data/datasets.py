"""Datasets, collation and loaders shared by pretraining and evaluation.

Image sources (``bam.data.sources``) yield ``(uint8 image, label)``; the wrappers here put the
images through a transform (``TransformedSource``) or carry each row's dataset index along
(``IndexedSource``), the collate functions batch them, and ``readable``/``ReadableLoader`` leave
out the images that could not be read.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from bam.data.sources import ImageSource


class TransformedSource(Dataset):
    """A source whose images go through ``transform`` (labels untouched).

    ``pass_index=True`` calls ``transform(image, index)``: ContrastiveCrop's CPU path needs the
    dataset index to find the image's box.
    """

    def __init__(self, source: ImageSource, transform: Callable[..., Any], pass_index: bool = False) -> None:
        self.source, self.transform, self.pass_index = source, transform, pass_index

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> Optional[tuple[Any, int]]:
        sample = self.source[index]
        if sample is None:  # an unreadable file of a source that drops them
            return None
        image, label = sample
        return (self.transform(image, index) if self.pass_index else self.transform(image)), label


class IndexedSource(Dataset):
    """``(image, label, index)`` of a source, the image optionally through ``transform``.

    The index travels with the batch so that ContrastiveCrop's on-device crops (and its box
    computation) know which image each row is.
    """

    def __init__(self, source: ImageSource, transform: Optional[Callable[[Tensor], Tensor]] = None,
                 indices: Optional[Tensor] = None) -> None:
        self.source, self.transform = source, transform
        self.indices = torch.arange(len(source)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[Tensor, int, int]:
        index = int(self.indices[position])
        image, label = self.source[index]
        return (image if self.transform is None else self.transform(image)), label, index


def collate_views(samples: list[tuple[list[Tensor], int, int]]) -> tuple[list[Tensor], Tensor, Tensor]:
    """Per-image ``(views, label, dataset index)`` -> per-view batches:
    ``([V x (B, 3, H, W)], labels (B,), dataset indices (B,))``."""
    views = [torch.stack(view) for view in zip(*(sample[0] for sample in samples))]
    return views, torch.tensor([sample[1] for sample in samples]), torch.tensor([sample[2] for sample in samples])


def collate_images(samples: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    """``(images (B, ...), labels (B,))`` as a tuple."""
    return torch.stack([sample[0] for sample in samples]), torch.tensor([sample[1] for sample in samples])


def collate_indexed_images(samples: list[tuple[Tensor, int, int]]) -> tuple[Tensor, Tensor, Tensor]:
    """``(images (B, ...), labels (B,), dataset indices (B,))``."""
    images, labels = collate_images([sample[:2] for sample in samples])
    return images, labels, torch.tensor([sample[2] for sample in samples])


def collate_images_and_indices(samples: list[tuple[Tensor, int, int]]) -> tuple[Tensor, Tensor]:
    """``(images (B, ...), dataset indices (B,))``: what ContrastiveCrop's box update reads."""
    images, _, indices = collate_indexed_images(samples)
    return images, indices


def readable(collate: Callable[[list], Any]) -> Callable[[list], Any]:
    """``collate`` applied to the batch's readable samples (unreadable ones are None); None when
    there is none left (``ReadableLoader`` skips such batches)."""
    return partial(_collate_readable, collate)


def _collate_readable(collate: Callable[[list], Any], samples: list) -> Any:
    kept = [sample for sample in samples if sample is not None]
    return collate(kept) if kept else None


class ReadableLoader(DataLoader):
    """A DataLoader whose collate function is ``readable(...)``: it skips the batches in which no
    image could be read, so evaluation sees every readable image once and nothing else."""

    def __iter__(self) -> Iterator[Any]:
        return (batch for batch in super().__iter__() if batch is not None)


def square_base_transform(size: int) -> v2.Compose:
    """uint8 image -> ``size x size`` uint8: resize the short side, keep the centre square.

    The device path crops from this square, so for non-square images its crops cover the
    centre square only (the CPU path crops from the whole image); square images are unaffected.
    """
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
