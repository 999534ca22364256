"""Data order that survives an interruption: resume in the middle of an epoch, batch for batch.

Lightning restores the loop counters of a mid-epoch checkpoint but not the position of a plain
`DataLoader`: it would start the epoch's data over while counting on from the saved batch, so
the resumed run sees other images than the uninterrupted one (and some twice). Lightning does
save and restore the `state_dict()` of any training loader that has one (before it creates the
epoch's iterator), which is the hook used here:

- `ResumableSampler` is a `DistributedSampler` (Lightning then leaves it in place under DDP):
  epoch `e` is the permutation seeded by `(seed, e)`, process `r` of `W` takes its entries
  `r, r + W, r + 2W, ...`. After `k` batches of `b` on every process, exactly the first `k*b*W`
  entries of the permutation have been used, so the position in an epoch is one number of
  samples, whatever the batch size and the number of processes. The sampler can start `start`
  samples into the permutation and deal the rest out over its own processes.
  With `keyed=True` it yields `(epoch, index)` pairs instead of indices, for datasets whose
  items depend on the epoch (seeded augmentations, `bam.data.seeding.SeededSamples`).
- `ResumableDataLoader` counts the batches it has handed to the trainer in the current epoch
  (not those prefetched by workers) and saves `{"epoch", "samples", "world_size", "batch_size"}`;
  loading it makes the next iterator start at that sample of the permutation. A run resumed with
  another batch size or number of processes thus continues exactly where the other stopped: no
  image of the epoch is left out or seen twice (beyond the last partial batch that every epoch
  drops). Positions saved as `{"epoch", "batches"}` (bam before 0.3) are read as batches of this
  run's size on this run's processes.

Usage in a data module (everything else as with a plain DataLoader):

    sampler = ResumableSampler(dataset, shuffle=True, seed=seed, drop_last=True)
    return ResumableDataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, ...)

The sampler reads the process group when it is built, so build it in `train_dataloader()`
(Lightning calls it after the group exists), not in `__init__`.
"""
from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler


def _process_group_shape() -> tuple[int, int]:
    """(world size, rank) of the default group, (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ResumableSampler(DistributedSampler):
    """Per-epoch permutation seeded by `(seed, epoch)`, split over processes, startable mid-epoch.

    `keyed=True` yields `(epoch, index)` pairs (see the module's notes). Works without a process
    group (one process gets the whole permutation), so the same data module runs on one device
    and on many. `len()` is always the full epoch of this process,
    which Lightning uses for the schedules, whatever `start` is.
    """

    def __init__(
        self,
        dataset: Sized,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        keyed: bool = False,
    ) -> None:
        world, own_rank = _process_group_shape()
        super().__init__(
            dataset,
            num_replicas=world if num_replicas is None else num_replicas,
            rank=own_rank if rank is None else rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self.start = 0  # samples of this epoch's list to skip, once (set by load_state_dict)
        self.keyed = keyed

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0  # a skip belongs to the epoch it was saved in
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        indices = self._share(self.start) if self.start else list(super().__iter__())
        self.start = 0
        if self.keyed:
            return iter([(self.epoch, index) for index in indices])
        return iter(indices)

    def _share(self, start: int) -> list[int]:
        """This process's entries of the epoch's permutation after its first `start` (which the
        processes of the interrupted run used), dealt out as at an epoch's start."""
        if not self.drop_last:
            raise ValueError("starting mid-epoch needs drop_last=True (every process the same number of samples)")
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        rest = (order if self.shuffle else torch.arange(len(self.dataset)))[start:].tolist()
        per_process = len(rest) // self.num_replicas
        return rest[self.rank : per_process * self.num_replicas : self.num_replicas]

    def remaining(self, start: int) -> int:
        """Samples this process gets of the epoch when it starts `start` samples in."""
        return (len(self.dataset) - start) // self.num_replicas if start else self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch goes into Lightning checkpoints.

    Needs a `ResumableSampler` as `sampler` and a `batch_size`; otherwise it behaves exactly like
    `DataLoader` (its constructor is DataLoader's, so Lightning can rebuild it if it must).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler) or self.batch_size is None:
            raise ValueError("ResumableDataLoader needs sampler=ResumableSampler(...) and a batch_size")
        self._epoch = self.sampler.epoch  # the epoch `_start` and `_batches` count in
        self._start = 0  # samples of the epoch's permutation used before this iterator started
        self._batches = 0  # batches handed over since

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing runs before the first batch is asked for, so the sampler already
        # has the epoch Lightning sets (after creating the iterator) and any restored position.
        self._epoch, self._start, self._batches = self.sampler.epoch, self.sampler.start, 0
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    @property
    def samples(self) -> int:
        """Samples of the current epoch's permutation used so far, over all processes."""
        return self._start + self._batches * self.batch_size * self.sampler.num_replicas

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "samples": self.samples, "world_size": self.sampler.num_replicas,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        samples = state.get("samples", state.get("batches", 0) * self.batch_size * self.sampler.num_replicas)
        self.sampler.set_epoch(state["epoch"])
        self.sampler.start = samples
        self._epoch, self._start, self._batches = state["epoch"], samples, 0

    def batches_done(self) -> int:
        """Batches of this epoch counted as done, in this run's batch size: the epoch's length
        less the batches still to come, so that a trainer counting to `len(self)` stops when the
        data does, also after a resume with another batch size or number of processes."""
        return len(self) - self.sampler.remaining(self.sampler.start) // self.batch_size
