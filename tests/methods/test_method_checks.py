"""The checks every method runs, on their own: the loss monitor's stuck-loss count and tolerance,
the batch and crop-count checks, and the argument checks of BAMModule and SwAVModule (no training)."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from bam.losses import SwAVObjective
from bam.methods import BAMModule, NonFiniteLossError, SSLMethod, StuckLossWarning, SwAVModule
from bam.methods.base import _crops_of
from bam.methods.monitoring import LossMonitor

SMALL_HEAD = dict(projector=dict(hidden_dim=32, out_dim=16, num_layers=2))
CHANCE = 1000.0  # with the default tolerance 0.002 the loss may differ from it by 2.0 (exact in binary)


def updates(monitor: LossMonitor, losses, first_step: int = 0) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, loss in enumerate(losses, start=first_step):
            monitor.update(loss, step, CHANCE)
    return caught


def test_stuck_loss_counts_consecutive_steps_within_the_tolerance():
    monitor = LossMonitor(patience=3)
    assert updates(monitor, [1002.0, 998.0]) == [] and monitor.steps_at_chance == 2
    assert updates(monitor, [1002.5]) == [] and monitor.steps_at_chance == 0  # outside: counting starts again
    assert updates(monitor, [1000.0, 1000.0], first_step=3) == []
    caught = updates(monitor, [1000.0], first_step=5)
    assert [w.category for w in caught] == [StuckLossWarning]
    assert str(caught[0].message).startswith("the loss has stayed at log(N) = 1000.0000 for 3 steps (step 5): ")
    assert str(caught[0].message).endswith("Typical causes: collapse, a too-high temperature, or (small CNNs) a projector "
                                           "without batch norm (set model.init_args.projector.batch_norm: true).")
    assert not caught[0].filename.endswith("monitoring.py")  # names the caller of update(), not the monitor
    assert updates(monitor, [1000.0] * 5, first_step=6) == []  # once per run
    assert monitor.last_finite == 1000.0


def test_stuck_loss_defaults_are_200_steps_and_a_relative_tolerance_of_0_002():
    monitor = LossMonitor()
    assert updates(monitor, [1002.0] * 199) == []
    assert len(updates(monitor, [998.0], first_step=199)) == 1
    assert updates(LossMonitor(patience=1), [1002.5]) == []


@pytest.mark.parametrize("patience, warns", [(0, False), (1, True)])
def test_patience_zero_turns_the_check_off_and_one_warns_at_once(patience, warns):
    assert len(updates(LossMonitor(patience=patience), [CHANCE])) == int(warns)


def test_infinite_loss_stops_too_and_names_the_last_finite_loss():
    monitor = LossMonitor()
    monitor.update(3.5, 0, CHANCE)
    with pytest.raises(NonFiniteLossError, match=r"^the loss became inf at step 7 \(last finite loss: 3.5\); stopping .*"
                                                 r"Try a lower learning rate, gradient clipping, bf16 instead of fp16, or a larger reg\.$"):
        monitor.update(float("inf"), 7, CHANCE)
    assert monitor.last_finite == 3.5


# --------------------------------------------------------------------------------- batches and crops
def test_a_batch_is_crops_with_labels_or_crops_alone():
    crops = [torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 4, 4)]
    assert _crops_of((crops, torch.zeros(2))) == crops
    assert _crops_of([tuple(crops), torch.zeros(2)]) == crops
    assert _crops_of(crops) == crops
    assert _crops_of(tuple(crops)) == crops


@pytest.mark.parametrize("batch", [torch.zeros(2, 3, 8, 8), [torch.zeros(2, 3, 8)], ([torch.zeros(2, 3, 8, 8), "x"], None)])
def test_a_batch_that_is_not_a_list_of_image_batches_is_refused(batch):
    with pytest.raises(TypeError, match=r"^a training batch must be \(crops, labels\) or crops, where crops is a list of "
                                        rf"\(B, C, H, W\) tensors with the global crops first; got a {type(batch).__name__}$"):
        _crops_of(batch)


def test_crop_count_check_names_both_numbers():
    SSLMethod.check_crop_count([torch.zeros(1)] * 3, 3)
    with pytest.raises(ValueError, match=r"^the data provides 2 crops per image but the model expects 3 "
                                         r"\(num_global_crops \+ num_local_crops\); make the data and model crop counts agree$"):
        SSLMethod.check_crop_count([torch.zeros(1)] * 2, 3)


@pytest.mark.parametrize("method", [BAMModule, SwAVModule])
def test_crop_settings_need_a_global_crop_and_no_negative_local_crops(method):
    extra = dict(objective=SwAVObjective(num_prototypes=8)) if method is SwAVModule else {}
    # the fewest crops each objective takes: BAM one (a lone global crop), SwAV two
    local = 1 if method is SwAVModule else 0
    model = method(backbone="bam_cnn4", num_global_crops=1, num_local_crops=local, **extra, **SMALL_HEAD)
    assert model.loss_fn.num_crops == 1 + local
    with pytest.raises(ValueError, match="^model num_global_crops must be at least 1, got 0$"):
        method(backbone="bam_cnn4", num_global_crops=0, **SMALL_HEAD)
    with pytest.raises(ValueError, match="^model num_local_crops must be >= 0, got -1$"):
        method(backbone="bam_cnn4", num_local_crops=-1, **SMALL_HEAD)


class OnlyALoss(SSLMethod):
    def compute_loss(self, crops):
        return self.student(crops).square().mean()


def test_a_method_without_its_own_chance_level_or_schedule_has_neither():
    model = OnlyALoss(backbone="bam_cnn4", **SMALL_HEAD)
    assert math.isnan(model.chance_level(8))
    assert LossMonitor().last_finite is None
    assert model.on_schedule(5) == {}
    assert model.extra_param_groups() == []
    with pytest.raises(NotImplementedError):
        SSLMethod.compute_loss(model, [])


# --------------------------------------------------------------------------------- method arguments
@pytest.mark.parametrize("reg_final", [0.0, -0.1])
def test_bam_reg_final_must_be_positive(reg_final):
    with pytest.raises(ValueError, match=f"^reg_final must be positive .*got {reg_final}$"):
        BAMModule(backbone="bam_cnn4", reg_final=reg_final, **SMALL_HEAD)


def test_bam_chance_level_is_its_objectives_for_the_batch_on_one_process():
    model = BAMModule(backbone="bam_cnn4", num_local_crops=2, **SMALL_HEAD)
    assert model.chance_level(8) == model.loss_fn.chance_level(8) != model.loss_fn.chance_level(9)


def test_swav_prototypes_may_be_free_from_the_start_but_not_negative():
    model = SwAVModule(backbone="bam_cnn4", objective=SwAVObjective(num_prototypes=8), freeze_prototypes_epochs=0,
                       **SMALL_HEAD)
    assert model.hparams.freeze_prototypes_epochs == 0
    with pytest.raises(ValueError, match=r"^freeze_prototypes_epochs=-0.5 must be >= 0$"):
        SwAVModule(backbone="bam_cnn4", freeze_prototypes_epochs=-0.5, **SMALL_HEAD)


# --------------------------------------------------------------------------------- defaults
# What a Python user (or a config that leaves a key out) trains with. A default changed by accident
# changes every such run without a word, so changing one means changing this table too.
SHARED_DEFAULTS = dict(
    backbone="bam_vit_small_patch16_224", backbone_kwargs=None, momentum_teacher=False,
    teacher_momentum=0.995, teacher_momentum_final=1.0, optimizer="adamw", lr=3e-4, min_lr=1e-6, warmup_epochs=10,
    weight_decay=0.04, weight_decay_final=0.4, sgd_momentum=0.9, gradient_checkpointing=False, compile_backbone=False,
    channels_last=False, bn_stats_from_global_crops=True, sync_batchnorm=True, stuck_loss_patience=200,
)
PROJECTOR_DEFAULTS = dict(last_batch_norm=False, bias=True, init="pytorch")
BAM_DEFAULTS = dict(SHARED_DEFAULTS, num_global_crops=2, num_local_crops=6, reg_final=None, reg_warmup_epochs=30,
                    projector=dict(PROJECTOR_DEFAULTS, hidden_dim=4096, out_dim=4096, num_layers=3, activation="gelu",
                                   batch_norm=False))
SWAV_DEFAULTS = dict(SHARED_DEFAULTS, num_global_crops=2, num_local_crops=6, freeze_prototypes_epochs=1,
                     projector=dict(PROJECTOR_DEFAULTS, hidden_dim=2048, out_dim=128, num_layers=2, activation="relu",
                                    batch_norm=True))


def _linear_shapes(module: torch.nn.Module) -> list[tuple[int, ...]]:
    return [tuple(m.weight.shape) for m in module.modules() if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("method, defaults", [(BAMModule, BAM_DEFAULTS), (SwAVModule, SWAV_DEFAULTS)])
def test_a_method_built_without_arguments_has_the_documented_defaults(method, defaults):
    model = method()
    for name, value in defaults.items():
        assert model.hparams[name] == value, name
    assert model.teacher is None and model.loss_monitor.patience == 200 and model.data_recipe is None
    assert model.student.memory_format == torch.contiguous_format and model.student.global_running_stats
    assert model.loss_fn.num_crops == 8
    projector = defaults["projector"]
    widths = [384] + [projector["hidden_dim"]] * (projector["num_layers"] - 1) + [projector["out_dim"]]  # ViT-S/16: 384
    assert _linear_shapes(model.student.projector) == [(b, a) for a, b in zip(widths, widths[1:])]
    norms = [m for m in model.student.projector.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(norms) == (projector["num_layers"] - 1 if projector["batch_norm"] else 0)
    activation = {"gelu": torch.nn.GELU, "relu": torch.nn.ReLU}[projector["activation"]]
    activations = [type(m) for m in model.student.projector.modules() if isinstance(m, (torch.nn.GELU, torch.nn.ReLU))]
    assert activations == [activation] * (projector["num_layers"] - 1)
    assert all(m.bias is not None for m in model.student.projector.modules() if isinstance(m, torch.nn.Linear))


def test_projector_and_encoder_settings_reach_the_modules():
    model = BAMModule(backbone="bam_cnn4", projector=dict(hidden_dim=32, out_dim=16, num_layers=2, batch_norm=True,
                                                          last_batch_norm=True, bias=False, init="trunc_normal"),
                      channels_last=True, bn_stats_from_global_crops=False)
    projector = model.student.projector
    assert all(m.bias is None for m in projector.modules() if isinstance(m, torch.nn.Linear))
    assert [type(m) for m in projector if isinstance(m, (torch.nn.Linear, torch.nn.BatchNorm1d))] == [
        torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.Linear, torch.nn.BatchNorm1d]
    assert model.student.memory_format == torch.channels_last and model.student.global_running_stats is False
    # the authors' initialisation zeroes the biases; PyTorch's leaves them random
    head = SMALL_HEAD["projector"]
    authors = BAMModule(backbone="bam_cnn4", projector=dict(head, init="trunc_normal")).student.projector
    pytorch = BAMModule(backbone="bam_cnn4", projector=dict(head, init="pytorch")).student.projector
    biases = [(m.bias, n.bias) for m, n in zip(authors.modules(), pytorch.modules()) if isinstance(m, torch.nn.Linear)]
    assert all(not a.any() and b.abs().sum() > 0 for a, b in biases)


def test_swav_builds_the_backbone_it_is_given():
    from bam.models import build_backbone

    model = SwAVModule(backbone="bam_cnn4", backbone_kwargs={"width": 8}, objective=SwAVObjective(num_prototypes=8),
                       **SMALL_HEAD)
    reference = build_backbone("bam_cnn4", width=8)
    assert {k: v.shape for k, v in model.student.backbone.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}


def test_unsupported_gradient_checkpointing_names_the_backbone():
    with pytest.raises(ValueError, match="^backbone 'bam_cnn4' does not support gradient checkpointing"):
        BAMModule(backbone="bam_cnn4", gradient_checkpointing=True, **SMALL_HEAD)
