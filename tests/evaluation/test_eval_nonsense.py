"""Evaluations never report numbers computed from nonsense (issue 27 item 8): a backbone with
non-finite weights stops `bam knn`, `bam linear` and `bam finetune` with one line and without a
checkpoint, and label sets that make accuracy meaningless (held-out labels the training split
never has, a single class) are refused before any image is embedded."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import write_png

from bam.cli import main as bam_main
from bam.data.splits import MissingLabelsError
from bam.evaluation.data import FolderClassificationData, LabelSetError
from cli_runs import run_bam
from eval_fixtures import CNN, synthetic_args, trainer_args, write_checkpoint

NON_FINITE_FEATURES = ("the backbone gives non-finite features (NaN or infinity) for {count} of {total} images of the "
                       "{split} split: its weights are broken (e.g. a diverged run's checkpoint); evaluate another "
                       "checkpoint")
NON_FINITE_LOSS = ("the training loss is not finite ({loss}) at step 0: from the first step, this means a backbone "
                   "or data giving NaN or infinity (a diverged run's checkpoint); later, lower the learning rate. "
                   "Nothing was saved from this step on")


@pytest.fixture(scope="module")
def nan_checkpoint(tmp_path_factory) -> Path:
    """A bam checkpoint whose teacher's first convolution holds NaN."""
    path = write_checkpoint(tmp_path_factory.mktemp("nan"), *CNN)
    contents = torch.load(path, weights_only=True)
    contents["state_dict"]["teacher.backbone.features.0.weight"].fill_(float("nan"))
    torch.save(contents, path)
    return path


def listed_images(directory: Path, labels: dict[str, list[int]]) -> dict[str, Path]:
    """Per split name, a `path label` list file of 32-px images with the given labels."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    lists = {}
    for split, split_labels in labels.items():
        lines = []
        for index, label in enumerate(split_labels):
            name = f"{split}_{index}.png"
            write_png(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator), str(directory / name))
            lines.append(f"{name} {label}")
        lists[split] = directory / f"{split}.txt"
        lists[split].write_text("\n".join(lines) + "\n")
    return lists


def list_data_args(lists: dict[str, Path]) -> list[str]:
    return ["--data", "bam.evaluation.data.FolderClassificationData", "--data.root", str(lists["train"]),
            "--data.val_root", str(lists["val"]), "--data.image_size", "32", "--data.resize_size", "32",
            "--data.num_workers", "0", "--data.batch_size", "4"]


def test_held_out_labels_training_never_has_are_refused(tmp_path):
    lists = listed_images(tmp_path, {"train": [0, 0, 1, 1], "val": [0, 1, 2, 2, 5]})
    data = FolderClassificationData(str(lists["train"]), str(lists["val"]), num_workers=0)
    with pytest.raises(LabelSetError) as error:
        data.num_classes
    assert str(error.value) == (
        "the held-out split has 3 images with labels [2, 5] that the training split never has: no classifier or "
        "k-NN bank can predict them, and accuracy would count them as errors (or as top-5 hits among unused classes); "
        "check that both splits number their classes the same way"
    )


def test_a_single_class_is_refused(tmp_path):
    lists = listed_images(tmp_path, {"train": [3, 3, 3], "val": [3]})
    with pytest.raises(MissingLabelsError) as error:
        FolderClassificationData(str(lists["train"]), str(lists["val"]), num_workers=0).num_classes
    assert str(error.value) == (
        "a classifier (linear probe, fine-tuning) needs images with class labels (two classes or more), but the "
        "training images have a single class: give a folder with one sub-folder per class (and labels: classes or "
        "auto) or a list of 'path label' lines"
    )


@pytest.mark.process
def test_bam_knn_stops_on_non_finite_features(nan_checkpoint, tmp_path):
    knn = run_bam(["knn", "--backbone", str(nan_checkpoint), *synthetic_args(train_size=16, val_size=8),
                   "--accelerator", "cpu", "--output_dir", str(tmp_path / "knn")])
    assert knn.returncode == 1
    assert knn.stdout.strip().splitlines()[-1] == "bam knn: " + NON_FINITE_FEATURES.format(
        count=16, total=16, split="train")
    assert not (tmp_path / "knn" / "knn_results.json").exists()


def test_bam_knn_stops_on_a_bad_label_set(tmp_path):
    """In this process, through the `bam` entry point: the stage's exit message is the line the
    console script prints, by the route of the non-finite features' stop above (a process)."""
    lists = listed_images(tmp_path / "images", {"train": [0, 0, 1, 1], "val": [0, 7]})
    sound = write_checkpoint(tmp_path, *CNN)
    with pytest.raises(SystemExit) as stop:
        bam_main(["knn", "--backbone", str(sound), *list_data_args(lists), "--accelerator", "cpu",
                  "--output_dir", str(tmp_path / "knn")])
    assert str(stop.value.code).startswith(
        "bam knn: the held-out split has 1 images with labels [7] that the training split never has")
    assert not (tmp_path / "knn" / "knn_results.json").exists()


def stage_on_the_nan_checkpoint(stage: str, checkpoint: Path, run_dir: Path) -> list[str]:
    no_mixing = ["--model.mixup", "0", "--model.cutmix", "0", "--model.drop_path_rate", "0"]
    options = no_mixing if stage == "finetune" else []
    return [stage, "--model.backbone", str(checkpoint), *options, *synthetic_args(train_size=16, val_size=8),
            *trainer_args(run_dir, max_epochs=1)]


def assert_nothing_saved(run_dir: Path) -> None:
    assert not list(run_dir.glob("checkpoints/*.ckpt")) and not (run_dir / "results.json").exists()


@pytest.mark.process
def test_linear_stops_on_a_non_finite_loss_and_saves_nothing(nan_checkpoint, tmp_path):
    run = run_bam(stage_on_the_nan_checkpoint("linear", nan_checkpoint, tmp_path))
    assert run.returncode == 1
    assert run.stdout.strip().splitlines()[-1] == "bam linear: " + NON_FINITE_LOSS.format(loss="nan")
    assert_nothing_saved(tmp_path)


def test_finetune_stops_on_a_non_finite_loss_and_saves_nothing(nan_checkpoint, tmp_path):
    """In this process, through the `bam` entry point (the linear probe's stop above is the
    console script's, by the same route: the trained stages' shared training step)."""
    with pytest.raises(SystemExit) as stop:
        bam_main(stage_on_the_nan_checkpoint("finetune", nan_checkpoint, tmp_path))
    assert str(stop.value.code) == "bam finetune: " + NON_FINITE_LOSS.format(loss="nan")
    assert_nothing_saved(tmp_path)


def test_a_probe_refuses_to_save_a_non_finite_head(tmp_path):
    from bam.evaluation.linear import LinearProbe
    from bam.training.health import NonFiniteStateError

    probe = LinearProbe(str(write_checkpoint(tmp_path, *CNN)), num_classes=4)
    probe.head[1].weight.data[0, 0] = float("inf")
    checkpoint = {"state_dict": probe.state_dict(), "optimizer_states": []}
    with pytest.raises(NonFiniteStateError, match=r"^refusing to write a checkpoint at step 0: non-finite values in "
                                                  r"head\.1\.weight\."):
        probe.on_save_checkpoint(checkpoint)
