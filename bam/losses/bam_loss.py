"""Balanced self-Attention Matching (BAM) objective: pure torch, usable in any training loop.

The exact specification lives in `docs/bam-objective.md` of the project's shared folder; the
comments below refer to its step numbers. Embeddings are crop-major: rows
`[crop 0: images 0..B-1 | crop 1: images 0..B-1 | ...]`, global crops first.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bam import distributed
from bam.losses.sinkhorn import sinkhorn_log


def positive_mask(
    num_crops: int,
    batch_size: int,
    num_target_crops: int,
    world_size: int = 1,
    rank: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Boolean `(num_crops * B, num_target_crops * B * W)` mask of each row's own image.

    Row (crop v, image b) on process `rank` masks column `t*B*W + rank*B + b` for every target
    crop t: the other views of the same image are positives, not candidates to attend to.
    """
    row_image = torch.arange(num_crops * batch_size, device=device) % batch_size + rank * batch_size
    column_image = torch.arange(num_target_crops * batch_size * world_size, device=device) % (
        batch_size * world_size
    )
    return row_image.unsqueeze(1) == column_image.unsqueeze(0)


def balanced_target(
    similarity: torch.Tensor,
    mask: torch.Tensor | None = None,
    reg: float = 0.05,
    sinkhorn_iterations: int = 3,
) -> torch.Tensor:
    """The no-gradient Sinkhorn target of step 5: rows of `exp(similarity / reg)` balanced over
    the whole (distributed) batch, each row a distribution, masked entries exactly zero.

    Computed in float32 in the log domain, so fp16/bf16 inputs and `reg` down to 0.01 are safe.
    """
    with torch.no_grad():
        logits = similarity.detach().float() / reg
        if mask is not None:
            logits = logits.masked_fill(mask, -math.inf)
        return sinkhorn_log(logits, sinkhorn_iterations)


def keep_top_k(targets: torch.Tensor, k: int) -> torch.Tensor:
    """Sparsify `(G, B, N)` targets: keep, per image, the `k` columns largest in the average over
    the G targets, zero the rest in every target, renormalise rows. `k <= 0` or `k >= N` keeps all.
    """
    if k <= 0 or k >= targets.shape[-1]:
        return targets
    top = targets.mean(dim=0).topk(k, dim=-1).indices
    keep = torch.zeros_like(targets[0], dtype=torch.bool).scatter_(-1, top, True)
    sparse = targets * keep
    return sparse / sparse.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(sparse.dtype).tiny)


def _check_inputs(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    num_crops: int,
    positive_masking: bool,
    world_size: int,
) -> int:
    """Validate shapes and return the per-process batch size B."""
    if student.dim() != 2:
        raise ValueError(f"BAM expects (num_crops * B, D) embeddings, got shape {tuple(student.shape)}")
    if student.shape[0] % num_crops:
        raise ValueError(
            f"{student.shape[0]} embedding rows are not divisible by num_crops={num_crops}; "
            "rows must be crop-major, num_crops blocks of B images each"
        )
    if teacher is not None and teacher.shape != student.shape:
        raise ValueError(
            f"teacher embeddings have shape {tuple(teacher.shape)} but student embeddings have "
            f"{tuple(student.shape)}; the teacher must embed the same crops"
        )
    batch = student.shape[0] // num_crops
    if positive_masking and batch * world_size < 2:
        raise ValueError(
            f"positive masking needs at least 2 images in the global batch, got {batch} per process "
            f"x {world_size} processes; increase the batch size or set positive_masking=False"
        )
    return batch


def bam_loss(
    student: torch.Tensor,
    teacher: torch.Tensor | None = None,
    *,
    num_crops: int,
    num_global_crops: int = 2,
    num_target_crops: int | None = None,
    reg: float = 0.05,
    temperature: float = 0.1,
    sinkhorn_iterations: int = 3,
    top_k: int = 0,
    positive_masking: bool = True,
) -> torch.Tensor:
    """Functional BAM loss; see :class:`BAMLoss` for the arguments."""
    num_target_crops = _validate_crop_counts(num_crops, num_global_crops, num_target_crops)
    world, rank = distributed.world_size(), distributed.rank()
    batch = _check_inputs(student, teacher, num_crops, positive_masking, world)
    # Similarities near 1 lose precision in half precision: the objective runs in float32.
    with torch.autocast(device_type=student.device.type, enabled=False):
        z = F.normalize(student.float(), dim=1)  # step 1
        z_target = F.normalize(teacher.float(), dim=1) if teacher is not None else None
        keys = _target_columns(z if z_target is None else z_target, num_target_crops, batch)
        similarity = z @ keys.T  # step 3
        target_similarity = similarity if z_target is None else z_target @ keys.T
        mask = None
        if positive_masking:
            mask = positive_mask(num_crops, batch, num_target_crops, world, rank, student.device)
        target = balanced_target(target_similarity, mask, reg, sinkhorn_iterations)  # step 5
        target = keep_top_k(target[: num_global_crops * batch].view(num_global_crops, batch, -1), top_k)
        log_source = _log_source(similarity, mask, temperature).view(num_crops, batch, -1)  # step 6
        return _cross_view_entropy(target, log_source)  # step 7


def _validate_crop_counts(num_crops: int, num_global_crops: int, num_target_crops: int | None) -> int:
    if not 1 <= num_global_crops <= num_crops:
        raise ValueError(f"num_global_crops={num_global_crops} must be between 1 and num_crops={num_crops}")
    num_target_crops = num_global_crops if num_target_crops is None else num_target_crops
    if not 1 <= num_target_crops <= num_global_crops:
        raise ValueError(
            f"num_target_crops={num_target_crops} must be between 1 and num_global_crops={num_global_crops}"
        )
    return num_target_crops


def _target_columns(embeddings: torch.Tensor, num_target_crops: int, batch: int) -> torch.Tensor:
    """Step 2: the first T crops of every process, ordered crop-major, then rank, then image.

    Without a teacher the gather carries gradient back to every process's own rows.
    """
    local = embeddings[: num_target_crops * batch]
    gathered = distributed.gather_with_grad(local) if local.requires_grad else distributed.gather(local)
    world, dim = gathered.shape[0], gathered.shape[-1]
    return gathered.view(world, num_target_crops, batch, dim).transpose(0, 1).reshape(-1, dim)


def _log_source(similarity: torch.Tensor, mask: torch.Tensor | None, temperature: float) -> torch.Tensor:
    logits = similarity / temperature
    if mask is None:
        return logits.log_softmax(dim=1)
    # Masked entries are -inf inside the softmax and exactly 0 afterwards, so that the zero target
    # there multiplies a finite number (never 0 * -inf) and they receive no gradient.
    return logits.masked_fill(mask, -math.inf).log_softmax(dim=1).masked_fill(mask, 0.0)


def _cross_view_entropy(target: torch.Tensor, log_source: torch.Tensor) -> torch.Tensor:
    """Step 7 without a loop over view pairs.

    sum_{t<G} sum_{v != t} <P_t, log q_v> = <sum_t P_t, sum_v log q_v> - sum_t <P_t, log q_t>,
    which costs two `(B, N)` products whatever the number of pairs.
    """
    num_global, batch = target.shape[0], target.shape[1]
    num_crops = log_source.shape[0]
    same_view = (target * log_source[:num_global]).sum()
    if num_crops == 1:
        return -same_view / batch
    all_pairs = (target.sum(dim=0) * log_source.sum(dim=0)).sum()
    return -(all_pairs - same_view) / (batch * num_global * (num_crops - 1))


class BAMLoss(nn.Module):
    """Balanced self-Attention Matching loss (Shalam & Korman, ECCV 2024).

    Each view's softmax attention over the target views of the global batch (the source) is
    trained to match a Sinkhorn-balanced version of that attention (the target, no gradient).

    Args:
        num_crops: views per image `V` (global + local), rows are `V` blocks of `B` images.
        num_global_crops: the first `G` views are global; only they provide targets.
        num_target_crops: views used as attention columns `T` (default `G`, at most `G`).
        reg: entropic regularisation of the target; may be changed between steps (schedules).
        temperature: temperature of the source softmax.
        sinkhorn_iterations: balancing iterations.
        top_k: keep only each image's `k` strongest target columns (0 keeps all).
        positive_masking: exclude the other views of the same image from both sides.

    `forward(student, teacher=None)` takes `(V * B, D)` un-normalised embeddings (the teacher's,
    when given, of the same crops) and returns the scalar loss. Under `torch.distributed`, target
    columns are gathered from every process (with gradient when there is no teacher) and the
    Sinkhorn column sums are all-reduced; after DDP's gradient averaging, training equals
    single-process training on the global batch.
    """

    def __init__(
        self,
        num_crops: int,
        num_global_crops: int = 2,
        num_target_crops: int | None = None,
        reg: float = 0.05,
        temperature: float = 0.1,
        sinkhorn_iterations: int = 3,
        top_k: int = 0,
        positive_masking: bool = True,
    ) -> None:
        super().__init__()
        self.num_target_crops = _validate_crop_counts(num_crops, num_global_crops, num_target_crops)
        if reg <= 0 or temperature <= 0:
            raise ValueError(f"reg={reg} and temperature={temperature} must both be positive")
        self.num_crops = num_crops
        self.num_global_crops = num_global_crops
        self.reg = reg
        self.temperature = temperature
        self.sinkhorn_iterations = sinkhorn_iterations
        self.top_k = top_k
        self.positive_masking = positive_masking

    def forward(self, student: torch.Tensor, teacher: torch.Tensor | None = None) -> torch.Tensor:
        return bam_loss(
            student,
            teacher,
            num_crops=self.num_crops,
            num_global_crops=self.num_global_crops,
            num_target_crops=self.num_target_crops,
            reg=self.reg,
            temperature=self.temperature,
            sinkhorn_iterations=self.sinkhorn_iterations,
            top_k=self.top_k,
            positive_masking=self.positive_masking,
        )

    def chance_level(self, global_batch_size: int) -> float:
        """The loss of a uniform source, log(number of candidate columns): a loss that stays here
        means nothing is being learned."""
        columns = self.num_target_crops * global_batch_size
        return math.log(columns - self.num_target_crops if self.positive_masking else columns)

    def extra_repr(self) -> str:
        return (
            f"num_crops={self.num_crops}, num_global_crops={self.num_global_crops}, "
            f"num_target_crops={self.num_target_crops}, reg={self.reg}, temperature={self.temperature}, "
            f"sinkhorn_iterations={self.sinkhorn_iterations}, top_k={self.top_k}, "
            f"positive_masking={self.positive_masking}"
        )
