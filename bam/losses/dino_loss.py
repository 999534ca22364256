"""DINO objective (Caron et al., ICCV 2021): self-distillation with centring and sharpening.

Pure torch, usable in any training loop. Outputs are crop-major, as everywhere in bam: rows
`[crop 0: images 0..B-1 | crop 1: images 0..B-1 | ...]`, global crops first. The student embeds
every crop, the momentum teacher the `G` global crops only; both outputs are the `K` logits of the
DINO head (`bam.models.DINOHead`).

1. Teacher targets, without gradient: `q = softmax((t - c) / teacher_temperature)`. Subtracting
   the centre `c` keeps one dimension from dominating (against collapse onto one output); the low
   teacher temperature sharpens the targets (against collapse onto the uniform output).
2. Student predictions `p = softmax(s / student_temperature)`.
3. Every student crop `j` predicts the target of every global crop `i != j` of the same image:
   the loss is the cross-entropy `-<q_i, log p_j>` averaged over the `G * (V - 1)` pairs and the
   images (the average over pairs is SwAV's swapped prediction, `swapped_prediction`, reused).
4. After the loss, `c <- m * c + (1 - m) * mean of t over the *global* batch` (centre momentum
   `m`, 0.9). The mean is all-reduced, so every process holds the same centre.

Under `torch.distributed` each process's loss is a mean over its own images and needs no gather:
the targets of an image depend on that image and the shared centre only, so after DDP's gradient
averaging, training equals one process on the global batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bam.losses.settings import require_positive, settings_of
from bam.losses.swav_loss import swapped_prediction
from bam.ops import compute_dtype
from bam.ops.crops import check_crops_of_objective
from bam.ops.distributed import all_reduce_, world_size


@dataclass(frozen=True)
class DINOObjective:
    """The settings of the DINO objective, the paper's values by default.

    Args:
        student_temperature: temperature of the student's softmax (0.1).
        teacher_temperature: temperature of the teacher's softmax at the start of training (0.04);
            `DINOModule` warms it up to its `teacher_temperature_final`.
        center_momentum: momentum of the centre's moving average (0.9).
    """

    student_temperature: float = 0.1
    teacher_temperature: float = 0.04
    center_momentum: float = 0.9

    def __post_init__(self) -> None:
        require_positive(student_temperature=self.student_temperature, teacher_temperature=self.teacher_temperature)
        if not 0.0 <= self.center_momentum < 1.0:
            raise ValueError(f"center_momentum={self.center_momentum} must be in [0, 1) (1 would never update the centre)")


def dino_targets(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temperature: float) -> torch.Tensor:
    """Step 1: centred, sharpened teacher distributions (rows sum to 1), without gradient."""
    with torch.no_grad():
        return F.softmax((teacher_logits.detach() - center) / teacher_temperature, dim=1)


def dino_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    *,
    num_global_crops: int = 2,
    student_temperature: float = DINOObjective.student_temperature,
    teacher_temperature: float = DINOObjective.teacher_temperature,
) -> torch.Tensor:
    """Functional DINO loss (steps 1-3) of `(V*B, K)` student logits, `(G*B, K)` teacher logits of
    the global crops, and the `(1, K)` centre; the centre is not updated here (`update_center`)."""
    batch = _check_inputs(student_logits, teacher_logits, center, num_global_crops)
    dtype = compute_dtype(student_logits)
    # Logits divided by 0.04 lose precision in half precision: run in float32.
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        targets = dino_targets(teacher_logits.to(dtype), center.to(dtype), teacher_temperature)
        return swapped_prediction(student_logits.to(dtype), targets.view(num_global_crops, batch, -1), student_temperature)


@torch.no_grad()
def batch_center(teacher_logits: torch.Tensor) -> torch.Tensor:
    """The `(1, K)` mean of the teacher's logits over every process's rows (all-reduced)."""
    total = all_reduce_(teacher_logits.detach().float().sum(dim=0, keepdim=True))
    return total / (teacher_logits.shape[0] * world_size())


def _check_inputs(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, num_global_crops: int) -> int:
    """Validate shapes; return the per-process batch size B."""
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"DINO expects (V*B, K) student and (G*B, K) teacher logits of the same K, got shapes "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if num_global_crops < 1 or teacher.shape[0] % num_global_crops:
        raise ValueError(f"the teacher's {teacher.shape[0]} rows are not num_global_crops={num_global_crops} blocks of images")
    batch = teacher.shape[0] // num_global_crops
    if student.shape[0] % batch or student.shape[0] // batch < max(2, num_global_crops):
        raise ValueError(
            f"the student's {student.shape[0]} rows are not crop blocks of the teacher's {batch} images, at least 2 "
            f"and the {num_global_crops} global crops first"
        )
    if center.shape != (1, student.shape[1]):
        raise ValueError(f"the centre must have shape (1, {student.shape[1]}), got {tuple(center.shape)}")
    return batch


class DINOLoss(nn.Module):
    """The DINO objective with its centre, a registered buffer (checkpointed, the same on every
    process).

    Args:
        out_dim: `K`, the DINO head's output dimension.
        num_crops: views per image `V` (global + local) of the student.
        num_global_crops: the first `G` views are global; the teacher embeds only them.
        objective: the settings (`DINOObjective`); `teacher_temperature` is the attribute
            `self.teacher_temperature`, which a schedule may change between steps.

    `forward(student_logits, teacher_logits)` returns the scalar loss and then, in training mode,
    moves the centre towards the batch's mean teacher output.
    """

    center: torch.Tensor

    def __init__(
        self, out_dim: int, num_crops: int, num_global_crops: int = 2, objective: DINOObjective | None = None
    ) -> None:
        super().__init__()
        check_crops_of_objective(num_crops, num_global_crops, 2, "DINO (the student predicts the teacher's output of another crop)")
        self.objective = settings_of(DINOObjective, objective, {})  # a mapping too: a config's or a checkpoint's
        self.num_crops = num_crops
        self.num_global_crops = num_global_crops
        self.teacher_temperature = self.objective.teacher_temperature
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        if student_logits.shape[0] != self.num_crops * (teacher_logits.shape[0] // self.num_global_crops):
            raise ValueError(
                f"expected {self.num_crops} student crops per {self.num_global_crops} teacher crops, got "
                f"{student_logits.shape[0]} student and {teacher_logits.shape[0]} teacher rows"
            )
        loss = dino_loss(student_logits, teacher_logits, self.center, num_global_crops=self.num_global_crops,
                         student_temperature=self.objective.student_temperature,
                         teacher_temperature=self.teacher_temperature)
        if self.training:
            self.update_center(teacher_logits)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """Step 4: `c <- m c + (1 - m) mean(t)` with the mean over the global batch."""
        momentum = self.objective.center_momentum
        self.center.mul_(momentum).add_(batch_center(teacher_logits).to(self.center.dtype), alpha=1.0 - momentum)

    def chance_level(self) -> float:
        """The loss of uniform student predictions, log(K), whatever the targets."""
        return math.log(self.center.shape[1])

    def extra_repr(self) -> str:
        return f"num_crops={self.num_crops}, num_global_crops={self.num_global_crops}, {self.objective}"
