"""The GPU paths, on the GPUs of this machine, as tests marked `gpu` (skipped without CUDA by
tests/conftest.py; `bash tests/gpu/check.sh` runs them, a few minutes on one GPU):

1. every recipe in configs/pretrain/ for a few steps through `bam pretrain` (one GPU: one process;
   two or more: DDP over NCCL, Lightning's launcher), in bf16 and fp16, with the batched
   on-device augmentation;
2. the FFCV loader: `bam data ffcv` of a generated folder, then a pretraining run reading it;
3. images/s of a full BAM step next to a backbone-only step (throughput.py; the table is printed,
   no figure is asserted: a wall-clock number is not a property of the code).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import throughput
from cli_runs import run_bam
from ffcv_check import require_ffcv
from product_runs import PRETRAIN_CONFIGS, logged_losses, shrunk_recipe_args, write_image_folder
from repo_paths import CONFIGS

pytestmark = pytest.mark.gpu

GPUS = torch.cuda.device_count()
# placed after the shrunk recipe's CPU settings, which they override (the last value wins)
LAYOUT = ["--trainer.accelerator", "gpu", "--trainer.devices", str(GPUS)] + (
    ["--trainer.strategy", "ddp"] if GPUS >= 2 else [])
THROUGHPUT_CONFIGS = [CONFIGS / "pretrain" / name for name in ("vit_small_patch16.yaml", "resnet50.yaml", "demo.yaml")]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


def _pretrain_on_gpus(args: list[str], run_dir: Path) -> None:
    done = run_bam(["pretrain", *args, *LAYOUT, "--data.init_args.augment_on", "device"])
    assert done.returncode == 0, done.stdout[-3000:]
    losses = logged_losses(run_dir)
    assert losses and all(math.isfinite(loss) for loss in losses.values()), losses
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.process
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("config", PRETRAIN_CONFIGS, ids=lambda path: path.stem)
def test_recipe_trains_on_the_gpus_in_mixed_precision(config, precision, images, tmp_path):
    run_dir = tmp_path / "run"
    _pretrain_on_gpus([*shrunk_recipe_args(config, images, run_dir), "--trainer.precision", precision], run_dir)


@pytest.mark.process
def test_ffcv_loader_feeds_a_gpu_run(images, tmp_path):
    require_ffcv()
    for split in ("train", "val"):
        done = run_bam(["data", "ffcv", "--source", str(images / split), "--output", str(tmp_path / f"{split}.beton")])
        assert done.returncode == 0, done.stdout[-3000:]
    run_dir = tmp_path / "run"
    _pretrain_on_gpus([
        *shrunk_recipe_args(CONFIGS / "pretrain" / "vit_small_patch16.yaml", images, run_dir),
        "--data", "bam.data.FFCVDataModule", "--data.init_args.path", str(tmp_path / "train.beton"),
        "--data.init_args.val_path", str(tmp_path / "val.beton"), "--data.init_args.base_size", "40",
        "--data.init_args.eval_size", "32",
    ], run_dir)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_throughput_of_a_bam_step_next_to_a_backbone_only_step(precision):
    rows = []
    for config in THROUGHPUT_CONFIGS:
        bare, full = throughput.measure(config, batch=64, steps=10, device=torch.device("cuda"), precision=precision)
        assert math.isfinite(bare) and math.isfinite(full) and bare > 0 and full > 0
        rows.append(throughput.table_row(config, precision, bare, full))
    print("\n".join([throughput.TABLE_HEADER, *rows]))  # shown by check.sh (pytest -s)
