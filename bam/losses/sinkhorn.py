"""Entropic balancing (Sinkhorn-Knopp), shared by every objective here.

Rows of the matrix may be split over processes (each process holds the rows of its own samples,
all processes hold the same columns): column sums then run over every row of every process, row
sums stay local. This is the layout of BAM's attention matrix and of SwAV's sample-to-prototype
scores alike, so both use this one implementation.

How it stays exact and cheap. The plan after any number of steps is `diag(u) K diag(v)` for a fixed
kernel `K` and two scaling vectors, so each column or row normalisation is one matrix-vector
product instead of several full passes over the matrix. The kernel is `exp` of the log-kernel
shifted first by each column's (global) maximum, then by each row's maximum: every row and every
column of `K` then has an entry equal to 1, so no column or row sum can underflow to zero, whatever
the spread of the log-kernel (an image dissimilar to everything at `reg = 0.01` sits ~200 nats
below the rest, far beyond float32's `exp` range). The shifts are constants that the scalings
absorb, so the plan is the same as the textbook exp-domain iteration in exact arithmetic; only
entries of `K` below float32's smallest normal number (~e^-87) flush to zero, and as every line of
`K` also holds a 1, such an entry's share of its row and column sums of `K` is below 1e-38.
"""
from __future__ import annotations

import torch

from bam.distributed import all_reduce_


def _finite_or_zero(shift: torch.Tensor) -> torch.Tensor:
    # A line that is -inf everywhere (fully masked) would give -inf - (-inf) = nan; shift it by 0.
    return torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))


def balancing_kernel(log_kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrite `log_kernel` with `K = exp(log_kernel - column max - row max)` and return it with
    the row shifts: entries in [0, 1], an entry equal to 1 in every line that is not all `-inf`.

    The column maxima are taken over the rows of all processes (one all-reduce of an `N`-vector).
    The column shifts cancel in the first column normalisation; the row shifts do not (they weight
    the rows' contributions to the column sums), so the caller starts from `exp(row shift)`.
    """
    column_max = _finite_or_zero(all_reduce_(log_kernel.amax(dim=0), op="max"))
    shifted = log_kernel.sub_(column_max)
    row_max = _finite_or_zero(shifted.amax(dim=1, keepdim=True))
    return shifted.sub_(row_max).exp_(), row_max.squeeze(1)


def _reciprocal(sums: torch.Tensor) -> torch.Tensor:
    # A line that is all zero (fully masked) keeps zero mass: 0 * (1 / tiny) = 0, never 0 / 0.
    return sums.clamp_min(torch.finfo(sums.dtype).tiny).reciprocal_()


def _row_softmax_(log_matrix: torch.Tensor) -> torch.Tensor:
    plan = log_matrix.sub_(_finite_or_zero(log_matrix.amax(dim=1, keepdim=True))).exp_()
    return plan.mul_(_reciprocal(plan.sum(dim=1, keepdim=True)))


@torch.no_grad()
def sinkhorn_(log_kernel: torch.Tensor, iterations: int, rows: int | None = None) -> torch.Tensor:
    """:func:`sinkhorn_log` that overwrites `log_kernel` (a float32/float64 one) with the plan and
    returns a view of its first `rows` rows: no copy of the matrix is made."""
    dtype = torch.float64 if log_kernel.dtype == torch.float64 else torch.float32
    log_kernel = log_kernel.to(dtype)
    rows = log_kernel.shape[0] if rows is None else rows
    if iterations == 0:  # only the final row normalisation: a row softmax
        return _row_softmax_(log_kernel[:rows])
    kernel, row_shift = balancing_kernel(log_kernel)
    # exp(row shift) <= 1 may underflow to 0 for a row ~100 nats below every column's maximum:
    # its share of those column sums is then below float precision anyway, and its own row
    # normalisation (which does not depend on this factor) restores it.
    row_scale = row_shift.exp_()
    column_scale = torch.ones(kernel.shape[1], dtype=dtype, device=kernel.device)
    for _ in range(iterations):
        column_scale = _reciprocal(all_reduce_(kernel.T @ row_scale, op="sum"))
        # The scalings are defined up to a factor ((u * a, v / a) give the same plan) and drift by
        # rows/columns per iteration when the two marginals differ; pin max(v) = 1 (the same on
        # every process, as v comes from all-reduced sums) so that many iterations cannot overflow.
        column_scale /= column_scale.max()
        row_scale = _reciprocal(kernel @ column_scale)  # (the last one is the final normalisation)
    return kernel[:rows].mul_(column_scale).mul_(row_scale[:rows, None])


def sinkhorn_log(log_kernel: torch.Tensor, iterations: int, rows: int | None = None) -> torch.Tensor:
    """Balance `exp(log_kernel)` and return the row-stochastic plan in float32 (float64 stays
    float64).

    Each iteration divides every column by its (global) sum, then every row by its (local) sum;
    a final row normalisation makes every row a distribution even for `iterations=0`. Uniform
    marginal constants cancel in this scheme and are therefore not applied. Entries that are
    `-inf` in `log_kernel` (masked) come out exactly zero. Every row takes part in the balancing,
    but only the first `rows` rows of the plan are returned (all by default).
    """
    return sinkhorn_(log_kernel.clone(), iterations, rows)
