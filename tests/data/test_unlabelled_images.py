"""Images without classes: folders at any depth and lists of paths alone are read for pretraining,
the rule that tells a labelled folder from an unlabelled one, label-free embedding checks instead
of a meaningless k-NN, and one line from the stages that need labels."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bam.data import ImageFolderDataModule
from bam.data.sources import UNLABELLED, class_count, read_file_list, scan_image_folder
from bam.data.splits import MissingLabelsError, image_splits
from bam.evaluation.data import FolderClassificationData
from bam.features.spread import embedding_spread
from cli_runs import run_bam
from eval_fixtures import CNN, write_checkpoint


def _write_images(folder: Path, count: int, prefix: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(len(str(folder)))
    paths = [folder / f"{prefix}{index:02d}.jpg" for index in range(count)]
    for path in paths:
        Image.fromarray(generator.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path, quality=95)
    return paths


@pytest.fixture
def flat(tmp_path: Path) -> Path:
    """10 images in the folder itself and 6 two levels down, no classes."""
    _write_images(tmp_path / "flat", 10)
    _write_images(tmp_path / "flat" / "2024" / "june", 6, prefix="deep")
    return tmp_path / "flat"


# -- which folders and lists are labelled ----------------------------------------------------------
def test_a_folder_of_images_is_read_at_any_depth_without_classes(flat):
    images, classes = scan_image_folder(flat)
    assert classes is None and len(images) == 16
    assert torch.equal(images.labels, torch.full((16,), UNLABELLED))
    assert sum("/2024/june/deep" in path for path in images.paths) == 6
    image, label = images[0]
    assert image.shape == (3, 20, 24) and label == UNLABELLED


def test_the_auto_rule_names_classes_only_for_two_or_more_subfolders_and_no_loose_images(tmp_path):
    for name in ("a", "b"):
        _write_images(tmp_path / "two" / name, 3)
    _write_images(tmp_path / "one" / "photos", 3)
    for name in ("a", "b"):
        _write_images(tmp_path / "loose" / name, 3)
    _write_images(tmp_path / "loose", 2, prefix="own")

    assert scan_image_folder(tmp_path / "two")[1] == ["a", "b"]
    assert class_count(scan_image_folder(tmp_path / "two")[0].labels) == 2
    assert scan_image_folder(tmp_path / "one")[1] is None  # one class would make every k-NN 100%
    loose, classes = scan_image_folder(tmp_path / "loose")
    assert classes is None and len(loose) == 8  # every image, the class folders' ones too
    # explicit settings override the rule
    assert scan_image_folder(tmp_path / "one", labels="classes")[1] == ["photos"]
    assert scan_image_folder(tmp_path / "two", labels="none")[1] is None
    with pytest.raises(FileNotFoundError, match="no class sub-folders in image folder .*flat.* labels: none"):
        _write_images(tmp_path / "flat", 2)
        scan_image_folder(tmp_path / "flat", labels="classes")
    with pytest.raises(ValueError, match="labels must be one of auto, classes, none, got 'folders'"):
        scan_image_folder(tmp_path / "two", labels="folders")


def test_a_list_of_paths_alone_is_unlabelled_and_a_mixed_list_names_its_line(flat, tmp_path):
    paths = sorted(flat.glob("*.jpg"))
    listed = tmp_path / "paths.txt"
    listed.write_text("# my photos\n" + "".join(f"{path}\n" for path in paths))
    images = read_file_list(listed)
    assert images.paths == [str(path) for path in paths]
    assert torch.equal(images.labels, torch.full((10,), UNLABELLED))

    labelled = tmp_path / "labelled.txt"
    labelled.write_text("".join(f"{path} {i % 2}\n" for i, path in enumerate(paths)))
    assert read_file_list(labelled).labels.tolist() == [i % 2 for i in range(10)]
    assert torch.equal(read_file_list(labelled, labels="none").labels, torch.full((10,), UNLABELLED))

    mixed = tmp_path / "mixed.txt"
    mixed.write_text(f"{paths[0]} 0\n{paths[1]}\n")
    with pytest.raises(ValueError) as error:
        read_file_list(mixed)
    assert str(error.value) == (
        f"{mixed}:2: expected 'path label' (other lines have labels), got '{paths[1]}'; give every line an integer "
        "label, or none (with labels: none every line is a path)")


def test_unlabelled_splits_hold_out_a_seeded_fraction_and_the_data_module_reports_no_classes(flat):
    train, val = image_splits(flat, val_fraction=0.25, seed=3)
    assert (len(train), len(val)) == (12, 4)
    assert not set(train.paths) & set(val.paths)
    assert image_splits(flat, val_fraction=0.25, seed=3)[1].paths == val.paths
    data = ImageFolderDataModule(str(flat), val_fraction=0.25, batch_size=4, num_workers=0)
    assert data.class_count() == 0
    with pytest.raises(MissingLabelsError, match="^k-NN accuracy needs images with class labels"):
        data.require_classes("k-NN accuracy")


# -- label-free checks ---------------------------------------------------------------------------
def test_embedding_spread_matches_its_definitions():
    assert embedding_spread(torch.ones(10, 4)) == {"effective_rank": 1.0, "std": 0.0, "max_rank": 4, "spread_std": 0.5}
    orthogonal = embedding_spread(torch.eye(8) * 3)
    # each coordinate: one 1 and seven 0s, whose (n - 1)-normalised variance is 1/8
    assert orthogonal["effective_rank"] == pytest.approx(8) and orthogonal["std"] == pytest.approx(math.sqrt(1 / 8))
    features = torch.randn(50, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    unit = features / features.norm(dim=1, keepdim=True)
    singular = np.linalg.svd(unit.numpy(), compute_uv=False)
    share = singular / singular.sum()
    spread = embedding_spread(features)
    assert spread["effective_rank"] == pytest.approx(float(np.exp(-(share * np.log(share)).sum())), rel=1e-9)
    assert spread["std"] == pytest.approx(float(unit.numpy().std(axis=0, ddof=1).mean()), rel=1e-9)


# -- through the console script ------------------------------------------------------------------
TINY = ["--config", "configs/pretrain/demo.yaml", "--data", "bam.data.ImageFolderDataModule",
        "--data.augment_on", "cpu", "--data.batch_size", "4", "--data.num_workers", "0", "--data.val_fraction", "0.25",
        "--data.eval_size", "16", "--data.base_size", "24", "--data.crops.global_size", "16",
        "--data.crops.local_size", "8", "--data.crops.num_local_crops", "2", "--model.init_args.projector.hidden_dim", "32",
        "--model.init_args.projector.out_dim", "16", "--trainer.max_epochs", "1", "--knn.every_n_epochs", "1",
        "--trainer.enable_progress_bar", "false"]


@pytest.mark.process
def test_pretraining_on_a_flat_folder_reports_embedding_checks_instead_of_knn(flat, tmp_path):
    run_dir = tmp_path / "run"
    run = run_bam(["pretrain", *TINY, "--data.root", str(flat), "--trainer.default_root_dir", str(run_dir)])
    assert run.returncode == 0, run.stdout[-3000:]
    assert ("online k-NN is off: the training images have no class labels, so any accuracy would read 100%; "
            "logging label-free checks instead (embedding/effective_rank, embedding/std, train/loss)") in run.stdout
    assert "%" not in run.stdout.split("`Trainer.fit` stopped")[-1]  # no accuracy table at the end
    report = json.loads(next(run_dir.glob("**/embedding_report.json")).read_text())
    rows = {name: row for name, row in report.items() if isinstance(row, dict)}
    assert set(rows) == {"trained backbone", "random init (same architecture)", "raw pixels"}
    # 12 bank images (16 minus 4 held out), fewer than any row's feature dimension
    assert {row["max_rank"] for row in rows.values()} == {12}
    assert rows["raw pixels"]["spread_std"] == pytest.approx(1 / math.sqrt(3 * 16 * 16))
    for row in rows.values():
        assert 1 <= row["effective_rank"] <= row["max_rank"] and 0 < row["std"] <= row["spread_std"] + 1e-9
    assert math.isfinite(report["last_train_loss"])
    table = run.stdout[run.stdout.index("Embeddings of the bank (no classes: no k-NN)"):].splitlines()
    trained = rows["trained backbone"]
    assert table[1].split() == ["trained", "backbone", f"{trained['effective_rank']:.1f}", "of",
                                str(trained["max_rank"]), f"{trained['std']:.4f}"]


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    (tmp_path / "backbone").mkdir()
    return write_checkpoint(tmp_path / "backbone", *CNN)


@pytest.mark.process
def test_knn_and_linear_on_unlabelled_images_say_in_one_line_that_labels_are_needed(flat, checkpoint, tmp_path):
    data = ["--data", "bam.evaluation.data.FolderClassificationData", "--data.root", str(flat),
            "--data.image_size", "16", "--data.resize_size", "16", "--data.num_workers", "0"]
    knn = run_bam(["knn", "--backbone", str(checkpoint), *data, "--accelerator", "cpu",
                   "--output_dir", str(tmp_path / "knn")])
    assert knn.returncode == 1 and "Traceback" not in knn.stdout
    assert knn.stdout.splitlines()[-1] == (
        "bam knn: k-NN accuracy needs images with class labels (two classes or more), but the training images have "
        "no class labels: give a folder with one sub-folder per class (and labels: classes or auto) or a list of "
        "'path label' lines")
    linear = run_bam(["linear", "--model.backbone", str(checkpoint), *data, "--trainer.accelerator", "cpu",
                      "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "linear")])
    assert linear.returncode == 1 and "Traceback" not in linear.stdout
    assert linear.stdout.splitlines()[-1].startswith(
        "bam linear: a classifier (linear probe, fine-tuning) needs images with class labels (two classes or more)")


def test_evaluation_data_of_one_class_is_refused_too(tmp_path):
    _write_images(tmp_path / "one" / "photos", 4)
    data = FolderClassificationData(str(tmp_path / "one"), labels="classes", batch_size=2, num_workers=0)
    with pytest.raises(MissingLabelsError, match="but the training images have a single class"):
        data.num_classes
