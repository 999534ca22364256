"""Labelled image collections ("sources") that yield ``(uint8 image (3, H, W), label)``.

Two kinds: image files on disk (an ImageFolder tree or a file list) and images held in memory as
one uint8 tensor (the built-in datasets). Both offer ``labels`` and ``subset(indices)`` so the
data modules can split and subsample them without knowing which kind they hold.

Unreadable files (corrupt, truncated, not an image) never stop a run: the sample is replaced by
the next readable one (deterministically, so the batch keeps its size) and a warning counts the
files skipped so far in this process (each DataLoader worker counts its own).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms.v2 import functional as TF

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")
_SHOWN_PATHS = 5  # how many skipped paths a warning lists


class UnreadableImageWarning(UserWarning):
    """An image file could not be decoded and was replaced by another sample."""


class ImageSource(Protocol):
    """What the data modules need from a labelled image collection."""

    labels: Tensor

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Tensor, int]: ...

    def subset(self, indices: Tensor) -> "ImageSource": ...


def decode_image_file(path: str) -> Tensor:
    """Read an image file as uint8 RGB ``(3, H, W)``.

    torchvision's decoder (libjpeg/libpng, no PIL round trip) handles JPEG, PNG, WebP and GIF;
    other formats (BMP, TIFF, PPM) fall back to PIL. Raises on corrupt or truncated data.
    """
    data = read_file(path)
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        with Image.open(path) as pil_image:
            array = np.asarray(pil_image.convert("RGB"))
        image = torch.from_numpy(array.copy()).permute(2, 0, 1)
    return TF.to_dtype(image, torch.uint8, scale=True)  # 16-bit PNGs decode to uint16


_DECODE_ERRORS = (OSError, RuntimeError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageFiles(Dataset):
    """Image files with integer labels; unreadable files are replaced by the next readable one.

    Args:
        paths: Image file paths.
        labels: One integer class per path.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | Tensor) -> None:
        self.paths = list(paths)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        self.unreadable: dict[str, str] = {}  # path -> error, in this process

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        for offset in range(len(self.paths)):
            candidate = (index + offset) % len(self.paths)
            image = self._read(candidate)
            if image is not None:
                return image, int(self.labels[candidate])
        raise RuntimeError(f"none of the {len(self.paths)} images could be read, e.g. {self.paths[index]}")

    def _read(self, index: int) -> Tensor | None:
        path = self.paths[index]
        if path in self.unreadable:
            return None
        try:
            return decode_image_file(path)
        except _DECODE_ERRORS as error:
            self.unreadable[path] = f"{type(error).__name__}: {error}"
            self._warn()
            return None

    def _warn(self) -> None:
        shown = ", ".join(list(self.unreadable)[-_SHOWN_PATHS:])
        more = "..., " if len(self.unreadable) > _SHOWN_PATHS else ""
        warnings.warn(
            f"skipped {len(self.unreadable)} unreadable image(s) so far in this process "
            f"(each replaced by the next readable image): {more}{shown}",
            UnreadableImageWarning,
            stacklevel=3,
        )

    def subset(self, indices: Tensor) -> "ImageFiles":
        """The files at ``indices`` (in that order)."""
        return ImageFiles([self.paths[i] for i in indices.tolist()], self.labels[indices])


class TensorImages(Dataset):
    """Images held in memory as one uint8 tensor ``(N, 3, H, W)`` with labels ``(N,)``.

    Args:
        images: uint8 images, all of the same size.
        labels: One integer class per image.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])

    def subset(self, indices: Tensor) -> "TensorImages":
        """The images at ``indices`` (in that order)."""
        return TensorImages(self.images[indices], self.labels[indices])


def scan_image_folder(root: str | Path, classes: Sequence[str] | None = None) -> tuple[ImageFiles, list[str]]:
    """Images under ``root/<class>/...`` (any depth), labelled by the sorted class folder names.

    Args:
        root: Folder with one sub-folder per class.
        classes: Class names fixing the label order (e.g. those of the training split); by
            default the sorted sub-folder names of ``root``. A sub-folder outside this list is an error.

    Raises:
        FileNotFoundError: ``root`` is missing, has no class folders or holds no image files.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    found = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not found:
        raise FileNotFoundError(f"no class sub-folders in image folder {root}")
    classes = list(classes) if classes is not None else found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"class folders {unknown} in {root} are not among the training classes")
    paths, labels = [], []
    for label, name in enumerate(classes):
        for file in _image_files(root / name):
            paths.append(file)
            labels.append(label)
    if not paths:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return ImageFiles(paths, labels), classes


def _image_files(folder: Path) -> list[str]:
    """Image files below ``folder`` in a reproducible (sorted) order."""
    files = []
    for directory, subdirs, names in os.walk(folder, followlinks=True):
        subdirs.sort()
        files.extend(os.path.join(directory, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS))
    return files


def read_file_list(list_file: str | Path) -> ImageFiles:
    """Images listed in a text file, one ``path label`` per line (``#`` comments, blank lines ok).

    Relative paths are relative to the list file's folder; a path may contain spaces (the label
    is the last field).

    Raises:
        FileNotFoundError: the list is missing or lists no images.
        ValueError: a line does not end in an integer label (the message names the line).
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"image list not found: {list_file}")
    paths, labels = [], []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.rsplit(maxsplit=1)
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise ValueError(f"{list_file}:{number}: expected 'path label', got {line!r}")
        paths.append(str(list_file.parent / fields[0]))
        labels.append(int(fields[1]))
    if not paths:
        raise FileNotFoundError(f"image list {list_file} lists no images")
    return ImageFiles(paths, labels)


def balanced_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Sorted indices of a seeded random ``fraction`` of every class (at least one per class)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return torch.arange(len(labels))
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).flatten()
        keep = max(1, round(fraction * len(members)))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:keep]])
    return torch.sort(torch.cat(chosen)).values


def stratified_split(labels: Tensor, held_out_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded split into (kept, held-out) sorted indices with the same class proportions."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held-out fraction must be in (0, 1), got {held_out_fraction}")
    held_out = balanced_subset(labels, held_out_fraction, seed)
    kept = torch.ones(len(labels), dtype=torch.bool)
    kept[held_out] = False
    return torch.nonzero(kept).flatten(), held_out
