"""Labelled data of the evaluation stages: image folders split as in pretraining, the evaluation
and training transforms, and timm's RandAugment policy surviving recent Pillow."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import RandomSampler, SequentialSampler
from torchvision.io import write_png
from torchvision.transforms import v2

from bam.evaluation import data as data_module
from bam.evaluation.data import BuiltinClassificationData, FolderClassificationData, RecipeMismatchWarning
from bam.recipe import DataRecipe
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


# --- the backbone's data recipe ---------------------------------------------------------------


def test_explicit_settings_without_a_recipe_warn_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 32 px differs from ImageNet's 224, but no backbone recorded that
        data = synthetic_data(mean=(0.1, 0.2, 0.3))
    assert (data.image_size, data.resize_size, data.mean) == (32, 32, (0.1, 0.2, 0.3))


def test_a_setting_that_differs_from_the_recipe_is_used_with_the_whole_warning():
    data = synthetic_data(mean=(0.1, 0.2, 0.3))
    recipe = DataRecipe(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), input_size=32, crop_pct=1.0)
    with pytest.warns(RecipeMismatchWarning) as caught:
        data.apply_recipe(recipe, "my-backbone")
    assert [str(warning.message) for warning in caught] == [
        "data.mean=[0.1, 0.2, 0.3] differs from the mean [0.5, 0.5, 0.5] that my-backbone was trained with "
        "(its data recipe); using data.mean=[0.1, 0.2, 0.3] as set. Leave data.mean unset to use the recipe's."
    ]
    assert (data.mean, data.std, data.image_size, data.resize_size) == ((0.1, 0.2, 0.3), (0.25,) * 3, 32, 32)


def test_settings_equal_to_the_recipe_up_to_float32_rounding_warn_nothing():
    recipe = DataRecipe(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_size=32, crop_pct=1.0)
    as_float32 = tuple(torch.tensor(recipe.mean, dtype=torch.float32).tolist())  # what a JSON round trip of float32 gives
    assert as_float32 != recipe.mean
    data = synthetic_data(mean=as_float32, std=recipe.std, interpolation="bicubic")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.apply_recipe(recipe, "my-backbone")
    assert data.mean == as_float32 and data.std == recipe.std


# --- loaders ------------------------------------------------------------------------------------


def test_training_batches_are_shuffled_and_full_validation_batches_in_order():
    data = synthetic_data(batch_size=4)
    features = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    data.use_features((features, torch.arange(10) % 4), (features, torch.arange(10) % 4))
    torch.manual_seed(0)
    train = data.train_dataloader()
    assert isinstance(train.sampler, RandomSampler) and train.drop_last
    seen = torch.cat([batch[0][:, 0] for batch in train])
    assert len(seen) == 8 and len(set(seen.tolist())) == 8  # two full batches, the last partial one dropped
    assert seen.tolist() != list(range(8))
    val = data.val_dataloader()
    assert isinstance(val.sampler, SequentialSampler)
    assert torch.cat([batch[0][:, 0] for batch in val]).tolist() == list(range(10))


def test_a_batch_of_one_is_allowed_and_zero_is_explained():
    assert synthetic_data(batch_size=1).train_dataloader().batch_size == 1
    with pytest.raises(ValueError) as error:
        synthetic_data(batch_size=0)
    assert str(error.value) == "batch_size must be at least 1, got 0"


def test_loaders_pin_memory_when_there_is_a_gpu(monkeypatch):
    data = synthetic_data()
    assert not data.val_dataloader().pin_memory  # this machine: no GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # not iterated: nothing is pinned here
    assert data.train_dataloader().pin_memory and data.val_dataloader().pin_memory


def test_posterize_keeps_the_top_bits_and_zero_bits_is_black():
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray(np.stack([pixels] * 3, axis=-1))
    for bits in (1, 2, 4, 8):
        kept = np.asarray(data_module._posterize(image, bits))
        assert np.array_equal(kept[..., 0], pixels & (0xFF << (8 - bits) & 0xFF)), bits
    black = data_module._posterize(image, 0)
    assert (black.mode, black.size, np.asarray(black).max()) == ("RGB", (16, 16), 0)


def test_training_workers_persist_across_epochs_and_cached_features_need_none():
    data = synthetic_data(num_workers=1)
    train, val = data.train_dataloader(), data.val_dataloader()  # not iterated: no worker is started
    assert (train.num_workers, train.persistent_workers) == (1, True)
    assert (val.num_workers, val.persistent_workers) == (1, False)
    data.use_features((torch.zeros(16, 2), torch.zeros(16, dtype=torch.long)), (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)))
    cached = data.train_dataloader()
    assert (cached.num_workers, cached.persistent_workers) == (0, False)


# --- training transforms ------------------------------------------------------------------------

IMAGE = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _normalised(image: torch.Tensor) -> torch.Tensor:
    return (image - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_crop_flip_of_the_whole_image_is_an_antialiased_resize(flip):
    # crop_scale (1, 1) of a square image: the crop is the whole image, only the resize and flip remain
    data = synthetic_data(augment="crop_flip", crop_scale=(1.0, 1.0), hflip_prob=flip, mean=MEAN, std=STD)
    resized = F.interpolate(IMAGE[None].float(), size=(32, 32), mode="bilinear", antialias=True, align_corners=False)[0]
    expected = _normalised(resized.round().clamp(0, 255) / 255)
    if flip:
        expected = expected.flip(-1)
    torch.testing.assert_close(data.train_transform()(IMAGE), expected, rtol=0, atol=1.01 / 255 / min(STD))


def test_timm_recipe_crops_with_the_configured_scale():
    data = synthetic_data(augment="timm", crop_scale=(1.0, 1.0), hflip_prob=0.0, color_jitter=0.0, mean=MEAN, std=STD)
    pil = Image.fromarray(IMAGE.permute(1, 2, 0).numpy())
    expected = _normalised(torch.from_numpy(np.array(pil.resize((32, 32), Image.BICUBIC))).permute(2, 0, 1) / 255)
    transform = data.train_transform()
    for _ in range(5):  # the crop is drawn at random: every draw of scale 1 is the whole image
        torch.testing.assert_close(transform(IMAGE), expected)


def test_timm_recipe_steps_follow_the_settings():
    to_pil, recipe = synthetic_data(augment="timm", color_jitter=0.3, hflip_prob=0.25).train_transform().transforms
    assert isinstance(to_pil, v2.ToPILImage)  # timm's operations work on PIL images
    assert [type(step).__name__ for step in recipe.transforms] == [
        "RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "ColorJitter", "MaybeToTensor", "Normalize"]
    crop, flip, jitter = recipe.transforms[:3]
    assert (crop.size, crop.scale, flip.p) == ((32, 32), (0.08, 1.0), 0.25)
    assert [jitter.brightness, jitter.contrast, jitter.saturation] == [pytest.approx((0.7, 1.3))] * 3
    assert jitter.hue is None
    # with an auto-augment policy, RandAugment replaces the colour jitter; random erasing comes last
    _, recipe = synthetic_data(augment="timm", auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25).train_transform().transforms
    assert [type(step).__name__ for step in recipe.transforms] == [
        "RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment", "MaybeToTensor", "Normalize",
        "RandomErasing"]
    augment, erasing = recipe.transforms[2], recipe.transforms[-1]
    assert (augment.num_layers, len(augment.ops), erasing.probability) == (2, 15, 0.25)
    assert {op.magnitude for op in augment.ops} == {9}
    posterize = [op for op in augment.ops if op.name.startswith("Posterize")]
    assert posterize and all(op.aug_fn is data_module._posterize for op in posterize)


def test_the_warning_names_the_backbone_by_default():
    data = synthetic_data(image_size=32, resize_size=32)
    recipe = DataRecipe(input_size=48, crop_pct=1.0)
    with pytest.warns(RecipeMismatchWarning) as caught:
        data.apply_recipe(recipe)
    assert [str(warning.message) for warning in caught] == [
        "data.image_size=32 differs from the image_size 48 that the backbone was trained with (its data recipe); "
        "using data.image_size=32 as set. Leave data.image_size unset to use the recipe's."
    ]  # resize_size: 32 / crop_pct 1.0 = 32, as set
    # attributed to the code that called apply_recipe (stacklevel), not to bam's own warn call
    import linecache

    assert "warnings.warn(" not in linecache.getline(caught[0].filename, caught[0].lineno)


def test_data_module_defaults_are_the_documented_ones():
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    data = BuiltinClassificationData("synthetic")
    assert (data.batch_size, data.num_workers, data.augment, data.crop_scale, data.hflip_prob, data.auto_augment,
            data.color_jitter, data.re_prob, data.fraction, data.seed) == (
        256, 8, "crop_flip", (0.08, 1.0), 0.5, None, 0.4, 0.0, 1.0, 0)
    # ImageNet's recipe for what is left unset: 224 px from 256, bicubic, ImageNet mean and std
    assert (data.image_size, data.resize_size, data.interpolation, data.mean, data.std) == (
        224, 256, "bicubic", tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD))
    assert data.cache == {} and data.train_source is None and data.val_source is None
    assert BuiltinClassificationData().name == "mnist" and BuiltinClassificationData().options == {}


def test_unknown_augmentation_message_in_full():
    with pytest.raises(ValueError) as error:
        synthetic_data(augment="randaug")
    assert str(error.value) == "unknown augmentation 'randaug'; choose one of ['crop_flip', 'none', 'timm']"


def test_explicit_mean_and_std_are_kept_as_tuples_and_the_resize_follows_the_crop_fraction():
    data = synthetic_data(mean=[0.1, 0.2, 0.3], std=[0.3, 0.2, 0.1], image_size=None, resize_size=None)
    assert (data.mean, data.std) == ((0.1, 0.2, 0.3), (0.3, 0.2, 0.1))
    data.apply_recipe(DataRecipe(input_size=40, crop_pct=0.8, mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1)))
    assert (data.image_size, data.resize_size) == (40, 50)  # 40 / 0.8


def test_evaluation_images_are_resized_with_the_configured_interpolation():
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))

    def expected(mode: v2.InterpolationMode) -> torch.Tensor:
        resized = v2.CenterCrop(16)(v2.Resize(20, interpolation=mode, antialias=True)(image))
        return v2.Normalize([0.5] * 3, [0.25] * 3)(v2.ToDtype(torch.float32, scale=True)(resized))

    bicubic, bilinear = expected(v2.InterpolationMode.BICUBIC), expected(v2.InterpolationMode.BILINEAR)
    assert not torch.allclose(bicubic, bilinear)  # the test tells them apart
    common = dict(image_size=16, resize_size=20, mean=(0.5,) * 3, std=(0.25,) * 3)
    torch.testing.assert_close(synthetic_data(**common).eval_transform()(image), bicubic)  # the default
    torch.testing.assert_close(synthetic_data(interpolation="bilinear", **common).eval_transform()(image), bilinear)


def test_the_data_recipe_describes_the_preprocessing_in_use():
    data = synthetic_data(image_size=32, resize_size=40, interpolation="bilinear", mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    assert data.data_recipe() == DataRecipe(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), input_size=32, crop_pct=0.8,
                                            interpolation="bilinear")
