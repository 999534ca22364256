"""Precise batch norm statistics: the helper and the end-of-training callback."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bam.callbacks import PreciseBatchNorm
from bam.callbacks import batchnorm_stats as batchnorm_stats_callback
from bam.methods import BAMModule
from bam.models.batchnorm_stats import recompute_batchnorm_stats
from tiny_runs import TinyCropsDataModule
from repo_paths import REPO


def test_statistics_are_the_exact_average_over_the_batches():
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(3).eval()
    norm.running_mean.fill_(5.0)
    batches = [torch.randn(4, 3, 8, 8) * 2 + 1 for _ in range(3)]
    used = recompute_batchnorm_stats(norm, iter(batches))
    assert used == 12
    per_batch_means = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches])
    per_batch_vars = torch.stack([b.var(dim=(0, 2, 3), unbiased=True) for b in batches])
    torch.testing.assert_close(norm.running_mean, per_batch_means.mean(0))
    torch.testing.assert_close(norm.running_var, per_batch_vars.mean(0))
    assert not norm.training and norm.momentum == 0.1  # mode and momentum restored


def test_max_images_bounds_the_pass_and_weights_are_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    weights = [p.detach().clone() for p in model.parameters()]
    used = recompute_batchnorm_stats(model, (torch.randn(8, 3, 8, 8) for _ in range(10)), max_images=16)
    assert used == 16
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert model.training  # it was in train mode


def test_no_batch_norm_is_a_no_op_and_no_images_is_an_error():
    assert recompute_batchnorm_stats(nn.Linear(3, 3), iter([])) == 0
    with pytest.raises(ValueError, match="no images"):
        recompute_batchnorm_stats(nn.BatchNorm2d(3), iter([]))


@pytest.mark.parametrize("enabled", [True, False])
def test_callback_sets_the_trained_backbones_statistics_from_clean_images(tmp_path, enabled):
    data = TinyCropsDataModule(num_images=16, batch_size=8)
    model = BAMModule(backbone="bam_cnn4", num_local_crops=2, momentum_teacher=True, warmup_epochs=0,
                      projector=dict(hidden_dim=32, out_dim=16, num_layers=2))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[PreciseBatchNorm(enabled=enabled)])
    trainer.fit(model, data)
    for encoder in (model.student, model.teacher):
        expected = BAMModule(backbone="bam_cnn4").student.backbone
        expected.load_state_dict(encoder.backbone.state_dict())
        recompute_batchnorm_stats(expected, (images for images, _ in data.knn_dataloaders()[0]))
        first = next(m for m in encoder.backbone.modules() if isinstance(m, nn.BatchNorm2d))
        reference = next(m for m in expected.modules() if isinstance(m, nn.BatchNorm2d))
        assert torch.allclose(first.running_mean, reference.running_mean, atol=1e-6) == enabled


def test_pretrain_cli_runs_precise_batch_norm_before_the_knn_evaluation(tmp_path):
    from bam.callbacks import OnlineKNN
    from bam.pretrain import pretrain_cli

    demo = REPO / "configs" / "pretrain" / "demo.yaml"
    cli = pretrain_cli(["--config", str(demo), "--trainer.default_root_dir", str(tmp_path)], run=False)
    kinds = [type(callback) for callback in cli.trainer.callbacks]
    assert kinds.index(PreciseBatchNorm) < kinds.index(OnlineKNN)


# ------------------------------------------------------------------ the callback on a stand-in trainer
SMALL_HEAD = dict(projector=dict(hidden_dim=32, out_dim=16, num_layers=2))


def _loader(seed: int, count: int, scale: float) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 3, 32, 32, generator=generator) * scale
    return DataLoader(TensorDataset(images, torch.zeros(count, dtype=torch.long)), batch_size=16)


class BankAndQuery:
    """k-NN loaders whose bank (clean training images) and queries differ in distribution."""

    def knn_dataloaders(self):
        return _loader(1, 48, 1.0), _loader(2, 32, 5.0)


def _final_epoch_trainer(datamodule, **state) -> SimpleNamespace:
    values = dict(should_stop=False, max_steps=-1, global_step=0, max_epochs=3, current_epoch=2)
    return SimpleNamespace(datamodule=datamodule, strategy=SimpleNamespace(root_device=torch.device("cpu")),
                           **{**values, **state})


def _model_with_distinct_teacher() -> BAMModule:
    torch.manual_seed(0)
    model = BAMModule(backbone="bam_cnn4", num_local_crops=2, momentum_teacher=True, **SMALL_HEAD)
    with torch.no_grad():
        for parameter in model.teacher.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def _norm_stats(backbone: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for m in backbone.modules() if isinstance(m, nn.BatchNorm2d) for t in (m.running_mean, m.running_var)]


def _expected_stats(backbone: nn.Module, max_images: int) -> list[torch.Tensor]:
    """Statistics of a copy of `backbone`, averaged here over the bank loader's first batches."""
    copy = BAMModule(backbone="bam_cnn4", **SMALL_HEAD).student.backbone
    copy.load_state_dict(backbone.state_dict())
    recompute_batchnorm_stats(copy, (images for images, _ in BankAndQuery().knn_dataloaders()[0]), max_images)
    return _norm_stats(copy)


def test_callback_reestimates_both_backbones_on_the_bank_images_up_to_max_images(monkeypatch):
    messages = []
    monkeypatch.setattr(batchnorm_stats_callback, "rank_zero_info", messages.append)
    model = _model_with_distinct_teacher()
    expected = {name: _expected_stats(getattr(model, name).backbone, 20) for name in ("student", "teacher")}
    before = _norm_stats(model.student.backbone)
    PreciseBatchNorm(max_images=20).on_train_epoch_end(_final_epoch_trainer(BankAndQuery()), model)
    for name in ("student", "teacher"):
        got = _norm_stats(getattr(model, name).backbone)
        for mine, theirs in zip(got, expected[name]):
            torch.testing.assert_close(mine, theirs)
    assert any(not torch.equal(a, b) for a, b in zip(before, _norm_stats(model.student.backbone)))
    assert any(not torch.allclose(a, b) for a, b in zip(expected["student"], expected["teacher"]))
    # two batches of 16 reach the 20 images
    assert messages == [f"PreciseBatchNorm: {name} backbone's batch norm statistics re-estimated on 32 clean images"
                        for name in ("student", "teacher")]


@pytest.mark.parametrize("enabled, state", [(False, {}), (True, dict(current_epoch=1)), (True, dict(max_epochs=-1))])
def test_callback_waits_for_the_last_epoch_end(enabled, state):
    model = _model_with_distinct_teacher()
    before = _norm_stats(model.student.backbone) + _norm_stats(model.teacher.backbone)
    PreciseBatchNorm(enabled=enabled).on_train_epoch_end(_final_epoch_trainer(BankAndQuery(), **state), model)
    after = _norm_stats(model.student.backbone) + _norm_stats(model.teacher.backbone)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_callback_without_a_bank_loader_warns_and_changes_nothing():
    model = _model_with_distinct_teacher()
    before = _norm_stats(model.student.backbone)
    with pytest.warns(UserWarning, match="SimpleNamespace has no knn_dataloaders\\(\\) to read clean training images"):
        PreciseBatchNorm().on_train_epoch_end(_final_epoch_trainer(SimpleNamespace()), model)
    assert all(torch.equal(a, b) for a, b in zip(before, _norm_stats(model.student.backbone)))


def test_max_images_must_be_positive_and_defaults_to_4096():
    with pytest.raises(ValueError, match="max_images must be positive, got 0"):
        PreciseBatchNorm(max_images=0)
    assert PreciseBatchNorm(max_images=1).max_images == 1
    default = PreciseBatchNorm()
    assert (default.enabled, default.max_images) == (True, 4096)


def test_callback_serves_a_module_without_a_teacher_attribute():
    """A user's LightningModule with a bam student encoder and no `teacher` at all."""
    model = _model_with_distinct_teacher()
    expected = _expected_stats(model.student.backbone, 4096)
    PreciseBatchNorm().on_train_epoch_end(_final_epoch_trainer(BankAndQuery()), SimpleNamespace(student=model.student))
    for mine, theirs in zip(_norm_stats(model.student.backbone), expected):
        torch.testing.assert_close(mine, theirs)
