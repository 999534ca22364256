"""Labelled data of the evaluation stages: image folders split as in pretraining, the evaluation
and training transforms, and timm's RandAugment policy surviving recent Pillow."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from bam.evaluation.data import FolderClassificationData
from eval_fixtures import synthetic_data


def test_image_folder_classes_split_and_transforms(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for index in range(4):
            image = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
            write_png(image, str(tmp_path / "train" / name / f"{index}.png"))
    data = FolderClassificationData(str(tmp_path), val_fraction=0.25, image_size=32, batch_size=2, num_workers=0)
    assert data.num_classes == 2
    assert (len(data.train_source), len(data.val_source)) == (6, 2)  # no val/ folder: 1 of 4 per class held out
    assert data.resize_size == round(32 / 0.875)
    images, labels = next(iter(data.val_dataloader()))
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (2, 3, 32, 32)


def test_fraction_keeps_every_class_and_unknown_augmentation_is_named():
    data = synthetic_data(fraction=0.25)
    data.setup()
    assert len(data.train_source) == 16 and data.train_source.labels.unique().tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="unknown augmentation 'randaug'"):
        synthetic_data(augment="randaug")


def test_timm_randaugment_survives_zero_bit_posterize():
    data = synthetic_data(augment="timm", auto_augment="rand-m10-mstd0-inc1")  # magnitude 10: 0 bits
    data.setup()
    transform = data.train_transform()
    image, _ = data.train_source[0]
    np.random.seed(0)
    for _ in range(100):  # 2 of 15 operations per call: posterize is drawn many times
        assert transform(image).shape == (3, 32, 32)


def test_evaluation_holds_out_the_images_pretraining_held_out(tmp_path):
    """Same folder, fraction and seed: the k-NN/linear held-out split is pretraining's."""
    from bam.data import ImageFolderDataModule

    for name in ("cat", "dog"):
        (tmp_path / "train" / name).mkdir(parents=True)
        for index in range(8):
            write_png(torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8), str(tmp_path / "train" / name / f"{index}.png"))
    for seed in (0, 1):
        evaluation = FolderClassificationData(str(tmp_path), val_fraction=0.25, seed=seed, num_workers=0)
        pretraining = ImageFolderDataModule(str(tmp_path), val_fraction=0.25, seed=seed, num_workers=0)
        evaluation.setup()
        pretraining.setup()
        assert len(evaluation.val_source.paths) == 4
        assert evaluation.val_source.paths == pretraining.val_source.paths
