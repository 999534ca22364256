"""Issue 26, item 2: reusing a shipped recipe is not a trap. A recipe whose normalisation or crop
sizes do not fit the images warns at start-up naming both, and the export records what the run
trained on; a cluster layout this machine cannot run stops at once with the flags that run it
here; a batch larger than the data stops naming both; `configs/pretrain/folder.yaml` trains on a
folder of photos without any of these."""
from __future__ import annotations

import json

import pytest
import torch

from bam.data.config import MultiCropConfig
from bam.data.recipe_fit import recipe_misfits, too_few_images
from bam.training.launch_plan import LaunchPlanError, Machine, check_launch_plan, launch_problems
from cli_runs import run_bam
from photos import PHOTO_SIZE, write_photo_folder

QUIET = ["--trainer.enable_progress_bar=false", "--plots.enabled=false", "--knn.compare_baselines=false"]
MNIST_MEAN, MNIST_STD = [0.1307] * 3, [0.3081] * 3
LAPTOP = Machine(cuda_gpus=0, mps=False, env={})


def warnings_of(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("bam pretrain: warning: ")]


@pytest.mark.process
def test_the_demo_recipe_on_photos_warns_naming_both_and_the_export_records_its_crops(tmp_path):
    photos = write_photo_folder(tmp_path / "photos", per_class=8)
    run = tmp_path / "run"
    trained = run_bam(["pretrain", "--config", "demo", "--data", "bam.data.ImageFolderDataModule",
                       f"--data.init_args.root={photos}", "--data.init_args.batch_size=8", "--trainer.max_steps=1",
                       f"--trainer.default_root_dir={run}", "--precise_bn.enabled=false", *QUIET])
    assert trained.returncode == 0, trained.stdout[-3000:]
    grey, small = warnings_of(trained.stdout)
    assert grey.startswith(f"bam pretrain: warning: the recipe normalises with one grey value for every channel "
                           f"(data.init_args.crops.mean [0.131, 0.131, 0.131], std [0.308, 0.308, 0.308]) but the "
                           f"images are in colour (mean [")
    assert grey.endswith("for photos use ImageNet's statistics (--data.init_args.crops.mean [0.485,0.456,0.406] "
                         "--data.init_args.crops.std [0.229,0.224,0.225])")
    short_side = min(PHOTO_SIZE)
    assert small == (f"bam pretrain: warning: the global crops are 28 px (data.init_args.crops.global_size; local "
                     f"14 px) but the images' short side is {short_side} px: the network sees them "
                     f"{short_side // 28}x reduced; set the crop sizes for these images")

    exported = run_bam(["export", str(run / "checkpoints" / "last.ckpt"), "--output", str(tmp_path / "export")])
    assert exported.returncode == 0, exported.stdout
    assert exported.stdout.strip().endswith(f"data recipe: 28 px, mean {MNIST_MEAN}, std {MNIST_STD}; "
                                            "trained on 28/14-px crops")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, 28, 28]  # not 224: the size it trained at
    assert config["pretrained_cfg"]["mean"] == MNIST_MEAN and config["bam"]["train_crop_sizes"] == [28, 14]


@pytest.mark.process
def test_an_imagenet_recipe_on_a_machine_without_its_gpus_and_nodes_stops_with_the_flags(tmp_path):
    photos = write_photo_folder(tmp_path / "photos", per_class=2)
    finished = run_bam(["pretrain", "--config", "vit_small_patch16", f"--data.init_args.root={photos}",
                        "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert finished.returncode != 0
    assert "MEMBER" not in finished.stdout  # no process started and waited for the second node
    assert finished.stdout.strip().splitlines()[-1] == (
        "bam pretrain: trainer.num_nodes=2 but nothing starts the other 1 node(s) (no SLURM job step, no torchrun, "
        "no WORLD_SIZE/NODE_RANK). To run on this machine alone add: --trainer.accelerator cpu --trainer.devices 1 "
        "--trainer.num_nodes 1 --trainer.precision 32-true (several machines: start bam through SLURM or torchrun, "
        "see docs/distributed.md)")


@pytest.mark.process
def test_a_batch_larger_than_the_data_stops_at_start_up_naming_both(tmp_path):
    # 0.025 of the demo's 4,000 digits, class-balanced: 100 images; 64 per process never fits 2 processes.
    # 2 processes only: one process goes through the same start-up check, whose count for any number
    # of processes test_too_few_images_counts_every_process checks in-process
    finished = run_bam(["pretrain", "--config", "demo", "--data.init_args.fraction=0.025",
                        "--data.init_args.batch_size=64", "--trainer.devices=2",
                        "--trainer.strategy=ddp", f"--trainer.default_root_dir={tmp_path}", *QUIET])
    assert finished.returncode == 1
    assert finished.stdout.strip().splitlines()[-1] == (
        "bam pretrain: the training set has 100 images but a step takes data.init_args.batch_size=64 per "
        "process x 2 process(es) = 128 (global batch): no training step would run; set "
        "--data.init_args.batch_size 50 or less, or add images")
    assert not (tmp_path / "checkpoints").exists() and "k-NN" not in finished.stdout


@pytest.mark.process
def test_the_folder_recipe_trains_on_photos_without_a_warning(tmp_path):
    photos = write_photo_folder(tmp_path / "photos", per_class=8)
    run = tmp_path / "run"
    trained = run_bam(["pretrain", "--config", "folder", f"--data.init_args.root={photos}",
                       "--data.init_args.batch_size=4", "--data.init_args.num_workers=0", "--trainer.max_steps=1",
                       "--precise_bn.enabled=false", f"--trainer.default_root_dir={run}", *QUIET])
    assert trained.returncode == 0, trained.stdout[-3000:]
    assert warnings_of(trained.stdout) == [] and "Warning" not in trained.stdout
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 1
    assert saved["data_recipe"]["input_size"] == 160 and saved["data_recipe"]["train_crop_sizes"] == [160, 96]


# -- the checks themselves --------------------------------------------------------------------
def test_launch_problems_name_each_setting_and_launchers_provide_nodes():
    assert launch_problems("gpu", 8, 2, LAPTOP) == [
        "trainer.accelerator=gpu but this machine has no CUDA GPU (torch.cuda.is_available() is False)",
        "trainer.num_nodes=2 but nothing starts the other 1 node(s) (no SLURM job step, no torchrun, no WORLD_SIZE/NODE_RANK)",
    ]
    torchrun = Machine(cuda_gpus=8, mps=False, env={"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "16"})
    assert launch_problems("gpu", 8, 2, torchrun) == []
    slurm = Machine(cuda_gpus=8, mps=False, env={"SLURM_NTASKS": "16", "SLURM_JOB_NAME": "train"})
    assert launch_problems("gpu", 8, 2, slurm) == []  # bam.training.slurm checks its numbers
    wrong_world = Machine(cuda_gpus=8, mps=False, env={"WORLD_SIZE": "2"})
    assert launch_problems("gpu", 8, 2, wrong_world) == [
        "the launcher starts WORLD_SIZE=2 processes but the trainer expects num_nodes x devices = 2 x 8 = 16"]
    assert launch_problems("gpu", 1, 1, Machine(cuda_gpus=0, mps=True, env={})) == []  # gpu means MPS on a Mac


def test_a_gpu_machine_is_told_to_use_its_own_gpus():
    with pytest.raises(LaunchPlanError, match=r"add: --trainer\.num_nodes 1 --trainer\.devices 4 \(several"):
        check_launch_plan("gpu", 8, 2, "bf16-mixed", Machine(cuda_gpus=4, mps=False, env={}))
    check_launch_plan("cpu", 2, 1, "32-true", LAPTOP)  # runs here: nothing raised


def test_a_fitting_recipe_is_quiet_and_each_misfit_is_named():
    generator = torch.Generator().manual_seed(0)
    photos = [(torch.rand(3, 150, 200, generator=generator) * 255).to(torch.uint8) for _ in range(4)]
    imagenet = MultiCropConfig(global_size=160, local_size=96)
    assert recipe_misfits(photos, imagenet) == []
    grey = [photo[:1] for photo in photos]
    assert recipe_misfits(grey, imagenet)[0].startswith("the recipe normalises 3 channel(s) (data.init_args.crops.mean "
                                                        "[0.485, 0.456, 0.406]) but the images have [1]")
    upsampled = recipe_misfits(photos, MultiCropConfig(global_size=320))
    assert upsampled == ["the global crops are 320 px (data.init_args.crops.global_size) but the images' short side "
                         "is only 150 px: every crop is an upsampled blur; set smaller crop sizes"]
    dark = [photo // 8 for photo in photos]
    assert recipe_misfits(dark, imagenet)[0].startswith("the recipe's normalisation (data.init_args.crops.mean "
                                                        "[0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]) is far")


def test_too_few_images_counts_every_process():
    assert too_few_images(100, 50, 2) is None
    assert too_few_images(100, 51, 2).startswith("the training set has 100 images but a step takes "
                                                 "data.init_args.batch_size=51 per process x 2 process(es) = 102")
    assert too_few_images(100, 51, 2).endswith("set --data.init_args.batch_size 50 or less, or add images")


def test_too_few_images_never_suggests_a_global_batch_of_one_image():
    assert too_few_images(1, 4, 1).endswith("no training step would run; add images")
    assert too_few_images(3, 4, 2).endswith("set --data.init_args.batch_size 1 or less, or add images")  # 2 images a step
