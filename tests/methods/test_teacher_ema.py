"""The momentum teacher is the EMA of the student, step by step, against an EMA computed here in
float64 (a skipped update, swapped `m` / `1 - m` or a momentum read at the wrong step all fail)."""
from __future__ import annotations

import pytorch_lightning as pl
import torch

from bam import BAMModule
from tiny_runs import TinyCropsDataModule

SMALL_HEAD = dict(projector=dict(hidden_dim=64, out_dim=32, num_layers=2))
STEPS = 3


class RecordStudent(pl.Callback):
    """The student's parameters (float64) after every optimiser step, and the momentum in force."""

    def __init__(self) -> None:
        self.students: list[list[torch.Tensor]] = []
        self.momenta: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.momenta.append(module.teacher_momentum_at(trainer.global_step))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.students.append([p.detach().double().clone() for p in module.student.parameters()])


def train_and_expect(momentum: float, momentum_final: float) -> tuple[BAMModule, list[torch.Tensor], list[torch.Tensor]]:
    """Train STEPS steps; return the model, the teacher's float64 EMA computed here, and the start."""
    torch.manual_seed(0)
    # a large learning rate: one step moves the student by ~1e-2, far above the tolerance below
    model = BAMModule(backbone="bam_cnn4", num_local_crops=2, momentum_teacher=True, lr=50.0,
                      teacher_momentum=momentum, teacher_momentum_final=momentum_final, warmup_epochs=0,
                      **SMALL_HEAD)
    start = [p.detach().double().clone() for p in model.teacher.parameters()]
    record = RecordStudent()
    pl.Trainer(accelerator="cpu", max_steps=STEPS, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, callbacks=[record]).fit(
        model, TinyCropsDataModule(num_images=8 * STEPS, batch_size=8))
    assert len(record.students) == STEPS
    expected = [t.clone() for t in start]
    for momentum_now, student in zip(record.momenta, record.students):
        expected = [momentum_now * t + (1.0 - momentum_now) * s for t, s in zip(expected, student)]
    return model, expected, start


def assert_teacher_is(model: BAMModule, expected: list[torch.Tensor], start: list[torch.Tensor]) -> None:
    moved = max((e - s).abs().max().item() for e, s in zip(expected, start))
    assert moved > 1e-3, f"the EMA moved the teacher by {moved:g} only: the test could not see a wrong update"
    for teacher, want in zip(model.teacher.parameters(), expected):
        # float32 rounding of a few EMA steps: ~1e-7 relative, far below the 1e-3 an update moves
        torch.testing.assert_close(teacher.detach().double(), want, rtol=1e-5, atol=1e-6)


def test_teacher_is_float64_ema_of_student_with_constant_momentum():
    model, expected, start = train_and_expect(0.9, 0.9)
    assert_teacher_is(model, expected, start)


def test_teacher_follows_the_cosine_momentum_schedule():
    model, expected, start = train_and_expect(0.7, 1.0)
    assert model.teacher_momentum_at(0) == 0.7 and model.teacher_momentum_at(model.step_budget.total_steps) == 1.0
    assert_teacher_is(model, expected, start)
