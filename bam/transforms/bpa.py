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

As the official code (github.com/DanielShalam/BPA, `bpa/balanced_pairwise_affinities.py`)
computes it, by default:

- the Sinkhorn iterations alternate row then column normalisations (marginals 1) and end on the
  column one, so columns sum to 1 exactly and rows approximately; row `i` of that plan is item
  `i`'s new feature. No symmetrisation: a few iterations leave the plan slightly asymmetric.
- `max_scale=True`: the plan is divided by its largest entry (range [0, 1]), *then* the diagonal
  is set to `self_affinity` (1). Without this scaling every off-diagonal entry is about `1 / n`,
  so the self-entry of 1 dominates each row once it is L2-normalised: the features become nearly
  one-hot and lose what the off-diagonal affinities say (figures: docs/results-bpa.md).

`max_scale=False, symmetrize=True` is bam's earlier reading of the paper's text: the plan made
exactly symmetric as `(P + P^T) / 2` and the diagonal set to 1 without rescaling.
`self_affinity=None` keeps the balanced plan itself (zero diagonal), whose columns sum to 1.
The excluded diagonal is `-inf` in the log-kernel (the official code writes a cost of 1000,
which is the same at any useful `reg`): the plan is exactly zero there, with zero gradient.

Balancing uses bam's one Sinkhorn (`bam.ops.sinkhorn_differentiable`).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bam.ops import compute_dtype, sinkhorn_differentiable

BPA_MAX_SET = 32768  # items of one set: a (N, N) float32 matrix of 4 GiB, a few copies at once


def bpa(
    features: Tensor,
    reg: float = 0.1,
    iterations: int = 10,
    self_affinity: Optional[float] = 1.0,
    max_scale: bool = True,
    symmetrize: bool = False,
) -> Tensor:
    """The BPA transform of the rows of `features`: an `(n, n)` matrix whose rows are the new features.

    Args:
        features: `(n, d)` features of one set, `n >= 2` (any scale: they are L2-normalised).
        reg: Entropic regularisation of the transport (the paper's lambda): smaller is sharper.
        iterations: Sinkhorn iterations (the paper: 10).
        self_affinity: Value written on the diagonal last (the paper: 1); `None` keeps the zeros.
        max_scale: Divide the plan by its largest entry before writing the diagonal (official).
        symmetrize: Return `(P + P^T) / 2` (bam's earlier variant, with `max_scale=False`).

    Returns:
        `(n, n)`, in `features`' dtype (half precision computed in float32), differentiable.
    """
    _check(features, reg, iterations)
    unit = F.normalize(features.to(compute_dtype(features)), dim=1)
    cost = 1.0 - unit @ unit.T
    own = torch.eye(len(unit), dtype=torch.bool, device=unit.device)
    # bam's Sinkhorn ends on a row normalisation; on this symmetric kernel its transpose is the plan
    # of the same iterations ending on the column one, as the official code's
    plan = sinkhorn_differentiable((-cost / reg).masked_fill(own, -math.inf), iterations).T
    if symmetrize:
        plan = (plan + plan.T) / 2
    if max_scale:
        plan = plan / plan.amax()
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

    Takes :func:`bpa`'s arguments after `features`, positional or by name, with its defaults (the
    argument list is written once, on the function; a misspelt name fails here, not at the first call).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        signature = inspect.signature(bpa)
        try:
            bound = signature.bind(None, *args, **kwargs)
        except TypeError as error:
            raise TypeError(f"BPA: {error}; it takes bpa's settings {list(signature.parameters)[1:]}") from None
        bound.apply_defaults()
        self.settings = {name: value for name, value in bound.arguments.items() if name != "features"}

    def forward(self, features: Tensor) -> Tensor:
        return bpa(features, **self.settings)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in self.settings.items())


@dataclass(frozen=True)
class BPASettings:
    """Whether and how a frozen-feature evaluation stage (k-NN, clustering, few-shot, retrieval)
    applies BPA; in a config or on the command line `bpa.enabled`, `bpa.reg`, `bpa.iterations`.

    Args:
        enabled: Also evaluate on the BPA transform of the features.
        reg: BPA's entropic regularisation (the paper: 0.1).
        iterations: BPA's Sinkhorn iterations (the paper: 10).
    """

    enabled: bool = True
    reg: float = 0.1
    iterations: int = 10

    def __post_init__(self) -> None:
        if self.reg <= 0 or self.iterations < 1:
            raise ValueError(f"bpa.reg must be positive and bpa.iterations at least 1, got reg={self.reg}, "
                             f"iterations={self.iterations}")

    def transform(self, features: Tensor, remedy: str = "evaluate a class-balanced `fraction` of the split") -> Tensor:
        """`bpa` of the set `features` with these settings; a set of more than `BPA_MAX_SET` items
        is refused, saying what to do (`remedy`)."""
        if len(features) > BPA_MAX_SET:
            raise ValueError(
                f"BPA transforms {len(features)} items as one set, more than BPA_MAX_SET={BPA_MAX_SET} (its affinities "
                f"would not fit); {remedy}"
            )
        return bpa(features, self.reg, self.iterations)

    def recorded(self) -> dict[str, float] | None:
        """What a stage's result records of the settings (None: BPA was off)."""
        return {"reg": self.reg, "iterations": self.iterations} if self.enabled else None
