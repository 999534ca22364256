"""Frozen-backbone features for evaluation: the authors' readouts (which tokens of a backbone
become its features), and whole-dataset extraction.

Readouts (`FEATURE_READOUTS`), chosen by name (the stages' `feature` setting):

- `pooled`: what the backbone returns (CNNs and MetaFormers: the pooled last stage; ViTs: the
  class token after the final norm).
- `cls`: a ViT's class token of the last block after the final norm (k-NN protocol).
- `cls_patch_mean`: a ViT's class tokens of the last `n_last_blocks` blocks, each after the final
  norm, then the mean patch token of the last block after the final norm: `(n + 1) * dim`
  features (linear protocol; `n_last_blocks=1` is the authors' ViT-B `[CLS, mean patch]`).
- `cls_blocks`: a ViT's class tokens of the last `n_last_blocks` blocks, each after the final norm,
  and no patch token: `n * dim` features (the authors' and DINO's ViT-S linear protocol,
  `n_last_blocks=4`: 4 x 384 = 1536 features for ViT-S/16).

`auto` picks the protocol's readout for ViTs and `pooled` for every other architecture.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm import tqdm

from bam.data.datasets import ReadableLoader, collate_indexed_images, readable
from bam.ops import is_vit
from bam.ops.distributed import gather_rows, rank, world_size

FeatureFn = Callable[[Tensor], Tensor]


def _pooled(model: nn.Module, images: Tensor, n_last_blocks: int) -> Tensor:
    return model(images)


def _vit_tokens(model: nn.Module, images: Tensor, n_last_blocks: int) -> list[tuple[Tensor, Tensor]]:
    """(patch tokens, prefix tokens) of the last `n_last_blocks` blocks, each after the final norm."""
    return model.get_intermediate_layers(images, n=n_last_blocks, return_prefix_tokens=True, norm=True)


def _cls(model: nn.Module, images: Tensor, n_last_blocks: int) -> Tensor:
    return _vit_tokens(model, images, 1)[-1][1][:, 0]


def _cls_blocks(model: nn.Module, images: Tensor, n_last_blocks: int) -> Tensor:
    return torch.cat([prefix[:, 0] for _, prefix in _vit_tokens(model, images, n_last_blocks)], dim=1)


def _cls_patch_mean(model: nn.Module, images: Tensor, n_last_blocks: int) -> Tensor:
    outputs = _vit_tokens(model, images, n_last_blocks)
    class_tokens = [prefix[:, 0] for _, prefix in outputs]
    return torch.cat([*class_tokens, outputs[-1][0].mean(dim=1)], dim=1)


@dataclass(frozen=True)
class Readout:
    """How to compute features from a backbone, and how many there are per image."""

    compute: Callable[[nn.Module, Tensor, int], Tensor]
    tokens: Callable[[int], int]  # n_last_blocks -> number of `num_features`-wide pieces
    needs_vit: bool = True


FEATURE_READOUTS: dict[str, Readout] = {
    "pooled": Readout(_pooled, lambda n: 1, needs_vit=False),
    "cls": Readout(_cls, lambda n: 1),
    "cls_patch_mean": Readout(_cls_patch_mean, lambda n: n + 1),
    "cls_blocks": Readout(_cls_blocks, lambda n: n),
}


def patch_feature_map(model: nn.Module, images: Tensor) -> Tensor:
    """`(B, D, h, w)` spatial features: a ViT's last-block patch tokens after the final norm (built
    with `dynamic_img_size=True` for images of any size), any other backbone's last feature map
    (`forward_features`)."""
    if is_vit(model):
        return model.get_intermediate_layers(images, n=1, reshape=True, norm=True)[0]
    features = model.forward_features(images)
    if features.dim() != 4:
        raise ValueError(
            f"{type(model).__name__}.forward_features returned shape {tuple(features.shape)}, not a (B, C, h, w) "
            "feature map: label propagation needs spatial features"
        )
    return features


def resolve_readout(name: str, backbone: nn.Module, vit_default: str) -> str:
    """`name`, with `auto` replaced by `vit_default` for ViTs and `pooled` otherwise."""
    if name == "auto":
        return vit_default if is_vit(backbone) else "pooled"
    if name not in FEATURE_READOUTS:
        raise ValueError(f"unknown feature readout {name!r}; choose 'auto' or one of {sorted(FEATURE_READOUTS)}")
    return name


class FeatureExtractor(nn.Module):
    """A frozen backbone followed by a feature readout; always in eval mode, never trained.

    Args:
        backbone: timm feature extractor (`num_classes=0`).
        readout: a key of `FEATURE_READOUTS`.
        n_last_blocks: blocks whose class tokens `cls_patch_mean` and `cls_blocks` concatenate.
    """

    def __init__(self, backbone: nn.Module, readout: str = "pooled", n_last_blocks: int = 1) -> None:
        super().__init__()
        if n_last_blocks < 1:
            raise ValueError(f"n_last_blocks must be at least 1, got {n_last_blocks}")
        if FEATURE_READOUTS[readout].needs_vit and not is_vit(backbone):
            raise ValueError(
                f"feature readout {readout!r} reads a ViT's class token, but the backbone is a {type(backbone).__name__}; "
                "use feature 'auto' or 'pooled'"
            )
        self.backbone = backbone.eval().requires_grad_(False)
        self.readout = readout
        self.n_last_blocks = n_last_blocks
        self.out_dim = FEATURE_READOUTS[readout].tokens(n_last_blocks) * int(backbone.num_features)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        # frozen means batch-norm statistics and dropout stay as evaluated, whatever the parent does
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return FEATURE_READOUTS[self.readout].compute(self.backbone, images, self.n_last_blocks).float()


def shard_indices(length: int) -> range:
    """This process's share of `range(length)`: every index exactly once over all processes, no
    padding (a `DistributedSampler` repeats indices to even out the shards)."""
    return range(rank(), length, world_size())


class _Positioned(Dataset):
    """`(image, label, index in dataset)` of the items at `indices`; None for an unreadable file."""

    def __init__(self, dataset: Dataset, indices: range) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[Tensor, int, int] | None:
        index = self.indices[position]
        sample = self.dataset[index]
        return None if sample is None else (*sample, index)


def shard_batches(
    dataset: Dataset, fn: FeatureFn, device: torch.device, batch_size: int, num_workers: int
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(features, labels, dataset indices) of this process's shard, batch by batch; items that are
    None (unreadable files) are left out, and a batch left without any is skipped."""
    # its own generator: extracting features leaves the global random state (hence the order in
    # which training later shuffles) as it was
    loader = ReadableLoader(
        _Positioned(dataset, shard_indices(len(dataset))), batch_size, num_workers=num_workers,
        collate_fn=readable(collate_indexed_images), generator=torch.Generator(),
    )
    for images, labels, positions in loader:
        yield fn(images.to(device, non_blocking=True)), labels, positions


def progress_bar(steps: Iterable[Any], description: str | None, total: int | None = None) -> Iterable[Any]:
    """`steps` with a progress bar on process 0 when `description` is given (none otherwise)."""
    if description is None or rank() != 0:
        return steps
    return tqdm(steps, desc=description, total=total, unit="batch", dynamic_ncols=True)


class NonFiniteFeaturesError(ValueError):
    """A backbone gave NaN or infinite features: any number computed from them is meaningless."""


def require_finite(features: Tensor, split: str) -> Tensor:
    """`features` (rows of images of `split`), if every value is finite; else `NonFiniteFeaturesError`
    saying how many rows are not (a backbone with NaN weights gives NaN for every image, and k-NN
    or a probe would still print accuracies)."""
    bad = int((~torch.isfinite(features)).flatten(1).any(dim=1).sum())
    if bad:
        raise NonFiniteFeaturesError(
            f"the backbone gives non-finite features (NaN or infinity) for {bad} of {len(features)} images of the "
            f"{split} split: its weights are broken (e.g. a diverged run's checkpoint); evaluate another checkpoint"
        )
    return features


@torch.no_grad()
def embed_dataset(
    dataset: Dataset, fn: FeatureFn, device: torch.device, batch_size: int = 256, num_workers: int = 0,
    progress: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Features and labels of every readable item of `dataset`: `embed_rows` without the indices."""
    features, labels, _ = embed_rows(dataset, fn, device, batch_size, num_workers, progress)
    return features, labels


@torch.no_grad()
def embed_rows(
    dataset: Dataset, fn: FeatureFn, device: torch.device, batch_size: int = 256, num_workers: int = 0,
    progress: str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Features, labels and dataset indices of every item of `dataset`, in dataset order, on the
    CPU, on every process (the indices say which items an unreadable file left out).

    Each process embeds its own shard (`shard_indices`); the shards are gathered batch by batch and
    moved to the CPU, so the device holds at most one batch from each process and every row
    comes from a real image (no padding rows, no duplicates). Items that are None (unreadable
    files) have no row. `progress` names a progress bar (shown by process 0), None shows none.
    """
    if len(dataset) < world_size():
        raise ValueError(f"cannot shard {len(dataset)} images over {world_size()} processes")
    # shards differ by at most one image: every process knows the largest one, hence the number
    # of gathers, and embeds at least one batch before its shard can run out
    steps = math.ceil(math.ceil(len(dataset) / world_size()) / batch_size)
    batches = shard_batches(dataset, fn, device, batch_size, num_workers)
    features, keys = [], []
    local = None
    for _ in progress_bar(range(steps), progress):
        batch = next(batches, None)
        if batch is None and local is None:
            raise ValueError(f"none of the {len(dataset)} images of process {rank()}'s share could be read")
        local, labels, positions = batch or (local[:0], labels[:0], positions[:0])
        features.append(gather_rows(local.float()).cpu())
        keys.append(gather_rows(torch.stack([positions, labels], dim=1).to(device)).cpu())
    features, keys = torch.cat(features), torch.cat(keys)
    order = torch.argsort(keys[:, 0])
    return features[order], keys[order, 1], keys[order, 0]
