"""GSP: Generalized Sum Pooling (Gurbuz, Sener & Alatan, ICCV 2023, arXiv 2308.09228), a learnable
replacement for a CNN's global average pooling.

Global average pooling is a convex combination of the feature vectors at all `n` locations of a
feature map, with equal weights. GSP learns which locations matter: `m` learnable prototypes
(semantic entities the training finds useful) and an entropy-smoothed optimal transport problem
that sends a fraction `mu` of the map's feature mass (every location holds `1 / n`) to the
prototypes, the remaining `1 - mu` to a residual bin. A location's weight is the mass it sends to
the prototypes: locations that match prototypes are selected, nuisance ones end in the residual.
The pooled feature is `sum_i w_i x_i` with the weights normalised to sum to 1.

Formulation used here (our reading of the paper, written independently):

- cost of location `i` to prototype `k`: `1 - cos(x_i, z_k)`; to the residual: 0. Only cost
  differences within a row matter and the residual's mass is fixed, so a constant residual cost
  changes nothing;
- marginals: rows (locations) `1 / n` each; prototypes `mu / m` each (every prototype is a
  balanced share of the selected mass, the standard balanced form of the problem); residual
  `1 - mu`;
- entropic regularisation `eps` (0.01), solved by `iterations` steps of bam's one Sinkhorn in
  its differentiable form (`bam.losses.sinkhorn.sinkhorn_plan`); gradients reach the prototypes
  and the features through the iterations (the paper derives them analytically at the optimum).

With `mu = 1` the residual receives nothing, every location sends all of its `1 / n` to the
prototypes, all weights are equal and GSP is exactly global average pooling (a test checks it).
The paper also trains the prototypes with an auxiliary zero-shot loss; it is not part of this layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bam.losses.sinkhorn import sinkhorn_plan


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    # the transport runs in float32 at least: under autocast the map arrives in half precision
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


class GSPPool(nn.Module):
    """`(B, C, H, W)` feature map -> `(B, C)` pooled features, by generalized sum pooling.

    Args:
        channels: Feature channels `C` (the width of the prototypes).
        num_prototypes: Learnable prototypes `m`.
        mu: Fraction of the feature mass transported to the prototypes, in (0, 1]; 1 is average pooling.
        eps: Entropic regularisation of the transport (smaller: sharper selection).
        iterations: Sinkhorn iterations.
    """

    def __init__(self, channels: int, num_prototypes: int = 64, mu: float = 0.5, eps: float = 0.01, iterations: int = 10) -> None:
        super().__init__()
        if not 0 < mu <= 1:
            raise ValueError(f"mu is the fraction of feature mass selected, in (0, 1]; got {mu}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if num_prototypes < 1 or channels < 1:
            raise ValueError(f"channels and num_prototypes must be positive, got {channels} and {num_prototypes}")
        if iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {iterations}")
        self.channels, self.num_prototypes = channels, num_prototypes
        self.mu, self.eps, self.iterations = mu, eps, iterations
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, channels) / channels**0.5)

    def weights(self, features: Tensor) -> Tensor:
        """`(B, n)` selection weights of the `n` locations of `(B, n, C)` features (each row sums to 1)."""
        dtype = _compute_dtype(features)
        unit = F.normalize(features.to(dtype), dim=-1)
        cost = 1.0 - unit @ F.normalize(self.prototypes.to(dtype), dim=-1).T
        log_kernel = torch.cat([-cost / self.eps, cost.new_zeros(*cost.shape[:-1], 1)], dim=-1)
        locations = features.shape[1]
        row_mass = cost.new_full((locations,), 1.0 / locations)
        column_mass = torch.cat([cost.new_full((self.num_prototypes,), self.mu / self.num_prototypes),
                                 cost.new_full((1,), 1.0 - self.mu)])
        plan = sinkhorn_plan(log_kernel, self.iterations, row_mass, column_mass)
        selected = plan[..., : self.num_prototypes].sum(dim=-1)
        return selected / selected.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(selected.dtype).tiny)

    def forward(self, feature_map: Tensor) -> Tensor:
        if feature_map.dim() != 4 or feature_map.shape[1] != self.channels:
            raise ValueError(
                f"GSPPool expects a (batch, {self.channels}, height, width) feature map, got shape {tuple(feature_map.shape)}"
            )
        features = feature_map.flatten(2).transpose(1, 2)  # (B, n, C)
        weights = self.weights(features)
        return (weights.unsqueeze(-1) * features.to(weights.dtype)).sum(dim=1).to(feature_map.dtype)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_prototypes={self.num_prototypes}, mu={self.mu}, eps={self.eps}, iterations={self.iterations}"
