"""Tiny in-memory data and a gloo process spawner that exercise the training stack in seconds."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

def spawn_gloo_workers(worker: Callable[..., None], world: int, tmp_path: Path) -> None:
    """Run `worker(rank, world, init_file, out_dir)` on `world` processes and wait for them; if the
    wait is ended (pytest-timeout on a deadlock of mismatched collectives), the workers are killed."""
    join_workers(mp.spawn(worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=False))


def join_workers(context: mp.ProcessContext) -> None:
    """Wait for every process of `context` (a worker's error is raised here); if the wait is ended
    (pytest-timeout on a deadlock), the workers are killed first."""
    try:
        while not context.join():
            pass
    except BaseException:
        for process in context.processes:
            process.kill()
        raise


class TinyCropsDataModule(pl.LightningDataModule):
    """Random images cut into deterministic multi-crop views (2 global + `num_local` local)."""

    def __init__(self, num_images: int = 32, batch_size: int = 8, global_size: int = 32,
                 local_size: int = 16, num_local: int = 2, num_classes: int = 4) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(num_images, 3, global_size, global_size, generator=generator)
        self.labels = torch.arange(num_images) % num_classes
        self.batch_size = batch_size
        self.local_size = local_size
        self.num_local = num_local

    def _views(self, images: torch.Tensor) -> list[torch.Tensor]:
        size = self.local_size
        globals_ = [images, images.flip(-1)]
        locals_ = [images[..., i : i + size, i : i + size] for i in range(self.num_local)]
        return globals_ + locals_

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=self.batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        images, labels = batch
        return self._views(images), labels

    def knn_dataloaders(self) -> tuple[DataLoader, DataLoader]:
        dataset = TensorDataset(self.images, self.labels)
        return DataLoader(dataset, batch_size=16), DataLoader(dataset, batch_size=16)


class IndexedTinyCrops(TinyCropsDataModule):
    """`TinyCropsDataModule` whose batches carry dataset indices, `(views, labels, indices)`, as bam's
    data modules' do, and which knows its training set's size (what DeepCluster-v2's bank needs)."""

    def train_dataloader(self) -> DataLoader:
        dataset = TensorDataset(self.images, self.labels, torch.arange(len(self.images)))
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))

    def on_after_batch_transfer(self, batch, dataloader_idx):
        images, labels, indices = batch
        return self._views(images), labels, indices

    def training_set_size(self) -> int:
        return len(self.images)
