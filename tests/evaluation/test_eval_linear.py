"""`bam linear`: the stage at toy size (command line, report, checkpoint, resume) and cached features
training the head exactly as on-the-fly features of un-augmented images do."""
from __future__ import annotations

from dataclasses import astuple
import json
import logging

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torchvision.io import write_png

from bam.evaluation import classifier
from bam.evaluation import linear as linear_module
from bam.evaluation.classifier import ClassificationStage
from bam.evaluation.data import BuiltinClassificationData, FolderClassificationData
from bam.evaluation.linear import LinearProbe, main
from bam.training.optim import OptimizerSettings
from eval_fixtures import CNN, VIT, synthetic_args, synthetic_data, trainer_args, write_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("linear")
    return {"cnn": write_checkpoint(directory, *CNN), "vit": write_checkpoint(directory, *VIT)}


def test_vit_probe_runs_reports_and_resumes(checkpoints, tmp_path):
    args = ["--model.backbone", str(checkpoints["vit"]), "--model.n_last_blocks", "2", *synthetic_args()]
    main([*args, *trainer_args(tmp_path, max_epochs=1)])
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == ["last.ckpt"]  # the last only, no top-k
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert not any(key.startswith("extractor.") for key in saved["state_dict"])  # the frozen backbone is not stored
    assert saved["state_dict"]["head.1.weight"].shape == (4, 3 * 48)  # 2 class tokens + mean patch token
    main([*args, *trainer_args(tmp_path, max_epochs=2), "--ckpt_path", "last"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert [entry["epoch"] for entry in results["history"]] == [1, 2]  # the resumed run kept epoch 1
    best, last = results["val"], results["history"][-1]
    assert best["last_top1"] == last["val/top1"] and best["last_epoch"] == 2
    assert best["best_top1"] == max(entry["val/top1"] for entry in results["history"])
    assert 0 <= best["best_top1"] <= best["best_top5"] <= 100


def test_misspelt_config_key_is_rejected_by_name(checkpoints, tmp_path, capsys):
    config = tmp_path / "probe.yaml"
    config.write_text(f"model:\n  backbone: {checkpoints['cnn']}\n  n_last_block: 2\n")
    with pytest.raises(SystemExit):
        main(["--config", str(config), *synthetic_args(), *trainer_args(tmp_path)])
    assert "n_last_block" in capsys.readouterr().err


def test_head_starts_from_small_gaussian_weights_after_a_plain_batch_norm(checkpoints):
    torch.manual_seed(0)
    probe = LinearProbe(str(checkpoints["cnn"]), num_classes=100)
    norm, linear = probe.head
    assert isinstance(norm, torch.nn.BatchNorm1d) and not norm.affine
    assert linear.weight.shape == (100, probe.extractor.out_dim) == (100, 32)
    weights = linear.weight.detach().flatten()  # 3,200 draws of N(0, 0.01^2)
    assert weights.std().item() == pytest.approx(0.01, rel=0.05) and abs(weights.mean().item()) < 0.001
    assert torch.equal(linear.bias.detach(), torch.zeros(100))


def test_defaults_are_the_authors_protocol(checkpoints):
    probe = LinearProbe(str(checkpoints["vit"]))
    assert astuple(probe.optimizer_settings)[:6] == (
        "sgd", 0.002, 0.0, 0.0, 0.0, 0.9)
    assert not probe.cache_features and list(probe.val_metrics) == ["val"]
    assert (probe.extractor.readout, probe.extractor.out_dim) == ("cls_patch_mean", 2 * 48)  # [CLS, mean patch] of 1 block
    assert probe.head[1].weight.shape == (1000, 2 * 48)


def test_cached_mode_embeds_on_the_trainer_device(checkpoints, tmp_path, monkeypatch):
    probe = LinearProbe(str(checkpoints["cnn"]), num_classes=4, cache_features=True)
    moves, move = [], probe.extractor.to
    probe.extractor.to = lambda *args, **kwargs: moves.append(args) or move(*args, **kwargs)  # a GPU run moves it there
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    data = synthetic_data(batch_size=16, augment="none")
    embedded = []
    real = linear_module.embed_dataset
    monkeypatch.setattr(linear_module, "embed_dataset",
                        lambda dataset, fn, *args: embedded.append((len(dataset), fn, *args)) or real(dataset, fn, *args))
    trainer.fit(probe, data)
    assert moves == [(torch.device("cpu"),)] and len(data.cache["train"]) == 64
    # both splits, each with the trainer's device and the data module's batch size and workers
    assert embedded == [(64, probe.extractor, torch.device("cpu"), 16, 0), (32, probe.extractor, torch.device("cpu"), 16, 0)]


def test_optimiser_settings_reach_the_stage(checkpoints):
    probe = LinearProbe(str(checkpoints["cnn"]), num_classes=4, optimizer=OptimizerSettings(
                        "adamw", lr=0.3, min_lr=0.01, warmup_epochs=2.0, weight_decay=0.05, momentum=0.8))
    assert astuple(probe.optimizer_settings)[:6] == (
        "adamw", 0.3, 0.01, 2.0, 0.05, 0.8)


def train_head(backbone: str, cache_features: bool, run_dir) -> tuple[LinearProbe, BuiltinClassificationData]:
    pl.seed_everything(0)
    model = LinearProbe(backbone, num_classes=4, cache_features=cache_features, optimizer=OptimizerSettings(lr=0.5))
    data = synthetic_data(batch_size=16, augment="none")
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=run_dir,
    )
    trainer.fit(model, data)
    return model, data


def test_cached_features_train_the_head_as_on_the_fly_features(checkpoints, tmp_path):
    on_the_fly, _ = train_head(str(checkpoints["cnn"]), cache_features=False, run_dir=tmp_path / "images")
    cached, data = train_head(str(checkpoints["cnn"]), cache_features=True, run_dir=tmp_path / "features")
    assert len(data.cache["train"]) == 64 and len(data.cache["val"]) == 32
    assert on_the_fly.history == cached.history
    assert set(on_the_fly.trainer.progress_bar_metrics) == {"train/loss"}  # the loss is shown as it trains
    moved = on_the_fly.head[1].weight.abs().max() > 0.05  # far from its N(0, 0.01) start: it trained
    assert moved
    for name, value in on_the_fly.head.state_dict().items():
        torch.testing.assert_close(cached.head.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_report_is_printed_and_written_indented(checkpoints, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    model, _ = train_head(str(checkpoints["cnn"]), cache_features=True, run_dir=tmp_path)
    text = (tmp_path / "results.json").read_text()
    results = json.loads(text)
    assert text == json.dumps(results, indent=2)  # for people to read
    assert results["history"] == model.history and [entry["epoch"] for entry in model.history] == [1, 2]
    best, last = results["val"], results["history"][-1]
    assert (best["last_top1"], best["last_top5"], best["last_epoch"]) == (last["val/top1"], last["val/top5"], 2)
    report = f"{'':<14} {'top-1':>7} {'top-5':>7}  epoch"
    printed = [record.getMessage() for record in caplog.records if record.getMessage().startswith(report)]
    assert printed == ["\n".join([
        "                 top-1   top-5  epoch",
        f"best val       {best['best_top1']:>6.2f}% {best['best_top5']:>6.2f}%  {best['best_epoch']}",
        f"last val       {best['last_top1']:>6.2f}% {best['last_top5']:>6.2f}%  2",
        f"(written to {tmp_path / 'results.json'})",
    ])]


def test_command_line_defaults_seed_and_shipped_config_names(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model.backbone", "bam_cnn4", "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["seed_everything"] == 0  # a run is reproducible without being told a seed
    # the last checkpoint only, and the curves, as options of their own
    assert (printed["checkpoint"]["save_last"], printed["checkpoint"]["save_top_k"]) == (True, 0)
    assert "plots" in printed and "dirpath" in printed["checkpoint"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", "demo", "--print_config"])  # configs/eval/linear_demo.yaml by name
    assert exit_info.value.code in (None, 0)
    assert yaml.safe_load(capsys.readouterr().out)["model"]["backbone"] == "runs/demo/backbone"


class ImagesOnly(pl.LightningDataModule):
    """Labelled images from a plain Lightning data module: no data recipe to take, no files to account for."""

    def __init__(self, data: BuiltinClassificationData) -> None:
        super().__init__()
        self.data = data

    def train_dataloader(self):
        return self.data.train_dataloader()

    def val_dataloader(self):
        return self.data.val_dataloader()


def test_validation_accuracy_to_four_decimals_with_a_plain_data_module(checkpoints, tmp_path):
    torch.manual_seed(0)
    probe = LinearProbe(str(checkpoints["cnn"]), num_classes=4)
    data = synthetic_data(batch_size=16, val_size=31, augment="none")  # 31 images: accuracies are not round numbers
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
    )
    trainer.fit(probe, datamodule=ImagesOnly(data))
    dataset = data.eval_dataset("val")
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        correct = int((probe.eval()(images).argmax(dim=1) == labels).sum())
    assert 0 < correct < 31
    top1 = round(100.0 * (torch.tensor(correct, dtype=torch.float32) / 31).item(), 4)  # as torchmetrics divides
    assert top1 != round(100.0 * correct / 31, 5)  # the test tells 4 decimals from more
    assert probe.history == [{"epoch": 1, "val/top1": top1, "val/top5": 100.0}]
    assert json.loads((tmp_path / "results.json").read_text())["files"] is None


def test_images_on_disk_are_accounted_for_in_the_results(checkpoints, tmp_path, capsys, monkeypatch):
    for name in ("cat", "dog"):
        (tmp_path / "images" / "train" / name).mkdir(parents=True)
        for index in range(4):
            image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(index))
            write_png(image, str(tmp_path / "images" / "train" / name / f"{index}.png"))
    data = FolderClassificationData(str(tmp_path / "images"), val_fraction=0.25, image_size=32, resize_size=32,
                                    batch_size=2, num_workers=0, augment="none")
    probe = LinearProbe(str(checkpoints["cnn"]), num_classes=2)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path / "run",
    )
    settled = []
    real = classifier.report_files
    monkeypatch.setattr(classifier, "report_files", lambda *args: settled.append(args[1:]) or real(*args))
    trainer.fit(probe, data)
    assert settled == [(tmp_path / "run" / "skipped_files.tsv", torch.device("cpu"))]  # summed on the trainer's device
    files = json.loads((tmp_path / "run" / "results.json").read_text())["files"]
    assert files == {
        "found": 8, "read": 8, "skipped": 0, "not_read": 0, "skipped_log": None,
        "skipped_by_reason": {"empty": 0, "undecodable": 0, "too_many_pixels": 0, "unsupported": 0, "already_listed": 0},
    }  # 6 training images in 3 full batches of 2, 2 held out
    assert "files: 8 found, 8 read, 0 skipped\n" in capsys.readouterr().out


class Bare(ClassificationStage):
    """Only the base class's settings."""


def test_the_base_stage_defaults_are_the_linear_protocol():
    stage = Bare(7)
    assert astuple(stage.optimizer_settings)[:6] == (
        "sgd", 0.002, 0.0, 0.0, 0.0, 0.9)
    assert list(stage.val_metrics) == ["val"] and stage.history == [] and stage.recipe is None


def test_summary_takes_the_best_top1_epoch_and_the_last_epoch_of_each_model():
    stage = Bare(4, evaluated=("val", "val_ema"))
    stage.history = [
        {"epoch": 1, "val/top1": 40.0, "val/top5": 90.0, "val_ema/top1": 10.0, "val_ema/top5": 50.0},
        {"epoch": 2, "val/top1": 60.0, "val/top5": 95.0, "val_ema/top1": 30.0, "val_ema/top5": 70.0},
        {"epoch": 3, "val/top1": 50.0, "val/top5": 99.0, "val_ema/top1": 20.0, "val_ema/top5": 80.0},
    ]
    assert stage.summary() == {
        "val": {"best_top1": 60.0, "best_top5": 95.0, "best_epoch": 2, "last_top1": 50.0, "last_top5": 99.0, "last_epoch": 3},
        "val_ema": {"best_top1": 30.0, "best_top5": 70.0, "best_epoch": 2, "last_top1": 20.0, "last_top5": 80.0,
                    "last_epoch": 3},
    }


def test_results_are_written_into_a_new_run_folder(checkpoints, tmp_path):
    run_dir = tmp_path / "new" / "run"
    train_head(str(checkpoints["cnn"]), cache_features=True, run_dir=run_dir)
    assert json.loads((run_dir / "results.json").read_text())["val"]["last_epoch"] == 2


def test_probe_takes_the_chosen_encoder_and_the_backbone_recipe(checkpoints, tmp_path):
    from bam.evaluation.backbone import resolve_backbone
    from bam.io import export_backbone
    from bam.recipe import DataRecipe

    student = resolve_backbone(str(checkpoints["cnn"]), encoder="student").state
    probe = LinearProbe(str(checkpoints["cnn"]), num_classes=4, encoder="student")
    for name, value in student.items():
        assert torch.equal(probe.extractor.backbone.state_dict()[name], value), name
    assert probe.recipe is None  # a pretraining checkpoint records none
    recipe = DataRecipe(mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.2), input_size=32, crop_pct=0.5)
    export = export_backbone(checkpoints["cnn"], tmp_path / "export", recipe=recipe)
    assert LinearProbe(str(export), num_classes=4).recipe == recipe


def _attach(stage, datamodule) -> None:
    """A stand-in trainer: what `setup` reads (the data module, the strategy's checkpoint I/O)."""
    from types import SimpleNamespace

    stage._trainer = SimpleNamespace(datamodule=datamodule, strategy=SimpleNamespace(checkpoint_io=None))


def test_cached_features_need_a_classification_data_module(checkpoints):
    probe = LinearProbe(str(checkpoints["cnn"]), num_classes=4, cache_features=True)
    _attach(probe, ImagesOnly(synthetic_data()))
    with pytest.raises(TypeError) as error:
        probe.setup("fit")
    assert str(error.value) == "cache_features needs a ClassificationDataModule (it serves the cached features)"


def test_setup_names_the_backbone_in_recipe_warnings():
    from bam.evaluation.data import RecipeMismatchWarning
    from bam.recipe import DataRecipe

    stage = Bare(4)  # no backbone among its settings: "the backbone"
    stage.recipe = DataRecipe(input_size=48, crop_pct=1.0)
    data = synthetic_data()  # 32 px, set explicitly
    _attach(stage, data)
    with pytest.warns(RecipeMismatchWarning) as caught:
        stage.setup("fit")
    assert [str(warning.message) for warning in caught] == [
        "data.image_size=32 differs from the image_size 48 that the backbone was trained with (its data recipe); "
        "using data.image_size=32 as set. Leave data.image_size unset to use the recipe's."
    ]


class RecordGroups(pl.Callback):
    """(lr, weight decay, momentum) of every parameter group as the optimiser is about to step."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[float, float, float]]] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.steps.append([(group["lr"], group["weight_decay"], group["momentum"]) for group in optimizer.param_groups])


@pytest.mark.parametrize("warmup_epochs", [0.0, 1.0])
def test_optimiser_steps_follow_the_scaled_warmup_cosine_schedule(checkpoints, tmp_path, warmup_epochs):
    """SGD at lr * 16 / 256, warmed up linearly from 0 over `warmup_epochs` (4 steps an epoch), then
    cosine to min_lr over the remaining steps of 2 epochs; weight decay on the weight only, momentum
    on both groups: against the schedule computed here."""
    import math

    probe = LinearProbe(str(checkpoints["cnn"]), num_classes=4, optimizer=OptimizerSettings(
                        lr=0.4, min_lr=0.001, warmup_epochs=warmup_epochs, weight_decay=0.01, momentum=0.8))
    record = RecordGroups()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[record],
        default_root_dir=tmp_path,
    )
    trainer.fit(probe, synthetic_data(batch_size=16, augment="none"))
    assert isinstance(trainer.optimizers[0], torch.optim.SGD)
    peak, warmup, total = 0.4 * 16 / 256, int(4 * warmup_epochs), 8
    expected = [peak * step / warmup for step in range(warmup)] + [
        0.001 + 0.5 * (peak - 0.001) * (1 + math.cos(math.pi * step / (total - warmup))) for step in range(total - warmup)
    ]
    assert [[pytest.approx(lr) for lr, _, _ in groups] for groups in record.steps] == [[rate, rate] for rate in expected]
    assert {(decay, momentum) for groups in record.steps for _, decay, momentum in groups} == {(0.0, 0.8), (0.01, 0.8)}
    assert trainer.callback_metrics["train/lr"].item() == pytest.approx(expected[-1])


def test_setup_names_the_probed_backbone_in_recipe_warnings(checkpoints, tmp_path):
    from bam.evaluation.data import RecipeMismatchWarning
    from bam.io import export_backbone
    from bam.recipe import DataRecipe

    export = export_backbone(checkpoints["cnn"], tmp_path / "export", recipe=DataRecipe(input_size=48, crop_pct=1.0))
    probe = LinearProbe(str(export), num_classes=4)
    _attach(probe, synthetic_data())  # 32 px, set explicitly
    with pytest.warns(RecipeMismatchWarning) as caught:
        probe.setup("fit")
    assert [str(warning.message) for warning in caught] == [
        f"data.image_size=32 differs from the image_size 48 that {export} was trained with (its data recipe); "
        "using data.image_size=32 as set. Leave data.image_size unset to use the recipe's."
    ]


def test_runs_go_to_runs_linear_by_default_and_user_errors_end_in_one_line(checkpoints, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--model.backbone", str(checkpoints["cnn"]), "--model.cache_features", "true", *synthetic_args(),
            "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false"]
    main(args)
    assert json.loads((tmp_path / "runs" / "linear" / "results.json").read_text())["val"]["last_epoch"] == 1
    assert (tmp_path / "runs" / "linear" / "checkpoints" / "last.ckpt").is_file()
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--ckpt_path", str(missing)])
    assert exit_info.value.code == f"bam linear: checkpoint file not found: {str(missing)!r} (--ckpt_path)"
