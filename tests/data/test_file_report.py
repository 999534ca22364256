"""Datasets hold what the user gave them (issue #20): an ImageFolder of 3 classes x 20 readable
JPEGs plus one broken JPEG and one empty file (and a val/ twin) goes through `bam data ffcv`,
every evaluation stage and a short pretraining run. Each readable image is written or evaluated
exactly once, unreadable files are counted (never replaced outside training), and every stage
ends with one file-report line and a `files` field in its JSON report, summed over processes."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from bam.cli import main as bam
from bam.data.sources import decode_image_file
from bam.evaluation.data import FolderClassificationData
from bam.features.extract import embed_dataset
from ffcv_check import require_ffcv
from tiny_runs import spawn_gloo_workers
from eval_fixtures import CNN, write_checkpoint
from file_status_workers import count_file_statuses_of_two_ranks
from cli_runs import run_bam
from repo_paths import REPO

# numba fails in a finalizer when FFCV's compiled pipelines are garbage collected; harmless
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CLASSES, PER_CLASS, VAL_PER_CLASS = 3, 20, 4
TRAIN_ACCOUNT = "files: 62 found, 60 read, 2 skipped (1 empty, 1 undecodable)"
BOTH_SPLITS_REPORT = "files: 76 found, 72 read, 4 skipped (2 empty, 2 undecodable)"


def _write_split(folder: Path, per_class: int, seed: int) -> None:
    """`per_class` distinct noise JPEGs per class, plus class0/broken.jpg (truncated) and class1/empty.jpg."""
    for label in range(CLASSES):
        (folder / f"class{label}").mkdir(parents=True)
        for index in range(per_class):
            generator = torch.Generator().manual_seed(seed + 100 * label + index)
            pixels = torch.randint(0, 256, (24, 28, 3), dtype=torch.uint8, generator=generator).numpy()
            Image.fromarray(pixels).save(folder / f"class{label}" / f"img{index:02d}.jpg", quality=95)
    good = (folder / "class0" / "img00.jpg").read_bytes()
    (folder / "class0" / "broken.jpg").write_bytes(good[: len(good) // 3])
    (folder / "class1" / "empty.jpg").write_bytes(b"")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    _write_split(root / "train", PER_CLASS, seed=0)
    _write_split(root / "val", VAL_PER_CLASS, seed=10_000)
    return root


def _digest(image: torch.Tensor) -> str:
    """Hash of an HWC uint8 image."""
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


def _readable_digests(folder: Path) -> Counter:
    digests = Counter()
    for path in sorted(folder.rglob("img*.jpg")):
        digests[_digest(decode_image_file(str(path)).permute(1, 2, 0))] += 1
    return digests


def _beton_digests(path: Path) -> Counter:
    """Hashes of the images decoded back from a .beton (stored raw: the exact decoded pixels)."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    pipelines = {"image": [SimpleRGBImageDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor()]}
    loader = Loader(str(path), batch_size=16, num_workers=1, order=OrderOption.SEQUENTIAL, pipelines=pipelines,
                    drop_last=False)
    return Counter(_digest(image) for images, _ in loader for image in images)


def _run_bam(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`bam ARGS` run from `cwd`, which must succeed."""
    finished = run_bam(args, cwd=cwd, separate_stderr=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return finished


# -- conversion ---------------------------------------------------------------------------------
@pytest.mark.process
def test_converter_writes_every_readable_file_once_and_reports_the_rest(root, tmp_path):
    require_ffcv()
    output = tmp_path / "train.beton"
    run = _run_bam(["data", "ffcv", "--source", str(root), "--output", str(output), "--split", "train",
                    "--write-mode", "raw", "--num-workers", "2"], tmp_path)
    assert f"wrote 60 images to {output}: every train image listed in {root}" in run.stdout
    log = Path(f"{output}.skipped.tsv")
    assert f"{TRAIN_ACCOUNT}; skipped paths in {log}" in run.stdout.splitlines()
    assert log.read_text().splitlines() == [
        f"undecodable\t{root / 'train' / 'class0' / 'broken.jpg'}", f"empty\t{root / 'train' / 'class1' / 'empty.jpg'}"]
    report = json.loads(Path(f"{output}.json").read_text())
    assert report["files"]["found"] == 62 and report["files"]["read"] == 60
    assert report["files"]["skipped_by_reason"] == {"empty": 1, "undecodable": 1, "too_many_pixels": 0, "unsupported": 0, "already_listed": 0}
    assert report["outputs"][0]["images"] == 60
    written = _beton_digests(output)
    assert written == _readable_digests(root / "train")  # every readable image, none twice, no hold-out
    assert max(written.values()) == 1 and len(written) == CLASSES * PER_CLASS


def test_validation_fraction_is_explicit_disjoint_complete_and_seeded(root, tmp_path, capsys):
    require_ffcv()
    from bam.data.cli import main as data_cli

    digests = []
    for attempt in ("a", "b"):
        train, val = tmp_path / attempt / "train.beton", tmp_path / attempt / "val.beton"
        assert data_cli(["ffcv", "--source", str(root / "train"), "--output", str(train), "--val-fraction", "0.25",
                         "--val-output", str(val), "--seed", "3", "--write-mode", "raw", "--num-workers", "1"]) == 0
        digests.append((_beton_digests(train), _beton_digests(val)))
    out = capsys.readouterr().out
    assert "the held-out 0.25 of each class (seed 3)" in out and f"{TRAIN_ACCOUNT}; skipped paths in" in out
    (kept, held_out), again = digests
    assert again == (kept, held_out)  # the same seed, the same split
    assert not set(kept) & set(held_out) and kept + held_out == _readable_digests(root / "train")
    assert 12 <= sum(held_out.values()) <= 15  # round(0.25 * 21 or 20) = 5 per class, minus unreadable ones

    with pytest.raises(SystemExit) as error:  # no val/ folder and no fraction asked for: nothing hidden
        data_cli(["ffcv", "--source", str(root / "train"), "--output", str(tmp_path / "x.beton"), "--split", "val"])
    assert error.value.code == 2 and "has no val/ folder" in capsys.readouterr().err


# -- evaluation stages ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("backbone"), *CNN)


def _folder_data(root: Path, num_workers: int = 0) -> list[str]:
    return ["--data", "bam.evaluation.data.FolderClassificationData", "--data.root", str(root),
            "--data.image_size", "24", "--data.resize_size", "24", "--data.batch_size", "31",
            "--data.num_workers", str(num_workers)]


def _report_line(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("files: ")]
    assert len(lines) == 1, out
    return lines[0]


def test_knn_and_cluster_evaluate_each_readable_image_once(root, checkpoint, tmp_path, capsys):
    bam(["knn", "--backbone", str(checkpoint), *_folder_data(root), "--accelerator", "cpu",
         "--output_dir", str(tmp_path / "knn")])
    knn = json.loads((tmp_path / "knn" / "knn_results.json").read_text())
    assert (knn["bank_size"], knn["num_queries"]) == (60, 12)
    assert knn["files"]["read"] == 72 and knn["files"]["skipped"] == 4
    assert _report_line(capsys.readouterr().out).startswith(BOTH_SPLITS_REPORT)

    bam(["cluster", "--backbone", str(checkpoint), *_folder_data(root), "--accelerator", "cpu", "--bpa.enabled", "false",
         "--restarts", "1", "--output_dir", str(tmp_path / "cluster")])
    clustered = json.loads((tmp_path / "cluster" / "cluster_results.json").read_text())
    assert clustered["num_images"] == 12
    assert _report_line(capsys.readouterr().out).startswith(
        "files: 76 found, 12 read, 2 skipped (1 empty, 1 undecodable), 62 not needed")
    assert clustered["files"]["not_read"] == 62


@pytest.mark.parametrize("stage", ["linear", "finetune"])
def test_linear_and_finetune_report_the_files(root, checkpoint, tmp_path, capsys, stage):
    run_dir = tmp_path / stage
    options = ["--model.drop_path_rate", "0", "--model.layer_decay", "null", "--model.mixup", "0",
               "--model.cutmix", "0"] if stage == "finetune" else []
    bam([stage, "--model.backbone", str(checkpoint), *options, *_folder_data(root, num_workers=2),
         "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(run_dir),
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false"])
    # training (2 full batches of 31) replaced its 2 bad files; validation dropped its 2: read by workers
    assert _report_line(capsys.readouterr().out) == (
        f"{BOTH_SPLITS_REPORT}; skipped paths in {run_dir / 'skipped_files.tsv'}")
    files = json.loads((run_dir / "results.json").read_text())["files"]
    assert (files["found"], files["read"], files["skipped"]) == (76, 72, 4)
    assert len((run_dir / "skipped_files.tsv").read_text().splitlines()) == 4


def test_a_broken_validation_image_does_not_change_which_others_are_evaluated(root, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)

    def evaluated(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
        data = FolderClassificationData(str(folder), image_size=24, resize_size=24, batch_size=5, num_workers=0)
        return embed_dataset(data.eval_dataset("val"), lambda images: images.flatten(1), torch.device("cpu"), 5)

    before, before_labels = evaluated(copy)
    victim = copy / "val" / "class2" / "img01.jpg"  # the 10th readable validation image in listing order
    victim.write_bytes(victim.read_bytes()[:50])
    after, after_labels = evaluated(copy)
    assert len(before) == 12 and len(after) == 11
    assert torch.equal(after, torch.cat([before[:9], before[10:]]))
    assert torch.equal(after_labels, torch.cat([before_labels[:9], before_labels[10:]]))


# -- pretraining ----------------------------------------------------------------------------------
@pytest.mark.process
def test_pretraining_run_ends_with_the_file_report_over_workers(root, tmp_path):
    run_dir = tmp_path / "pretrain"
    run = _run_bam([
        "pretrain", "--config", str(REPO / "configs" / "pretrain" / "demo.yaml"),
        "--data", "bam.data.ImageFolderDataModule", "--data.root", str(root), "--data.augment_on", "cpu",
        "--data.batch_size", "31", "--data.num_workers", "2", "--data.eval_size", "16", "--data.base_size", "24",
        "--data.crops.global_size", "16", "--data.crops.local_size", "8", "--data.crops.num_local_crops", "2",
        "--model.init_args.num_local_crops", "2", "--model.init_args.projector.hidden_dim", "32",
        "--model.init_args.projector.out_dim", "16", "--trainer.max_epochs", "1", "--knn.every_n_epochs", "1",
        "--knn.compare_baselines", "false", "--trainer.default_root_dir", str(run_dir),
        "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
    ], tmp_path)
    assert _report_line(run.stdout) == f"{BOTH_SPLITS_REPORT}; skipped paths in {run_dir / 'skipped_files.tsv'}"
    files = json.loads((run_dir / "file_report.json").read_text())["files"]
    assert files["skipped_by_reason"]["empty"] == 2 and files["read"] == 72


# -- summed over processes -------------------------------------------------------------------------
@pytest.mark.distributed
def test_file_statuses_are_counted_over_processes_once_per_file(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(folder / name)
    (folder / "bad.png").write_bytes(b"not a png")
    spawn_gloo_workers(count_file_statuses_of_two_ranks, 2, tmp_path)
    summaries = [json.loads((tmp_path / f"summary{rank}.json").read_text()) for rank in range(2)]
    assert summaries[0] == summaries[1]  # every rank gets the total
    summary = summaries[0]
    assert (summary["found"], summary["read"], summary["skipped"], summary["not_read"]) == (5, 2, 2, 1)
    assert summary["skipped_by_reason"] == {"empty": 0, "undecodable": 1, "too_many_pixels": 0, "unsupported": 1, "already_listed": 0}
