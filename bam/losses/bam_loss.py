"""Balanced self-Attention Matching (BAM) objective: pure torch, usable in any training loop.

The exact specification lives in `docs/bam-objective.md` of the project's shared folder; the
comments below refer to its step numbers. Embeddings are crop-major: rows
`[crop 0: images 0..B-1 | crop 1: images 0..B-1 | ...]`, global crops first.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from bam import distributed
from bam.losses.sinkhorn import sinkhorn_


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


def fill_positives_(
    matrix: torch.Tensor,
    value: float,
    num_crops: int,
    batch_size: int,
    num_target_crops: int,
    world_size: int = 1,
    rank: int = 0,
) -> torch.Tensor:
    """Write `value` in place at exactly the entries :func:`positive_mask` marks; returns `matrix`.

    The positives form a strided diagonal (crop v, target crop t, image b) of the contiguous
    `(V*B, T*W*B)` matrix, so this touches `V*T*B` entries instead of reading a full boolean mask.
    """
    blocks = matrix.view(num_crops, batch_size, num_target_crops, world_size, batch_size)
    blocks[:, :, :, rank].diagonal(dim1=1, dim2=3).fill_(value)
    return matrix


def balanced_target(
    similarity: torch.Tensor,
    mask: torch.Tensor | None = None,
    reg: float = 0.05,
    sinkhorn_iterations: int = 3,
    rows: int | None = None,
) -> torch.Tensor:
    """The no-gradient Sinkhorn target of step 5: rows of `exp(similarity / reg)` balanced over
    the whole (distributed) batch, each row a distribution, masked entries exactly zero. Only the
    first `rows` rows are returned (all by default); all of them take part in the balancing.

    Computed in float32 (float64 inputs stay float64) with every line stabilised by its maximum
    (see `bam.losses.sinkhorn`), so fp16/bf16 inputs and `reg` down to 0.01 are safe.
    """
    with torch.no_grad():
        logits = _target_logits(similarity, reg)
        if mask is not None:
            logits.masked_fill_(mask, -math.inf)
        return sinkhorn_(logits, sinkhorn_iterations, rows)


def _target_logits(similarity: torch.Tensor, reg: float) -> torch.Tensor:
    """A fresh `similarity / reg` in the compute dtype, free to be overwritten."""
    return similarity.detach().to(compute_dtype(similarity)) / reg


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (exact gradient checks); anything else is computed in float32, since
    similarities near 1 lose precision and `exp` overflows in half precision."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def keep_top_k(targets: torch.Tensor, k: int) -> torch.Tensor:
    """Sparsify `(G, B, N)` targets: keep, per image, the `k` columns largest in the average over
    the G targets, zero the rest in every target, renormalise rows. `k <= 0` or `k >= N` keeps all.
    """
    if k <= 0 or k >= targets.shape[-1]:
        return targets
    return keep_top_k_(targets.clone(), k)


def keep_top_k_(targets: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`keep_top_k` in place (for targets the caller owns)."""
    if k <= 0 or k >= targets.shape[-1]:
        return targets
    # Only the set of kept columns matters, so skip sorting it (about twice as fast on CPU).
    top = targets.sum(dim=0).topk(k, dim=-1, sorted=False).indices  # the sum ranks as the mean
    keep = torch.zeros_like(targets[0]).scatter_(-1, top, 1.0)
    targets.mul_(keep)
    return targets.div_(targets.sum(dim=-1, keepdim=True).clamp_min_(torch.finfo(targets.dtype).tiny))


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
    # Similarities near 1 lose precision in half precision: the objective runs in float32 (or in
    # float64 when given float64). The teacher is detached: it never receives gradient (step 1).
    dtype = compute_dtype(student)
    with torch.autocast(device_type=student.device.type, enabled=False):
        z = F.normalize(student.to(dtype), dim=1)  # step 1
        z_target = F.normalize(teacher.detach().to(dtype), dim=1) if teacher is not None else None
        keys = _target_columns(z if z_target is None else z_target, num_target_crops, batch)
        similarity = z @ keys.T  # step 3
        target_similarity = similarity if z_target is None else z_target @ keys.T

        def mask_(matrix: torch.Tensor, value: float) -> torch.Tensor:  # step 4
            if not positive_masking:
                return matrix
            return fill_positives_(matrix, value, num_crops, batch, num_target_crops, world, rank)

        with torch.no_grad():  # step 5
            # A teacher's similarities are needed for nothing else: overwrite them.
            if z_target is None:
                logits = _target_logits(target_similarity, reg)
            else:
                logits = target_similarity.div_(reg)
            target = sinkhorn_(mask_(logits, -math.inf), sinkhorn_iterations, rows=num_global_crops * batch)
            target = keep_top_k_(target.view(num_global_crops, batch, -1), top_k)
        return _SourceCrossEntropy.apply(similarity, target, temperature, mask_)  # steps 6 and 7


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


class _SourceCrossEntropy(torch.autograd.Function):
    """Steps 6 and 7 with a hand-written backward: the masked log-softmax source over the columns
    and its cross-entropy with every other view's target, from `(V*B, N)` similarities and fixed
    `(G, B, N)` targets.

    Why not plain autograd: dividing, masking in place, `log_softmax` and a weighted sum traverse
    the `(V*B, N)` matrix about a dozen times in forward+backward and allocate about seven fresh
    ones; this traverses it about eight times and allocates two, which matters once the matmul is
    cheap (small D; see tests/benchmarks/bench_loss.py). Double backward is unsupported.

    The loss, with log q = l - lse(l) and per-view weights W_v = sum_t P_t - [v < G] P_v
    (W_0 = P_0 when V = 1), is  -1/C * sum_v <W_v, log q_v>  where C = B * (number of pairs),
    and its gradient w.r.t. the logits is  1/C * (rowsum(W) * softmax(l) - W).
    """

    @staticmethod
    def forward(
        ctx, similarity: torch.Tensor, target: torch.Tensor, temperature: float, mask_: Callable
    ) -> torch.Tensor:
        num_global, batch, columns = target.shape
        num_crops = similarity.shape[0] // batch
        # Masked logits are set far below any other (cosine similarities lie in [-1, 1]): their
        # softmax weight is exactly 0 in float32 and float64, as if removed, yet they stay finite,
        # so the zero target there contributes exactly 0 (never 0 * -inf) and gets no gradient.
        logits = mask_(similarity * (1.0 / temperature), -1.0 / temperature - 1000.0)
        targets = target.view(num_global * batch, columns)
        mass = targets.sum(dim=1)  # each target row's total, 1 up to rounding
        # sum_v <W_v, x_v> = <sum_t P_t, sum_v x_v> - sum_t <P_t, x_t>, for x = l (now) and lse.
        if num_crops == 1:
            row_weight = mass
            weighted = torch.dot(targets.view(-1), logits.view(-1))
        else:
            total, total_mass = target.sum(dim=0), mass.view(num_global, batch).sum(dim=0)
            row_weight = total_mass.repeat(num_crops)
            row_weight[: num_global * batch] -= mass
            weighted = torch.dot(total.view(-1), logits.view(num_crops, -1).sum(dim=0))
            weighted = weighted - torch.dot(targets.view(-1), logits[: num_global * batch].view(-1))
        row_max = logits.amax(dim=1, keepdim=True)
        exp = logits.sub_(row_max).exp_()  # the unnormalised softmax, kept for backward
        sum_exp = exp.sum(dim=1)
        weighted = weighted - torch.dot(row_weight, row_max.squeeze(1) + sum_exp.log())
        count = batch * (num_global * (num_crops - 1) if num_crops > 1 else 1)
        ctx.save_for_backward(exp, row_weight / sum_exp, target)
        ctx.scale = 1.0 / (count * temperature)
        return weighted / -count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        exp, row_factor, target = ctx.saved_tensors
        num_global, batch, columns = target.shape
        num_crops = exp.shape[0] // batch
        scale = grad_loss * ctx.scale
        grad = exp * (row_factor * scale).unsqueeze(1)  # rowsum(W) * softmax; 0 where masked
        targets = target.view(num_global * batch, columns) * scale
        if num_crops == 1:
            return grad.sub_(targets), None, None, None
        grad.view(num_crops, batch, columns).sub_(targets.view(num_global, batch, columns).sum(dim=0))
        grad[: num_global * batch].add_(targets)
        return grad, None, None, None


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
        column_block_size: if > 0, compute in blocks of this many target columns (same result;
            memory O(V*B*block) instead of O(V*B*N) per process, about 4x the matmul time; for
            hundreds of processes, see `bam.losses.blockwise`).

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
        column_block_size: int = 0,
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
        self.column_block_size = column_block_size

    def forward(self, student: torch.Tensor, teacher: torch.Tensor | None = None) -> torch.Tensor:
        options = dict(
            num_crops=self.num_crops,
            num_global_crops=self.num_global_crops,
            num_target_crops=self.num_target_crops,
            reg=self.reg,
            temperature=self.temperature,
            sinkhorn_iterations=self.sinkhorn_iterations,
            top_k=self.top_k,
            positive_masking=self.positive_masking,
        )
        if self.column_block_size > 0:
            # imported here: the blockwise module builds on this one
            from bam.losses.blockwise import bam_loss_blockwise

            return bam_loss_blockwise(student, teacher, column_block_size=self.column_block_size, **options)
        return bam_loss(student, teacher, **options)

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
            f"positive_masking={self.positive_masking}, column_block_size={self.column_block_size}"
        )
