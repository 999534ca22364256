"""DINO: the loss against a float64 reference written from the paper's equations, the centre's
update, DINO's head, multi-process equality (loss, gradients and centre), and the module's
teacher, schedules and last-layer freeze in a tiny run."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
from cli_runs import printed_pretrain_config
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from bam.losses import DINOLoss, batch_center, dino_loss
from bam.methods import DINOModule
from bam.models import DINOHead
from bam.models.projector import DINO_PROJECTOR
from repo_paths import REPO
from test_loss_distributed import BATCH, DIM, NUM_CROPS, global_batch, rows_of
from tiny_runs import TinyCropsDataModule, spawn_gloo_workers

NUM_GLOBAL = 2
SMALL = dict(backbone="bam_cnn4", num_local_crops=2, out_dim=24, projector=dict(hidden_dim=32, out_dim=16, num_layers=2))
DEMO = REPO / "configs" / "pretrain" / "dino_demo.yaml"


# ----------------------------------------------------------------- reference (paper's equations)
def reference_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, num_crops: int,
                   num_global: int, student_temperature: float = 0.1, teacher_temperature: float = 0.04) -> torch.Tensor:
    """Pair by pair: for every global crop i of the teacher and every student crop j != i, the mean
    over images of H(P_t(i), P_s(j)) = -sum_k P_t(i)_k log P_s(j)_k with P_t = softmax((t - c) / tau_t)
    and P_s = softmax(s / tau_s); the loss is the mean over the pairs."""
    batch = teacher.shape[0] // num_global
    s_blocks, t_blocks = student.split(batch), teacher.detach().split(batch)
    losses = []
    for i in range(num_global):
        p_teacher = torch.exp((t_blocks[i] - center) / teacher_temperature)
        p_teacher = p_teacher / p_teacher.sum(dim=1, keepdim=True)
        for j in range(num_crops):
            if j != i:
                log_p_student = s_blocks[j] / student_temperature - torch.logsumexp(s_blocks[j] / student_temperature, 1, True)
                losses.append(-(p_teacher * log_p_student).sum(dim=1).mean())
    return torch.stack(losses).mean()


def fixed_inputs(num_crops: int = NUM_CROPS, batch: int = 5, dim: int = DIM, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(num_crops * batch, dim, dtype=torch.float64, generator=generator)
    teacher = torch.randn(NUM_GLOBAL * batch, dim, dtype=torch.float64, generator=generator)
    center = 0.3 * torch.randn(1, dim, dtype=torch.float64, generator=generator)
    return student, teacher, center


# ----------------------------------------------------------------- loss
@pytest.mark.parametrize("num_crops", [2, 4])
def test_loss_and_gradients_match_the_float64_reference(num_crops):
    student, teacher, center = fixed_inputs(num_crops)
    ours_s, ours_t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    ref_s = student.clone().requires_grad_()
    ours = dino_loss(ours_s, ours_t, center, num_global_crops=NUM_GLOBAL, student_temperature=0.1, teacher_temperature=0.05)
    ref = reference_loss(ref_s, teacher, center, num_crops, NUM_GLOBAL, 0.1, 0.05)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_s.grad, ref_s.grad, rtol=1e-9, atol=1e-12)
    assert ours_t.grad is None  # the targets carry no gradient to the teacher


def test_the_centre_and_temperatures_change_the_loss():
    student, teacher, center = fixed_inputs()
    base = dino_loss(student, teacher, center)
    assert not torch.isclose(base, dino_loss(student, teacher, torch.zeros_like(center)))
    assert not torch.isclose(base, dino_loss(student, teacher, center, teacher_temperature=0.07))
    assert not torch.isclose(base, dino_loss(student, teacher, center, student_temperature=0.2))
    torch.testing.assert_close(base, reference_loss(student, teacher, center, NUM_CROPS, NUM_GLOBAL))  # 0.1, 0.04


def test_module_uses_the_centre_before_updating_it_with_momentum_0_9():
    student, teacher, center = fixed_inputs()
    loss_fn = DINOLoss(DIM, NUM_CROPS, NUM_GLOBAL).double()
    loss_fn.center.copy_(center)
    loss_fn.teacher_temperature = 0.06
    loss = loss_fn(student, teacher)
    torch.testing.assert_close(loss, reference_loss(student, teacher, center, NUM_CROPS, NUM_GLOBAL, 0.1, 0.06))
    torch.testing.assert_close(loss_fn.center, 0.9 * center + 0.1 * teacher.mean(dim=0, keepdim=True))
    loss_fn.eval()  # evaluation leaves the centre alone
    loss_fn(student, teacher)
    torch.testing.assert_close(loss_fn.center, 0.9 * center + 0.1 * teacher.mean(dim=0, keepdim=True))
    assert "center" in loss_fn.state_dict()  # a buffer: checkpointed with the model


def test_uniform_student_scores_chance_level():
    loss_fn = DINOLoss(DIM, NUM_CROPS, NUM_GLOBAL)
    teacher = torch.randn(NUM_GLOBAL * 3, DIM, generator=torch.Generator().manual_seed(0))
    loss = loss_fn(torch.zeros(NUM_CROPS * 3, DIM), teacher)
    assert loss.item() == pytest.approx(math.log(DIM)) == pytest.approx(loss_fn.chance_level())


@pytest.mark.parametrize(
    "kwargs,message",
    [(dict(num_crops=1, num_global_crops=1), "num_crops=1, num_global_crops=1: DINO (the student predicts "
                                             "the teacher's output of another crop) needs at least 2 crops, got 1"),
     (dict(num_crops=4, objective=dict(center_momentum=1.0)), "center_momentum=1.0 must be in [0, 1) (1 would never update the centre)"),
     (dict(num_crops=4, objective=dict(student_temperature=0.0)), "student_temperature=0.0 and teacher_temperature=0.04 must be positive")],
)
def test_bad_settings_are_explained(kwargs, message):
    with pytest.raises(ValueError) as error:
        DINOLoss(DIM, **kwargs)
    assert str(error.value) == message


def test_bad_shapes_are_explained():
    loss_fn = DINOLoss(DIM, NUM_CROPS, NUM_GLOBAL)
    with pytest.raises(ValueError, match=r"^expected 4 student crops per 2 teacher crops, got 10 student and 6 teacher rows$"):
        loss_fn(torch.randn(10, DIM), torch.randn(6, DIM))
    with pytest.raises(ValueError, match=r"same K, got shapes \(12, 8\) and \(6, 9\)$"):
        loss_fn(torch.randn(12, DIM), torch.randn(6, DIM + 1))


# ----------------------------------------------------------------- the head
def test_head_is_an_mlp_a_normalised_bottleneck_and_a_unit_norm_last_layer():
    torch.manual_seed(0)
    head = DINOHead(10, out_dim=7, mlp=dataclasses.replace(DINO_PROJECTOR, hidden_dim=12, out_dim=5))
    linears = [layer for layer in head.mlp if isinstance(layer, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(10, 12), (12, 12), (12, 5)]
    assert all(bool((l.bias == 0).all()) for l in linears)
    x = torch.randn(4, 10)
    direction = head.last_layer.parametrizations.weight.original1
    expected = F.normalize(head.mlp(x), dim=-1) @ F.normalize(direction, dim=1).T  # cosines
    torch.testing.assert_close(head(x), expected)
    gains = head.last_layer.parametrizations.weight.original0
    assert not gains.requires_grad and bool((gains == 1).all())
    assert DINOHead(10, 7, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


# ----------------------------------------------------------------- 2 processes = 1 process
def loss_grad_center(student: torch.Tensor, teacher: torch.Tensor):
    student = student.clone().requires_grad_()
    loss_fn = DINOLoss(DIM, NUM_CROPS, NUM_GLOBAL)
    loss_fn.center.copy_(torch.linspace(-1, 1, DIM).unsqueeze(0))  # a centre that changes the targets
    loss = loss_fn(student, teacher)
    loss.backward()
    return loss.detach(), student.grad, loss_fn.center.clone()


def teacher_batch(world: int) -> torch.Tensor:
    return global_batch(world, seed=1)[:NUM_GLOBAL]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = loss_grad_center(rows_of(global_batch(world, seed=0), rank), rows_of(teacher_batch(world), rank))
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_match_one_process_and_share_the_centre(tmp_path):
    world = 2
    spawn_gloo_workers(_worker, world, tmp_path)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]

    student, teacher = global_batch(world, seed=0), teacher_batch(world)
    loss, grad, center = loss_grad_center(student.reshape(-1, DIM), teacher.reshape(-1, DIM))
    grad = grad.view(NUM_CROPS, world * BATCH, DIM)
    losses = torch.stack([result[0] for result in results])
    torch.testing.assert_close(losses.mean(), loss, rtol=1e-6, atol=1e-6)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result[1] / world, rows_of(grad, rank), rtol=1e-5, atol=1e-7)
        assert torch.equal(result[2], results[0][2])                     # the same centre on every process
        torch.testing.assert_close(result[2], center, rtol=1e-6, atol=1e-7)  # the global batch's
    assert (losses - loss).abs().max() > 1e-4  # each process's own loss differs: the check is not vacuous
    own_center = batch_center(rows_of(teacher, 0))  # one process's mean alone would be another centre
    assert (own_center - batch_center(teacher.reshape(-1, DIM))).abs().max() > 1e-3


# ----------------------------------------------------------------- the LightningModule
def tiny_trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    return pl.Trainer(**{**defaults, **kwargs})


def test_the_teacher_sees_the_global_crops_only():
    torch.manual_seed(0)
    model = DINOModule(**SMALL)
    with torch.no_grad():
        for parameter in model.teacher.parameters():  # a teacher that has moved away from the student
            parameter.add_(0.1 * torch.randn_like(parameter))
    crops = [torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32), torch.rand(4, 3, 16, 16), torch.rand(4, 3, 16, 16)]
    model.eval()
    with torch.no_grad():
        expected = model.loss_fn(model.student(crops), model.teacher(crops[:2]))
        torch.testing.assert_close(model.compute_loss(crops), expected)


class Record(pl.Callback):
    """Per step: whether the last layer had a gradient at the optimiser step, and the temperature."""

    def __init__(self) -> None:
        self.has_grad, self.temperatures = [], []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = [p.grad for p in module.student.projector.last_layer.parameters()]
        self.has_grad.append(any(g is not None for g in grads))
        self.temperatures.append(module.loss_fn.teacher_temperature)


def test_last_layer_frozen_for_the_first_epoch_and_the_teacher_temperature_warms_up(tmp_path):
    model = DINOModule(**SMALL, teacher_temperature_warmup_epochs=1, warmup_epochs=0, lr=0.5)
    last_layer = model.student.projector.last_layer.parametrizations.weight.original1
    start = last_layer.detach().clone()
    record = Record()
    tiny_trainer(tmp_path, max_epochs=2, callbacks=[record]).fit(model, TinyCropsDataModule(num_images=16, batch_size=4))
    assert record.has_grad == [False] * 4 + [True] * 4
    assert record.temperatures == pytest.approx([0.04 + 0.03 * step / 4 for step in range(4)] + [0.07] * 4)
    assert (last_layer - start).abs().max() > 1e-4  # trained in the second epoch
    assert model.loss_fn.center.abs().sum() > 0 and "loss_fn.center" in model.state_dict()


def test_teacher_is_dinos_and_without_stochastic_depth():
    with pytest.raises(ValueError, match=r"^DINO distils a momentum teacher into the student; remove momentum_teacher: false$"):
        DINOModule(**SMALL, momentum_teacher=False)
    model = DINOModule(backbone="vit_tiny_patch16_224", backbone_kwargs=dict(drop_path_rate=0.1, img_size=32),
                       out_dim=8, projector=dict(hidden_dim=8, out_dim=8))
    from timm.layers import DropPath
    student = [m.drop_prob for m in model.student.modules() if isinstance(m, DropPath)]
    teacher = [m.drop_prob for m in model.teacher.modules() if isinstance(m, DropPath)]
    assert student and max(student) == pytest.approx(0.1) and teacher == [0.0] * len(student)


# ----------------------------------------------------------------- configs
def test_demo_config_matches_the_bam_demo_except_the_model():
    dino, bam = yaml.safe_load(DEMO.read_text()), yaml.safe_load((DEMO.parent / "demo.yaml").read_text())
    assert dino["data"] == bam["data"] and dino["trainer"] == {**bam["trainer"], "default_root_dir": "runs/dino_demo"}
    assert dino["knn"] == bam["knn"] and dino["seed_everything"] == bam["seed_everything"]
    for key in ("backbone", "backbone_kwargs", "channels_last", "teacher_momentum", "lr", "warmup_epochs"):
        assert dino["model"]["init_args"][key] == bam["model"]["init_args"][key]


@pytest.mark.parametrize("name", ["dino_demo", "dino_vit_small_patch16"])
def test_dino_configs_parse_and_build(name, capsys):
    config = DEMO.parent / f"{name}.yaml"
    printed = printed_pretrain_config(config, capsys)
    assert printed["model"]["class_path"] == "bam.methods.DINOModule"
    init_args = yaml.safe_load(config.read_text())["model"]["init_args"]
    if name == "dino_demo":  # the ViT one is too big to build in a unit test
        model = DINOModule(**init_args, num_local_crops=4)
        assert model.student.projector.out_dim == init_args["out_dim"]
