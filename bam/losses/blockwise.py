"""The BAM objective in column blocks: the same loss and gradients as `bam_loss`, without ever
holding a `(V*B, N)` matrix (`N = T*B*W` target columns over `W` processes).

Why: every process of `bam_loss` holds several `(V*B, N)` matrices (similarities, Sinkhorn kernel,
source log-probabilities and their gradients), so its memory grows linearly with the number of
processes: at B=256, V=8, T=2 one such matrix is 64 MiB at W=16 but 4 GiB at W=1024. Here the
columns are visited in blocks of `column_block_size` and each block's similarities are recomputed
(one `(V*B, D) x (D, C)` product) whenever they are needed, so the objective keeps only
block-sized matrices and vectors of length `V*B` or `N`:

- Sinkhorn (no gradient): the column maxima, row maxima, column sums and row sums of the
  balancing are block-wise reductions; the scalings `u`, `v` are vectors (the plan is
  `diag(u) K diag(v)`): this is `bam.ops.sinkhorn_blocked`, with the same all-reduces as `bam_loss`.
- Top-k: a running top-k over the blocks keeps each image's `k` best columns and their values.
- Source: the log-sum-exp of each row is streamed over the blocks; the cross-view entropy needs
  only `<target, logits>` per row and the row's log-sum-exp, both accumulated block by block.
- Backward: a custom autograd function recomputes each block's logits and softmax from the saved
  log-sum-exp, and sends the block's gradient to the embeddings and to the target columns.

The price is time: every pass over the blocks recomputes the similarity product (2 per Sinkhorn
iteration, 2 for the maxima, 1 for top-k, 1 forward and 2 backward), about 4 times the product
work of the unblocked form with 3 iterations (see `tests/benchmarks/bench_scale.py`), which is why
the unblocked form stays the default. The gathered `(N, D)` target embeddings are still held.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bam.losses.bam_objective import BAMObjective, Layout, keeps_all, positive_mask, target_columns
from bam.ops import BlockedPlan, compute_dtype, distributed, sinkhorn_blocked
from bam.ops.sinkhorn import Block


def blocks_of(layout: Layout, size: int) -> list[Block]:
    """`[start, stop)` ranges of at most `size` target columns covering all of them."""
    return [(start, min(start + size, layout.columns)) for start in range(0, layout.columns, size)]


def fill_block_positives_(matrix: torch.Tensor, layout: Layout, block: Block, value: float) -> torch.Tensor:
    """Write `value` where a row meets a column of its own image (step 4), in the column `block`
    (the whole-matrix form is `bam.losses.bam_loss.fill_positives_`)."""
    if layout.masking:
        mask = positive_mask(layout.num_crops, layout.batch, layout.num_target, layout.world, layout.rank,
                             matrix.device, columns=block)
        matrix.masked_fill_(mask[: matrix.shape[0]], value)
    return matrix


class _TargetLogits:
    """Blocks of the target's masked log-kernel `S'/reg` (no gradient), recomputed on demand."""

    def __init__(self, queries: torch.Tensor, keys: torch.Tensor, reg: float, layout: Layout) -> None:
        self.queries, self.keys, self.reg, self.layout = queries.detach(), keys.detach(), reg, layout

    def block(self, block: Block, rows: int | None = None, similarity: torch.Tensor | None = None) -> torch.Tensor:
        """`(rows, C)` log-kernel of `block` for the first `rows` rows; `similarity` may bring
        the block's raw similarities when the caller has them already (no teacher)."""
        rows = self.layout.rows if rows is None else rows
        if similarity is None:
            logits = (self.queries[:rows] @ self.keys[block[0] : block[1]].T).div_(self.reg)
        else:
            logits = similarity.detach() / self.reg
        return fill_block_positives_(logits, self.layout, block, -math.inf)


class _Targets:
    """The global crops' targets `P_0..P_{G-1}` of each block, `(G, B, C)`: straight from the
    plan, or, with top-k, from the kept columns (indices and renormalised values per image)."""

    def __init__(self, logits: _TargetLogits, plan: BlockedPlan, top_k: int, blocks: list[Block]) -> None:
        self.logits, self.plan, self.layout = logits, plan, logits.layout
        self.rows = self.layout.target_rows
        self.sparse = None if keeps_all(top_k, self.layout.columns) else _top_k(self, top_k, blocks)

    def dense(self, block: Block, similarity: torch.Tensor | None = None) -> torch.Tensor:
        plan = self.plan.plan_(self.logits.block(block, self.rows, similarity), block)
        return plan.view(self.layout.num_global, self.layout.batch, -1)

    def block(self, block: Block, similarity: torch.Tensor | None = None) -> torch.Tensor:
        if self.sparse is None:
            return self.dense(block, similarity)
        indices, values = self.sparse
        inside = (indices >= block[0]) & (indices < block[1])
        position = (indices - block[0]).clamp(0, block[1] - block[0] - 1).expand_as(values)
        targets = values.new_zeros(*values.shape[:2], block[1] - block[0])
        # scatter_add: entries outside the block add 0 wherever their clamped position falls.
        return targets.scatter_add_(-1, position, values * inside)


@torch.no_grad()
def _top_k(targets: _Targets, k: int, blocks: list[Block]) -> tuple[torch.Tensor, torch.Tensor]:
    """`bam.losses.bam_loss.keep_top_k` with a running top-k over the blocks: each image's `k`
    columns largest in the average over the G targets, `(1, B, k)` indices and the renormalised
    `(G, B, k)` values of every target there."""
    best_scores = best_indices = best_values = None
    for block in blocks:
        values = targets.dense(block)
        indices = torch.arange(*block, device=values.device).expand(values.shape[1], -1)
        scores = values.mean(dim=0)
        if best_scores is not None:
            scores = torch.cat([best_scores, scores], dim=-1)
            indices = torch.cat([best_indices, indices], dim=-1)
            values = torch.cat([best_values, values], dim=-1)
        best_scores, top = scores.topk(min(k, scores.shape[-1]), dim=-1, sorted=False)
        best_indices = indices.gather(-1, top)
        best_values = values.gather(-1, top.expand(values.shape[0], -1, -1))
    norm = best_values.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(best_values.dtype).tiny)
    return best_indices.unsqueeze(0), best_values / norm


class _CrossViewEntropy(torch.autograd.Function):
    """Step 6 + 7 from `(V*B, D)` queries and `(N, D)` target columns, in column blocks.

    With `W_r` the weight row of source row `r = (v, b)` (the sum of the image's global targets,
    minus its own view's target: `sum_{t != v} P_t[b]`) and `m_r` its mass,
    `L = -c * sum_r (<W_r, s_r> - m_r * lse_r)` with `s = S / tau` and `c = 1 / (B G (V-1))`,
    and `dL/ds_r = -c * (W_r - m_r * softmax(s_r))`.
    """

    @staticmethod
    def forward(ctx: Any, queries: torch.Tensor, keys: torch.Tensor, targets: _Targets, temperature: float,
                blocks: list[Block], shared_similarity: bool) -> torch.Tensor:
        layout = targets.layout
        lse = torch.full((layout.rows,), -math.inf, dtype=queries.dtype, device=queries.device)
        weighted = queries.new_zeros(())
        target_mass = queries.new_zeros(layout.num_global, layout.batch)
        for block in blocks:
            similarity = queries @ keys[block[0] : block[1]].T
            logits = _source_logits(similarity, layout, block, temperature)
            lse = torch.logaddexp(lse, logits.logsumexp(dim=1))
            target = targets.block(block, similarity[: targets.rows] if shared_similarity else None)
            weighted += _weighted_sum(target, logits.view(layout.num_crops, layout.batch, -1))
            target_mass += target.sum(dim=-1)
        mass = _row_mass(target_mass, layout.num_crops)
        ctx.save_for_backward(queries, keys, lse, mass)
        ctx.targets, ctx.temperature, ctx.blocks, ctx.shared_similarity = targets, temperature, blocks, shared_similarity
        return -(weighted - (mass * lse).sum()) * _scale(layout)

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        queries = ctx.saved_tensors[0]
        # Like the forward, in the inputs' precision even when backward() runs under autocast.
        with torch.autocast(device_type=queries.device.type, enabled=False):
            return _CrossViewEntropy._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        queries, keys, lse, mass = ctx.saved_tensors
        targets, temperature = ctx.targets, ctx.temperature
        layout = targets.layout
        coefficient = grad_loss * _scale(layout) / temperature  # ds/dS = 1 / tau
        grad_queries = torch.zeros_like(queries) if ctx.needs_input_grad[0] else None
        grad_keys = torch.zeros_like(keys) if ctx.needs_input_grad[1] else None
        for block in ctx.blocks:
            key_block = keys[block[0] : block[1]]
            similarity = queries @ key_block.T
            logits = _source_logits(similarity, layout, block, temperature)
            target = targets.block(block, similarity[: targets.rows] if ctx.shared_similarity else None)
            # dL/dS = c / tau * (m_r * softmax - W_r); masked entries have W = 0 and softmax = 0.
            grad = logits.sub_(lse[:, None]).exp_().mul_(mass[:, None])
            _subtract_weights_(grad.view(layout.num_crops, layout.batch, -1), target)
            grad.mul_(coefficient)
            if grad_queries is not None:
                grad_queries.addmm_(grad, key_block)
            if grad_keys is not None:
                grad_keys[block[0] : block[1]].addmm_(grad.T, queries)
        return grad_queries, grad_keys, None, None, None, None


def _gather_target_columns(embeddings: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Step 2. Without gradient (teacher), each target crop is gathered straight into its place in
    the `(N, D)` column matrix: one `N x D` buffer instead of the stacked gather plus its reordered
    copy, which matters once `N x D` is the largest tensor (many processes, wide projector)."""
    num_target, batch = layout.num_target, layout.batch
    local = embeddings[: num_target * batch]
    if local.requires_grad or not distributed.is_distributed():
        return target_columns(embeddings, layout)
    span = layout.world * batch  # columns of one target crop
    columns = local.new_empty(num_target * span, local.shape[1])
    gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the newer name
    for crop in range(num_target):
        gather_into(columns[crop * span : (crop + 1) * span], local[crop * batch : (crop + 1) * batch].contiguous())
    return columns


def _source_logits(similarity: torch.Tensor, layout: Layout, block: Block, temperature: float) -> torch.Tensor:
    # As in bam_loss: masked logits far below any other (weight exactly 0, yet finite).
    return fill_block_positives_(similarity / temperature, layout, block, -1.0 / temperature - 1000.0)


def _scale(layout: Layout) -> float:
    return 1.0 / (layout.batch * layout.num_global * max(layout.num_crops - 1, 1))


def _cross(num_crops: int) -> float:
    """1 when a view's own target is excluded from its weights (V > 1), 0 when V = 1 (kept)."""
    return 1.0 if num_crops > 1 else 0.0


def _weighted_sum(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """sum_r <W_r, s_r> for one block: `target` `(G, B, C)`, `logits` `(V, B, C)`."""
    num_global = target.shape[0]
    all_pairs = (target.sum(dim=0) * logits.sum(dim=0)).sum()
    return all_pairs - _cross(logits.shape[0]) * (target * logits[:num_global]).sum()


def _subtract_weights_(grad: torch.Tensor, target: torch.Tensor) -> None:
    """grad[v, b] -= W_(v, b) in place, for `(V, B, C)` grad and `(G, B, C)` targets."""
    grad.sub_(target.sum(dim=0))
    if grad.shape[0] > 1:
        grad[: target.shape[0]].add_(target)


def _row_mass(target_mass: torch.Tensor, num_crops: int) -> torch.Tensor:
    """m_r = sum_j W_rj for every row, crop-major, from the `(G, B)` row sums of the targets."""
    total = target_mass.sum(dim=0)
    mass = total.expand(num_crops, -1).clone()
    mass[: target_mass.shape[0]] -= _cross(num_crops) * target_mass
    return mass.reshape(-1)


def blockwise_bam_loss(student: torch.Tensor, teacher: torch.Tensor | None, layout: Layout,
                       objective: BAMObjective) -> torch.Tensor:
    """`bam.losses.bam_loss` over `objective.column_block_size` target columns at a time, for
    inputs `bam_loss` has checked (it calls this when `column_block_size > 0`).

    Same value and gradients (up to floating-point summation order), same collectives under
    `torch.distributed`; peak memory is O(V*B*column_block_size) instead of O(V*B*N) on top of the
    embeddings and the gathered target columns.
    """
    blocks = blocks_of(layout, objective.column_block_size)
    dtype = compute_dtype(student)
    with torch.autocast(device_type=student.device.type, enabled=False):
        z = F.normalize(student.to(dtype), dim=1)
        z_target = z if teacher is None else F.normalize(teacher.detach().to(dtype), dim=1)
        keys = _gather_target_columns(z_target, layout)
        logits = _TargetLogits(z_target, keys, objective.reg, layout)
        plan = sinkhorn_blocked(logits.block, blocks, objective.sinkhorn_iterations)
        targets = _Targets(logits, plan, objective.top_k, blocks)
        return _CrossViewEntropy.apply(z, keys, targets, objective.temperature, blocks, teacher is None)
