"""Training from FFCV ``.beton`` files (written by ``bam data ffcv``, ``bam.data.ffcv_convert``).

FFCV's loader decodes and crops in one fused step, one crop per stored image; multi-crop needs
several crops of the same decoded image. So the loader here only decodes each image once, to a
square at ``base_size``, and the crops are made batch-wise on the training device
(``DeviceMultiCrop``, the "device" path).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from bam.data.config import MultiCropConfig
from bam.data.ffcv_install import require_ffcv
from bam.data.modules import SSLDataModule
from bam.data.sources import Subset, balanced_subset, class_count
from bam.recipe import DEFAULT_CROP_PCT


def beton_labels(path: str) -> Tensor:
    """The labels stored in a ``.beton`` file written by ``write_beton`` (read from its metadata)."""
    require_ffcv()
    from ffcv.reader import Reader

    reader = Reader(path)
    column = f"f{reader.field_names.index('label')}"
    return torch.from_numpy(np.array(reader.metadata[column], dtype=np.int64))


@contextmanager
def _torch_threads_kept() -> Iterator[None]:
    """Undo FFCV's ``torch.set_num_threads(num_workers)`` (made when a loader is built and at
    every epoch), which would silently change how many threads the model runs on."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class FFCVBatches:
    """An FFCV loader that leaves torch's thread count alone, optionally mapping its batches.

    Args:
        build: Makes the ``ffcv.loader.Loader``.
        transform: Applied to every ``(images, labels)`` batch (None: batches as FFCV yields them).
    """

    def __init__(self, build: Callable[[], Any], transform: Optional[Callable[[Tensor, Tensor], Any]] = None) -> None:
        with _torch_threads_kept():
            self.loader = build()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        with _torch_threads_kept():
            batches = iter(self.loader)
        for images, labels in batches:
            yield (images, labels) if self.transform is None else self.transform(images, labels)


class _Normalise:
    """uint8 images -> float images normalised with the recipe's mean and std."""

    def __init__(self, crops: MultiCropConfig) -> None:
        self.mean = torch.tensor(crops.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(crops.std).view(1, 3, 1, 1)

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return (images.float() / 255 - self.mean) / self.std, labels


class FFCVDataModule(SSLDataModule):
    """Train from an FFCV ``.beton`` file (see ``write_beton``); views are made on the device.

    The FFCV loader is built in ``train_dataloader``, i.e. after Lightning has created the
    process group, so ``distributed=True`` shards the data across processes.

    Args:
        path: ``.beton`` file of the training split.
        val_path: ``.beton`` file of the held-out split (needed only for k-NN evaluation).
        base_size: Images are decoded once to their centre square at this side.
        eval_size: Side of k-NN images (centre crop of ``eval_size / 0.875`` of the short side).
        os_cache: Let the OS page cache hold the file (True) or let FFCV manage memory (False).
        **kwargs: See ``SSLDataModule`` (``augment_on`` is always ``"device"`` here).
    """

    def __init__(
        self,
        path: str,
        val_path: Optional[str] = None,
        base_size: int = 256,
        eval_size: int = 224,
        os_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        require_ffcv()
        if kwargs.pop("augment_on", "device") != "device":
            raise ValueError("FFCVDataModule makes the views on the device: augment_on must be 'device'")
        super().__init__(augment_on="device", eval_size=eval_size, **kwargs)
        for file in (path, val_path):
            if file is not None and not Path(file).is_file():
                raise FileNotFoundError(f"FFCV file not found: {file}")
        self.path, self.val_path = path, val_path
        self.base_size = base_size
        self.os_cache = os_cache

    def setup(self, stage: str | None = None) -> None:
        """Nothing to load up front: FFCV reads the files lazily."""

    def class_count(self) -> int:
        """Number of classes among the training file's labels (0: images written without classes)."""
        return class_count(beton_labels(self.path))

    def training_set_size(self) -> int:
        """Images in the training file: FFCV's sample ids (the box store's rows) index the whole
        file, also when ``fraction`` trains on a subset of it."""
        return len(beton_labels(self.path))

    def heatmap_batches(self, batch_size: int, rank: int = 0, world: int = 1) -> FFCVBatches:
        """Process ``rank``'s share of the training images as ``(uint8 base squares, file indices)``,
        decoded like the training images (centre square at ``base_size``), unaugmented, in order."""
        loader = require_ffcv()
        used = self._indices(self.fraction)
        used = np.arange(self.training_set_size()) if used is None else used
        return FFCVBatches(lambda: loader.Loader(
            self.path,
            batch_size=batch_size,
            num_workers=max(1, self.num_workers),
            order=loader.OrderOption.SEQUENTIAL,
            indices=used[rank::world],
            pipelines=self._pipelines(self.base_size, ratio=1.0, with_index=True),
            drop_last=False,
            os_cache=self.os_cache,
        ), _images_and_indices)

    def train_dataloader(self) -> FFCVBatches:
        """FFCV loader of ``(uint8 images (B, 3, S, S), labels)``, shuffled, sharded under DDP
        (with ContrastiveCrop also the images' indices in the file: ``(images, labels, indices)``)."""
        loader = require_ffcv()
        with_index = self.crop_boxes is not None
        return FFCVBatches(lambda: loader.Loader(
            self.path,
            batch_size=self.batch_size,
            num_workers=max(1, self.num_workers),
            order=loader.OrderOption.RANDOM,
            distributed=_world_size() > 1,
            seed=self.seed,
            indices=self._indices(self.fraction),
            pipelines=self._pipelines(self.base_size, ratio=1.0, with_index=with_index),
            drop_last=True,
            os_cache=self.os_cache,
        ), _split_label_index if with_index else None)

    def knn_dataloaders(self) -> tuple[FFCVBatches, FFCVBatches]:
        """``(bank, query)``: normalised float images and labels from the train / val files."""
        if self.val_path is None:
            raise ValueError("FFCVDataModule needs val_path (a .beton of the held-out split) for k-NN evaluation")
        loader = require_ffcv()
        subsets = ((self.path, self._indices(self.knn_bank_fraction)), (self.val_path, None))
        return tuple(
            FFCVBatches(
                lambda file=file, indices=indices: loader.Loader(
                    file,
                    batch_size=self.knn_batch_size,
                    num_workers=max(1, self.num_workers),
                    order=loader.OrderOption.SEQUENTIAL,
                    indices=indices,
                    pipelines=self._pipelines(self.eval_size, ratio=DEFAULT_CROP_PCT),
                    drop_last=False,
                    os_cache=self.os_cache,
                ),
                _Normalise(self.crops),
            )
            for file, indices in subsets
        )

    def _indices(self, fraction: Subset) -> np.ndarray | None:
        if isinstance(fraction, str):
            raise ValueError(
                f"fraction {fraction!r}: a subset list names image files, which a .beton file does not record; "
                "give a fraction, or convert only the listed images"
            )
        if fraction == 1:
            return None
        return balanced_subset(beton_labels(self.path), fraction, self.seed).numpy()

    @staticmethod
    def _pipelines(size: int, ratio: float, with_index: bool = False) -> dict[str, list]:
        """Decode the centre ``ratio`` of the short side to ``size x size`` uint8; labels ``(B,)``
        (``with_index``: ``(B, 2)`` rows ``label, sample id``, see ``label_and_index_decoder``).

        Images come out as ``(B, 3, size, size)`` views of FFCV's channels-last buffer (a copy to
        contiguous NCHW would cost a quarter of the decoding time; the device makes it cheaply).
        """
        from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder
        from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

        label = [label_and_index_decoder(), ToTensor()] if with_index else [IntDecoder(), ToTensor(), Squeeze()]
        return {
            "image": [CenterCropRGBImageDecoder((size, size), ratio=ratio), ToTensor(), ToTorchImage(channels_last=True)],
            "label": label,
        }


def label_and_index_decoder() -> Any:
    """An FFCV decoder of the label field that also emits each sample's id (its index in the file).

    FFCV's loader yields only decoded fields; ContrastiveCrop needs to know which image each row
    is. A decoder receives the batch's sample ids, so this one writes ``(label, id)`` pairs.
    """
    from ffcv.fields.basics import IntDecoder
    from ffcv.pipeline.allocation_query import AllocationQuery

    class LabelAndIndexDecoder(IntDecoder):
        def declare_state_and_memory(self, previous_state):
            state, _ = super().declare_state_and_memory(previous_state)
            from dataclasses import replace

            return replace(state, shape=(2,)), AllocationQuery((2,), dtype=self.dtype)

        def generate_code(self):
            def decode(indices, destination, metadata, storage_state):
                for row, sample_id in enumerate(indices):
                    destination[row, 0] = metadata[sample_id]
                    destination[row, 1] = sample_id
                return destination[:len(indices)]

            return decode

    return LabelAndIndexDecoder()


def _split_label_index(images: Tensor, label_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return images, label_index[:, 0], label_index[:, 1]


def _images_and_indices(images: Tensor, label_index: Tensor) -> tuple[Tensor, Tensor]:
    return images, label_index[:, 1]


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
