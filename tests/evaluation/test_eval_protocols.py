"""The published evaluation protocols (issue 29), in process: the evaluation configs hold the
published values of the table in docs/evaluation.md; the ViT-S linear readout and head
options; SimCLR-style subset lists wherever `fraction` is taken; the step lr schedule with a
head lr of its own (SwAV's semi-supervised recipe); few-shot episodes on listed novel classes.
(The student's online k-NN is tested in tests/callbacks/test_online_knn.py.)"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from bam.cli import main as bam_main
from bam.data.sources import TensorImages, listed_subset
from bam.evaluation import fewshot
from bam.evaluation.data import BuiltinClassificationData, FolderClassificationData
from bam.evaluation.fewshot import read_class_list, run_fewshot
from bam.evaluation.linear import LinearProbe
from bam.training.optim import LrSchedule, StepBudget, optimizer_with_schedule
from bam.transforms import BPASettings
from eval_fixtures import CNN, write_checkpoint, write_imagenet_like_folder
from recipe_table import EVAL_DIR, REPO, config_value, eval_markdown, expected_value, load_table

EVAL_TABLE = load_table("eval_recipes")


# -- the recipe table -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(EVAL_TABLE))
def test_eval_config_holds_the_published_values(name):
    config = yaml.safe_load((EVAL_DIR / name).read_text())
    for row in EVAL_TABLE[name]["settings"]:
        assert config_value(config, row["key"]) == expected_value(row), f"{name}: {row['key']}"
        assert row["source"] and ("bam" not in row or row.get("reason")), f"{name}: {row['key']}"


def test_docs_show_the_eval_table():
    assert eval_markdown() in (REPO / "docs" / "evaluation.md").read_text(), (
        "docs/evaluation.md's table is stale: run python tests/helpers/recipe_table.py eval and paste its output there")


# -- ViT-S linear readout -------------------------------------------------------------------------
def test_vit_small_config_builds_the_authors_1536_feature_probe_without_batch_norm():
    model = yaml.safe_load((EVAL_DIR / "linear_imagenet_vit_small.yaml").read_text())["model"]
    settings = {key: model[key] for key in ("feature", "n_last_blocks", "bn_head", "bn_eps")}
    probe = LinearProbe("vit_small_patch16_224", num_classes=10, **settings)
    assert (probe.extractor.readout, probe.extractor.out_dim) == ("cls_blocks", 4 * 384) == ("cls_blocks", 1536)
    assert isinstance(probe.head[0], nn.Identity) and probe.head[1].weight.shape == (10, 1536)


def test_batch_norm_head_takes_the_authors_eps_and_refuses_a_bad_one(tmp_path):
    checkpoint = write_checkpoint(tmp_path, *CNN)
    norm = LinearProbe(str(checkpoint), num_classes=4).head[0]
    assert isinstance(norm, nn.BatchNorm1d) and not norm.affine and norm.eps == 1e-6
    assert LinearProbe(str(checkpoint), num_classes=4, bn_eps=1e-3).head[0].eps == 1e-3
    with pytest.raises(ValueError) as error:
        LinearProbe(str(checkpoint), num_classes=4, bn_eps=0.0)
    assert str(error.value) == "bn_eps must be positive, got 0.0"


# -- subset lists ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_imagenet_like_folder(tmp_path_factory.mktemp("imagenet"), classes=3, train_per_class=4, val_per_class=2)


def _subset_file(path, names) -> str:
    path.write_text("".join(f"{name}\n" for name in names))
    return str(path)


def test_a_subset_list_keeps_exactly_the_named_images_of_the_training_split(images, tmp_path):
    named = ["n00000002_3.JPEG", "n00000000_1.JPEG", "", "n00000000_2.JPEG"]  # any order, blank lines ignored
    data = FolderClassificationData(str(images), fraction=_subset_file(tmp_path / "1percent.txt", named), num_workers=0)
    data.setup()
    kept = sorted(path.rsplit("/", 1)[1] for path in data.train_source.paths)
    assert kept == ["n00000000_1.JPEG", "n00000000_2.JPEG", "n00000002_3.JPEG"]
    assert data.train_source.labels.tolist() == [0, 0, 2] and len(data.val_source) == 6  # val untouched
    queries = data.eval_dataset("val", _subset_file(tmp_path / "val.txt", ["n00000001_0.JPEG"]))
    assert len(queries) == 1 and queries[0][1] == 1  # the frozen-feature stages' fraction takes a list too


def test_names_missing_from_the_split_are_counted_and_the_first_three_shown(images, tmp_path):
    listed = _subset_file(tmp_path / "list.txt", ["n00000000_1.JPEG", *[f"n09999999_{i}.JPEG" for i in range(5)]])
    with pytest.raises(ValueError) as error:
        FolderClassificationData(str(images), fraction=listed).setup()
    assert str(error.value) == (
        f"5 of the 6 images named in {listed} are not in the split's 12 images, e.g. n09999999_0.JPEG, "
        "n09999999_1.JPEG, n09999999_2.JPEG; check that the list belongs to this dataset"
    )


def test_bam_finetune_names_the_absent_images_of_a_subset_list_in_one_line(images, tmp_path):
    """Through the `bam` entry point with the 1% config (a subset-list run of the console script is
    test_eval_configs_run.py's test_semisupervised_config_trains_on_the_listed_images)."""
    listed = _subset_file(tmp_path / "1percent.txt", ["n00000000_0.JPEG", "n01440764_10026.JPEG", "n01440764_10027.JPEG"])
    on_this_cpu = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
                   "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                   "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0"]
    with pytest.raises(SystemExit) as stop:
        bam_main(["finetune", "--config", "finetune_imagenet_semisup_1pct", "--model.backbone", "resnet18",
                  "--data.init_args.root", str(images), "--data.init_args.fraction", listed,
                  "--trainer.default_root_dir", str(tmp_path / "run"), *on_this_cpu])
    assert str(stop.value.code) == (
        f"bam finetune: 2 of the 3 images named in {listed} are not in the split's 12 images, e.g. "
        "n01440764_10026.JPEG, n01440764_10027.JPEG; check that the list belongs to this dataset"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_missing_list_and_images_without_file_names_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        listed_subset(TensorImages(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2)), tmp_path / "no.txt")
    assert str(error.value) == f"subset list not found: {tmp_path / 'no.txt'} (fraction takes a number in (0, 1] or a list file)"
    listed = _subset_file(tmp_path / "list.txt", ["a.JPEG"])
    with pytest.raises(ValueError) as error:
        BuiltinClassificationData("synthetic", {"train_size": 8, "val_size": 4}, fraction=listed).setup()
    assert str(error.value) == f"subset list {listed} names image files, but these images are held in memory; give a fraction"


# -- SwAV's semi-supervised optimisation: head lr and step decay ------------------------------------
def _optimised(schedule: LrSchedule, head_lr: float | None = None, epochs: int = 20, steps_per_epoch: int = 5):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    trainer = SimpleNamespace(estimated_stepping_batches=epochs * steps_per_epoch, max_epochs=epochs)
    own_lr = None if head_lr is None else (list(model[1].parameters()), head_lr)
    config = optimizer_with_schedule(trainer, model, 512, "sgd", 0.02, 0.0, 0.0, 0.0, 0.9, schedule=schedule, own_lr=own_lr)
    return model, config["optimizer"], config["lr_scheduler"]["scheduler"]


def test_step_schedule_decays_every_group_at_the_start_of_the_decay_epochs_and_the_head_keeps_its_lr():
    model, optimizer, scheduler = _optimised(LrSchedule("step", decay_epochs=(12, 16), decay_rate=0.2), head_lr=5.0)
    head = {id(param) for param in model[1].parameters()}
    head_groups = [group for group in optimizer.param_groups if {id(p) for p in group["params"]} <= head]
    trunk_groups = [group for group in optimizer.param_groups if not {id(p) for p in group["params"]} & head]
    assert len(head_groups) + len(trunk_groups) == len(optimizer.param_groups) and head_groups and trunk_groups
    for step, factor in [(0, 1.0), (59, 1.0), (60, 0.2), (79, 0.2), (80, 0.04), (99, 0.04)]:  # 5 steps per epoch
        scheduler.step_update(num_updates=step)
        # lr per 256 images times the global batch of 512
        assert [group["lr"] for group in trunk_groups] == pytest.approx([0.04 * factor] * len(trunk_groups)), step
        assert [group["lr"] for group in head_groups] == pytest.approx([10.0 * factor] * len(head_groups)), step


def test_the_head_group_keeps_the_weight_decay_split_of_its_parameters():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    trainer = SimpleNamespace(estimated_stepping_batches=10, max_epochs=1)
    config = optimizer_with_schedule(trainer, model, 256, "sgd", 0.1, 0.0, 0.0, 0.05, 0.9,
                                     own_lr=([model[1].weight, model[1].bias], 3.0))
    by_param = {id(p): group for group in config["optimizer"].param_groups for p in group["params"]}
    assert (by_param[id(model[1].weight)]["lr"], by_param[id(model[1].weight)]["weight_decay"]) == (3.0, 0.05)
    assert (by_param[id(model[1].bias)]["lr"], by_param[id(model[1].bias)]["weight_decay"]) == (3.0, 0.0)
    assert (by_param[id(model[0].weight)]["lr"], by_param[id(model[0].bias)]["lr"]) == (0.1, 0.1)


@pytest.mark.parametrize("settings, message", [
    ({"name": "steps"}, "unknown lr schedule 'steps'; choose one of ['cosine', 'step']"),
    ({"name": "step"}, "the step lr schedule needs lr_decay_epochs, e.g. [12, 16]"),
    ({"name": "step", "decay_epochs": (12, 0)}, "lr_decay_epochs must be positive epochs, got [12, 0]"),
])
def test_bad_schedules_are_named(settings, message):
    with pytest.raises(ValueError) as error:
        LrSchedule(**settings)
    assert str(error.value) == message


def test_budget_counts_decay_epochs_in_steps():
    assert StepBudget(100, 5).steps(12) == 60


# -- few-shot on novel classes ----------------------------------------------------------------------
def test_class_list_takes_folder_names_or_labels_and_names_what_it_lacks(tmp_path):
    listed = tmp_path / "novel.txt"
    listed.write_text("# novel classes\nn00000003\n1\n\nn00000003\n")
    assert read_class_list(listed, 5, [f"n{i:08d}" for i in range(5)]) == [1, 3]
    listed.write_text("n00000003\nn00000009\n7\nn00000008\n")
    with pytest.raises(ValueError) as error:
        read_class_list(listed, 5, [f"n{i:08d}" for i in range(5)])
    assert str(error.value) == (
        f"3 of the 4 classes in {listed} are neither class folders of the data nor labels 0-4, e.g. n00000009, 7, n00000008")
    with pytest.raises(FileNotFoundError, match="novel class list not found: .*absent.txt"):
        read_class_list(tmp_path / "absent.txt", 5)


def test_episodes_draw_only_from_the_novel_classes(tmp_path, monkeypatch):
    checkpoint = write_checkpoint(tmp_path, *CNN)
    options = {"train_size": 16, "val_size": 80, "image_size": 32, "num_classes": 8}
    data = BuiltinClassificationData("synthetic", options, image_size=32, resize_size=32, num_workers=0, batch_size=40)
    (tmp_path / "novel.txt").write_text("2\n5\n7\n")
    drawn = []
    real = fewshot.sample_episode
    monkeypatch.setattr(fewshot, "sample_episode", lambda labels, *args: drawn.append(labels.unique().tolist()) or real(labels, *args))
    result = run_fewshot(str(checkpoint), data, ways=3, shots=[1], queries=2, episodes=4, bpa=BPASettings(enabled=False),
                         novel_classes=str(tmp_path / "novel.txt"), output_dir=str(tmp_path / "out"), accelerator="cpu")
    assert drawn == [[2, 5, 7]] * 4
    assert result["novel_classes"] == {"file": str(tmp_path / "novel.txt"), "labels": [2, 5, 7]}
    assert result["num_images"] == 30  # the 10 held-out images of each of the 3 novel classes
