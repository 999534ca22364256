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

Two entry points share that kernel and the scaling loop (`_scalings`):

- `sinkhorn_` / `sinkhorn_log`: the training objectives' balancing. In place, no gradient, rows may
  be split over processes, uniform marginals.
- `sinkhorn_plan`: the differentiable form (autograd runs through the iterations), for transforms
  and layers: `bam.transforms.bpa` (a set's features balanced against themselves) and
  `bam.models.gsp` (feature-map locations transported to prototypes). Out of place, local to the
  process (one set or one image is one problem; nothing to all-reduce), batched over leading
  dimensions, with optional row and column marginals.
"""
from __future__ import annotations

from typing import Callable, Optional

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
    row_scale, column_scale = _scalings(kernel, row_shift.exp_(), iterations, reduce=_global_sum)
    return kernel[:rows].mul_(column_scale).mul_(row_scale[:rows, None])


def _global_sum(column_sums: torch.Tensor) -> torch.Tensor:
    return all_reduce_(column_sums, op="sum")


def _matvec(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    # one (rows, cols) matrix: a plain matrix-vector product; a batch (..., rows, cols): batched
    return matrix @ vector if matrix.dim() == 2 else (matrix @ vector.unsqueeze(-1)).squeeze(-1)


def _scalings(
    kernel: torch.Tensor,
    row_scale: torch.Tensor,
    iterations: int,
    row_mass: Optional[torch.Tensor] = None,
    column_mass: Optional[torch.Tensor] = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scaling vectors `(u, v)` of the plan `diag(u) K diag(v)` after `iterations` column-then-row
    normalisations (no iteration: the row normalisation alone), to the given marginals (default:
    1 for every line; the column total then follows from the rows). `reduce` sums column sums
    over the processes holding other rows. Out of place, so autograd can run through it."""
    column_scale = torch.ones(kernel.shape[:-2] + kernel.shape[-1:], dtype=kernel.dtype, device=kernel.device)
    for _ in range(iterations):
        column_scale = _reciprocal(reduce(_matvec(kernel.mT, row_scale)))
        if column_mass is not None:
            column_scale = column_scale * column_mass
        # The scalings are defined up to a factor ((u * a, v / a) give the same plan) and drift by
        # rows/columns per iteration when the two marginals differ; pin max(v) = 1 (the same on
        # every process, as v comes from all-reduced sums) so that many iterations cannot overflow.
        # The plan does not depend on the factor, so neither does its gradient: no graph through it.
        column_scale = column_scale / column_scale.amax(dim=-1, keepdim=True).detach()
        row_scale = _row_normalisation(kernel, column_scale, row_mass)  # (the last one is the final one)
    if iterations == 0:
        row_scale = _row_normalisation(kernel, column_scale, row_mass)
    return row_scale, column_scale


def _row_normalisation(kernel: torch.Tensor, column_scale: torch.Tensor, row_mass: Optional[torch.Tensor]) -> torch.Tensor:
    row_scale = _reciprocal(_matvec(kernel, column_scale))
    return row_scale if row_mass is None else row_scale * row_mass


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


def sinkhorn_plan(
    log_kernel: torch.Tensor,
    iterations: int,
    row_mass: Optional[torch.Tensor] = None,
    column_mass: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Differentiable balancing of `exp(log_kernel)`: the plan, with autograd through the iterations.

    The same kernel and iterations as :func:`sinkhorn_log`, out of place and without all-reduces
    (a set transform or a pooling layer solves one problem per set or image, on one process).
    `log_kernel` is `(rows, cols)` or a batch `(..., rows, cols)` of independent problems; half
    precision is computed in float32, float64 stays float64. Marginals: `row_mass` `(rows,)` or
    `(..., rows)` (default 1 for every row) and `column_mass` `(cols,)` or `(..., cols)` (default
    uniform, so columns sum to `rows / cols`); their totals should agree. The last step is a row
    normalisation: row sums are exact, column sums approach their marginal as iterations grow.
    `-inf` entries (excluded pairs) come out exactly zero, with zero gradient.

    The kernel's stabilising shifts (`balancing_kernel`) and the scalings' normalising factor do
    not change the plan, so no gradient flows through them (they are detached, exactly).
    """
    if log_kernel.dim() < 2:
        raise ValueError(f"log_kernel must be (rows, cols) or (..., rows, cols), got shape {tuple(log_kernel.shape)}")
    dtype = torch.float64 if log_kernel.dtype == torch.float64 else torch.float32
    log_kernel = log_kernel.to(dtype)
    with torch.no_grad():
        column_max = _finite_or_zero(log_kernel.amax(dim=-2, keepdim=True))
        row_max = _finite_or_zero((log_kernel - column_max).amax(dim=-1, keepdim=True))
    kernel = (log_kernel - column_max - row_max).exp()
    marginals = [None if mass is None else mass.to(dtype) for mass in (row_mass, column_mass)]
    row_scale, column_scale = _scalings(kernel, row_max.squeeze(-1).exp(), iterations, *marginals)
    return kernel * column_scale.unsqueeze(-2) * row_scale.unsqueeze(-1)
