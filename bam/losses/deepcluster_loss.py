"""DeepCluster-v2 objective (Caron et al., NeurIPS 2020, with SwAV): predict last epoch's clusters.

Pure torch, usable in any training loop. Embeddings are crop-major, as everywhere in bam: rows
`[crop 0: images 0..B-1 | crop 1: images 0..B-1 | ...]`, global crops first.

1. A memory bank holds, for every image of the training set (by dataset index) and every global
   crop `g`, the normalised embedding `z` that crop had when the image was last trained on.
2. At the start of each epoch, head `h` clusters bank `h mod G` by spherical k-means (`K_h`
   clusters, 10 iterations; `bam.ops.spherical_kmeans`): its centroids become the head's
   prototypes `c_h` and each image's cluster its target `y_h` for the whole epoch.
3. Every crop (global and local) of image `i` predicts each head's target with
   `softmax(z . c_h / temperature)`; the loss is the cross-entropy averaged over crops, images
   and heads. The prototypes are not trained: the next clustering replaces them (the reference
   run freezes its prototypes for more steps than it trains).
4. After the loss, the batch's global-crop embeddings replace the bank rows of its images.

Under `torch.distributed` the bank is whole and the same on every process: each step gathers the
dataset indices and global-crop embeddings of every process and writes all of them. The k-means
splits its rows over the processes (same centroids and targets everywhere), and each process's
loss is a mean over its own images: after DDP's gradient averaging, training equals one process on
the global batch, and no embedding is gathered with its gradient.

Before the first clustering the bank holds random unit vectors (seeded), as solo-learn's
DeepCluster-v2 does: the first epoch's targets are k-means clusters of noise, i.e. a fixed random
partition of the images (the reference instead fills the bank with a pass of the untrained
network). An image the epoch did not train on (the sampler's dropped last batch) keeps its older row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bam.losses.settings import require_positive, settings_of
from bam.ops import compute_dtype, spherical_kmeans
from bam.ops.distributed import gather_rows
from bam.ops.errors import UserInputError

NOT_ASSIGNED = -1  # the target of an image before the first clustering


@dataclass(frozen=True)
class DeepClusterV2Objective:
    """The settings of the DeepCluster-v2 objective, the reference's ImageNet values by default.

    Args:
        num_prototypes: `K_h` of each head (ImageNet: three heads of 3000 clusters).
        temperature: temperature of the predictions' softmax.
        kmeans_iterations: k-means iterations of each clustering.
    """

    num_prototypes: tuple[int, ...] = (3000, 3000, 3000)
    temperature: float = 0.1
    kmeans_iterations: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_prototypes", tuple(self.num_prototypes))  # a config's list too
        require_positive(temperature=self.temperature)
        if not self.num_prototypes or min(self.num_prototypes) < 2:
            raise ValueError(f"num_prototypes={list(self.num_prototypes)}: give each head at least 2 clusters")
        if self.kmeans_iterations < 1:
            raise ValueError(f"kmeans_iterations={self.kmeans_iterations} must be at least 1")


def deepcluster_loss(
    embeddings: torch.Tensor, prototypes: Sequence[torch.Tensor], targets: torch.Tensor, *, num_crops: int,
    temperature: float = DeepClusterV2Objective.temperature,
) -> torch.Tensor:
    """Step 3: `(V*B, D)` un-normalised embeddings, one `(K_h, D)` unit prototypes per head and the
    `(H, B)` cluster of each image per head -> the cross-entropy averaged over crops, images and heads."""
    if embeddings.dim() != 2 or embeddings.shape[0] != num_crops * targets.shape[1]:
        raise ValueError(f"DeepCluster-v2 expects crop-major ({num_crops} crops x {targets.shape[1]} images, D) "
                         f"embeddings, got shape {tuple(embeddings.shape)}")
    if len(prototypes) != targets.shape[0]:
        raise ValueError(f"{len(prototypes)} heads of prototypes but targets for {targets.shape[0]}")
    dtype = compute_dtype(embeddings)
    # Scores divided by 0.1 in half precision lose digits: run in float32.
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        z = F.normalize(embeddings.to(dtype), dim=1)
        losses = [F.cross_entropy(z @ centroids.to(dtype).T / temperature, target.repeat(num_crops))
                  for centroids, target in zip(prototypes, targets)]
        return torch.stack(losses).mean()


class DeepClusterV2Loss(nn.Module):
    """The DeepCluster-v2 objective with its state, all registered buffers (checkpointed, the same
    on every process): the memory `bank` `(G, N, D)`, each head's `centroids_h` `(K_h, D)`, the
    `assignments` `(H, N)` and the epoch they were made for (`clustered_epoch`).

    Args:
        dim: `D`, the dimension of the embeddings (the projector's output).
        num_crops: views per image `V` (global + local).
        num_global_crops: the first `G` views are global; each has its bank.
        objective: the settings (`DeepClusterV2Objective`).

    Call `allocate(N)` with the training set's size before training (a loaded state dict brings
    its own size), `cluster(epoch)` at each epoch's start, then `forward(embeddings, indices)`.
    """

    bank: torch.Tensor
    assignments: torch.Tensor
    clustered_epoch: torch.Tensor

    def __init__(self, dim: int, num_crops: int, num_global_crops: int = 2,
                 objective: DeepClusterV2Objective | dict[str, Any] | None = None) -> None:
        super().__init__()
        if num_crops < 1 or not 1 <= num_global_crops <= num_crops:
            raise ValueError(f"DeepCluster-v2 needs 1 <= num_global_crops <= num_crops, got num_crops={num_crops}, "
                             f"num_global_crops={num_global_crops}")
        self.objective = settings_of(DeepClusterV2Objective, objective, {})
        self.num_crops, self.num_global_crops = num_crops, num_global_crops
        self.register_buffer("bank", torch.zeros(num_global_crops, 0, dim))
        self.register_buffer("assignments", torch.zeros(self.num_heads, 0, dtype=torch.long))
        self.register_buffer("clustered_epoch", torch.tensor(-1))
        for head, count in enumerate(self.objective.num_prototypes):
            self.register_buffer(f"centroids_{head}", torch.zeros(count, dim))

    @property
    def num_heads(self) -> int:
        return len(self.objective.num_prototypes)

    @property
    def prototypes(self) -> list[torch.Tensor]:
        return [getattr(self, f"centroids_{head}") for head in range(self.num_heads)]

    # ----------------------------------------------------------------- state
    @torch.no_grad()
    def allocate(self, num_images: int, seed: int = 0) -> None:
        """Size the bank for a training set of `num_images` and fill it with seeded random unit
        vectors (the same on every process); a bank of that size already there is kept."""
        most = max(self.objective.num_prototypes)
        if most > num_images:
            raise UserInputError(
                f"num_prototypes={list(self.objective.num_prototypes)}: k-means cannot make {most} clusters of "
                f"{num_images} training images; set model.init_args.objective.num_prototypes to at most {num_images} per head"
            )
        if self.bank.shape[1] == num_images:
            return
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(self.num_global_crops, num_images, self.bank.shape[2], generator=generator)
        self.bank = F.normalize(noise, dim=2).to(self.bank.device)
        self.assignments = torch.full((self.num_heads, num_images), NOT_ASSIGNED, device=self.bank.device)
        self.clustered_epoch.fill_(-1)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # A checkpoint's bank has its training set's size, whatever this module was allocated with.
        for name in ("bank", "assignments"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args)

    @torch.no_grad()
    def cluster(self, epoch: int, seed: int = 0) -> None:
        """Step 2 for `epoch`: each head's k-means on its bank (`h mod G`), seeded by `(seed, epoch,
        head)` so that every process, and a resumed run, draws the same starting centroids."""
        for head, (count, centroids) in enumerate(zip(self.objective.num_prototypes, self.prototypes)):
            generator = torch.Generator().manual_seed(_mix(seed, epoch, head))
            points = self.bank[head % self.num_global_crops]
            found, assigned = spherical_kmeans(points, count, self.objective.kmeans_iterations, generator)
            centroids.copy_(found)
            self.assignments[head] = assigned
        self.clustered_epoch.fill_(epoch)

    @torch.no_grad()
    def update_bank(self, embeddings: torch.Tensor, indices: torch.Tensor) -> None:
        """Step 4: the normalised global-crop embeddings of every process's images go into the
        bank rows of their dataset indices."""
        batch = indices.shape[0]
        rows = gather_rows(indices.to(self.bank.device))
        for crop in range(self.num_global_crops):
            z = F.normalize(embeddings[crop * batch : (crop + 1) * batch].detach().float(), dim=1)
            self.bank[crop, rows] = gather_rows(z).to(self.bank.dtype)

    # ----------------------------------------------------------------- the loss
    def forward(self, embeddings: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The loss of `(V*B, D)` embeddings of the images with dataset `indices` `(B,)`; in
        training mode their global-crop embeddings then go into the bank."""
        if self.bank.shape[1] == 0 or int(self.clustered_epoch) < 0:
            raise RuntimeError("DeepCluster-v2 has no clusters yet: call allocate(num_images) and cluster(epoch) "
                               "before the first step (DeepClusterV2Module does, at each epoch's start)")
        if int(indices.max()) >= self.bank.shape[1] or int(indices.min()) < 0:
            raise ValueError(f"dataset indices must lie in [0, {self.bank.shape[1]}) (the bank's training set size), "
                             f"got {int(indices.min())}..{int(indices.max())}")
        targets = self.assignments[:, indices.to(self.assignments.device)]
        loss = deepcluster_loss(embeddings, self.prototypes, targets, num_crops=self.num_crops,
                                temperature=self.objective.temperature)
        if self.training:
            self.update_bank(embeddings, indices)
        return loss

    def chance_level(self) -> float:
        """The loss of uniform predictions: the mean over heads of log(K_h)."""
        return sum(math.log(count) for count in self.objective.num_prototypes) / self.num_heads

    def extra_repr(self) -> str:
        return f"num_crops={self.num_crops}, num_global_crops={self.num_global_crops}, {self.objective}"


def _mix(seed: int, epoch: int, head: int) -> int:
    """One generator seed per (seed, epoch, head), distinct for distinct triples."""
    return (seed * 1_000_003 + epoch) * 1_009 + head
