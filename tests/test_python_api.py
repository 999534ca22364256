"""The Python API as a Lightning user would use it: a plain DataLoader, and the CLI's callbacks and
plugins in one call."""
from __future__ import annotations

import json

import pytorch_lightning as pl
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import bam
from bam.callbacks import CurvePlots, OnlineKNN, PreciseBatchNorm
from bam.methods import BAMModule
from bam.recipe import DataRecipe
from bam.training import AtomicCheckpointIO, PreemptionCheckpoint, RunCheckpoint
from tiny_runs import TinyCropsDataModule

BATCH = 8


class MultiCropImages(Dataset):
    """What docs/python-api.md shows: each item is (list of crops, label), global crops first."""

    def __init__(self, num_images: int = 16) -> None:
        self.images = torch.rand(num_images, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], int]:
        image = self.images[index]
        return [image, image.flip(-1), image[:, :16, :16], image[:, 16:, 16:]], index % 4


def tiny_module(**kwargs) -> BAMModule:
    return BAMModule(backbone="bam_cnn4", backbone_kwargs={"width": 8}, num_local_crops=2, warmup_epochs=0,
                     projector=dict(hidden_dim=16, out_dim=8, num_layers=2), **kwargs)


def quiet_trainer(tmp_path, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path)
    return pl.Trainer(**{**options, **kwargs})


def test_fit_with_a_plain_dataloader_trains_and_records_the_given_recipe(tmp_path):
    model = tiny_module()
    model.data_recipe = DataRecipe(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=32, crop_pct=1.0)
    before = [p.detach().clone() for p in model.student.parameters()]
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(model, train_dataloaders=DataLoader(MultiCropImages(), batch_size=BATCH, shuffle=True))
    assert trainer.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, model.student.parameters()))
    # the learning rate was scaled by the loader's batch: peak lr * 8 / 256
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(3e-4 * BATCH / 256)

    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    export = bam.export_backbone(tmp_path / "plain.ckpt", tmp_path / "export")
    cfg = json.loads((export / "config.json").read_text())["pretrained_cfg"]
    assert (cfg["mean"], cfg["std"], cfg["input_size"]) == ([0.5] * 3, [0.25] * 3, [3, 32, 32])


def test_a_batch_of_the_wrong_shape_is_a_clear_error(tmp_path):
    images = DataLoader(torch.rand(8, 3, 32, 32), batch_size=BATCH)  # images, not lists of crops
    with pytest.raises(TypeError, match="list of \\(B, C, H, W\\) tensors"):
        quiet_trainer(tmp_path, max_steps=1).fit(tiny_module(), train_dataloaders=images)


def test_pretrain_trainer_arguments_are_the_clis_callbacks_and_plugins(tmp_path):
    extras = bam.pretrain_trainer_arguments(str(tmp_path), compare_baselines=True)
    kinds = [type(callback) for callback in extras["callbacks"]]
    assert kinds == [RunCheckpoint, PreciseBatchNorm, OnlineKNN, PreemptionCheckpoint, CurvePlots]
    assert [type(plugin) for plugin in extras["plugins"]] == [AtomicCheckpointIO]
    checkpoint = extras["callbacks"][0]
    assert (checkpoint.save_last, checkpoint.save_top_k, checkpoint.dirpath) == (True, -1, str(tmp_path / "checkpoints"))

    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, enable_progress_bar=False, enable_model_summary=False,
                         **extras)
    trainer.fit(tiny_module(), TinyCropsDataModule(num_images=16, batch_size=8))
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "csv" / "version_0" / "metrics.csv").is_file()
    assert (tmp_path / "plots" / "summary.png").is_file()
    assert "knn/top1" in trainer.callback_metrics


def test_every_public_name_resolves_and_editors_see_it():
    """`bam`'s lazy names load from the modules they name, and the TYPE_CHECKING block imports
    exactly those names (what editors and type checkers show)."""
    import ast
    import importlib
    from pathlib import Path

    tree = ast.parse(Path(bam.__file__).read_text())
    guarded = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    seen = {alias.asname or alias.name for node in guarded.body for alias in node.names}
    assert seen == set(bam._LAZY)
    for name, module in bam._LAZY.items():
        assert getattr(bam, name) is getattr(importlib.import_module(module), name)
    assert {"SSLMethod", "SSLDataModule", "MultiCropConfig"} <= set(bam.__all__) and bam.__version__
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        bam.not_a_name  # noqa: B018
