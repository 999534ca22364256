"""`sinkhorn_distributed(..., rows=R)`: every row takes part in the balancing, only the first R come back
(the objective asks for the rows of its own samples under DDP and for the global crops)."""
from __future__ import annotations

import pytest
import torch

from bam.ops import sinkhorn_distributed


@pytest.mark.parametrize("iterations", [0, 3])
def test_rows_returns_the_first_rows_of_the_whole_plan(iterations):
    log_kernel = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    whole = sinkhorn_distributed(log_kernel, iterations)
    first = sinkhorn_distributed(log_kernel, iterations, rows=4)
    assert whole.shape == (7, 5) and first.shape == (4, 5)
    torch.testing.assert_close(first, whole[:4])
    # the rows left out of the answer still shaped the columns: balancing the 4 rows alone differs
    assert not torch.allclose(first, sinkhorn_distributed(log_kernel[:4], iterations)) or iterations == 0
