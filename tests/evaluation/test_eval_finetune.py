"""`bam finetune`: layer-wise lr decay really reaches the optimiser, drop path is built in, the
pretrained weights are loaded, the EMA follows the optimiser steps, and the command line runs."""
from __future__ import annotations

from dataclasses import astuple, replace
import json

import pytest
import pytorch_lightning as pl
import torch

from bam.evaluation.backbone import resolve_backbone
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from bam.evaluation.finetune import FINETUNE_OPTIMIZER, FineTune, main
from bam.training.optim import OptimizerSettings
from bam.io.finetune_checkpoint import ARCHITECTURE_KEY
from eval_fixtures import CNN, VIT, synthetic_args, synthetic_data, trainer_args, write_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("finetune")
    return {"cnn": write_checkpoint(directory, *CNN), "vit": write_checkpoint(directory, *VIT)}


class RecordLearningRates(pl.Callback):
    """The learning rate and lr_scale of every group, as the optimiser is about to step."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[float, float]]] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.steps.append([(group["lr"], group["lr_scale"]) for group in optimizer.param_groups])


def test_vit_fine_tuning_with_layer_decay_drop_path_and_ema(checkpoints, tmp_path):
    pl.seed_everything(0)
    model = FineTune(
        str(checkpoints["vit"]), num_classes=4, layer_decay=0.5, drop_path_rate=0.2, 
        mixup=0.8, cutmix=1.0, ema=True, ema_decay=0.5, optimizer=replace(FINETUNE_OPTIMIZER, warmup_epochs=0, lr=0.01),
    )
    # the architecture was rebuilt with stochastic depth (timm: linear in depth up to the rate) ...
    assert model.model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    # ... and then given the pretrained weights
    pretrained = resolve_backbone(str(checkpoints["vit"])).state
    for name, value in pretrained.items():
        assert torch.equal(model.model.state_dict()[name], value), name
    assert model.model.training  # fine-tuning trains batch norm, dropout and drop path
    record = RecordLearningRates()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[record], default_root_dir=tmp_path,
    )
    trainer.fit(model, synthetic_data(batch_size=16))
    assert len(record.steps) == 4
    for groups in record.steps[1:]:  # after the scheduler has set them at least once
        rates = sorted({rate for rate, _ in groups})
        assert len(rates) == 5  # patch embedding, 3 blocks, final norm + head: 0.5^4 ... 1
        for rate, scale in groups:
            assert rate == pytest.approx(scale * max(rates))
    # the EMA moved with the steps and is evaluated next to the model
    ema, trained = model.ema.module.state_dict(), model.model.state_dict()
    assert not torch.equal(ema["head.weight"], trained["head.weight"])
    assert not torch.equal(ema["blocks.0.attn.qkv.weight"], pretrained["blocks.0.attn.qkv.weight"])
    assert {"val/top1", "val_ema/top1"} <= set(model.history[-1])
    assert sorted(trainer.callback_metrics) == [
        "train/loss", "train/lr", "val/top1", "val/top5", "val_ema/top1", "val_ema/top5"]
    # the logged learning rate is the last group's (the head's) at the last step
    assert trainer.callback_metrics["train/lr"].item() == pytest.approx(record.steps[-1][-1][0])
    assert set(trainer.progress_bar_metrics) == {"train/loss"}  # the loss is shown as it trains


def test_command_line_with_timm_augmentation_mixup_and_label_smoothing(checkpoints, tmp_path):
    main([
        "--model.backbone", str(checkpoints["cnn"]), "--model.drop_path_rate", "0", "--model.layer_decay", "null",
        "--model.optimizer.warmup_epochs", "1", "--model.ema", "true", "--data.augment", "timm",
        "--data.auto_augment", "rand-m9-mstd0.5-inc1", "--data.re_prob", "0.25",
        *synthetic_args(), *trainer_args(tmp_path, max_epochs=2),
    ])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"val", "val_ema", "files", "history"}
    assert results["files"] is None  # images held in memory: no files to account for
    assert [entry["epoch"] for entry in results["history"]] == [1, 2]
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    # what `bam export` rebuilds the classifier from: the architecture and the preprocessing it was tuned with
    assert saved[ARCHITECTURE_KEY] == {
        "model": "bam_cnn4", "model_kwargs": {"width": 8},
        "data_recipe": {"mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD), "input_size": 32,
                        "crop_pct": 1.0, "interpolation": "bicubic", "train_crop_sizes": []},
    }


def test_optimiser_settings_reach_the_stage(checkpoints):
    model = FineTune(str(checkpoints["cnn"]), num_classes=4, drop_path_rate=0, layer_decay=0.7, optimizer=OptimizerSettings(
                     "sgd", lr=0.3, min_lr=0.01, warmup_epochs=2.0, weight_decay=0.04, momentum=0.8))
    assert astuple(model.optimizer_settings)[:6] == (
        "sgd", 0.3, 0.01, 2.0, 0.04, 0.8)
    assert model.optimizer_options() == {"layer_decay": 0.7}


def test_mixed_targets_take_the_soft_target_loss_and_plain_labels_the_smoothed_one(checkpoints):
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    log_probabilities = logits.log_softmax(dim=1)
    mixed = FineTune(str(checkpoints["cnn"]), num_classes=4, drop_path_rate=0, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    soft = torch.softmax(torch.randn(6, 4, generator=torch.Generator().manual_seed(1)), dim=1)  # already smoothed
    torch.testing.assert_close(mixed.loss_fn(logits, soft), -(soft * log_probabilities).sum(dim=1).mean())
    plain = FineTune(str(checkpoints["cnn"]), num_classes=4, drop_path_rate=0, mixup=0, cutmix=0, label_smoothing=0.1)
    assert plain.mixup is None
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    smoothed = 0.9 * torch.nn.functional.one_hot(labels, 4) + 0.1 / 4
    torch.testing.assert_close(plain.loss_fn(logits, labels), -(smoothed * log_probabilities).sum(dim=1).mean())



def test_defaults_are_the_beit_mae_recipe_without_ema(checkpoints):
    model = FineTune(str(checkpoints["vit"]), num_classes=4)
    assert model.ema is None and list(model.val_metrics) == ["val"]
    assert model.model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert astuple(model.optimizer_settings)[:6] == (
        "adamw", 5e-4, 1e-6, 5.0, 0.05, 0.9)
    assert model.optimizer_options() == {"layer_decay": 0.65}
    mixup = model.mixup
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.mix_prob, mixup.switch_prob, mixup.label_smoothing,
            mixup.num_classes) == (0.8, 1.0, 1.0, 0.5, 0.1, 4)


class RecordWeights(pl.Callback):
    """The model's and the EMA's weights after every optimiser step (the EMA updates right after it)."""

    def __init__(self) -> None:
        self.model: list[dict] = []
        self.ema: list[dict] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.model.append({name: value.clone() for name, value in module.model.state_dict().items()})
        self.ema.append({name: value.clone() for name, value in module.ema.module.state_dict().items()})


def test_ema_copies_the_model_at_the_first_step_then_averages(checkpoints, tmp_path):
    pl.seed_everything(0)
    model = FineTune(str(checkpoints["cnn"]), num_classes=4, drop_path_rate=0, mixup=0, cutmix=0, ema=True,
                     ema_decay=0.5, optimizer=replace(FINETUNE_OPTIMIZER, warmup_epochs=0, lr=0.5))
    record = RecordWeights()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=[record],
        default_root_dir=tmp_path,
    )
    trainer.fit(model, synthetic_data(batch_size=16))
    assert len(record.model) == 2
    first, second = record.model
    weight = "head.weight"
    assert torch.equal(record.ema[0][weight], first[weight])  # timm's convention: the first update copies
    assert not torch.equal(first[weight], second[weight])
    torch.testing.assert_close(record.ema[1][weight], 0.5 * first[weight] + 0.5 * second[weight])


def test_fine_tuning_takes_the_chosen_encoder_and_the_backbone_recipe_and_freezes_the_average(checkpoints, tmp_path):
    from bam.io import export_backbone
    from bam.recipe import DataRecipe

    student = resolve_backbone(str(checkpoints["cnn"]), encoder="student").state
    model = FineTune(str(checkpoints["cnn"]), num_classes=4, encoder="student", drop_path_rate=0, ema=True)
    for name, value in student.items():
        assert torch.equal(model.model.state_dict()[name], value), name
    assert model.recipe is None and model.architecture == {"model": "bam_cnn4", "model_kwargs": {"width": 8}}
    assert not any(parameter.requires_grad for parameter in model.ema.parameters())  # the average is not trained
    assert all(parameter.requires_grad for parameter in model.model.parameters())
    assert model.ema.decay == 0.9999 and list(model.val_metrics) == ["val", "val_ema"]
    recipe = DataRecipe(mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), input_size=32, crop_pct=0.5)
    export = export_backbone(checkpoints["cnn"], tmp_path / "export", recipe=recipe)
    assert FineTune(str(export), num_classes=4, drop_path_rate=0).recipe == recipe


def test_a_checkpoint_saved_without_a_trainer_records_the_backbone_recipe(checkpoints, tmp_path):
    from bam.io import export_backbone
    from bam.recipe import DataRecipe

    recipe = DataRecipe(mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), input_size=32, crop_pct=0.5)
    model = FineTune(str(export_backbone(checkpoints["cnn"], tmp_path / "export", recipe=recipe)), num_classes=4,
                     drop_path_rate=0)
    checkpoint = {"state_dict": {}}
    model.on_save_checkpoint(checkpoint)  # no trainer, no data module: the backbone's own recipe
    assert checkpoint[ARCHITECTURE_KEY] == {
        "model": "bam_cnn4", "model_kwargs": {"width": 8}, "data_recipe": recipe.to_dict(),
    }
    plain = FineTune(str(checkpoints["cnn"]), num_classes=4, drop_path_rate=0)
    plain.on_save_checkpoint(checkpoint)
    assert checkpoint[ARCHITECTURE_KEY]["data_recipe"] is None  # none recorded, none made up


def test_the_default_drop_path_rate_works_for_an_architecture_without_stochastic_depth(checkpoints):
    """`FineTune(export)` with its defaults on the demo's CNN (no stochastic depth): built without
    the rate, with a warning saying so, instead of timm's TypeError."""
    with pytest.warns(UserWarning, match=r"bam_cnn4 has no stochastic depth: drop_path_rate 0.1 is not used"):
        model = FineTune(str(checkpoints["cnn"]), num_classes=4)
    assert model.model(torch.zeros(2, 3, 28, 28)).shape == (2, 4)
