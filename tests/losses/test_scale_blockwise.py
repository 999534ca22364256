"""The column-blocked objective equals `bam_loss`: value and gradients, alone and on 2 gloo processes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bam.losses import bam_loss
from tiny_runs import spawn_gloo_workers

# name: (num_crops, num_global, num_target, top_k, sinkhorn_iterations, teacher, positive_masking)
CONFIGS = {
    "recipe_shape": (8, 2, 2, 5, 3, False, True),
    "teacher_topk": (4, 2, 2, 4, 3, True, True),
    "one_target_crop": (4, 2, 1, 0, 3, True, True),
    "no_sinkhorn": (4, 2, 2, 0, 0, False, True),
    "no_masking": (3, 2, 2, 3, 2, False, False),
    "single_view": (1, 1, 1, 0, 3, False, True),
}
BATCH, DIM = 6, 16


def _inputs(config: tuple, rows: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(rows, DIM, generator=generator, dtype=dtype)
    teacher = torch.randn(rows, DIM, generator=generator, dtype=dtype) if config[5] else None
    return student, teacher


def _loss_and_grad(loss_fn, student, teacher, config, **extra) -> tuple[torch.Tensor, torch.Tensor]:
    num_crops, num_global, num_target, top_k, iterations, _, masking = config
    student = student.clone().requires_grad_()
    loss = loss_fn(student, teacher, num_crops=num_crops, num_global_crops=num_global, num_target_crops=num_target,
                   top_k=top_k, sinkhorn_iterations=iterations, positive_masking=masking, **extra)
    loss.backward()
    return loss.detach(), student.grad


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("block", [1, 5, 7, 10_000])  # one column, uneven, a block larger than N
def test_equals_unblocked_in_float64(name, block):
    config = CONFIGS[name]
    student, teacher = _inputs(config, config[0] * BATCH, seed=0, dtype=torch.float64)
    loss, grad = _loss_and_grad(bam_loss, student, teacher, config)
    blocked_loss, blocked_grad = _loss_and_grad(bam_loss, student, teacher, config, column_block_size=block)
    torch.testing.assert_close(blocked_loss, loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(blocked_grad, grad, rtol=1e-10, atol=1e-14)


def test_equals_unblocked_in_float32_and_under_autocast():
    config = CONFIGS["recipe_shape"]
    student, teacher = _inputs(config, config[0] * BATCH, seed=1, dtype=torch.float32)
    loss, grad = _loss_and_grad(bam_loss, student, teacher, config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        blocked_loss, blocked_grad = _loss_and_grad(bam_loss, student, teacher, config, column_block_size=4)
    assert blocked_loss.dtype == torch.float32
    torch.testing.assert_close(blocked_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(blocked_grad, grad, rtol=1e-4, atol=1e-6)


def test_half_precision_student_and_teacher_are_computed_in_float32():
    # mixed-precision training hands both encoders' embeddings over in bfloat16
    config = CONFIGS["teacher_topk"]
    student, teacher = (x.to(torch.bfloat16) for x in _inputs(config, config[0] * BATCH, seed=2, dtype=torch.float32))
    loss, grad = _loss_and_grad(bam_loss, student.float(), teacher.float(), config)
    blocked_loss, blocked_grad = _loss_and_grad(bam_loss, student, teacher, config, column_block_size=5)
    assert blocked_loss.dtype == torch.float32 and blocked_grad.dtype == torch.bfloat16
    torch.testing.assert_close(blocked_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(blocked_grad.float(), grad, rtol=1e-2, atol=1e-4)


def test_block_size_must_not_be_negative():
    with pytest.raises(ValueError, match="column_block_size"):
        bam_loss(torch.randn(8, 4), num_crops=2, column_block_size=-1)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        for name in ("recipe_shape", "teacher_topk", "no_sinkhorn"):
            config = CONFIGS[name]
            student, teacher = _inputs(config, config[0] * BATCH, seed=10 + rank, dtype=torch.float64)
            results[name] = (
                _loss_and_grad(bam_loss, student, teacher, config),
                _loss_and_grad(bam_loss, student, teacher, config, column_block_size=5),
            )
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_equals_unblocked_on_two_processes(tmp_path):
    """Same gathers and all-reduces in the same order (a mismatch would deadlock), same values
    and same per-process gradients (which carry the other process's loss terms)."""
    spawn_gloo_workers(_worker, 2, tmp_path)
    for rank in range(2):
        for name, ((loss, grad), (blocked_loss, blocked_grad)) in torch.load(tmp_path / f"rank{rank}.pt").items():
            torch.testing.assert_close(blocked_loss, loss, rtol=1e-12, atol=1e-12, msg=f"{name}, rank {rank}")
            torch.testing.assert_close(blocked_grad, grad, rtol=1e-10, atol=1e-14, msg=f"{name}, rank {rank}")


def test_bam_loss_module_option_selects_the_blocked_form(monkeypatch):
    """`BAMLoss(column_block_size=...)` (and so `BAMModule`) really uses the blocked form."""
    import bam.losses.blockwise as blockwise
    from bam import BAMLoss

    calls = []
    original = blockwise.blockwise_bam_loss
    monkeypatch.setattr(blockwise, "blockwise_bam_loss", lambda *a, **k: calls.append(k) or original(*a, **k))
    student = torch.randn(4 * 6, 16, dtype=torch.float64)
    blocked = BAMLoss(4, column_block_size=5, top_k=4)(student)
    assert calls and calls[0]["objective"].column_block_size == 5
    torch.testing.assert_close(blocked, BAMLoss(4, top_k=4)(student))
