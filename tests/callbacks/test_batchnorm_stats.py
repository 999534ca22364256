"""Precise batch norm statistics: the helper and the end-of-training callback."""
from __future__ import annotations


import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from bam.callbacks import PreciseBatchNorm
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
                      proj_hidden_dim=32, proj_out_dim=16, proj_layers=2)
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
