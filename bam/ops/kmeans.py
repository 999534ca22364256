"""Spherical k-means of unit vectors, its work split over processes: pure torch.

The rows are the same on every process (DeepCluster-v2's memory bank is kept whole on each, see
`bam.losses.deepcluster_loss`); each process assigns its own contiguous share of them, the
per-cluster sums and counts are all-reduced and the assignments gathered, so every process ends
with the same centroids and assignments: those of one process on all the rows, up to the order in
which the float sums are added. Without a process group the one process does all the rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bam.ops.distributed import all_reduce_, gather_rows, rank, world_size


def spherical_kmeans(
    points: torch.Tensor, num_clusters: int, iterations: int = 10, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(N, D)` unit rows -> `(K, D)` unit centroids and the `(N,)` nearest centroid of each row.

    Starts from `num_clusters` distinct rows drawn with `generator` (a CPU generator: seed it alike
    on every process, as the draw must be the same), then `iterations` times assigns every row to
    the centroid of largest cosine and moves each centroid to the normalised mean of its rows (a
    centroid without rows stays where it was). The returned assignments are those of the final
    centroids.
    """
    count = points.shape[0]
    if not 1 <= num_clusters <= count:
        raise ValueError(
            f"k-means of {count} rows into {num_clusters} clusters: there must be at least one row per "
            "cluster; use fewer clusters (prototypes) or more images"
        )
    start = torch.randperm(count, generator=generator)[:num_clusters].to(points.device)
    centroids = points[start].clone()
    share = _own_share(points)
    for _ in range(iterations):
        nearest = (share @ centroids.T).argmax(dim=1)
        sums = all_reduce_(torch.zeros_like(centroids).index_add_(0, nearest, share))
        members = all_reduce_(torch.bincount(nearest, minlength=num_clusters))
        filled = members > 0
        centroids[filled] = F.normalize(sums[filled], dim=1)  # the mean's direction is the sum's
    return centroids, gather_rows((share @ centroids.T).argmax(dim=1))


def _own_share(points: torch.Tensor) -> torch.Tensor:
    """This process's contiguous block of rows (blocks in process order cover every row once)."""
    count, processes, me = points.shape[0], world_size(), rank()
    return points[count * me // processes : count * (me + 1) // processes]
