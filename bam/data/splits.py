"""``(train, held-out)`` splits of image data, labelled or not, as pretraining and evaluation both load them."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from bam.data.file_report import FileStatuses, file_statuses_of
from bam.data.sources import (
    DEFAULT_MAX_PIXELS,
    ImageSource,
    LabelMode,
    Subset,
    class_count,
    read_file_list,
    scan_image_folder,
    stratified_split,
    subset_indices,
)


class MissingLabelsError(ValueError):
    """A stage that needs classes was given images with fewer than two."""


class LabelledSplits:
    """A ``(train, held-out)`` pair of image sources, loaded once on first ``setup`` with the
    training split reduced to ``fraction``: a class-balanced fraction (seeded by ``seed``) or a
    subset list file (``bam.data.sources.listed_subset``, e.g. SimCLR's ImageNet 1% list); images
    without classes are labelled ``UNLABELLED`` (the fraction is then drawn from all of them).

    Shared by the pretraining data modules and the evaluation stages' classification data, so
    both see the same splits of the same data.
    """

    fraction: Subset
    seed: int
    train_source: ImageSource | None
    val_source: ImageSource | None

    def load_splits(self) -> tuple[ImageSource, ImageSource]:
        """``(train, held-out)`` sources; fail with the offending path if data is missing."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load the splits once (cheap to call again), then subsample the training split."""
        if self.train_source is not None:
            return
        train, val = self.load_splits()
        self.train_source = train.subset(subset_indices(train, self.fraction, self.seed))
        self.val_source = val

    def class_count(self) -> int:
        """Number of classes in the training split (0: images without classes)."""
        self.setup()
        return class_count(self.train_source.labels)

    def require_classes(self, purpose: str) -> int:
        """The number of classes of the training split; ``MissingLabelsError`` naming ``purpose``
        (e.g. "k-NN accuracy") when it has fewer than two, where accuracies would be meaningless."""
        count = self.class_count()
        if count < 2:
            found = "no class labels" if count == 0 else "a single class"
            raise MissingLabelsError(
                f"{purpose} needs images with class labels (two classes or more), but the training images have "
                f"{found}: give a folder with one sub-folder per class (and labels: classes or auto) or a list of "
                "'path label' lines"
            )
        return count

    def class_names(self) -> list[str] | None:
        """The class of each label (index = label), where the data names its classes (None here)."""
        return None

    def file_statuses(self) -> list[FileStatuses]:
        """Accounts of the image files behind both splits (none for images held in memory)."""
        self.setup()
        return file_statuses_of(self.train_source, self.val_source)


class ImageFolderSplits(LabelledSplits):
    """The splits of images on disk (``image_splits``): where the images are, for the data
    modules that read image folders or list files in pretraining and in evaluation.

    Args:
        root: Either a folder with ``train/`` (and optionally ``val/``) sub-folders, a folder of
            class folders or of images without classes (any depth), or a text file of
            ``path label`` or ``path`` lines.
        val_root: Held-out split (folder or list file); default ``root/val`` if it exists, else a
            stratified ``val_fraction`` of the training images.
        val_fraction: Held-out fraction when there is no separate held-out split.
        max_pixels: Images with more pixels (by their header) are skipped without decoding.
        labels: Where classes come from: ``classes`` (class sub-folders, or a label on every
            line), ``none`` (every image at any depth, no classes) or ``auto``: class sub-folders
            when the training folder has two or more and no image of its own, labelled lines when
            every line ends in an integer; otherwise no classes.
        **kwargs: The data module's own settings.
    """

    def __init__(self, root: str, val_root: Optional[str] = None, val_fraction: float = 0.05,
                 max_pixels: int = DEFAULT_MAX_PIXELS, labels: LabelMode = "auto", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.val_root = Path(val_root) if val_root is not None else None
        self.val_fraction = val_fraction
        self.max_pixels = max_pixels
        self.labels = labels

    def load_splits(self) -> tuple[ImageSource, ImageSource]:
        return image_splits(self.root, self.val_root, self.val_fraction, self.seed, self.max_pixels, self.labels)

    def class_names(self) -> list[str] | None:
        """The class folder names in label order (None for a ``path label`` list file)."""
        training = training_location(self.root)
        return sorted(entry.name for entry in training.iterdir() if entry.is_dir()) if training.is_dir() else None


def listed_image_splits(
    root: str | Path, val_root: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
    labels: LabelMode = "auto",
) -> tuple[ImageSource, Optional[ImageSource]]:
    """The training images under ``root`` and the separate held-out images (None without one);
    the arguments are ``ImageFolderSplits``'s.

    Raises:
        FileNotFoundError: ``root`` or ``val_root`` does not exist (named in the message).
    """
    root, val_root = Path(root), None if val_root is None else Path(val_root)
    require_locations(root, val_root)
    train, classes = _load(training_location(root), None, max_pixels, labels)
    val_root = val_root or (root / "val" if (root / "val").is_dir() else None)
    # held-out images have the training split's classes, or none when it has none
    val_labels = "none" if class_count(train.labels) == 0 else labels
    return train, None if val_root is None else _load(val_root, classes, max_pixels, val_labels)[0]


def training_location(root: Path) -> Path:
    """Where the training images of ``root`` are: ``root/train`` if it exists, else ``root``."""
    return root / "train" if (root / "train").is_dir() else root


def require_locations(*locations: Path | None) -> None:
    """Fail with the missing path's name if an image folder or list file does not exist (None: unset)."""
    for location in locations:
        if location is not None and not location.exists():
            raise FileNotFoundError(f"image folder or list not found: {location}")


def image_splits(
    root: str | Path,
    val_root: str | Path | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    labels: LabelMode = "auto",
) -> tuple[ImageSource, ImageSource]:
    """``(train, held-out)`` image sources of ``root`` (arguments: see ``ImageFolderSplits``): the
    separate held-out split if there is one, else a stratified ``val_fraction`` of the training
    images, seeded by ``seed``."""
    train, val = listed_image_splits(root, val_root, max_pixels, labels)
    if val is not None:
        return train, val
    kept, held_out = stratified_split(train.labels, val_fraction, seed)
    return train.subset(kept), train.subset(held_out)


def _load(
    location: Path, classes: list[str] | None, max_pixels: int, labels: LabelMode
) -> tuple[ImageSource, list[str] | None]:
    """A folder (of class folders or of images) or a list file, and its class names (None: none
    or a list file's integer labels)."""
    if location.is_file():
        return read_file_list(location, max_pixels, labels), classes
    return scan_image_folder(location, classes, max_pixels, labels)
