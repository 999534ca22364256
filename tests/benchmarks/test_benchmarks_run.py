"""The benchmarks still run (at toy sizes). No benchmark figure is asserted: wall-clock numbers on a
shared CI machine mean nothing; the script is for people to read. Only their bookkeeping is
checked (which child a time is charged to), with `sleep` children seconds apart."""
from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).parent / "bench_loss.py"


def _load_benchmark(name: str = "bench_loss"):
    spec = importlib.util.spec_from_file_location(name, BENCH.with_name(f"{name}.py"))
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


# the shipped demo through `bam pretrain`, shrunk: 200 digits, batches of 32, a small head, a k-NN bank
# of 200 digits, no plots and no end-of-run pictures (their t-SNE map is no part of either ledger; the
# demo chain in tests/evaluation/test_eval_demo_chain.py draws them)
TINY_DEMO = ["--trainer.max_epochs=1", "--data.init_args.fraction=0.05", "--data.init_args.batch_size=32",
             "--data.init_args.knn_bank_fraction=0.05", "--model.init_args.projector.hidden_dim=64",
             "--model.init_args.projector.out_dim=32", "--plots.enabled=false", "--pictures.enabled=false"]


@pytest.mark.slow  # 12 CPU-seconds: longer than a fast-tier test may take (a few seconds)
def test_step_benchmark_runs_at_toy_size(capsys):
    """Both recipe shapes and the whole-run split run; every phase of both steps is timed and the
    run's CPU time is charged to the parts that ran in it."""
    bench = _load_benchmark("bench_step")
    results = bench.main(["demo", "vit_small"], repeats=1, warmup=0, threads=1, vit_sizes=(32, 16), vit_batch=4,
                         demo_batch=8, run_epochs=1, run_args=TINY_DEMO)
    for shape in ("demo", "vit_small"):
        assert set(results[shape]["bam"]) == {*bench.PHASES, "step"}
        assert set(results[shape]["backbone only"]) == {*bench.BACKBONE_ONLY_PHASES, "step"}
        assert set(results[shape][bench.GLOBAL_ONLY]) == {*bench.PHASES, "step"}
        assert results[shape]["bam"]["teacher forward"] > 0  # both recipes have a momentum teacher
    ledger = results["run"]
    for part in ("training", "k-NN evaluations", "baselines", "BN re-estimation", "checkpointing"):
        assert ledger.cpu[part] > 0, part
    out = capsys.readouterr().out
    assert out.count("BAM step / backbone-only step:") == 2
    assert out.count("BAM with a global-crops-only teacher (objective.balance_local_rows: false) / backbone-only step:") == 2
    assert "bam_vit_small_patch16_224, batch 4, 2x32 + 6x16 px" in out
    assert "Whole demo run (1 epochs" in out


@pytest.mark.process
def test_demo_benchmark_compares_recipes_through_bam_pretrain(tmp_path, capsys):
    """Both recipes run as `bam pretrain` children: their CPU time comes from the kernel and their
    k-NN from the reports the runs wrote."""
    bench = _load_benchmark("bench_demo")
    # HEAD: a shallow clone (as CI may make) holds no older revision
    old, new = bench.main(baseline_rev="HEAD", threads=1, extra_args=TINY_DEMO, out_dir=tmp_path)
    for run in (old, new):
        assert run.returncode == 0
        assert run.cpu_s > 0 and run.wall_s > 0
        assert set(run.report()) == {"trained backbone", "random init (same architecture)", "raw pixels"}
    assert "demo_HEAD.yaml" in old.config.name and "seed_everything" in old.config.read_text()
    assert "new / old CPU-seconds:" in capsys.readouterr().out


@pytest.mark.process
def test_concurrent_recipes_each_keep_their_own_wall_time(tmp_path):
    """A recipe that ends first is timed to its own end, not to the end of the one listed before it."""
    bench = _load_benchmark("bench_demo")
    slow, fast = (bench.DemoRun(name, tmp_path / f"{name}.yaml", tmp_path / name) for name in ("slow", "fast"))
    for run, seconds in ((slow, "3"), (fast, "0.1")):
        run.started = time.perf_counter()
        run.process = subprocess.Popen(["sleep", seconds])
    bench.wait_all([slow, fast])
    assert slow.returncode == fast.returncode == 0
    assert fast.wall_s < 2 < slow.wall_s
