"""Image collections ("sources") that yield ``(uint8 image (3, H, W), label)``.

Two kinds: image files on disk (an ImageFolder tree, a folder of images without classes or a file
list) and images held in memory as one uint8 tensor (the built-in datasets). Both offer ``labels``,
``subset(indices)`` and ``dropping_unreadable()`` so the data modules can split, subsample and
evaluate them without knowing which kind they hold. Images without a class carry the label
``UNLABELLED`` (-1); ``class_count`` says how many classes a source's labels hold.

Whether a folder's sub-folders are classes is ``labels``' choice (``LABEL_MODES``):
``classes``: each sub-folder of the folder is a class; ``none``: every image at any depth, no
classes; ``auto`` (default): classes when the folder holds two or more sub-folders and no image of
its own, else no classes. A list file is labelled when its lines end in an integer label (``auto``:
all of them or none).

Folders are walked following symbolic links, but each real folder is entered once and each real
file is listed once (by device and inode): a link back to a parent (a loop) or to a file already
listed is left out and counted in the file statuses as ``already_listed``.

Files are decoded by ``bam.data.image_decoding.decode_image_file`` (TorchCodec or Pillow, see there).
Unreadable files (empty, corrupt or truncated, more pixels than ``max_pixels``) never stop a run
and are never read twice. Every file's fate goes into the listing's ``FileStatuses`` (shared with
DataLoader workers), which stages report once, summed over processes, at their end. What a
sample of an unreadable file becomes depends on who reads it: training replaces it by the next
readable image (batches keep their size); evaluation and conversion drop it
(``dropping_unreadable``), so they see every readable image exactly once.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional, Protocol, Sequence, Union, get_args

import torch
from torch import Tensor
from torch.utils.data import Dataset

from bam.data.file_report import READ, FileStatuses, skip_code
from bam.data.image_decoding import DEFAULT_MAX_PIXELS, UnreadableImageError, decode_image_file
from bam.ops.errors import UserInputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")
UNLABELLED = -1  # the label of an image without a class
LabelMode = Literal["auto", "classes", "none"]
LABEL_MODES: tuple[str, ...] = get_args(LabelMode)


class ImageSource(Protocol):
    """What the data modules need from an image collection (labels ``UNLABELLED`` without classes)."""

    labels: Tensor

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Optional[tuple[Tensor, int]]: ...

    def subset(self, indices: Tensor) -> "ImageSource": ...

    def dropping_unreadable(self) -> "ImageSource": ...


class ImageFiles(Dataset):
    """Image files with integer labels; every read goes into the listing's ``FileStatuses``.

    An unreadable file is replaced by the next readable one (its own label), so that training
    batches keep their size; ``dropping_unreadable()`` gives a view that yields None for it
    instead (for evaluation and conversion: no image twice). A file known to be unreadable,
    from any process sharing the statuses, is not read again.

    Args:
        paths: Image file paths.
        labels: One integer class per path.
        max_pixels: Larger images (by the size in their header) are skipped without decoding.
        statuses: Statuses of the listing these files come from (default: new ones of ``paths``).
        positions: Position of each path in ``statuses`` (default: ``0, 1, ...``).
        replace_unreadable: Replace an unreadable file by the next readable one (else None).
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int] | Tensor,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        statuses: Optional[FileStatuses] = None,
        positions: Optional[Sequence[int]] = None,
        replace_unreadable: bool = True,
    ) -> None:
        self.paths = list(paths)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {max_pixels}")
        self.max_pixels = max_pixels
        self.statuses = statuses if statuses is not None else FileStatuses(self.paths)
        self.positions = list(positions) if positions is not None else list(range(len(self.paths)))
        self.replace_unreadable = replace_unreadable

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Optional[tuple[Tensor, int]]:
        if not self.replace_unreadable:
            image = self._read(index)
            return None if image is None else (image, int(self.labels[index]))
        for offset in range(len(self.paths)):
            candidate = (index + offset) % len(self.paths)
            image = self._read(candidate)
            if image is not None:
                return image, int(self.labels[candidate])
        raise RuntimeError(f"none of the {len(self.paths)} images could be read, e.g. {self.paths[index]}")

    def _read(self, index: int) -> Optional[Tensor]:
        position = self.positions[index]
        if self.statuses.skipped(position):
            return None
        try:
            image = decode_image_file(self.paths[index], self.max_pixels)
        except UnreadableImageError as error:
            self.statuses.mark(position, skip_code(error.reason))
            return None
        self.statuses.mark(position, READ)
        return image

    def subset(self, indices: Tensor) -> "ImageFiles":
        """The files at ``indices`` (in that order), with the same statuses."""
        chosen = indices.tolist()
        return self._view([self.paths[i] for i in chosen], self.labels[indices], [self.positions[i] for i in chosen],
                          self.replace_unreadable)

    def dropping_unreadable(self) -> "ImageFiles":
        """The same files, yielding None for an unreadable one instead of a replacement."""
        return self._view(self.paths, self.labels, self.positions, replace_unreadable=False)

    def _view(self, paths: list[str], labels: Tensor, positions: list[int], replace_unreadable: bool) -> "ImageFiles":
        return ImageFiles(paths, labels, self.max_pixels, self.statuses, positions, replace_unreadable)


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

    def dropping_unreadable(self) -> "TensorImages":
        """Itself: images in memory are all readable."""
        return self


def scan_image_folder(
    root: str | Path,
    classes: Sequence[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    labels: LabelMode = "auto",
) -> tuple[ImageFiles, list[str] | None]:
    """Images under ``root``, any depth, labelled by their class folder ``root/<class>/...`` or
    ``UNLABELLED`` (see ``labels``), and the class names (None: no classes).

    Files without an image extension (``IMAGE_EXTENSIONS``, or none at all) are not read; they
    are counted in the file statuses as skipped, ``unsupported``; links to a folder or file already
    listed, as ``already_listed``.

    Args:
        root: Folder with one sub-folder per class, or of images without classes.
        classes: Class names fixing the label order (e.g. those of the training split); by
            default the sorted sub-folder names of ``root``. A sub-folder outside this list is an error.
        max_pixels: Larger images are skipped without decoding (see ``ImageFiles``).
        labels: ``classes``, ``none`` or ``auto``: whether ``root``'s sub-folders are classes (see
            the module's docstring); ignored when ``classes`` is given.

    Raises:
        FileNotFoundError: ``root`` is missing, has no class folders (``labels="classes"``) or
            holds no image files.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = list(classes) if classes is not None else _class_folders(root, labels)
    walk = _OnceWalk(root)
    listed = walk.files()
    if classes is None:
        labelled = [UNLABELLED] * len(listed)
    else:
        unknown = sorted(set(_subfolders(root)) - set(classes))
        if unknown:
            raise ValueError(f"class folders {unknown} in {root} are not among the training classes")
        label_of = {name: label for label, name in enumerate(classes)}
        in_class = [(path, label_of.get(Path(path).relative_to(root).parts[0])) for path in listed]
        # files of the folder itself are in no class: left out, as the rule for labels says
        listed = [path for path, label in in_class if label is not None]
        labelled = [label for _, label in in_class if label is not None]
    images = [i for i, path in enumerate(listed) if path.lower().endswith(IMAGE_EXTENSIONS)]
    if not images:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    unsupported = sorted(set(range(len(listed))) - set(images))
    repeated = range(len(listed), len(listed) + len(walk.repeated))
    statuses = FileStatuses(listed + walk.repeated, unsupported=unsupported, already_listed=repeated)
    return ImageFiles([listed[i] for i in images], [labelled[i] for i in images], max_pixels, statuses, images), classes


def _subfolders(root: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir())


def _class_folders(root: Path, labels: LabelMode) -> list[str] | None:
    """The class folders of ``root`` under the rule ``labels`` (module docstring); None: no classes."""
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {', '.join(LABEL_MODES)}, got {labels!r}")
    if labels == "none":
        return None
    subfolders = _subfolders(root)
    if labels == "classes":
        if not subfolders:
            raise FileNotFoundError(f"no class sub-folders in image folder {root} (labels: classes); for images "
                                    "without classes set labels: none (or auto)")
        return subfolders
    own_images = any(entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS) for entry in os.scandir(root))
    return subfolders if len(subfolders) >= 2 and not own_images else None


class _OnceWalk:
    """Walks a folder following symbolic links, entering each real folder once and listing each
    real file once (identified by ``(st_dev, st_ino)``), whatever links lead to them.

    ``repeated`` collects the paths left out: links (or hard links) to a folder or file met
    before, such as a link back to a parent folder, which would otherwise be walked in a loop.
    """

    def __init__(self, root: Path) -> None:
        self.root = str(root)
        self.seen = {_identity(self.root)}
        self.repeated: list[str] = []

    def files(self) -> list[str]:
        """Every file below the root, in a reproducible (sorted) order: a folder's files, then its
        sub-folders' in name order."""
        files: list[str] = []
        self._walk(self.root, files)
        return files

    def _walk(self, folder: str, files: list[str]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError:  # unreadable folder: as os.walk, list nothing below it
            return
        subfolders = []
        for entry in entries:
            if self._first_visit(entry.path):
                (subfolders if entry.is_dir() else files).append(entry.path)
        for subfolder in subfolders:
            self._walk(subfolder, files)

    def _first_visit(self, path: str) -> bool:
        identity = _identity(path)
        if identity is None:  # a dangling link: listed, and skipped as undecodable when read
            return True
        if identity in self.seen:
            self.repeated.append(path)
            return False
        self.seen.add(identity)
        return True


def _identity(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of what ``path`` leads to (following links); None if it leads nowhere."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def read_file_list(list_file: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, labels: LabelMode = "auto") -> ImageFiles:
    """Images listed in a text file, one ``path label`` or ``path`` per line (``#`` comments, blank
    lines ok).

    Relative paths are relative to the list file's folder; a path may contain spaces (the label
    is the last field). Every listed file is tried, whatever its extension.

    Args:
        list_file: The text file.
        max_pixels: Larger images are skipped without decoding (see ``ImageFiles``).
        labels: ``classes``: every line ends in an integer label; ``none``: every line is a path
            (``UNLABELLED``); ``auto``: labelled if every line ends in an integer label, unlabelled
            if none does.

    Raises:
        FileNotFoundError: the list is missing or lists no images.
        ValueError: a line lacks the label that ``labels`` (or the other lines) call for (the
            message names the line).
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise FileNotFoundError(f"image list not found: {list_file}")
    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {', '.join(LABEL_MODES)}, got {labels!r}")
    lines = [(number, line.strip()) for number, line in enumerate(list_file.read_text().splitlines(), start=1)
             if line.strip() and not line.strip().startswith("#")]
    if not lines:
        raise FileNotFoundError(f"image list {list_file} lists no images")
    split = [(number, line, _path_and_label(line)) for number, line in lines]
    if labels == "none" or (labels == "auto" and all(label is None for _, _, (_, label) in split)):
        return ImageFiles([str(list_file.parent / line) for _, line in lines], [UNLABELLED] * len(lines), max_pixels)
    for number, line, (_, label) in split:
        if label is None:
            rule = "labels: classes" if labels == "classes" else "other lines have labels"
            raise ValueError(f"{list_file}:{number}: expected 'path label' ({rule}), got {line!r}; give every line "
                             "an integer label, or none (with labels: none every line is a path)")
    return ImageFiles([str(list_file.parent / path) for _, _, (path, _) in split],
                      [label for _, _, (_, label) in split], max_pixels)


def _path_and_label(line: str) -> tuple[str, int | None]:
    """``(path, label)`` of a ``path label`` line; ``(line, None)`` if it does not end in an integer."""
    fields = line.rsplit(maxsplit=1)
    if len(fields) == 2 and fields[1].lstrip("-").isdigit():
        return fields[0], int(fields[1])
    return line, None


def class_count(labels: Tensor) -> int:
    """How many classes ``labels`` hold (``UNLABELLED`` is none)."""
    return len(torch.unique(labels[labels != UNLABELLED]))


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


# what `fraction` options take: a class-balanced fraction of a split, or a subset list file
Subset = Union[float, str]
SUBSET_NAMES_SHOWN = 3  # missing names an error message quotes


def subset_indices(source: ImageSource, subset: Subset, seed: int) -> Tensor:
    """Sorted indices of ``source`` to keep: a seeded class-balanced fraction (a number), or the
    images named by a subset list file (a path, see ``listed_subset``)."""
    if isinstance(subset, str):
        return listed_subset(source, Path(subset))
    return balanced_subset(source.labels, subset, seed)


def listed_subset(source: ImageSource, list_file: Path) -> Tensor:
    """Sorted indices of the images of ``source`` whose file names ``list_file`` lists, one per line
    (the format of SimCLR's ImageNet 1% / 10% lists: ``n01440764_10026.JPEG``; blank lines and
    ``#`` comments are ignored). A file name is matched against the image files' base names.

    Raises:
        FileNotFoundError: the list does not exist.
        ValueError: the list names no image, names images the split lacks (how many, and the first
            few), or the images are held in memory (no file names).
    """
    if not list_file.is_file():
        raise FileNotFoundError(f"subset list not found: {list_file} (fraction takes a number in (0, 1] or a list file)")
    paths = getattr(source, "paths", None)
    if paths is None:
        raise UserInputError(f"subset list {list_file} names image files, but these images are held in memory; give a fraction")
    names = [line.strip() for line in list_file.read_text().splitlines()]
    names = [name for name in names if name and not name.startswith("#")]
    if not names:
        raise UserInputError(f"subset list {list_file} names no images")
    positions = {os.path.basename(path): index for index, path in enumerate(paths)}
    missing = [name for name in names if name not in positions]
    if missing:
        raise UserInputError(
            f"{len(missing)} of the {len(names)} images named in {list_file} are not in the split's {len(paths)} "
            f"images, e.g. {', '.join(missing[:SUBSET_NAMES_SHOWN])}; check that the list belongs to this dataset"
        )
    return torch.tensor(sorted({positions[name] for name in names}), dtype=torch.long)


def stratified_split(labels: Tensor, held_out_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded split into (kept, held-out) sorted indices with the same class proportions."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held-out fraction must be in (0, 1), got {held_out_fraction}")
    held_out = balanced_subset(labels, held_out_fraction, seed)
    kept = torch.ones(len(labels), dtype=torch.bool)
    kept[held_out] = False
    return torch.nonzero(kept).flatten(), held_out
