"""Entropic balancing (Sinkhorn-Knopp) in the log domain, shared by every objective here.

Rows of the matrix may be split over processes (each process holds the rows of its own samples,
all processes hold the same columns): column sums then run over every row of every process, row
sums stay local. This is the layout of BAM's attention matrix and of SwAV's sample-to-prototype
scores alike, so both use this one implementation.
"""
from __future__ import annotations

import torch

from bam.distributed import all_reduce_


def column_logsumexp(log_matrix: torch.Tensor) -> torch.Tensor:
    """`logsumexp` over dim 0 across the rows of all processes; returns a `(N,)` tensor.

    Two small all-reduces (max, then sum of shifted exponentials) keep it exact and overflow-free
    whatever the spread of the entries; a column that is `-inf` everywhere gets `-inf`.
    """
    column_max = all_reduce_(log_matrix.amax(dim=0), op="max")
    shift = torch.where(torch.isfinite(column_max), column_max, torch.zeros_like(column_max))
    total = all_reduce_(torch.exp(log_matrix - shift).sum(dim=0), op="sum")
    return shift + total.log()


def _subtract_finite(log_matrix: torch.Tensor, log_norm: torch.Tensor) -> torch.Tensor:
    # An all -inf line would give -inf - (-inf) = nan; leave such lines at -inf instead.
    return log_matrix - torch.where(torch.isfinite(log_norm), log_norm, torch.zeros_like(log_norm))


@torch.no_grad()
def sinkhorn_log(log_kernel: torch.Tensor, iterations: int) -> torch.Tensor:
    """Balance `exp(log_kernel)` and return the row-stochastic plan in float32.

    Each iteration divides every column by its (global) sum, then every row by its (local) sum;
    a final row normalisation makes every row a distribution even for `iterations=0`. Uniform
    marginal constants cancel in this scheme and are therefore not applied. Entries that are
    `-inf` in `log_kernel` (masked) come out exactly zero.
    """
    log_plan = log_kernel.float()
    for _ in range(iterations):
        log_plan = _subtract_finite(log_plan, column_logsumexp(log_plan).unsqueeze(0))
        log_plan = _subtract_finite(log_plan, log_plan.logsumexp(dim=1, keepdim=True))
    if iterations == 0:
        log_plan = _subtract_finite(log_plan, log_plan.logsumexp(dim=1, keepdim=True))
    return log_plan.exp()
