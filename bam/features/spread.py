"""Label-free health of an embedding: spread over many directions, or collapsed?

Without classes no accuracy can be measured, but two numbers of the L2-normalised embeddings of a
set of images still tell a learning run from a collapsing one:

- effective rank (Roy & Vetterli, 2007; used as RankMe by Garrido et al., 2023): ``exp`` of the
  entropy of the normalised singular values of the ``(N, D)`` embedding matrix. 1 when every image
  lies on one direction (collapse), up to ``min(N, D)`` when all directions are used equally.
- std: the standard deviation of each coordinate over the images, averaged over coordinates
  (SimSiam's collapse check): 0 when every image has the same embedding, about ``1 / sqrt(D)``
  when the embeddings spread evenly over the sphere.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def embedding_spread(features: Tensor) -> dict[str, float]:
    """``effective_rank`` and ``std`` of the L2-normalised rows of ``features`` ``(N, D)`` (see
    the module docstring), with their ranges' ends: ``max_rank = min(N, D)`` and
    ``spread_std = 1 / sqrt(D)``.

    The singular values come from the ``D x D`` Gram matrix in float64, so a bank of a million
    images costs one ``N x D x D`` product, not an SVD of the whole bank.
    """
    if features.dim() != 2 or len(features) < 2:
        raise ValueError(f"need (N, D) features of at least 2 images, got shape {tuple(features.shape)}")
    normalised = F.normalize(features.double(), dim=1)
    squared = torch.linalg.eigvalsh(normalised.T @ normalised)
    # rounding leaves eigenvalues of about 1e-16 where the true ones are 0: they are 0
    singular = torch.where(squared > 1e-12 * squared.max(), squared, 0).sqrt()
    share = singular / singular.sum()
    entropy = -(share * share.clamp_min(1e-300).log()).sum()
    dims = features.shape[1]
    return {
        "effective_rank": float(entropy.exp()),
        "std": float(normalised.std(dim=0).mean()),
        "max_rank": min(len(features), dims),
        "spread_std": 1 / math.sqrt(dims),
    }
