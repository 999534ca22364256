"""The precision bam's numerics run in, whatever the caller's (or autocast's) dtype."""
from __future__ import annotations

import torch


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (exact gradient checks); anything else is computed in float32, since
    similarities near 1 lose precision and `exp` overflows in half precision."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32
