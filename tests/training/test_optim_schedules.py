"""The optimiser setup and the per-step schedules against values computed here from their
definitions (warm-up from 0, half-cosine to the minimum, lr scaled by global batch / 256)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bam.training.optim import StepBudget, create_optimizer, optimizer_with_schedule, takes_momentum
from bam.training.schedules import (apply_lr_schedule, cosine, global_batch_size, linear_ramp,
                                    rebuild_lr_schedule_on_resume, warmup_cosine_lr)


def expected_lr(step: int, peak: float, min_lr: float, total: int, warmup: int) -> float:
    """Linear from 0 over `warmup` steps, then a half-cosine from `peak` to `min_lr` at `total`."""
    if step < warmup:
        return peak * step / warmup
    progress = min((step - warmup) / (total - warmup), 1.0)
    return min_lr + (peak - min_lr) * (1 + math.cos(math.pi * progress)) / 2


@pytest.mark.parametrize("step, value", [(-3, 0.9), (0, 0.9), (2, 0.9 + 0.1 * (1 - math.cos(math.pi * 0.25)) / 2),
                                         (4, 0.95), (8, 1.0), (30, 1.0)])
def test_cosine_goes_from_start_to_end_then_stays(step, value):
    assert cosine(0.9, 1.0, step, 8) == pytest.approx(value)


def test_cosine_over_no_steps_is_the_end_value():
    assert cosine(0.9, 1.0, 0, 0) == pytest.approx(0.9) and cosine(0.9, 1.0, 1, 0) == pytest.approx(1.0)


@pytest.mark.parametrize("step, value", [(-1, 2.0), (0, 2.0), (1, 3.5), (3, 6.5), (4, 8.0), (9, 8.0)])
def test_linear_ramp_goes_from_start_to_end_then_stays(step, value):
    assert linear_ramp(2.0, 8.0, step, 4) == pytest.approx(value)


@pytest.mark.parametrize("ramp_steps", [0, -2])
def test_linear_ramp_without_steps_is_the_end_value(ramp_steps):
    assert linear_ramp(2.0, 8.0, 0, ramp_steps) == 8.0


def test_linear_ramp_of_one_step_starts_at_the_start_value():
    assert linear_ramp(2.0, 8.0, 0, 1) == 2.0 and linear_ramp(2.0, 8.0, 1, 1) == 8.0


def _sgd(lr: float = 0.4) -> torch.optim.Optimizer:
    weights, scaled = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [weights]}, {"params": [scaled], "lr_scale": 0.5}], lr=lr)


@pytest.mark.parametrize("total, warmup", [(10, 3), (6, 0), (5, 3), (4, 3)])
def test_warmup_cosine_lr_at_every_step(total, warmup):
    optimizer = _sgd(0.4)
    scheduler = warmup_cosine_lr(optimizer, total, warmup, min_lr=0.01)
    for step in range(total + 2):
        scheduler.step_update(num_updates=step)
        # a schedule with one step after the warm-up: that step is at the peak whatever the cosine's length
        expected = expected_lr(step, 0.4, 0.01, max(total, warmup + 2), warmup) if step < total else 0.01
        if total - warmup == 1 and step >= total:
            continue  # the cosine of length 2 is not at its end yet; no step of the run reads it
        lrs = [group["lr"] for group in optimizer.param_groups]
        assert lrs == pytest.approx([expected, expected * 0.5]), (step, lrs)


def test_apply_lr_schedule_sets_the_lr_of_the_current_step():
    optimizer = _sgd(0.4)
    scheduler = warmup_cosine_lr(optimizer, 10, 4, min_lr=0.0)
    trainer = SimpleNamespace(lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)])
    module = SimpleNamespace(global_step=2, trainer=trainer)
    apply_lr_schedule(module)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.2)


def test_resume_drops_the_saved_lr_schedulers_only():
    checkpoint = {"lr_schedulers": [{"base_lrs": [1.0]}], "state_dict": {"w": 1}}
    rebuild_lr_schedule_on_resume(checkpoint)
    assert checkpoint == {"lr_schedulers": [], "state_dict": {"w": 1}}
    plain = {"state_dict": {}}
    rebuild_lr_schedule_on_resume(plain)
    assert plain == {"state_dict": {}}


def _trainer(datamodule=None, loader=None, world_size=2, accumulate=3):
    trainer = SimpleNamespace(datamodule=datamodule, train_dataloader=loader, world_size=world_size,
                              accumulate_grad_batches=accumulate)
    loader_of_setup = SimpleNamespace(batch_size=5)
    trainer.fit_loop = SimpleNamespace(setup_data=lambda: setattr(trainer, "train_dataloader", loader_of_setup))
    return trainer


def test_global_batch_is_per_process_batch_times_processes_times_accumulation():
    assert global_batch_size(_trainer(datamodule=SimpleNamespace(batch_size=8))) == 48
    assert global_batch_size(_trainer(loader=SimpleNamespace(batch_size=7), world_size=1, accumulate=1)) == 7
    assert global_batch_size(_trainer()) == 30  # the loader is set up first when the trainer has none yet


def test_global_batch_without_any_batch_size_says_what_to_give():
    with pytest.raises(ValueError, match="cannot tell the batch size the learning rate is scaled by: give the data "
                                         "module a `batch_size` attribute, or train from a DataLoader built with "
                                         r"batch_size= \(not a batch_sampler\)"):
        global_batch_size(_trainer(loader=SimpleNamespace(batch_size=None)))
    with pytest.raises(ValueError, match="cannot tell the batch size"):
        global_batch_size(_trainer(loader=[[1, 2], [3, 4]]))  # any iterable of batches, no batch_size attribute


@pytest.mark.parametrize("stepping, epochs, expected", [(100, 4, (100, 25)), (100, None, (100, 100)), (0, 3, (1, 1)),
                                                         (7, 10, (7, 1)), (7, 2, (7, 3)), (100, 0, (100, 100))])
def test_step_budget_of_a_trainer(stepping, epochs, expected):
    budget = StepBudget.of(SimpleNamespace(estimated_stepping_batches=stepping, max_epochs=epochs))
    assert (budget.total_steps, budget.steps_per_epoch) == expected


def test_step_budget_counts_whole_steps_of_fractional_epochs():
    assert StepBudget(100, 25).steps(1.5) == 37 and StepBudget(100, 25).steps(0) == 0


def test_momentum_goes_to_the_optimisers_that_take_one():
    assert takes_momentum("sgd") and takes_momentum("lars") and not takes_momentum("adamw")


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def test_sgd_gets_the_momentum_and_no_weight_decay_on_1d_parameters():
    model = _model()
    extra = nn.Parameter(torch.zeros(3))
    built = create_optimizer(model, "sgd", lr=0.3, weight_decay=0.05, momentum=0.8, extra_groups=[{"params": [extra]}])
    assert isinstance(built, torch.optim.SGD)
    decayed = {id(p) for group in built.param_groups if group["weight_decay"] == 0.05 for p in group["params"]}
    assert decayed == {id(model[0].weight), id(model[2].weight)}
    assert all(group["momentum"] == 0.8 and group["lr"] == 0.3 for group in built.param_groups)
    assert built.param_groups[-1]["params"] == [extra]
    assert all(group["initial_weight_decay"] == group["weight_decay"] for group in built.param_groups)
    assert sorted(g["initial_weight_decay"] for g in built.param_groups) == [0.0, 0.0, 0.05]


def test_adamw_is_built_without_a_momentum_argument():
    built = create_optimizer(_model(), "adamw", lr=1e-3, weight_decay=0.04, momentum=0.9, betas=(0.8, 0.95))
    assert isinstance(built, torch.optim.AdamW)
    assert all("momentum" not in group and group["betas"] == (0.8, 0.95) for group in built.param_groups)




def test_optimizer_with_schedule_scales_lr_by_global_batch_and_warms_up_per_step():
    trainer = SimpleNamespace(estimated_stepping_batches=40, max_epochs=4)
    extra = nn.Parameter(torch.zeros(2))
    config = optimizer_with_schedule(trainer, _model(), global_batch=512, optimizer="sgd", lr=0.1, min_lr=0.001,
                                     warmup_epochs=1.5, weight_decay=0.05, momentum=0.9,
                                     extra_groups=[{"params": [extra], "weight_decay": 0.0}], nesterov=False)
    assert config["lr_scheduler"]["interval"] == "step"
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert optimizer.param_groups[-1]["params"] == [extra]
    assert sorted(group["weight_decay"] for group in optimizer.param_groups) == [0.0, 0.0, 0.05]
    # timm's sgd is Nesterov unless told otherwise
    assert all(not group["nesterov"] and group["momentum"] == 0.9 for group in optimizer.param_groups)
    for step in (0, 7, 15, 27, 40):
        scheduler.step_update(num_updates=step)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected_lr(step, 0.2, 0.001, 40, 15)), step
