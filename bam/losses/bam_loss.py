"""Balanced self-Attention Matching (BAM) objective: pure torch, usable in any training loop.

The derivation is in `docs/objective.md`; the comments below refer to its step numbers.
Embeddings are crop-major: rows `[crop 0: images 0..B-1 | crop 1: images 0..B-1 | ...]`, global
crops first. The settings are one `BAMObjective` (`bam.losses.bam_objective`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from bam.losses import blockwise
from bam.losses.bam_objective import BAMObjective, Layout, keeps_all, layout_of, objective_of, target_columns
from bam.ops import compute_dtype, sinkhorn_distributed_


def fill_positives_(matrix: torch.Tensor, layout: Layout, value: float) -> torch.Tensor:
    """Write `value` in place at exactly the entries :func:`positive_mask` marks (step 4), when the
    layout masks positives; returns `matrix` (the whole `(V*B, T*W*B)` matrix; one column block of
    it is `bam.losses.blockwise.fill_block_positives_`).

    The positives form a strided diagonal (crop v, target crop t, image b) of the contiguous
    `(V*B, T*W*B)` matrix, so this touches `V*T*B` entries instead of reading a full boolean mask.
    """
    if layout.masking:
        blocks = matrix.view(layout.num_crops, layout.batch, layout.num_target, layout.world, layout.batch)
        blocks[:, :, :, layout.rank].diagonal(dim1=1, dim2=3).fill_(value)
    return matrix


def balanced_target(
    similarity: torch.Tensor,
    mask: torch.Tensor | None = None,
    reg: float = BAMObjective.reg,
    sinkhorn_iterations: int = BAMObjective.sinkhorn_iterations,
    rows: int | None = None,
) -> torch.Tensor:
    """The no-gradient Sinkhorn target of step 5: rows of `exp(similarity / reg)` balanced over
    the whole (distributed) batch, each row a distribution, masked entries exactly zero. Only the
    first `rows` rows are returned (all by default); all of them take part in the balancing.

    Computed in float32 (float64 inputs stay float64) with every line stabilised by its maximum
    (see `bam.ops.sinkhorn`), so fp16/bf16 inputs and `reg` down to 0.01 are safe.
    """
    with torch.no_grad():
        logits = _target_logits(similarity, reg)
        if mask is not None:
            logits.masked_fill_(mask, -math.inf)
        return sinkhorn_distributed_(logits, sinkhorn_iterations, rows)


def _target_logits(similarity: torch.Tensor, reg: float) -> torch.Tensor:
    """A fresh `similarity / reg` in the compute dtype, free to be overwritten."""
    return similarity.detach().to(compute_dtype(similarity)) / reg


def keep_top_k(targets: torch.Tensor, k: int) -> torch.Tensor:
    """Sparsify `(G, B, N)` targets: keep, per image, the `k` columns largest in the average over
    the G targets, zero the rest in every target, renormalise rows (step 5b). `k <= 0` or
    `k >= N` keeps all (`bam.losses.bam_objective.keeps_all`).
    """
    return targets if keeps_all(k, targets.shape[-1]) else keep_top_k_(targets.clone(), k)


def keep_top_k_(targets: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`keep_top_k` in place (for targets the caller owns)."""
    if keeps_all(k, targets.shape[-1]):
        return targets
    # Only the set of kept columns matters, so skip sorting it (about twice as fast on CPU).
    top = targets.sum(dim=0).topk(k, dim=-1, sorted=False).indices  # the sum ranks as the mean
    keep = torch.zeros_like(targets[0]).scatter_(-1, top, 1.0)
    targets.mul_(keep)
    return targets.div_(targets.sum(dim=-1, keepdim=True).clamp_min_(torch.finfo(targets.dtype).tiny))


def bam_loss(
    student: torch.Tensor,
    teacher: torch.Tensor | None = None,
    *,
    num_crops: int,
    num_global_crops: int = 2,
    objective: BAMObjective | None = None,
    **settings: Any,
) -> torch.Tensor:
    """Functional BAM loss; see :class:`BAMLoss`. The settings are `objective` (default:
    `BAMObjective()`), with any of its fields given by name (`reg=0.03`) replacing its value; a
    positive `column_block_size` computes it in column blocks (`bam.losses.blockwise`)."""
    objective = objective_of(objective, settings)
    layout = layout_of(student, teacher, num_crops, num_global_crops, objective)
    if objective.column_block_size > 0:
        return blockwise.blockwise_bam_loss(student, teacher, layout=layout, objective=objective)
    # Similarities near 1 lose precision in half precision: the objective runs in float32 (or in
    # float64 when given float64). The teacher is detached: it never receives gradient (step 1).
    dtype = compute_dtype(student)
    with torch.autocast(device_type=student.device.type, enabled=False):
        z = F.normalize(student.to(dtype), dim=1)  # step 1
        z_target = F.normalize(teacher.detach().to(dtype), dim=1) if teacher is not None else None
        keys = target_columns(z if z_target is None else z_target, layout)  # step 2
        similarity = z @ keys.T  # step 3
        with torch.no_grad():  # step 5, over every row or the global crops' rows only
            balanced = layout.balanced(objective.balance_local_rows)
            if z_target is None:
                logits = _target_logits(similarity[: balanced.rows], objective.reg)
            else:  # a teacher's similarities are needed for nothing else: overwrite them
                logits = (z_target @ keys.T).div_(objective.reg)
            logits = fill_positives_(logits, balanced, -math.inf)  # step 4
            target = sinkhorn_distributed_(logits, objective.sinkhorn_iterations, rows=layout.target_rows)
            target = keep_top_k_(target.view(layout.num_global, layout.batch, -1), objective.top_k)
        return _SourceCrossEntropy.apply(similarity, target, objective.temperature, layout)  # steps 6 and 7


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
        ctx, similarity: torch.Tensor, target: torch.Tensor, temperature: float, layout: Layout
    ) -> torch.Tensor:
        num_global, batch, columns = target.shape
        num_crops = similarity.shape[0] // batch
        # Masked logits are set far below any other (cosine similarities lie in [-1, 1]): their
        # softmax weight is exactly 0 in float32 and float64, as if removed, yet they stay finite,
        # so the zero target there contributes exactly 0 (never 0 * -inf) and gets no gradient.
        logits = fill_positives_(similarity * (1.0 / temperature), layout, -1.0 / temperature - 1000.0)
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
        objective: the settings (`BAMObjective`: reg, temperature, top-k, ...; default: its defaults).
        **settings: any field of `BAMObjective` by name, replacing `objective`'s value.

    `forward(student, teacher=None)` takes `(V * B, D)` un-normalised embeddings (the teacher's,
    when given, of the same crops) and returns the scalar loss. Under `torch.distributed`, target
    columns are gathered from every process (with gradient when there is no teacher) and the
    Sinkhorn column sums are all-reduced; after DDP's gradient averaging, training equals
    single-process training on the global batch. `reg` may be changed between steps (schedules).
    """

    def __init__(
        self, num_crops: int, num_global_crops: int = 2, objective: BAMObjective | None = None, **settings: Any
    ) -> None:
        super().__init__()
        self.objective = objective_of(objective, settings)
        self.num_target_crops = self.objective.target_crops(num_crops, num_global_crops)
        self.num_crops = num_crops
        self.num_global_crops = num_global_crops

    @property
    def reg(self) -> float:
        return self.objective.reg

    @reg.setter
    def reg(self, value: float) -> None:
        self.objective = dataclasses.replace(self.objective, reg=value)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor | None = None) -> torch.Tensor:
        return bam_loss(student, teacher, num_crops=self.num_crops, num_global_crops=self.num_global_crops,
                        objective=self.objective)

    def chance_level(self, global_batch_size: int) -> float:
        """The loss of a uniform source, log(number of candidate columns): a loss that stays here
        means nothing is being learned."""
        columns = self.num_target_crops * global_batch_size
        return math.log(columns - self.num_target_crops if self.objective.positive_masking else columns)

    def extra_repr(self) -> str:
        return f"num_crops={self.num_crops}, num_global_crops={self.num_global_crops}, {self.objective}"
