"""The loss benchmark still runs (at a toy size). No timing is asserted: wall-clock numbers on a
shared CI machine mean nothing; the script is for people to read."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

BENCH = Path(__file__).parent / "bench_loss.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_loss", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_at_toy_size(capsys):
    bench = _load_benchmark()
    # main() also checks that its loop baseline computes the same loss as BAMLoss, and raises if not.
    results = bench.main(batch=8, dims=(16, 8), repeats=1, warmup=0, device="cpu")
    assert set(results) == {16, 8}
    for ratios in results.values():
        assert set(ratios) == {"time_ratio", "memory_ratio"}
        assert not math.isinf(ratios["memory_ratio"])
    out = capsys.readouterr().out
    assert out.count("targets:") == 2 and "floor" in out and "loop" in out and "ours" in out


def test_loop_baseline_matches_bam_loss():
    """The baseline is only a fair comparison if it computes the same objective, gradients included."""
    import torch

    from bam.losses import BAMLoss

    bench = _load_benchmark()
    shape = bench.Shape(batch=6, dim=12, top_k=5)
    x = torch.randn(shape.num_crops * shape.batch, shape.dim, generator=torch.Generator().manual_seed(0))
    ours_x, loop_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = BAMLoss(shape.num_crops, shape.num_global, num_target_crops=shape.num_target, top_k=shape.top_k)(ours_x)
    loop = bench.loop_loss(loop_x, shape)
    ours.backward()
    loop.backward()
    torch.testing.assert_close(loop, ours, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loop_x.grad, ours_x.grad, rtol=1e-4, atol=1e-6)
