"""Image folders as users have them: symbolic links that loop back to a parent, animated images,
photos rotated by their EXIF orientation and file names that are not UTF-8. Each file is listed
once, decoded to one upright RGB image, and `bam data ffcv` never hangs or leaves a partial file."""
from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from bam.cli import main as bam
from bam.data.sources import UnreadableImageError, decode_image_file, scan_image_folder
from cli_runs import run_bam
from eval_fixtures import CNN, write_checkpoint
from ffcv_check import require_ffcv

# numba fails in a finalizer when FFCV's compiled pipelines are garbage collected; harmless
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
PER_CLASS = 5


def _noise(seed: int, size: tuple[int, int] = (24, 20)) -> Image.Image:
    width, height = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _class_tree(root: Path) -> None:
    """root/train/{a,b}/ with PER_CLASS noise JPEGs each."""
    for label, name in enumerate("ab"):
        (root / "train" / name).mkdir(parents=True)
        for index in range(PER_CLASS):
            _noise(10 * label + index).save(root / "train" / name / f"{name}{index}.jpg", quality=95)


@pytest.fixture
def looped(tmp_path: Path) -> Path:
    """Two classes of 5 images; b/loop -> .. (train/) and b/again.jpg -> ../a/a0.jpg."""
    _class_tree(tmp_path / "looped")
    os.symlink("..", tmp_path / "looped" / "train" / "b" / "loop")
    os.symlink("../a/a0.jpg", tmp_path / "looped" / "train" / "b" / "again.jpg")
    return tmp_path / "looped"


def _add_animated_gif(root: Path) -> None:
    """root/train/a/moving.gif: 3 frames of 24 x 20."""
    frames = [_noise(100 + index) for index in range(3)]
    frames[0].save(root / "train" / "a" / "moving.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)


@pytest.fixture
def animated(tmp_path: Path) -> Path:
    """Two classes of 5 JPEGs, plus a/moving.gif."""
    _class_tree(tmp_path / "animated")
    _add_animated_gif(tmp_path / "animated")
    return tmp_path / "animated"


# -- symbolic links ------------------------------------------------------------------------------
def test_a_link_loop_is_walked_once_and_no_file_is_listed_twice(looped):
    images, classes = scan_image_folder(looped / "train")
    real = Counter(os.path.realpath(path) for path in images.paths)
    assert classes == ["a", "b"] and len(images) == 2 * PER_CLASS and max(real.values()) == 1
    assert images.labels.tolist() == [0] * PER_CLASS + [1] * PER_CLASS  # a's images never under b's label
    left_out = [path for path, code in zip(images.statuses.paths, images.statuses.status.tolist()) if code > 1]
    assert left_out == [str(looped / "train" / "b" / "again.jpg"), str(looped / "train" / "b" / "loop")]


# -- what a file decodes to ----------------------------------------------------------------------
def test_an_animated_gif_decodes_to_its_first_frame(animated):
    gif = animated / "train" / "a" / "moving.gif"
    expected = torch.from_numpy(np.asarray(Image.open(gif).convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.equal(decode_image_file(str(gif)), expected)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)
    pixels[:, :10, 0] = 255  # red left half, blue right half, as stored
    pixels[:, 10:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "portrait.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(path)))
    decoded = decode_image_file(str(path))
    assert decoded.shape == (3, 20, 10)
    assert np.abs(decoded.permute(1, 2, 0).numpy().astype(int) - upright).max() <= 2


def test_a_jpeg_whose_name_is_not_utf8_is_read(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    _noise(7).save(folder / "plain.jpg", quality=95)
    latin1 = os.path.join(os.fsencode(folder), b"caf\xe9.jpg")  # "café.jpg" written by a Latin-1 system
    with open(latin1, "wb") as handle:
        handle.write((folder / "plain.jpg").read_bytes())
    assert torch.equal(decode_image_file(os.fsdecode(latin1)), decode_image_file(str(folder / "plain.jpg")))
    images, classes = scan_image_folder(folder)
    assert classes is None and os.fsdecode(latin1) in images.paths
    with pytest.raises(UnreadableImageError):  # a broken file is still refused
        (folder / "broken.jpg").write_bytes(b"not a jpeg")
        decode_image_file(str(folder / "broken.jpg"))


# -- through the console script ------------------------------------------------------------------
@pytest.mark.process
def test_ffcv_conversion_of_a_looped_folder_with_an_animated_gif_writes_each_image_once(looped, tmp_path):
    """One conversion for both: the links are counted, not followed twice, and the GIF neither
    hangs the writer nor leaves a partial file."""
    require_ffcv()
    _add_animated_gif(looped)
    output = tmp_path / "looped.beton"
    run = run_bam(["data", "ffcv", "--source", str(looped), "--output", str(output), "--write-mode", "raw",
                   "--num-workers", "1"])
    assert run.returncode == 0, run.stdout[-3000:]
    assert f"wrote {2 * PER_CLASS + 1} images to {output}: every train image listed in {looped}" in run.stdout
    log = Path(f"{output}.skipped.tsv")
    assert f"files: 13 found, 11 read, 2 skipped (2 already listed); skipped paths in {log}" in run.stdout.splitlines()
    assert log.read_text().splitlines() == [f"already_listed\t{looped / 'train' / 'b' / 'again.jpg'}",
                                            f"already_listed\t{looped / 'train' / 'b' / 'loop'}"]
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("looped.beton")) == [
        "looped.beton", "looped.beton.json", "looped.beton.skipped.tsv"]
    assert json.loads(Path(f"{output}.json").read_text())["outputs"][0]["images"] == 2 * PER_CLASS + 1


@pytest.mark.process
def test_pretraining_and_knn_read_an_animated_gif(animated, tmp_path):
    run_dir = tmp_path / "run"
    pretrain = run_bam([
        "pretrain", "--config", "configs/pretrain/demo.yaml", "--data", "bam.data.ImageFolderDataModule",
        "--data.root", str(animated), "--data.augment_on", "cpu", "--data.batch_size", "4", "--data.num_workers", "0",
        "--data.val_fraction", "0.2", "--data.eval_size", "16", "--data.base_size", "24",
        "--data.crops.global_size", "16", "--data.crops.local_size", "8", "--data.crops.num_local_crops", "2",
        "--model.init_args.projector.hidden_dim", "32", "--model.init_args.projector.out_dim", "16", "--trainer.max_epochs", "1",
        "--knn.compare_baselines", "false", "--trainer.default_root_dir", str(run_dir),
        "--trainer.enable_progress_bar", "false"])
    assert pretrain.returncode == 0, pretrain.stdout[-3000:]
    assert "files: 11 found, 11 read, 0 skipped" in pretrain.stdout

    checkpoint = write_checkpoint(tmp_path, *CNN)
    # `bam knn` in this process: its console script starts the same `bam.cli.main` (the pretraining
    # above is the run through a process of its own)
    bam(["knn", "--backbone", str(checkpoint), "--data", "bam.evaluation.data.FolderClassificationData",
         "--data.root", str(animated), "--data.val_fraction", "0.2", "--data.image_size", "16",
         "--data.resize_size", "16", "--data.num_workers", "0", "--accelerator", "cpu",
         "--output_dir", str(tmp_path / "knn")])
    result = json.loads((tmp_path / "knn" / "knn_results.json").read_text())
    assert result["bank_size"] + result["num_queries"] == 2 * PER_CLASS + 1 and result["files"]["read"] == 11


@pytest.mark.process
@pytest.mark.parametrize("sigint", ["handled", "ignored"])
def test_a_converter_process_that_dies_ends_the_conversion_with_an_error(tmp_path, sigint):
    """FFCV's writer waits for its sample count forever when a worker dies; here it must stop, also
    where SIGINT is ignored (a conversion started in the background, under nohup or by CI)."""
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField

    from bam.data.ffcv_convert import ConverterWorkerDied, write_complete

    class DiesAtThirdImage:
        def __len__(self) -> int:
            return 8

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            if index == 3:
                os._exit(3)  # as the OOM killer or a crashing decoder would end it
            return torch.zeros(3, 8, 8, dtype=torch.uint8), 0

    output = tmp_path / "out" / "x.beton"
    fields = {"image": RGBImageField(write_mode="raw"), "label": IntField()}
    with pytest.raises(ConverterWorkerDied, match=r"a writer process of FFCV \(pid \d+\) died with exit code 3 while "
                                                   f"writing {output}.partial; nothing was written"):
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN if sigint == "ignored" else signal.default_int_handler)
        try:
            write_complete(DiesAtThirdImage(), output, fields, num_workers=2)
        finally:
            signal.signal(signal.SIGINT, previous)
    assert list(output.parent.iterdir()) == []
