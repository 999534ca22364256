"""Multi-process BAM on CPU (gloo) equals single-process BAM on the concatenated global batch.

Each of W spawned processes holds B images of a fixed, seeded global batch and computes the loss on
its own rows. With DDP, parameter gradients are averaged over processes; so the objective is right
exactly when (a) the mean of the per-process losses is the single-process loss and (b) each
process's gradient w.r.t. its own embeddings, divided by W, is the single-process gradient of those
rows. (b) fails for a gather whose backward does not sum over processes (a known bug elsewhere).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from bam.losses import BAMLoss

pytestmark = pytest.mark.distributed

NUM_CROPS, NUM_GLOBAL, BATCH, DIM = 4, 2, 3, 8  # V = 2 global + 2 local crops, B images per process
CONFIGS = {  # name: (with teacher, top_k)
    "no_teacher": (False, 0),
    "teacher": (True, 0),
    "no_teacher_topk": (False, 5),
    "teacher_topk": (True, 5),
}


def global_batch(world: int, seed: int) -> torch.Tensor:
    """Seeded crop-major global batch: `(V, W*B, D)` (crop, global image, feature)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(NUM_CROPS, world * BATCH, DIM, generator=generator)


def rows_of(batch: torch.Tensor, rank: int) -> torch.Tensor:
    """Process `rank`'s crop-major rows: for every crop, images rank*B..(rank+1)*B-1."""
    return batch[:, rank * BATCH : (rank + 1) * BATCH].reshape(-1, batch.shape[-1])


def loss_and_grad(
    student: torch.Tensor, teacher: torch.Tensor | None, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    student = student.clone().requires_grad_()
    loss = BAMLoss(NUM_CROPS, NUM_GLOBAL, top_k=top_k)(student, teacher)
    loss.backward()
    return loss.detach(), student.grad


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Runs in a spawned process: every configuration on this process's share of the batch."""
    torch.set_num_threads(1)  # W processes share 2 cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        student, teacher = global_batch(world, seed=0), global_batch(world, seed=1)
        results = {}
        for name, (with_teacher, top_k) in CONFIGS.items():
            local_teacher = rows_of(teacher, rank) if with_teacher else None
            results[name] = loss_and_grad(rows_of(student, rank), local_teacher, top_k)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(world: int, tmp: Path) -> list[dict]:
    # imported here, not at the top: every spawned worker imports this module, and needs no Lightning
    from tiny_runs import spawn_gloo_workers

    spawn_gloo_workers(_worker, world, tmp)
    return [torch.load(tmp / f"rank{rank}.pt") for rank in range(world)]


@pytest.fixture(scope="module", params=[3], ids=lambda w: f"W{w}")
def distributed_run(request, tmp_path_factory) -> tuple[int, list[dict]]:
    """One spawn, shared by every configuration's test. 3 processes, not also 2: the same code, and
    a world of 2 would pass also where a gather took "the other rank" for "every other rank"."""
    world = request.param
    return world, _spawn(world, tmp_path_factory.mktemp(f"gloo_w{world}"))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_single_process(distributed_run, config):
    world, results = distributed_run
    with_teacher, top_k = CONFIGS[config]
    student, teacher = global_batch(world, seed=0), global_batch(world, seed=1)

    def crop_major(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, DIM)

    loss, grad = loss_and_grad(crop_major(student), crop_major(teacher) if with_teacher else None, top_k)
    grad = grad.view(NUM_CROPS, world * BATCH, DIM)

    losses = torch.stack([results[rank][config][0] for rank in range(world)])
    torch.testing.assert_close(losses.mean(), loss, rtol=1e-6, atol=1e-6)
    for rank in range(world):
        process_grad = results[rank][config][1]
        torch.testing.assert_close(process_grad / world, rows_of(grad, rank), rtol=0, atol=1e-5)
    # Each process's own loss differs from the global one: the check above is not vacuous.
    assert (losses - loss).abs().max() > 1e-4
