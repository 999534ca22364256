"""SeLa objective (Asano, Rupprecht & Vedaldi, ICLR 2020): self-labelling by optimal transport.

Pure torch, usable in any training loop. Every training image `i` of the data set (`N` images) has
one pseudo-label `y_hi` per classification head `h` (`H` heads of `K` classes each); the network is
trained to predict them, and from time to time they are re-optimised for the network:

1. Training: each head's logits `l = W_h x` of an image's head input `x` (`x` and the rows of `W_h`
   L2-normalised with `cosine_heads`, SeLa-v2's prototypes) give `p = softmax(l / temperature)`; the
   loss is the cross-entropy `-log p[y_hi]` of every crop of image `i` (crop-major rows, as
   everywhere in bam), averaged over crops, images and heads.
2. Label optimisation (no gradient), per head, over the whole data set: the `N x K` matrix of
   log-probabilities `log p` is turned into the transport plan `Q` that maximises
   `<Q, log p> + H(Q) / lambda` under the equipartition constraint (every class gets `N / K`
   images, every image one unit of mass): Sinkhorn-Knopp on the kernel `p ** lambda` (SeLa:
   lambda 25, float64). The new label of image `i` is the class of its row's largest entry.

The balancing is bam's single Sinkhorn (`bam.ops.sinkhorn_distributed_`), in float64: its layout
(rows split over processes, column sums all-reduced) is the data set's `N x K` matrix with each
process holding a slice of the images, so 2 processes solve exactly the problem 1 process solves.
The uniform marginal constants of the paper (`1/N`, `1/K`) cancel in its normalisations, and
`lambda * log p` differs from `lambda * l / temperature` by one constant per row, which the row
normalisation removes as well: the plan is the paper's.

`SeLaLoss` keeps what the label optimisation reads between optimisations: a bank of every image's
latest head input (`x` of its first global crop, recorded during training from every process, so
no second pass over the data is needed) and the labels. Both are the same on every process and are
saved by the training method in its checkpoints (`label_state`, `load_label_state`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bam.losses.settings import require_positive, settings_of
from bam.ops import sinkhorn_distributed_
from bam.ops.distributed import all_reduce_, gather_rows, rank, world_size


@dataclass(frozen=True)
class SeLaObjective:
    """The settings of the SeLa objective, the paper's ImageNet values by default.

    Args:
        num_clusters: `K`, the classes of each head (3000).
        num_heads: `H`, classification heads trained side by side, each with its own labels (10).
        lam: the paper's lambda, the inverse entropic regularisation of the label optimisation (25).
        sinkhorn_iterations: balancing iterations of one label optimisation (the authors iterate
            until the image scalings change by less than 0.1 in total; a fixed count here).
        temperature: temperature of the training softmax (SeLa: 1; SeLa-v2: 0.1).
        cosine_heads: the heads score L2-normalised inputs against L2-normalised weight rows
            (SeLa-v2's prototypes, re-normalised once per step, no bias); SeLa's are plain linear
            layers with bias.
    """

    num_clusters: int = 3000
    num_heads: int = 10
    lam: float = 25.0
    sinkhorn_iterations: int = 100
    temperature: float = 1.0
    cosine_heads: bool = False

    def __post_init__(self) -> None:
        require_positive(lam=self.lam, temperature=self.temperature)
        if self.num_clusters < 2 or self.num_heads < 1:
            raise ValueError(f"SeLa needs num_clusters >= 2 and num_heads >= 1, got num_clusters={self.num_clusters}, "
                             f"num_heads={self.num_heads}")
        if self.sinkhorn_iterations < 1:
            raise ValueError(f"sinkhorn_iterations={self.sinkhorn_iterations} must be >= 1 (the equipartition needs them)")


@torch.no_grad()
def optimal_labels(logits: torch.Tensor, lam: float = SeLaObjective.lam,
                   sinkhorn_iterations: int = SeLaObjective.sinkhorn_iterations) -> torch.Tensor:
    """Step 2 for one head: the `(n,)` labels of this process's `(n, K)` logits, balanced with the
    rows of every other process (float64, no gradient)."""
    log_kernel = lam * F.log_softmax(logits.detach().to(torch.float64), dim=1)  # log of p ** lambda
    return sinkhorn_distributed_(log_kernel, sinkhorn_iterations).argmax(dim=1)


def self_label_loss(logits: torch.Tensor, labels: torch.Tensor, temperature: float = SeLaObjective.temperature) -> torch.Tensor:
    """Step 1: `(H, V*B, K)` logits of `V` crops of `B` images, `(H, B)` labels -> the cross-entropy
    averaged over heads, crops and images."""
    heads, rows, classes = logits.shape
    if labels.dim() != 2 or labels.shape[0] != heads or rows % labels.shape[1]:
        raise ValueError(f"expected (H={heads}, B) labels for {rows} crop rows, got shape {tuple(labels.shape)}")
    crop_labels = labels.repeat(1, rows // labels.shape[1])  # crop-major: crop 0's images, crop 1's, ...
    return F.cross_entropy((logits / temperature).reshape(-1, classes), crop_labels.reshape(-1))


class SeLaLoss(nn.Module):
    """SeLa's classification heads, pseudo-labels and the bank the labels are optimised from.

    Args:
        dim: dimension of the head input (the projector's output, or the backbone's features).
        num_crops: views per image `V`; rows are `V` blocks of `B` images, global crops first.
        objective: the settings (`SeLaObjective`); `**settings` replace any of its fields by name.

    Call `start(num_images, seed)` once the data set's size is known (random, equipartitioned first
    labels, as the authors start), then `forward(embeddings, indices)` with the batch's dataset
    indices returns the scalar loss and, in training mode, records the batch's head inputs (of
    every process) in the bank. `optimize_labels()` re-labels every image recorded so far.
    """

    def __init__(self, dim: int, num_crops: int, objective: SeLaObjective | None = None, **settings: Any) -> None:
        super().__init__()
        self.objective = settings_of(SeLaObjective, objective, settings)
        if num_crops < 1:
            raise ValueError(f"num_crops={num_crops} must be >= 1")
        self.num_crops = num_crops
        self.heads = nn.ModuleList(nn.Linear(dim, self.objective.num_clusters, bias=not self.objective.cosine_heads)
                                   for _ in range(self.objective.num_heads))
        self.normalize_heads_()
        # Plain tensors, not buffers: DDP would broadcast an N-row buffer at every step, and their
        # size is the data's, unknown when the model is built. The method checkpoints them.
        self.labels = torch.empty(self.objective.num_heads, 0, dtype=torch.long)
        self.bank = torch.empty(0, dim)
        self.recorded = torch.empty(0, dtype=torch.bool)

    # ----------------------------------------------------------------- state
    @property
    def num_images(self) -> int:
        return self.labels.shape[1]

    def start(self, num_images: int, seed: int = 0) -> None:
        """Random first labels, each head's an equipartition (image `i` -> `i mod K`, shuffled),
        the same on every process (seeded); an empty bank."""
        generator = torch.Generator().manual_seed(seed)
        classes = torch.arange(num_images) % self.objective.num_clusters
        labels = torch.stack([classes[torch.randperm(num_images, generator=generator)] for _ in self.heads])
        device = self.heads[0].weight.device
        self.labels = labels.to(device)
        self.bank = torch.zeros(num_images, self.heads[0].in_features, device=device)
        self.recorded = torch.zeros(num_images, dtype=torch.bool, device=device)

    def label_state(self) -> dict[str, torch.Tensor]:
        """Labels, bank and which images the bank holds, on the CPU (for a checkpoint)."""
        return {"labels": self.labels.cpu(), "bank": self.bank.cpu(), "recorded": self.recorded.cpu()}

    def load_label_state(self, state: dict[str, torch.Tensor]) -> None:
        device = self.heads[0].weight.device
        self.labels, self.bank, self.recorded = (state[key].to(device) for key in ("labels", "bank", "recorded"))

    def _to_device(self) -> None:
        device = self.heads[0].weight.device
        if self.labels.device != device:
            self.labels, self.bank, self.recorded = (t.to(device) for t in (self.labels, self.bank, self.recorded))

    # ----------------------------------------------------------------- training
    @torch.no_grad()
    def normalize_heads_(self) -> None:
        """With `cosine_heads`, project every weight row back onto the unit sphere (once per step)."""
        if self.objective.cosine_heads:
            for head in self.heads:
                head.weight.copy_(F.normalize(head.weight, dim=1))

    def head_inputs(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.normalize(embeddings, dim=1) if self.objective.cosine_heads else embeddings

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """`(H, rows, K)` logits of `(rows, D)` head inputs."""
        return torch.stack([head(inputs) for head in self.heads])

    def forward(self, embeddings: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if self.num_images == 0:
            raise RuntimeError("SeLaLoss has no labels yet: call start(num_images) with the data set's size first")
        if embeddings.dim() != 2 or embeddings.shape[0] != self.num_crops * indices.shape[0]:
            raise ValueError(f"expected {self.num_crops} crop blocks of the batch's {indices.shape[0]} images, got "
                             f"embeddings of shape {tuple(embeddings.shape)}")
        self._to_device()
        inputs = self.head_inputs(embeddings)
        loss = self_label_loss(self.logits(inputs), self.labels[:, indices], self.objective.temperature)
        if self.training:
            self.record(inputs[: indices.shape[0]], indices)
        return loss

    @torch.no_grad()
    def record(self, inputs: torch.Tensor, indices: torch.Tensor) -> None:
        """Write the head inputs of every process's images (one row per image) into the bank."""
        if int(indices.max()) >= self.num_images or int(indices.min()) < 0:
            raise ValueError(f"dataset index {int(indices.max())} is outside the {self.num_images} images the labels "
                             "were started for")
        every_index = gather_rows(indices.to(self.recorded.device))
        self.bank[every_index] = gather_rows(inputs.detach().float())
        self.recorded[every_index] = True

    # ----------------------------------------------------------------- label optimisation
    @torch.no_grad()
    def optimize_labels(self) -> int:
        """Re-label every image the bank holds, head by head, with the current heads; images never
        recorded keep their labels. Each process balances its slice of those images; the labels
        are then the same on every process. Returns how many images were re-labelled."""
        self._to_device()
        images = torch.nonzero(self.recorded).flatten()  # the same on every process
        if len(images) < world_size():
            return 0  # nothing to balance yet (every process must hold at least one row)
        mine = images.tensor_split(world_size())[rank()]
        inputs = self.bank[mine].to(torch.float64)
        labels = torch.zeros_like(self.labels[:, images])
        start = sum(len(part) for part in images.tensor_split(world_size())[: rank()])
        for head_index, head in enumerate(self.heads):
            logits = F.linear(inputs, head.weight.to(torch.float64),
                              None if head.bias is None else head.bias.to(torch.float64))
            labels[head_index, start : start + len(mine)] = optimal_labels(logits, self.objective.lam,
                                                                           self.objective.sinkhorn_iterations)
        self.labels[:, images] = all_reduce_(labels)  # each process filled its own columns, zeros elsewhere
        return len(images)

    def chance_level(self) -> float:
        """The loss of uniform predictions, log(K)."""
        return math.log(self.objective.num_clusters)

    def extra_repr(self) -> str:
        return f"num_crops={self.num_crops}, {self.objective}"
