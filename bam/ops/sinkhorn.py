"""The one entropic balancing (Sinkhorn-Knopp) of bam, in the forms its users need.

Every form balances `exp(log_kernel)` (the caller has divided by its entropic regularisation `reg`)
by alternating column and row normalisations and ends on a row normalisation, so each
row of the plan is a distribution. They differ only in where the matrix lives and whether autograd
runs through the iterations:

- `sinkhorn_distributed_`: no gradient, **in place** (overwrites its input with the plan), rows
  may be **split over processes** (each process holds the rows of its own samples, all processes
  hold the same columns): column maxima and column sums are all-reduced, row sums stay local.
  This is the layout of BAM's attention matrix and of SwAV's sample-to-prototype scores alike.
  Without a process group it is the ordinary single-process balancing.
- `sinkhorn_distributed`: the same, out of place (the input is left untouched).
- `sinkhorn_blocked`: the same balancing and all-reduces for a matrix that is never held whole:
  the caller produces it in column blocks on demand (`bam.losses.blockwise`), and the plan is
  returned as four vectors (`BlockedPlan`).
- `sinkhorn_differentiable`: autograd through the iterations, out of place, local to the process
  (one set or one image is one problem: `bam.transforms.bpa`, `bam.models.gsp`), batched over
  leading dimensions, with optional row and column marginals.

How it stays exact and cheap. The plan after any number of steps is `diag(u) K diag(v)` for a fixed
kernel `K` and two scaling vectors, so each column or row normalisation is one matrix-vector
product instead of several full passes over the matrix; all forms share that scaling loop
(`_scalings`). The kernel is `exp` of the log-kernel shifted first by each column's (global)
maximum, then by each row's maximum: every row and every column of `K` then has an entry equal to
1, so no column or row sum can underflow to zero, whatever the spread of the log-kernel (an image
dissimilar to everything at `reg = 0.01` sits ~200 nats below the rest, far beyond float32's `exp`
range). The shifts are constants that the scalings absorb, so the plan is the same as the textbook
exp-domain iteration in exact arithmetic; only entries of `K` below float32's smallest normal
number (~e^-87) flush to zero, and as every line of `K` also holds a 1, such an entry's share of
its row and column sums of `K` is below 1e-38.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from bam.ops.distributed import all_reduce_
from bam.ops.dtypes import compute_dtype

Block = tuple[int, int]  # [start, stop) of a range of columns


def finite_or_zero(shift: torch.Tensor) -> torch.Tensor:
    """`shift` with non-finite entries replaced by 0: a line that is `-inf` everywhere (fully
    masked) would otherwise give `-inf - (-inf) = nan`."""
    return torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))


def safe_reciprocal(sums: torch.Tensor) -> torch.Tensor:
    """`1 / sums` (a new tensor), with a line that is all zero (fully masked) keeping zero mass:
    `0 * (1 / tiny) = 0`, never `0 / 0`."""
    return sums.clamp_min(torch.finfo(sums.dtype).tiny).reciprocal_()


class _Kernel(Protocol):
    """The two products the scaling loop needs from a kernel `K`, wherever `K` lives."""

    def transposed_times(self, row_scale: torch.Tensor) -> torch.Tensor:  # K^T u, local rows only
        ...

    def times(self, column_scale: torch.Tensor) -> torch.Tensor:  # K v
        ...


@dataclass(frozen=True)
class _DenseKernel:
    """A kernel held whole: `(rows, cols)` or a batch `(..., rows, cols)` of independent ones."""

    matrix: torch.Tensor

    def transposed_times(self, row_scale: torch.Tensor) -> torch.Tensor:
        return _matvec(self.matrix.mT, row_scale)

    def times(self, column_scale: torch.Tensor) -> torch.Tensor:
        return _matvec(self.matrix, column_scale)


def _matvec(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    # one (rows, cols) matrix: a plain matrix-vector product; a batch (..., rows, cols): batched
    return matrix @ vector if matrix.dim() == 2 else (matrix @ vector.unsqueeze(-1)).squeeze(-1)


def _global_sum(column_sums: torch.Tensor) -> torch.Tensor:
    return all_reduce_(column_sums, op="sum")


def _scalings(
    kernel: _Kernel,
    row_scale: torch.Tensor,
    column_scale: torch.Tensor,
    iterations: int,
    row_mass: Optional[torch.Tensor] = None,
    column_mass: Optional[torch.Tensor] = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scaling vectors `(u, v)` of the plan `diag(u) K diag(v)` after `iterations` column-then-row
    normalisations (no iteration: the row normalisation alone), starting from `(row_scale,
    column_scale)`, to the given marginals (default: 1 for every line; the column total then follows
    from the rows). `reduce` sums column sums over the processes holding other rows. Out of place,
    so autograd can run through it."""
    for _ in range(iterations):
        column_scale = safe_reciprocal(reduce(kernel.transposed_times(row_scale)))
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


def _row_normalisation(kernel: _Kernel, column_scale: torch.Tensor, row_mass: Optional[torch.Tensor]) -> torch.Tensor:
    row_scale = safe_reciprocal(kernel.times(column_scale))
    return row_scale if row_mass is None else row_scale * row_mass


def _row_softmax_(log_matrix: torch.Tensor) -> torch.Tensor:
    plan = log_matrix.sub_(finite_or_zero(log_matrix.amax(dim=1, keepdim=True))).exp_()
    return plan.mul_(safe_reciprocal(plan.sum(dim=1, keepdim=True)))


def _stabilised_kernel_(log_kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrite `log_kernel` with `K = exp(log_kernel - column max - row max)` and return it with
    the row shifts: entries in [0, 1], an entry equal to 1 in every line that is not all `-inf`.

    The column maxima are taken over the rows of all processes (one all-reduce of an `N`-vector).
    The column shifts cancel in the first column normalisation; the row shifts do not (they weight
    the rows' contributions to the column sums), so the scaling loop starts from `exp(row shift)`.
    """
    column_max = finite_or_zero(all_reduce_(log_kernel.amax(dim=0), op="max"))
    shifted = log_kernel.sub_(column_max)
    row_max = finite_or_zero(shifted.amax(dim=1, keepdim=True))
    return shifted.sub_(row_max).exp_(), row_max.squeeze(1)


@torch.no_grad()
def sinkhorn_distributed_(log_kernel: torch.Tensor, iterations: int, rows: int | None = None) -> torch.Tensor:
    """Balance `exp(log_kernel)` in place, rows split over processes; return the first `rows` rows
    of the row-stochastic plan (all by default), a view of the overwritten input: no copy is made.

    `log_kernel` is this process's `(rows, N)` part (float32, or float64 which stays float64; other
    dtypes are converted, and then the input is not overwritten). Each iteration divides every
    column by its sum over all processes, then every row by its (local) sum; a final row
    normalisation makes every row a distribution even for `iterations=0`. Uniform marginal
    constants cancel in this scheme and are therefore not applied. Entries that are `-inf`
    (masked) come out exactly zero. Every row takes part in the balancing.
    """
    log_kernel = log_kernel.to(compute_dtype(log_kernel))
    rows = log_kernel.shape[0] if rows is None else rows
    if iterations == 0:  # only the final row normalisation: a row softmax
        return _row_softmax_(log_kernel[:rows])
    kernel, row_shift = _stabilised_kernel_(log_kernel)
    # exp(row shift) <= 1 may underflow to 0 for a row ~100 nats below every column's maximum:
    # its share of those column sums is then below float precision anyway, and its own row
    # normalisation (which does not depend on this factor) restores it.
    row_scale, column_scale = _scalings(
        _DenseKernel(kernel), row_shift.exp_(), kernel.new_ones(kernel.shape[1]), iterations, reduce=_global_sum
    )
    return kernel[:rows].mul_(column_scale).mul_(row_scale[:rows, None])


def sinkhorn_distributed(log_kernel: torch.Tensor, iterations: int, rows: int | None = None) -> torch.Tensor:
    """:func:`sinkhorn_distributed_` on a copy: `log_kernel` is left untouched."""
    return sinkhorn_distributed_(log_kernel.clone(), iterations, rows)


@dataclass
class BlockedPlan:
    """A balanced plan `exp(A - column shift - row shift) * column scale * row scale` given by four
    vectors, for a log-kernel `A` produced one column block at a time: the plan is never stored."""

    column_shift: torch.Tensor
    row_shift: torch.Tensor
    column_scale: torch.Tensor
    row_scale: torch.Tensor

    def kernel_(self, log_kernel: torch.Tensor, block: Block) -> torch.Tensor:
        """The stabilised kernel of the first `len(log_kernel)` rows of `block`, from their
        log-kernel (overwritten)."""
        rows = log_kernel.shape[0]
        return log_kernel.sub_(self.column_shift[block[0] : block[1]]).sub_(self.row_shift[:rows, None]).exp_()

    def plan_(self, log_kernel: torch.Tensor, block: Block) -> torch.Tensor:
        """The plan of the first `len(log_kernel)` rows of `block`, from their log-kernel
        (overwritten): rows are distributions over all the columns of all blocks."""
        rows = log_kernel.shape[0]
        return self.kernel_(log_kernel, block).mul_(self.column_scale[block[0] : block[1]]).mul_(self.row_scale[:rows, None])


@dataclass(frozen=True)
class _BlockedKernel:
    """The stabilised kernel of a blocked log-kernel: products accumulated block by block."""

    log_kernel_of: Callable[[Block], torch.Tensor]
    blocks: list[Block]
    shifts: BlockedPlan

    def _kernel(self, block: Block) -> torch.Tensor:
        return self.shifts.kernel_(self.log_kernel_of(block), block)

    def transposed_times(self, row_scale: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._kernel(block).T @ row_scale for block in self.blocks])

    def times(self, column_scale: torch.Tensor) -> torch.Tensor:
        return sum(self._kernel(block) @ column_scale[block[0] : block[1]] for block in self.blocks)


@torch.no_grad()
def sinkhorn_blocked(log_kernel_of: Callable[[Block], torch.Tensor], blocks: list[Block], iterations: int) -> BlockedPlan:
    """:func:`sinkhorn_distributed_` for a log-kernel given by blocks of columns.

    `log_kernel_of(block)` returns a fresh `(rows, block columns)` log-kernel (the caller's to
    overwrite) of this process's rows; `blocks` cover the columns. The same stabilising shifts,
    iterations and all-reduces as the dense form; every pass over the matrix asks for each block
    again, so the memory held is one block plus vectors. The returned `BlockedPlan` turns a block's
    log-kernel into that block of the plan.
    """
    if iterations == 0:  # only the final row normalisation, a row softmax: no column shift to undo
        columns = blocks[-1][1]
        column_max = log_kernel_of(blocks[0]).new_zeros(columns)
    else:
        column_max = torch.cat([log_kernel_of(block).amax(dim=0) for block in blocks])
        column_max = finite_or_zero(all_reduce_(column_max, op="max"))
    row_max = None
    for block in blocks:
        block_max = log_kernel_of(block).sub_(column_max[block[0] : block[1]]).amax(dim=1)
        row_max = block_max if row_max is None else torch.maximum(row_max, block_max)
    row_max = finite_or_zero(row_max)
    plan = BlockedPlan(column_max, row_max, column_max.new_ones(column_max.shape), row_max.exp())
    kernel = _BlockedKernel(log_kernel_of, blocks, plan)
    plan.row_scale, plan.column_scale = _scalings(kernel, plan.row_scale, plan.column_scale, iterations, reduce=_global_sum)
    return plan


def sinkhorn_differentiable(
    log_kernel: torch.Tensor,
    iterations: int,
    row_mass: Optional[torch.Tensor] = None,
    column_mass: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Differentiable balancing of `exp(log_kernel)`: the plan, with autograd through the iterations.

    The same kernel and iterations as :func:`sinkhorn_distributed_`, out of place and without
    all-reduces (a set transform or a pooling layer solves one problem per set or image, on one
    process). `log_kernel` is `(rows, cols)` or a batch `(..., rows, cols)` of independent problems;
    half precision is computed in float32, float64 stays float64. Marginals: `row_mass` `(rows,)` or
    `(..., rows)` (default 1 for every row) and `column_mass` `(cols,)` or `(..., cols)` (default
    uniform, so columns sum to `rows / cols`); their totals should agree. The last step is a row
    normalisation: row sums are exact, column sums approach their marginal as iterations grow.
    `-inf` entries (excluded pairs) come out exactly zero, with zero gradient.

    The kernel's stabilising shifts and the scalings' normalising factor do not change the plan,
    so no gradient flows through them (they are detached, exactly).
    """
    if log_kernel.dim() < 2:
        raise ValueError(f"log_kernel must be (rows, cols) or (..., rows, cols), got shape {tuple(log_kernel.shape)}")
    dtype = compute_dtype(log_kernel)
    log_kernel = log_kernel.to(dtype)
    with torch.no_grad():  # without a column normalisation (no iteration) the column shift would stay
        column_max = finite_or_zero(log_kernel.amax(dim=-2, keepdim=True)) * (iterations > 0)
        row_max = finite_or_zero((log_kernel - column_max).amax(dim=-1, keepdim=True))
    kernel = (log_kernel - column_max - row_max).exp()
    marginals = [None if mass is None else mass.to(dtype) for mass in (row_mass, column_mass)]
    column_scale = kernel.new_ones(kernel.shape[:-2] + kernel.shape[-1:])
    row_scale, column_scale = _scalings(_DenseKernel(kernel), row_max.squeeze(-1).exp(), column_scale, iterations, *marginals)
    return kernel * column_scale.unsqueeze(-2) * row_scale.unsqueeze(-1)
