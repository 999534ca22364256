"""GSP: Generalized Sum Pooling (Gurbuz, Sener & Alatan, ICCV 2023, arXiv 2308.09228), a learnable
replacement for a CNN's global average pooling.

Global average pooling is a convex combination of the feature vectors at all `n` locations of a
feature map, with equal weights. GSP learns which locations matter: `m` learnable prototypes
(semantic entities the training finds useful) and an entropy-smoothed optimal transport problem
that sends a fraction `mu` of the map's feature mass (every location holds `1 / n`) to the
prototypes, the remaining `1 - mu` to a residual bin. A location's weight is the mass it sends to
the prototypes: locations that match prototypes are selected, nuisance ones end in the residual.
The pooled feature is `sum_i w_i x_i` with the weights normalised to sum to 1.

Two formulations (`mass`), both written from the equations (independently of any code):

- `"total"` (default), the official layer's (github.com/yetigurbuz/generalized-sum-pooling): a
  partial transport with one total mass. Cost of location `i` to prototype `k`:
  `2 - 2 cos(x_i, z_k)` (squared distance of the unit vectors), kernel `exp(-cost / reg)`, row
  sum `S_i = sum_k exp(-cost_ik / reg)`; to the residual: cost 0. The prototypes receive `mu` in
  total, with no marginal per prototype, so the problem has a single dual variable `a` (the log of
  the official `mu_`): location `i` keeps `p_i = (1/n) / (1 + e^a S_i)` in the residual and sends
  the rest, `(1/n) - p_i`, to the prototypes. From `a = log mu`, each of `iterations` steps
  computes `p` and sets `e^a = mu / sum_i p_i S_i`; the weights are `((1/n) - p_i) / mu` from a
  last `p`, as the official layer reads them off the residual masses.
- `"per_prototype"`, bam's earlier balanced reading of the paper: every prototype receives
  `mu / m` and the residual `1 - mu`, cost `1 - cos`, solved by bam's one differentiable
  Sinkhorn (`bam.ops.sinkhorn_differentiable`); weights normalised to sum to 1.

Gradients reach the prototypes and the features through the iterations (autograd; the official
layer derives them at the optimum). With `mu = 1` nothing is left for the residual: every location
sends all of its `1 / n` and GSP is exactly global average pooling, in both formulations (the
total-mass iteration would only approach that solution, so it is returned directly).
The paper also trains the prototypes with an auxiliary zero-shot loss; it is not part of this layer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bam.ops import compute_dtype, sinkhorn_differentiable


MASSES = ("total", "per_prototype")


class GSPPool(nn.Module):
    """`(B, C, H, W)` feature map -> `(B, C)` pooled features, by generalized sum pooling.

    Args:
        channels: Feature channels `C` (the width of the prototypes).
        num_prototypes: Learnable prototypes `m`.
        mu: Fraction of the feature mass transported to the prototypes, in (0, 1]; 1 is average pooling.
        reg: Entropic regularisation of the transport (smaller: sharper selection; the official
            layer's `gamma` is `1 / reg`).
        iterations: Dual updates (`"total"`) or Sinkhorn iterations (`"per_prototype"`).
        mass: `"total"`: the prototypes receive `mu` together (official); `"per_prototype"`:
            `mu / m` each (bam's earlier formulation).
    """

    def __init__(self, channels: int, num_prototypes: int = 64, mu: float = 0.5, reg: float = 0.05,
                 iterations: int = 100, mass: str = "total") -> None:
        super().__init__()
        if not 0 < mu <= 1:
            raise ValueError(f"mu is the fraction of feature mass selected, in (0, 1]; got {mu}")
        if reg <= 0:
            raise ValueError(f"reg must be positive, got {reg}")
        if num_prototypes < 1 or channels < 1:
            raise ValueError(f"channels and num_prototypes must be positive, got {channels} and {num_prototypes}")
        if iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {iterations}")
        if mass not in MASSES:
            raise ValueError(f"unknown mass {mass!r}; choose one of {MASSES}")
        self.channels, self.num_prototypes = channels, num_prototypes
        self.mu, self.reg, self.iterations, self.mass = mu, reg, iterations, mass
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, channels) / channels**0.5)

    def weights(self, features: Tensor) -> Tensor:
        """`(B, n)` selection weights of the `n` locations of `(B, n, C)` features (each row sums to 1,
        exactly for `"per_prototype"`, at convergence for `"total"`)."""
        if self.mu == 1:
            return features.new_full(features.shape[:2], 1.0 / features.shape[1], dtype=compute_dtype(features))
        dtype = compute_dtype(features)
        cosine = F.normalize(features.to(dtype), dim=-1) @ F.normalize(self.prototypes.to(dtype), dim=-1).T
        if self.mass == "total":
            return self._total_mass_weights(torch.logsumexp((2.0 * cosine - 2.0) / self.reg, dim=-1))
        return self._per_prototype_weights(1.0 - cosine)

    def _total_mass_weights(self, log_row_sums: Tensor) -> Tensor:
        """Weights of the one-total-mass transport, given `log S_i` `(B, n)`, in the log domain:
        `p_i = (1/n) sigmoid(-(a + log S_i))`, `(1/n) - p_i = (1/n) sigmoid(a + log S_i)`."""
        log_q = -math.log(log_row_sums.shape[-1])
        log_mu = math.log(self.mu)
        dual = torch.full_like(log_row_sums[..., :1], log_mu)
        for _ in range(self.iterations):
            log_residual = log_q + F.logsigmoid(-(dual + log_row_sums))
            dual = log_mu - torch.logsumexp(log_residual + log_row_sums, dim=-1, keepdim=True)
        return torch.exp(log_q + F.logsigmoid(dual + log_row_sums)) / self.mu

    def _per_prototype_weights(self, cost: Tensor) -> Tensor:
        log_kernel = torch.cat([-cost / self.reg, cost.new_zeros(*cost.shape[:-1], 1)], dim=-1)
        locations = cost.shape[1]
        row_mass = cost.new_full((locations,), 1.0 / locations)
        column_mass = torch.cat([cost.new_full((self.num_prototypes,), self.mu / self.num_prototypes),
                                 cost.new_full((1,), 1.0 - self.mu)])
        plan = sinkhorn_differentiable(log_kernel, self.iterations, row_mass, column_mass)
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
        return (f"channels={self.channels}, num_prototypes={self.num_prototypes}, mu={self.mu}, reg={self.reg}, "
                f"iterations={self.iterations}, mass={self.mass}")
