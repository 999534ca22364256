"""The lowest floor: pure-torch primitives every other package may use (no bam imports above).

- `bam.ops.sinkhorn`: the one entropic balancing, in its in-place distributed, out-of-place
  distributed, blocked and differentiable forms;
- `bam.ops.kmeans`: spherical k-means with its rows split over processes (DeepCluster-v2);
- `bam.ops.distributed`: gathers and all-reduces that are the identity without a process group;
- `bam.ops.dtypes`: the compute-dtype rule; `bam.ops.architecture`: `is_vit`;
- `bam.ops.errors`: `UserInputError`, the input a user must fix (stages print it on one line).
"""
from bam.ops.architecture import is_vit
from bam.ops.dtypes import compute_dtype
from bam.ops.kmeans import spherical_kmeans
from bam.ops.sinkhorn import (
    BlockedPlan,
    sinkhorn_blocked,
    sinkhorn_differentiable,
    sinkhorn_distributed,
    sinkhorn_distributed_,
)

__all__ = [
    "is_vit", "compute_dtype", "BlockedPlan", "spherical_kmeans",
    "sinkhorn_distributed_", "sinkhorn_distributed", "sinkhorn_blocked", "sinkhorn_differentiable",
]
