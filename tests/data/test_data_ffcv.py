"""FFCV: a clear install hint without it; with it, write a tiny .beton and train from it."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from bam.data import FFCVDataModule, MultiCropConfig, write_beton
from bam.data.cli import main as data_cli
from repo_paths import REPO
from ffcv_check import FFCV_EXPECTED_MARKER, require_ffcv

# numba (0.68) fails in a finalizer when FFCV's compiled pipelines are garbage collected; harmless
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

SMALL = MultiCropConfig(global_size=16, local_size=8, num_local_crops=2)
CLASSES, PER_CLASS, SIZE = 4, 8, 20


def test_data_cli_lists_its_commands(capsys):
    with pytest.raises(SystemExit) as exit_code:
        data_cli(["--help"])
    assert exit_code.value.code == 0 and "ffcv" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_code:
        data_cli(["fcv"])
    assert exit_code.value.code == 2


def test_the_old_module_path_still_names_the_converter_and_the_loader():
    """Configs and code written when converter and loader shared `bam.data.ffcv_data` keep working."""
    from bam.data import ffcv_convert, ffcv_data, ffcv_loader

    assert ffcv_data.FFCVDataModule is ffcv_loader.FFCVDataModule is FFCVDataModule
    assert ffcv_data.write_beton is ffcv_convert.write_beton is write_beton and ffcv_data.main is ffcv_convert.main


def _break_ffcv_import(monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "ffcv" or m.startswith("ffcv.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ffcv", None)  # makes `import ffcv` raise ImportError


def test_without_ffcv_selecting_it_fails_with_one_install_line(monkeypatch):
    _break_ffcv_import(monkeypatch)
    with pytest.raises(ImportError) as error:
        FFCVDataModule("train.beton")
    assert "pip install" in str(error.value) and "\n" not in str(error.value)


def test_a_broken_ffcv_fails_where_the_install_provided_it(monkeypatch, tmp_path):
    """The FFCV tests skip only for a user who never installed FFCV: where scripts/install.sh
    marked the environment, or the ffcv distribution is installed, a failing import fails them."""
    _break_ffcv_import(monkeypatch)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setattr("importlib.metadata.version", lambda name: "1.0.2")
    with pytest.raises(pytest.fail.Exception, match="distribution is installed"):
        require_ffcv()
    (tmp_path / FFCV_EXPECTED_MARKER).touch()
    with pytest.raises(pytest.fail.Exception, match="scripts/install.sh marked"):
        require_ffcv()


def test_without_any_ffcv_install_its_tests_skip(monkeypatch, tmp_path):
    import importlib.metadata

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    _break_ffcv_import(monkeypatch)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setattr("importlib.metadata.version", not_installed)
    with pytest.raises(pytest.skip.Exception, match="pip install"):
        require_ffcv()


def test_the_install_script_expects_ffcv():
    """CI runs scripts/install.sh: it must mark the environment and prove that FFCV imports."""
    script = (REPO / "scripts" / "install.sh").read_text()
    assert FFCV_EXPECTED_MARKER in script and "import ffcv" in script


@pytest.fixture(scope="module")
def betons(tmp_path_factory) -> tuple[Path, Path]:
    """train.beton (raw pixels) and val.beton (JPEG) of flat images whose grey level is their id."""
    require_ffcv()
    root = tmp_path_factory.mktemp("folder")
    for split, count in (("train", PER_CLASS), ("val", 2)):
        for label in range(CLASSES):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                level = 8 * (label * PER_CLASS + index) + (4 if split == "val" else 0)
                Image.new("RGB", (SIZE, SIZE), (level, level, level)).save(folder / f"{index}.png")
    train, val = root / "train.beton", root / "val.beton"
    assert write_beton(str(root), str(train), write_mode="raw", num_workers=1)["outputs"][0]["images"] == CLASSES * PER_CLASS
    assert data_cli(["ffcv", "--source", str(root), "--output", str(val), "--split", "val", "--num-workers", "1"]) == 0
    return train, val


def _module(betons: tuple[Path, Path], **kwargs) -> FFCVDataModule:
    return FFCVDataModule(str(betons[0]), val_path=str(betons[1]), base_size=SIZE, eval_size=16,
                          crops=SMALL, batch_size=8, num_workers=1, **kwargs)


def _ids(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() // 8).tolist()


def test_loader_decodes_each_image_once_at_base_size(betons):
    loader = _module(betons).train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == CLASSES * PER_CLASS // 8
    images, labels = batches[0]
    assert images.shape == (8, 3, SIZE, SIZE) and images.dtype == torch.uint8 and labels.shape == (8,)
    ids = sum((_ids(images) for images, _ in batches), [])
    assert sorted(ids) == list(range(CLASSES * PER_CLASS))  # every image once per epoch
    assert all(i // PER_CLASS == label for images, labels in batches for i, label in zip(_ids(images), labels.tolist()))


def test_ffcv_leaves_torch_threads_alone(betons):
    """FFCV calls torch.set_num_threads(num_workers) when a loader is built and at every epoch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        for _ in _module(betons).train_dataloader():
            assert torch.get_num_threads() == threads + 1
    finally:
        torch.set_num_threads(threads)


def test_device_hook_turns_ffcv_batches_into_views(betons):
    module = _module(betons)
    views, labels = module.on_after_batch_transfer(next(iter(module.train_dataloader())), 0)
    assert [tuple(v.shape) for v in views] == [(8, 3, 16, 16)] * 2 + [(8, 3, 8, 8)] * 2


def test_distributed_loader_shards_the_file(betons, monkeypatch):
    """Under a process group of two, the two ranks read disjoint halves."""
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_rank", lambda group=None, rank=rank: rank)
        shards.append({i for images, _ in _module(betons).train_dataloader() for i in _ids(images)})
    assert len(shards[0]) == len(shards[1]) == CLASSES * PER_CLASS // 2 and not shards[0] & shards[1]


def test_knn_loaders_read_both_files_deterministically(betons):
    bank, query = _module(betons, knn_bank_fraction=0.5).knn_dataloaders()
    bank_labels = torch.cat([labels for _, labels in bank])
    assert torch.bincount(bank_labels).tolist() == [PER_CLASS // 2] * CLASSES
    first, second = list(query), list(query)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    images = first[0][0]
    assert images.shape[1:] == (3, 16, 16) and images.dtype == torch.float32
    assert sum(len(labels) for _, labels in first) == 2 * CLASSES


def test_lightning_fit_from_ffcv(betons):
    seen = []

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            views, _ = batch
            seen.append(len(views))
            return (self.weight - views[0].mean()) ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Model(), datamodule=_module(betons))
    assert seen == [4, 4]


def test_ffcv_requires_the_device_path(betons):
    with pytest.raises(ValueError, match="device"):
        _module(betons, augment_on="cpu")
