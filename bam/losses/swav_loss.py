"""SwAV objective (Caron et al., NeurIPS 2020): swapped prediction of Sinkhorn-balanced codes.

Pure torch, usable in any training loop. Embeddings are crop-major, as everywhere in bam: rows
`[crop 0: images 0..B-1 | crop 1: images 0..B-1 | ...]`, global crops first.

1. `z = normalise(embedding)`, prototypes `c_k` unit vectors (re-normalised once per step), and
   scores `s = z . c` in [-1, 1]: a `(V*B, K)` matrix.
2. Codes, without gradient, for each global crop `i` separately: its `(B, K)` block of
   `exp(s / reg)` (`reg`: the paper's epsilon, bam's one name for an entropic regularisation)
   balanced by Sinkhorn-Knopp so that every image's code sums to 1 and, up to the few iterations,
   every prototype receives the same mass `B_global / K` over the *global* batch (the equipartition
   constraint that prevents the collapse onto one prototype).
3. Swapped prediction: every other crop `j != i` (global and local) predicts `q_i` with
   `p_j = softmax(s_j / temperature)`; the loss is the cross-entropy `-<q_i, log p_j>`
   averaged over the `G * (V - 1)` pairs and the images.

The balancing is bam's single Sinkhorn (`bam.ops.sinkhorn_distributed_`): its layout (rows split over
processes, column sums all-reduced) is SwAV's with rows = images and columns = prototypes, its
column-then-row normalisation order is SwAV's, and the uniform marginal constants SwAV multiplies
in (`1/K`, `1/B`) cancel in that scheme. Under `torch.distributed` every process balances its own
images against the prototype masses summed over all processes, and the per-process loss is a mean
over its own images: after DDP's gradient averaging, training equals single-process training on
the global batch. No embedding is gathered: codes carry no gradient.

The queue (optional, `SwAVLoss(queue_length=L)`; SwAV's remedy for batches much smaller than the
number of prototypes): the last `L` normalised global-crop embeddings of the *global* batch (gathered
from every process, newest first, the same on every process and in every checkpoint). Once full and
enabled, each global crop's Sinkhorn balances its images together with the queue's, scored by the
current prototypes, and keeps the images' codes only. Each process takes its own `L / W` rows of
the queue into the distributed Sinkhorn, so the balancing is over the global batch plus the queue,
once, exactly as on one process.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bam.losses.settings import require_positive, settings_of
from bam.ops import compute_dtype, sinkhorn_distributed_
from bam.ops.crops import check_crops_of_objective
from bam.ops.distributed import gather_rows, rank, world_size

SWAV_NEEDS = "SwAV (another crop must predict each global crop's code)"


@dataclass(frozen=True)
class SwAVObjective:
    """The settings of the SwAV objective, the paper's values by default.

    Args:
        num_prototypes: `K`, the number of learnable prototypes (3000 for ImageNet; a few times the
            number of classes one expects is the paper's rule of thumb).
        reg: entropic regularisation of the codes' Sinkhorn (the paper's epsilon).
        temperature: temperature of the predictions' softmax.
        sinkhorn_iterations: balancing iterations of the codes.
    """

    num_prototypes: int = 3000
    reg: float = 0.05
    temperature: float = 0.1
    sinkhorn_iterations: int = 3

    def __post_init__(self) -> None:
        require_positive(reg=self.reg, temperature=self.temperature)
        if self.num_prototypes < 2:
            raise ValueError(f"num_prototypes={self.num_prototypes}: SwAV needs at least 2 prototypes to balance over")


def swav_codes(
    scores: torch.Tensor, reg: float = SwAVObjective.reg, sinkhorn_iterations: int = SwAVObjective.sinkhorn_iterations,
    queue_scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Step 2 for one crop: the `(B, K)` codes of `(B, K)` image-prototype scores, no gradient.

    Each row sums to 1; with enough iterations every column sums to `B_global / K` (over every
    process's rows). Computed in float32 (float64 stays float64) and stabilised line by line, so
    `reg` down to 0.01 and half-precision scores are safe. `queue_scores` (`(L_p, K)`, this
    process's queue rows) take part in the balancing; only the images' codes are returned.
    """
    with torch.no_grad():
        logits = scores.detach().to(compute_dtype(scores)) / reg  # a fresh tensor, ours to overwrite
        if queue_scores is not None:
            logits = torch.cat([logits, queue_scores.detach().to(logits.dtype) / reg])
        return sinkhorn_distributed_(logits, sinkhorn_iterations, rows=scores.shape[0])


def swapped_prediction(scores: torch.Tensor, codes: torch.Tensor, temperature: float = SwAVObjective.temperature) -> torch.Tensor:
    """Step 3: `(V*B, K)` scores, `(G, B, K)` codes of the first G crops -> the mean cross-entropy
    of every crop's prediction with the code of every *other* global crop."""
    num_global, batch, num_prototypes = codes.shape
    num_crops = scores.shape[0] // batch
    log_p = F.log_softmax(scores / temperature, dim=1).view(num_crops, batch, num_prototypes)
    # sum over pairs (i, j != i) of <q_i, log p_j> = sum_i <q_i, sum_j log p_j> - sum_i <q_i, log p_i>
    every_crop = (codes * log_p.sum(dim=0)).sum()
    same_crop = (codes * log_p[:num_global]).sum()
    return (same_crop - every_crop) / (num_global * (num_crops - 1) * batch)


def _check_inputs(embeddings: torch.Tensor, prototypes: torch.Tensor, num_crops: int, num_global_crops: int) -> int:
    """Validate shapes and crop counts; return the per-process batch size B."""
    check_crops_of_objective(num_crops, num_global_crops, 2, SWAV_NEEDS)
    if embeddings.dim() != 2 or embeddings.shape[0] % num_crops:
        raise ValueError(
            f"SwAV expects crop-major (num_crops * B, D) embeddings with num_crops={num_crops}, "
            f"got shape {tuple(embeddings.shape)}"
        )
    if prototypes.dim() != 2 or prototypes.shape[1] != embeddings.shape[1]:
        raise ValueError(
            f"prototypes must be (K, D={embeddings.shape[1]}) to score the embeddings, got shape "
            f"{tuple(prototypes.shape)}; set the projector's output dimension and the prototypes' to agree"
        )
    return embeddings.shape[0] // num_crops


def swav_loss(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    num_crops: int,
    num_global_crops: int = 2,
    objective: SwAVObjective | None = None,
    queue: torch.Tensor | None = None,
    **settings: Any,
) -> torch.Tensor:
    """Functional SwAV loss of `(V*B, D)` un-normalised embeddings and `(K, D)` prototypes (used
    as given: normalise them once per step, see :meth:`SwAVLoss.normalize_prototypes_`). The
    settings are `objective` with any of its fields given by name replacing its value
    (`num_prototypes` is the prototypes' count here). `queue`: `(G, L_p, D)` normalised past
    embeddings of each global crop, this process's share, balanced with the images' codes."""
    objective = settings_of(SwAVObjective, objective, settings)
    batch = _check_inputs(embeddings, prototypes, num_crops, num_global_crops)
    dtype = compute_dtype(embeddings)
    # Scores near 1 divided by reg = 0.05 lose precision in half precision: run in float32.
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        z = F.normalize(embeddings.to(dtype), dim=1)  # step 1
        scores = z @ prototypes.to(dtype).T
        # One Sinkhorn per global crop, as in SwAV: each crop's images are spread over the prototypes.
        crops = [scores[i * batch : (i + 1) * batch] for i in range(num_global_crops)]
        queued = [None] * num_global_crops if queue is None else [past.to(dtype) @ prototypes.to(dtype).T for past in queue]
        codes = torch.stack([swav_codes(crop, objective.reg, objective.sinkhorn_iterations, past)
                             for crop, past in zip(crops, queued)])  # step 2
        return swapped_prediction(scores, codes, objective.temperature)  # step 3


class SwAVLoss(nn.Module):
    """Swapping Assignments between Views (Caron et al., NeurIPS 2020), with its prototypes.

    Args:
        num_crops: views per image `V` (global + local), rows are `V` blocks of `B` images.
        num_global_crops: the first `G` views are global; only they get codes.
        dim: dimension of the embeddings (the projector's output).
        objective: the settings (`SwAVObjective`: prototypes, reg, temperature, iterations).
        **settings: any field of `SwAVObjective` by name, replacing `objective`'s value.

    The prototypes are a bias-free linear layer (`self.prototypes`, weight `(K, D)`): optimise
    them with the network, call :meth:`normalize_prototypes_` once per step before the forward
    (SwAV's projection back onto the unit sphere, which keeps scores cosines), and leave them out
    of weight decay (the re-normalisation undoes any uniform shrinking anyway).

    `forward(embeddings)` takes `(V * B, D)` un-normalised embeddings and returns the scalar loss.

    With `queue_length > 0` the loss keeps a queue of past embeddings (buffers `queue`, `(G, L, D)`,
    and `queue_rows`, how many are filled: both in checkpoints); while `queue_enabled` (set by the
    training method from its schedule) each training forward pushes the global batch's normalised
    global-crop embeddings, and a full queue takes part in the codes' balancing.
    """

    queue: torch.Tensor
    queue_rows: torch.Tensor

    def __init__(
        self, num_crops: int, num_global_crops: int = 2, dim: int = 128, objective: SwAVObjective | None = None,
        queue_length: int = 0, **settings: Any,
    ) -> None:
        super().__init__()
        self.objective = settings_of(SwAVObjective, objective, settings)
        check_crops_of_objective(num_crops, num_global_crops, 2, SWAV_NEEDS)
        if queue_length < 0:
            raise ValueError(f"queue_length={queue_length} must be >= 0 (0: no queue)")
        self.num_crops = num_crops
        self.num_global_crops = num_global_crops
        self.prototypes = nn.Linear(dim, self.objective.num_prototypes, bias=False)
        self.normalize_prototypes_()
        self.queue_length = queue_length
        self.queue_enabled = False
        if queue_length:  # no buffers without a queue: checkpoints of queue-less runs keep their keys
            self.register_buffer("queue", torch.zeros(num_global_crops, queue_length, dim))
            self.register_buffer("queue_rows", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def normalize_prototypes_(self) -> None:
        """Project every prototype back onto the unit sphere, in place (once per training step)."""
        weight = self.prototypes.weight
        weight.copy_(F.normalize(weight, dim=1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        use_queue = self.queue_enabled and self.queue_length > 0 and int(self.queue_rows) >= self.queue_length
        loss = swav_loss(embeddings, self.prototypes.weight, num_crops=self.num_crops,
                         num_global_crops=self.num_global_crops, objective=self.objective,
                         queue=self.queue_share() if use_queue else None)
        if self.training and self.queue_enabled and self.queue_length:
            self.push_to_queue(embeddings)
        return loss

    def queue_share(self) -> torch.Tensor:
        """This process's `(G, L / W, D)` rows of the queue (each row in one process's Sinkhorn)."""
        processes = world_size()
        if self.queue_length % processes:
            raise ValueError(f"queue_length={self.queue_length} must be a multiple of the {processes} processes "
                             "(each balances an equal share of the queue)")
        share = self.queue_length // processes
        return self.queue[:, rank() * share : (rank() + 1) * share]

    @torch.no_grad()
    def push_to_queue(self, embeddings: torch.Tensor) -> None:
        """Put the normalised global-crop embeddings of every process (in process order) at the
        front of the queue; the oldest fall off its end."""
        batch = embeddings.shape[0] // self.num_crops
        newest = [gather_rows(F.normalize(embeddings[crop * batch : (crop + 1) * batch].detach().float(), dim=1))
                  for crop in range(self.num_global_crops)]
        for crop, rows in enumerate(newest):
            self.queue[crop] = torch.cat([rows.to(self.queue.dtype), self.queue[crop]])[: self.queue_length]
        self.queue_rows.fill_(min(self.queue_length, int(self.queue_rows) + newest[0].shape[0]))

    def chance_level(self) -> float:
        """The loss of uniform predictions, log(K): a loss that stays here means every image is
        scored alike by every prototype, nothing is being learned."""
        return math.log(self.prototypes.out_features)

    def extra_repr(self) -> str:
        return f"num_crops={self.num_crops}, num_global_crops={self.num_global_crops}, {self.objective}"
