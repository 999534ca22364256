"""Augmentations that are a function of (seed, epoch, sample), so a resumed run repeats them.

Random augmentations normally draw from process-wide random streams: the DataLoader workers'
(seeded when the workers start) on the CPU path, the training process's on the device path. A
run resumed from a checkpoint starts those streams afresh, so after the resume every image gets
other crops and colours than in the uninterrupted run, and the losses differ. Here each draw
comes from a stream seeded for the sample itself:

- CPU path: the sampler yields ``(epoch, index)`` keys (``ResumableSampler(keyed=True)``) and
  ``SeededSamples`` makes each item with the generator seeded from ``(seed, epoch, index)``;
  which worker makes it, and how many were made before, no longer matter.
- device path: the batch carries its dataset indices, and ``seeded_random`` seeds the batch's
  augmentation from ``(seed, epoch, indices)`` (``batch_seed``): the batch is augmented as one,
  so each image's draws depend on the whole batch, which a resume reproduces exactly.

``seeded_random`` puts the generator's previous state back afterwards, so the other random draws
of the process (dropout, weight initialisation, the workers' own seeds) are unaffected.
"""
from __future__ import annotations

import contextlib
import hashlib
import struct
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset


def _mix(values: Sequence[int]) -> int:
    """A 63-bit seed mixed from integers: nearby keys give unrelated streams (a hash, not a sum)."""
    data = struct.pack(f"<{len(values)}q", *values)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one sample's augmentation (CPU path)."""
    return _mix((seed, epoch, index))


def batch_seed(seed: int, epoch: int, indices: Tensor) -> int:
    """Seed of one batch's augmentation from the dataset indices of its rows, in order (device path)."""
    return _mix((seed, epoch, *indices.flatten().tolist()))


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    raise ValueError(f"seeded augmentation supports cpu and cuda devices, got {device}")


@contextlib.contextmanager
def seeded_random(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Random draws on ``device`` inside the block come from a stream seeded with ``seed``; the
    device's default generator gets its previous state back on leaving.

    The generator's own ``manual_seed`` rather than ``torch.manual_seed``, which seeds every
    device type and costs a millisecond: this runs once per image on the CPU path.
    """
    generator = _default_generator(torch.device(device))
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        yield
    finally:
        generator.set_state(state)


class SeededSamples(Dataset):
    """``dataset`` indexed by ``(epoch, index)`` keys: ``(*dataset[index], index)``, made with the
    random generator seeded from ``(seed, epoch, index)``; the index travels with the sample to
    ``training_step`` (``None`` stays ``None``: a sample a source could not read).

    The keys come from ``ResumableSampler(keyed=True)``, also inside DataLoader workers, which
    do not otherwise know the epoch (persistent workers keep their copy of the dataset).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with seeded_random(sample_seed(self.seed, epoch, index)):
            sample = self.dataset[index]
        return None if sample is None else (*sample, index)
