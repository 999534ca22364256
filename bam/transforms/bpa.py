"""BPA: the Balanced-Pairwise-Affinities feature transform (Shalam & Korman, ICML 2024, arXiv
2407.01467; first published as the Self-Optimal-Transport transform, arXiv 2204.03065).

A set of `n` features is re-described by its balanced affinities to the set itself: the cost of
pairing two items is their cosine distance (`1 - cosine similarity` of the L2-normalised
features), an item may not be paired with itself (its own cost is infinite), and the
entropy-regularised optimal transport of the set to itself (uniform marginals, regularisation
`reg`) is solved with `iterations` Sinkhorn steps. Row `i` of the plan is item `i`'s new feature:
its share of affinity to every other item, after every item's total affinity has been balanced,
so that an item in a dense region no longer dominates everyone's neighbourhoods. The transform
is parameterless, differentiable and permutation-equivariant: permuting the items permutes the
rows and the columns of the output alike.

Choices, and why:

- The optimal plan of a symmetric cost with equal marginals is symmetric, but a few Sinkhorn
  iterations end on a row normalisation and are only close to it. The plan is returned as
  `(P + P^T) / 2`: exactly symmetric, its row and column sums equal (the average of the plan's),
  and nothing changes once Sinkhorn has converged.
- The paper then sets the diagonal to 1 (an item's affinity to itself, the largest possible
  value; the balanced plan has zeros there because self-pairing is excluded), which is the
  default here (`self_affinity=1.0`). `self_affinity=None` keeps the balanced plan itself, whose
  rows and columns all sum to 1 (doubly stochastic).
- The excluded diagonal is `-inf` in the log-kernel rather than a large finite cost: the plan is
  then exactly zero there whatever `reg`, with zero gradient.

Balancing uses bam's one Sinkhorn (`bam.losses.sinkhorn.sinkhorn_plan`, its differentiable form).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bam.losses.sinkhorn import sinkhorn_plan


def bpa(features: Tensor, reg: float = 0.1, iterations: int = 10, self_affinity: Optional[float] = 1.0) -> Tensor:
    """The BPA transform of the rows of `features`: an `(n, n)` matrix whose rows are the new features.

    Args:
        features: `(n, d)` features of one set, `n >= 2` (any scale: they are L2-normalised).
        reg: Entropic regularisation of the transport (the paper's lambda): smaller is sharper.
        iterations: Sinkhorn iterations (the paper: 10).
        self_affinity: Value written on the diagonal after balancing (the paper: 1); `None` keeps
            the balanced plan, doubly stochastic (every row and column sums to 1).

    Returns:
        `(n, n)` symmetric, in `features`' dtype (half precision computed in float32), differentiable.
    """
    _check(features, reg, iterations)
    unit = F.normalize(features.float() if features.dtype in (torch.float16, torch.bfloat16) else features, dim=1)
    cost = 1.0 - unit @ unit.T
    own = torch.eye(len(unit), dtype=torch.bool, device=unit.device)
    plan = sinkhorn_plan((-cost / reg).masked_fill(own, -math.inf), iterations)
    plan = (plan + plan.T) / 2
    if self_affinity is not None:
        plan = plan.masked_fill(own, self_affinity)
    return plan.to(features.dtype)


def _check(features: Tensor, reg: float, iterations: int) -> None:
    if features.dim() != 2:
        raise ValueError(
            f"bpa transforms one set of features, a 2-D (items, dims) tensor; got shape {tuple(features.shape)} "
            "(for a batch of sets, call it once per set)"
        )
    if features.shape[0] < 2:
        raise ValueError(f"bpa needs at least 2 items (an item may not be paired with itself); got {features.shape[0]}")
    if not features.is_floating_point():
        raise ValueError(f"bpa needs floating-point features, got {features.dtype}")
    if reg <= 0:
        raise ValueError(f"reg must be positive, got {reg}")
    if iterations < 0:
        raise ValueError(f"iterations must be non-negative, got {iterations}")


class BPA(nn.Module):
    """`bpa` as a layer (no parameters): `(n, d)` set of features -> `(n, n)` balanced affinities.

    Args: see :func:`bpa`.
    """

    def __init__(self, reg: float = 0.1, iterations: int = 10, self_affinity: Optional[float] = 1.0) -> None:
        super().__init__()
        self.reg = reg
        self.iterations = iterations
        self.self_affinity = self_affinity

    def forward(self, features: Tensor) -> Tensor:
        return bpa(features, self.reg, self.iterations, self.self_affinity)

    def extra_repr(self) -> str:
        return f"reg={self.reg}, iterations={self.iterations}, self_affinity={self.self_affinity}"
