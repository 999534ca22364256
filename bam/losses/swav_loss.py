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

Not implemented: SwAV's optional queue of past embeddings (for batches much smaller than the
number of prototypes); the prototypes then only see the current global batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bam.ops import compute_dtype, sinkhorn_distributed_


def swav_codes(scores: torch.Tensor, reg: float = 0.05, sinkhorn_iterations: int = 3) -> torch.Tensor:
    """Step 2 for one crop: the `(B, K)` codes of `(B, K)` image-prototype scores, no gradient.

    Each row sums to 1; with enough iterations every column sums to `B_global / K` (over every
    process's rows). Computed in float32 (float64 stays float64) and stabilised line by line, so
    `reg` down to 0.01 and half-precision scores are safe.
    """
    with torch.no_grad():
        logits = scores.detach().to(compute_dtype(scores)) / reg  # a fresh tensor, ours to overwrite
        return sinkhorn_distributed_(logits, sinkhorn_iterations)


def swapped_prediction(
    scores: torch.Tensor, codes: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """Step 3: `(V*B, K)` scores, `(G, B, K)` codes of the first G crops -> the mean cross-entropy
    of every crop's prediction with the code of every *other* global crop."""
    num_global, batch, num_prototypes = codes.shape
    num_crops = scores.shape[0] // batch
    log_p = F.log_softmax(scores / temperature, dim=1).view(num_crops, batch, num_prototypes)
    # sum over pairs (i, j != i) of <q_i, log p_j> = sum_i <q_i, sum_j log p_j> - sum_i <q_i, log p_i>
    every_crop = (codes * log_p.sum(dim=0)).sum()
    same_crop = (codes * log_p[:num_global]).sum()
    return (same_crop - every_crop) / (num_global * (num_crops - 1) * batch)


def _validate_crop_counts(num_crops: int, num_global_crops: int) -> None:
    if num_crops < 2 or not 1 <= num_global_crops <= num_crops:
        raise ValueError(
            f"SwAV needs at least 2 crops and 1 <= num_global_crops <= num_crops (another crop must "
            f"predict each global crop's code), got num_crops={num_crops}, num_global_crops={num_global_crops}"
        )


def _check_inputs(embeddings: torch.Tensor, prototypes: torch.Tensor, num_crops: int, num_global_crops: int) -> int:
    """Validate shapes and crop counts; return the per-process batch size B."""
    _validate_crop_counts(num_crops, num_global_crops)
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
    reg: float = 0.05,
    temperature: float = 0.1,
    sinkhorn_iterations: int = 3,
) -> torch.Tensor:
    """Functional SwAV loss of `(V*B, D)` un-normalised embeddings and `(K, D)` prototypes (used
    as given: normalise them once per step, see :meth:`SwAVLoss.normalize_prototypes_`)."""
    batch = _check_inputs(embeddings, prototypes, num_crops, num_global_crops)
    dtype = compute_dtype(embeddings)
    # Scores near 1 divided by reg = 0.05 lose precision in half precision: run in float32.
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        z = F.normalize(embeddings.to(dtype), dim=1)  # step 1
        scores = z @ prototypes.to(dtype).T
        # One Sinkhorn per global crop, as in SwAV: each crop's images are spread over the prototypes.
        codes = torch.stack(
            [swav_codes(scores[i * batch : (i + 1) * batch], reg, sinkhorn_iterations) for i in range(num_global_crops)]
        )  # step 2
        return swapped_prediction(scores, codes, temperature)  # step 3


class SwAVLoss(nn.Module):
    """Swapping Assignments between Views (Caron et al., NeurIPS 2020), with its prototypes.

    Args:
        num_crops: views per image `V` (global + local), rows are `V` blocks of `B` images.
        num_global_crops: the first `G` views are global; only they get codes.
        dim: dimension of the embeddings (the projector's output).
        num_prototypes: `K`, the number of learnable prototypes (3000 for ImageNet).
        reg: entropic regularisation of the codes' Sinkhorn (0.05 in the paper).
        temperature: temperature of the predictions' softmax (0.1 in the paper).
        sinkhorn_iterations: balancing iterations (3 in the paper).

    The prototypes are a bias-free linear layer (`self.prototypes`, weight `(K, D)`): optimise
    them with the network, call :meth:`normalize_prototypes_` once per step before the forward
    (SwAV's projection back onto the unit sphere, which keeps scores cosines), and leave them out
    of weight decay (the re-normalisation undoes any uniform shrinking anyway).

    `forward(embeddings)` takes `(V * B, D)` un-normalised embeddings and returns the scalar loss.
    No queue of past embeddings is kept (see the module docstring).
    """

    def __init__(
        self,
        num_crops: int,
        num_global_crops: int = 2,
        dim: int = 128,
        num_prototypes: int = 3000,
        reg: float = 0.05,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
    ) -> None:
        super().__init__()
        if reg <= 0 or temperature <= 0:
            raise ValueError(f"reg={reg} and temperature={temperature} must both be positive")
        if num_prototypes < 2:
            raise ValueError(f"num_prototypes={num_prototypes}: SwAV needs at least 2 prototypes to balance over")
        _validate_crop_counts(num_crops, num_global_crops)
        self.num_crops = num_crops
        self.num_global_crops = num_global_crops
        self.reg = reg
        self.temperature = temperature
        self.sinkhorn_iterations = sinkhorn_iterations
        self.prototypes = nn.Linear(dim, num_prototypes, bias=False)
        self.normalize_prototypes_()

    @torch.no_grad()
    def normalize_prototypes_(self) -> None:
        """Project every prototype back onto the unit sphere, in place (once per training step)."""
        weight = self.prototypes.weight
        weight.copy_(F.normalize(weight, dim=1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return swav_loss(
            embeddings,
            self.prototypes.weight,
            num_crops=self.num_crops,
            num_global_crops=self.num_global_crops,
            reg=self.reg,
            temperature=self.temperature,
            sinkhorn_iterations=self.sinkhorn_iterations,
        )

    def chance_level(self) -> float:
        """The loss of uniform predictions, log(K): a loss that stays here means every image is
        scored alike by every prototype, nothing is being learned."""
        return math.log(self.prototypes.out_features)

    def extra_repr(self) -> str:
        return (
            f"num_crops={self.num_crops}, num_global_crops={self.num_global_crops}, "
            f"num_prototypes={self.prototypes.out_features}, reg={self.reg}, "
            f"temperature={self.temperature}, sinkhorn_iterations={self.sinkhorn_iterations}"
        )
