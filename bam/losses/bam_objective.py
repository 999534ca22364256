"""What both computations of the BAM objective share: its settings (`BAMObjective`, the one place
their defaults are written), the per-process layout of the problem, the input checks, the target
columns (step 2) and the positive mask (step 4). Step numbers refer to `docs/objective.md`.

`bam.losses.bam_loss` (the whole `(V*B, N)` matrix at once) and `bam.losses.blockwise` (column
blocks) both build on this module; neither imports the other's internals.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from bam.losses.settings import require_positive, settings_of
from bam.ops import distributed
from bam.ops.crops import check_crops_of_objective


@dataclass(frozen=True)
class BAMObjective:
    """The settings of the BAM objective (Shalam & Korman, ECCV 2024).

    Args:
        num_target_crops: views used as attention columns `T` (default: all `G` global crops).
        reg: entropic regularisation of the Sinkhorn target (smaller: sharper target).
        temperature: temperature of the source softmax.
        sinkhorn_iterations: balancing iterations of the target.
        top_k: keep only each image's `k` strongest target columns (see :func:`keeps_all`).
        positive_masking: exclude the other views of the same image from both sides.
        column_block_size: if > 0, compute in blocks of this many target columns (same result;
            memory O(V*B*block) instead of O(V*B*N) per process, about 4x the matmul time; see
            `bam.losses.blockwise`).
        balance_local_rows: the local crops' rows take part in the Sinkhorn balancing (step 5, the
            paper's form). False balances over the global crops' rows only, the rows that give
            targets: a momentum teacher then embeds only the global crops (DINO's cost, a cheaper
            step) and the loss takes teacher embeddings of `G * B` rows.

    Frozen: a schedule that changes `reg` between steps makes a new one (`dataclasses.replace`).
    """

    num_target_crops: int | None = None
    reg: float = 0.05
    temperature: float = 0.1
    sinkhorn_iterations: int = 3
    top_k: int = 0
    positive_masking: bool = True
    column_block_size: int = 0
    balance_local_rows: bool = True

    def __post_init__(self) -> None:
        require_positive(reg=self.reg, temperature=self.temperature)
        if self.column_block_size > 0 and not self.balance_local_rows:
            raise ValueError("balance_local_rows=False is computed on the whole matrix only: set column_block_size=0")
        if self.sinkhorn_iterations < 0:
            raise ValueError(f"sinkhorn_iterations must be >= 0, got {self.sinkhorn_iterations}")
        if self.column_block_size < 0:
            raise ValueError(f"column_block_size must be >= 0 (0: not blocked), got {self.column_block_size}")

    def target_crops(self, num_crops: int, num_global_crops: int) -> int:
        """`T` for these crop counts, after checking that the counts are possible."""
        check_crops_of_objective(num_crops, num_global_crops)
        target = num_global_crops if self.num_target_crops is None else self.num_target_crops
        if not 1 <= target <= num_global_crops:
            raise ValueError(f"num_target_crops={target} must be between 1 and num_global_crops={num_global_crops}")
        return target


def objective_of(objective: BAMObjective | None, settings: dict[str, Any]) -> BAMObjective:
    """`objective` (default: the defaults) with any `settings` given by name replaced."""
    return settings_of(BAMObjective, objective, settings)


def keeps_all(top_k: int, columns: int) -> bool:
    """The "keep all" rule of top-k: `k <= 0` or `k >= N` keeps every column."""
    return top_k <= 0 or top_k >= columns


@dataclass(frozen=True)
class Layout:
    """Shapes of one process's part of the objective (see the objective's notation)."""

    num_crops: int  # V
    num_global: int  # G
    num_target: int  # T
    batch: int  # B
    world: int  # W
    rank: int
    masking: bool

    @property
    def rows(self) -> int:
        return self.num_crops * self.batch

    @property
    def columns(self) -> int:
        return self.num_target * self.batch * self.world

    @property
    def target_rows(self) -> int:
        """Rows of the global crops, the ones that provide targets: `G * B`."""
        return self.num_global * self.batch

    def balanced(self, local_rows: bool) -> Layout:
        """The layout of the rows the Sinkhorn balances: all `V` crops, or the `G` global ones."""
        return self if local_rows else replace(self, num_crops=self.num_global)


def layout_of(
    student: torch.Tensor, teacher: torch.Tensor | None, num_crops: int, num_global_crops: int, objective: BAMObjective
) -> Layout:
    """Validate the embeddings against the settings and return this process's layout."""
    num_target = objective.target_crops(num_crops, num_global_crops)
    world, rank = distributed.world_size(), distributed.rank()
    if student.dim() != 2:
        raise ValueError(f"BAM expects (num_crops * B, D) embeddings, got shape {tuple(student.shape)}")
    if student.shape[0] % num_crops:
        raise ValueError(
            f"{student.shape[0]} embedding rows are not divisible by num_crops={num_crops}; "
            "rows must be crop-major, num_crops blocks of B images each"
        )
    batch = student.shape[0] // num_crops
    teacher_rows = student.shape[0] if objective.balance_local_rows else num_global_crops * batch
    if teacher is not None and tuple(teacher.shape) != (teacher_rows, student.shape[1]):
        crops = "same crops" if objective.balance_local_rows else "global crops only (balance_local_rows=False)"
        raise ValueError(
            f"teacher embeddings have shape {tuple(teacher.shape)} but must be {(teacher_rows, student.shape[1])} "
            f"for student embeddings of {tuple(student.shape)}; the teacher must embed the {crops}"
        )
    if objective.positive_masking and batch * world < 2:
        raise ValueError(
            f"positive masking needs at least 2 images in the global batch, got {batch} per process "
            f"x {world} processes; increase the batch size or set positive_masking=False"
        )
    return Layout(num_crops, num_global_crops, num_target, batch, world, rank, objective.positive_masking)


def target_columns(embeddings: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Step 2: the first T crops of every process, ordered crop-major, then rank, then image.

    Without a teacher the gather carries gradient back to every process's own rows.
    """
    local = embeddings[: layout.num_target * layout.batch]
    gathered = distributed.gather_with_grad(local) if local.requires_grad else distributed.gather(local)
    world, dim = gathered.shape[0], gathered.shape[-1]
    return gathered.view(world, layout.num_target, layout.batch, dim).transpose(0, 1).reshape(-1, dim)


def positive_mask(num_crops: int, batch_size: int, num_target_crops: int, world_size: int = 1, rank: int = 0,
                  device: torch.device | str | None = None, columns: tuple[int, int] | None = None) -> torch.Tensor:
    """Boolean `(num_crops * B, num_target_crops * B * W)` mask of each row's own image (step 4),
    or only its `[start, stop)` range of `columns`.

    Row (crop v, image b) on process `rank` masks column `t*B*W + rank*B + b` for every target
    crop t: the other views of the same image are positives, not candidates to attend to.
    """
    columns = (0, num_target_crops * batch_size * world_size) if columns is None else columns
    row_image = torch.arange(num_crops * batch_size, device=device) % batch_size + rank * batch_size
    column_image = torch.arange(*columns, device=device) % (batch_size * world_size)
    return row_image.unsqueeze(1) == column_image.unsqueeze(0)
