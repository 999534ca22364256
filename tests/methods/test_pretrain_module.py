"""BAMModule: backbones, teacher, schedules, resume and loss guards on tiny CPU runs."""
from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch

from bam.callbacks import OnlineKNN
from bam.losses import BAMObjective
from bam.methods import BAMModule, NonFiniteLossError, StuckLossWarning
from bam.methods.monitoring import LossMonitor
from tiny_runs import TinyCropsDataModule

SMALL_HEAD = dict(projector=dict(hidden_dim=64, out_dim=32, num_layers=2))


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    return pl.Trainer(**{**defaults, **kwargs})


@pytest.mark.parametrize("backbone", ["vit_tiny_patch16_224", "resnet18", "caformer_s18"])
@pytest.mark.parametrize("teacher", [False, True])
def test_one_step_each_backbone(tmp_path, backbone, teacher):
    model = BAMModule(backbone=backbone, num_local_crops=2, momentum_teacher=teacher, warmup_epochs=0, **SMALL_HEAD)
    before = [p.detach().clone() for p in model.student.parameters()]
    trainer(tmp_path, fast_dev_run=1).fit(model, TinyCropsDataModule(num_images=8, batch_size=4))
    moved = any(not torch.equal(a, b) for a, b in zip(before, model.student.parameters()))
    assert moved, "the student's parameters did not change after a training step"
    if teacher:
        assert all(not p.requires_grad for p in model.teacher.parameters())


def test_schedules_have_documented_values(tmp_path):
    model = BAMModule(backbone="bam_cnn4", num_local_crops=2, momentum_teacher=True, lr=0.256, min_lr=0.0,
                      warmup_epochs=1, weight_decay=0.04, weight_decay_final=0.4, objective=BAMObjective(reg=0.05), reg_final=0.1,
                      reg_warmup_epochs=2, teacher_momentum=0.99, **SMALL_HEAD)
    data = TinyCropsDataModule(num_images=32, batch_size=8)  # 4 steps per epoch
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            group = trainer.optimizers[0].param_groups[-1]
            seen.append((trainer.global_step, group["lr"]))

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            # the module sets reg and weight decay in its own batch-start hook, after callbacks
            seen[-1] += (module.loss_fn.reg, trainer.optimizers[0].param_groups[-1]["weight_decay"])

    trainer(tmp_path, max_epochs=4, callbacks=[Record()]).fit(model, data)
    steps = {step: rest for step, *rest in [(s[0], *s[1:]) for s in seen]}
    peak = 0.256 * 8 / 256  # linear scaling by global batch / 256
    assert steps[0][0] == pytest.approx(0.0)                        # warm-up starts at 0
    assert steps[2][0] == pytest.approx(peak * 2 / 4)               # linear warm-up over 4 steps
    assert steps[4][0] == pytest.approx(peak)                       # peak after warm-up
    assert steps[15][0] < steps[8][0] < peak                        # cosine decay
    assert steps[4][1] == pytest.approx(0.075)                      # reg halfway through its 8-step ramp
    assert steps[12][1] == pytest.approx(0.1)                       # reg constant after the ramp
    assert steps[0][2] == pytest.approx(0.04)                       # weight decay starts at 0.04
    assert steps[8][2] == pytest.approx(0.04 + (0.4 - 0.04) * 0.5)  # cosine midpoint
    no_decay = [g for g in trainer_groups(model) if g["initial_weight_decay"] == 0]
    assert no_decay and all(g["weight_decay"] == 0 for g in no_decay)
    assert model.teacher_momentum_at(0) == pytest.approx(0.99)
    assert model.teacher_momentum_at(model.step_budget.total_steps) == pytest.approx(1.0)


def trainer_groups(model):
    return model.trainer.optimizers[0].param_groups


def test_biases_and_norms_are_not_decayed(tmp_path):
    model = BAMModule(backbone="bam_cnn4", num_local_crops=2, **SMALL_HEAD)
    tr = trainer(tmp_path, fast_dev_run=1)
    tr.fit(model, TinyCropsDataModule(num_images=8, batch_size=4))
    names = {id(p): n for n, p in model.student.named_parameters()}
    for group in trainer_groups(model):
        for p in group["params"]:
            if p.ndim <= 1:
                assert group["initial_weight_decay"] == 0, names[id(p)]


def test_resume_reproduces_following_losses(tmp_path):
    def run(max_epochs, ckpt_path=None, callbacks=()):
        pl.seed_everything(0)
        model = BAMModule(backbone="bam_cnn4", num_local_crops=2, momentum_teacher=True, warmup_epochs=1, **SMALL_HEAD)
        losses = []

        class Record(pl.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                losses.append(outputs["loss"].item())

        tr = pl.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, callbacks=[Record(), *callbacks], enable_model_summary=False)
        tr.fit(model, TinyCropsDataModule(num_images=16, batch_size=8), ckpt_path=ckpt_path)
        return losses

    class StopAfterTwoEpochs(pl.Callback):  # an interruption that keeps the 4-epoch schedule
        def on_train_epoch_end(self, trainer, module):
            trainer.should_stop = trainer.current_epoch == 1

    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    uninterrupted = run(4)
    first_half = run(4, callbacks=[StopAfterTwoEpochs(), checkpoint])
    second_half = run(4, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert first_half == pytest.approx(uninterrupted[:4], abs=1e-6)
    assert second_half == pytest.approx(uninterrupted[4:], abs=1e-5)


def test_nan_loss_stops_before_the_step():
    monitor = LossMonitor()
    monitor.update(2.0, step=3, chance_level=5.0)
    with pytest.raises(NonFiniteLossError, match=r"step 4 .*last finite loss: 2.0"):
        monitor.update(float("nan"), step=4, chance_level=5.0)


def test_nan_in_training_leaves_parameters_untouched(tmp_path):
    model = BAMModule(backbone="bam_cnn4", num_local_crops=2, **SMALL_HEAD)
    with torch.no_grad():
        model.student.projector[0].weight.fill_(float("nan"))
    before = [p.detach().clone() for p in model.student.backbone.parameters()]
    with pytest.raises(NonFiniteLossError):
        trainer(tmp_path, fast_dev_run=1).fit(model, TinyCropsDataModule(num_images=8, batch_size=4))
    assert all(torch.equal(a, b) for a, b in zip(before, model.student.backbone.parameters()))


def test_stuck_loss_warns_once():
    monitor = LossMonitor(patience=5)
    chance = math.log(100)
    with pytest.warns(StuckLossWarning, match="log\\(N\\)"):
        for step in range(6):
            monitor.update(chance, step, chance)


def test_stuck_loss_is_not_reported_when_learning():
    monitor = LossMonitor(patience=5)
    for step in range(50):
        monitor.update(math.log(100) * 0.5, step, math.log(100))
    assert not monitor.warned


def test_crop_count_mismatch_is_explained(tmp_path):
    model = BAMModule(backbone="bam_cnn4", num_local_crops=6, **SMALL_HEAD)
    with pytest.raises(ValueError, match="provides 4 crops per image but the model expects 8"):
        trainer(tmp_path, fast_dev_run=1).fit(model, TinyCropsDataModule(num_images=8, batch_size=4))


def test_online_knn_logs_accuracy_and_baselines(tmp_path):
    model = BAMModule(backbone="bam_cnn4", num_local_crops=2, **SMALL_HEAD)
    knn = OnlineKNN(k=3, compare_baselines=True)
    trainer(tmp_path, max_epochs=1, callbacks=[knn]).fit(model, TinyCropsDataModule(num_images=16, batch_size=8))
    assert set(knn.report) == {"trained backbone", "random init (same architecture)", "raw pixels"}
    # every bank image is its own nearest neighbour: the raw-pixel k-NN of the bank on itself is perfect
    assert knn.report["raw pixels"][1] == pytest.approx(100.0)


def test_logs_every_scheduled_value(tmp_path):
    model = BAMModule(backbone="bam_cnn4", num_local_crops=2, momentum_teacher=True, **SMALL_HEAD)
    tr = trainer(tmp_path, max_steps=2)
    tr.fit(model, TinyCropsDataModule(num_images=16, batch_size=8))
    expected = {"train/loss", "train/lr", "train/weight_decay", "train/reg", "train/teacher_momentum"}
    assert expected <= set(tr.logged_metrics)


def _one_vit_step(tmp_path, checkpointing: bool, precision: str) -> torch.Tensor:
    """The student's parameter update (flattened, float32) after one step from a fixed start."""
    torch.manual_seed(0)
    model = BAMModule(backbone="vit_tiny_patch16_224", num_local_crops=2, gradient_checkpointing=checkpointing,
                      warmup_epochs=0, **SMALL_HEAD)
    assert model.student.backbone.grad_checkpointing == checkpointing
    before = torch.cat([p.detach().flatten().clone() for p in model.student.parameters()])
    trainer(tmp_path, max_steps=1, precision=precision).fit(model, TinyCropsDataModule(num_images=4, batch_size=4))
    after = torch.cat([p.detach().flatten().float() for p in model.student.parameters()])
    return after - before


def test_gradient_checkpointing_and_bf16_give_the_float32_step(tmp_path):
    """Recomputing activations changes no gradient; bf16 autocast moves the weights the same way."""
    reference = _one_vit_step(tmp_path / "fp32", checkpointing=False, precision="32-true")
    assert reference.abs().max() > 0
    checkpointed = _one_vit_step(tmp_path / "ckpt", checkpointing=True, precision="32-true")
    torch.testing.assert_close(checkpointed, reference, rtol=1e-4, atol=1e-7)
    bf16 = _one_vit_step(tmp_path / "bf16", checkpointing=True, precision="bf16-mixed")
    assert torch.isfinite(bf16).all()
    agreement = torch.nn.functional.cosine_similarity(bf16, reference, dim=0)
    assert agreement > 0.9, f"the bf16 step points elsewhere than the float32 one (cosine {agreement:.3f})"


def test_gradient_checkpointing_unsupported_is_explained():
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        BAMModule(backbone="bam_cnn4", gradient_checkpointing=True, **SMALL_HEAD)


def test_compile_keeps_checkpoint_keys():
    plain = BAMModule(backbone="bam_cnn4", **SMALL_HEAD)
    compiled = BAMModule(backbone="bam_cnn4", compile_backbone=True, **SMALL_HEAD)
    assert compiled.student.backbone._compiled_call_impl is not None
    assert set(compiled.state_dict()) == set(plain.state_dict())


def test_channels_last_computes_the_same_features_with_the_same_keys():
    torch.manual_seed(0)
    plain = BAMModule(backbone="bam_cnn4", **SMALL_HEAD).eval()
    fast = BAMModule(backbone="bam_cnn4", channels_last=True, **SMALL_HEAD).eval()
    fast.load_state_dict(plain.state_dict())
    conv = fast.student.backbone.features[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    crops = [torch.randn(4, 3, 28, 28), torch.randn(4, 3, 14, 14)]
    torch.testing.assert_close(fast.student(crops), plain.student(crops), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.extract_features(crops[0]), plain.extract_features(crops[0]), atol=1e-5, rtol=1e-5)
    assert list(fast.state_dict()) == list(plain.state_dict())


def test_teacher_embeds_only_the_global_crops_when_local_rows_are_not_balanced():
    """`objective.balance_local_rows: false` is the cheaper step: the teacher's forward sees the
    global crops alone, and the loss is the objective's on those embeddings."""
    model = BAMModule(backbone="bam_cnn4", num_local_crops=2, momentum_teacher=True,
                      objective={"balance_local_rows": False}, **SMALL_HEAD)
    crops = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    seen = []
    model.teacher.register_forward_pre_hook(lambda module, args: seen.append([tuple(c.shape) for c in args[0]]))
    loss = model.compute_loss(crops)
    assert seen == [[(4, 3, 32, 32), (4, 3, 32, 32)]]
    with torch.no_grad():
        expected = model.loss_fn(model.student(crops), model.teacher(crops[:2]))
    torch.testing.assert_close(loss, expected)
