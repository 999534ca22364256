"""Every shipped pretraining recipe on 2 CPU processes, started one of the two ways users start them.

- Lightning's launcher: `bam pretrain --config RECIPE --trainer.devices 2 --trainer.strategy ddp`
  (the `bam` console script; Lightning re-executes the command line for rank 1);
- torchrun: `launch/torchrun_single_node.sh --config RECIPE` with `GPUS=2`.

The recipes take the launchers in turn (RECIPE_LAUNCHES): what a launcher does (how rank 1 starts,
where the process layout is read from) is the same for every recipe, and what a recipe brings (its
model, callbacks and their collectives) runs the same DDP strategy under both, so each launcher
runs half of the recipes, ViTs, ResNets and ContrastiveCrop among them (every recipe under both
launchers made 20 of the suite's longest runs for no case that one launcher would miss).

Each recipe keeps its own callbacks (online k-NN, ContrastiveCrop where enabled, batch norm
re-estimation, checkpoints, plots); only sizes and schedules shrink (see `product_runs`). A
collective called on one rank only hangs or kills the run at the end of fit, so each run must exit
0 with its report, checkpoint and plots written once.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from product_runs import (BAM, PRETRAIN_CONFIGS, REPO, free_port, lightning_launch, logged_losses, rank_pid, run,
                          shrunk_recipe_args, start, tail, torchrun_multi_node, torchrun_single_node, wait,
                          write_image_folder)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LAUNCHERS = ("lightning", "torchrun")
# each recipe with one launcher, in turn over the sorted recipes
RECIPE_LAUNCHES = [(config, LAUNCHERS[index % len(LAUNCHERS)]) for index, config in enumerate(PRETRAIN_CONFIGS)]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


def recipe(config: Path) -> dict:
    return yaml.safe_load(config.read_text())


def launch(launcher: str, args: list[str], log: Path) -> int:
    if launcher == "lightning":
        return run(lightning_launch(args), log)
    command, env = torchrun_single_node(args)
    return run(command, log, **env)


def assert_run_complete(run_dir: Path, log: Path) -> dict:
    """One version folder per logger, a k-NN report, a loadable last checkpoint, plots; the report
    printed once (rank 0 only)."""
    output = log.read_text(errors="replace")
    assert [p.name for p in (run_dir / "csv").iterdir()] == ["version_0"], output[-3000:]
    report_path = run_dir / "csv" / "version_0" / "knn_report.json"
    assert report_path.is_file(), output[-3000:]
    report = json.loads(report_path.read_text())
    assert "trained backbone" in report
    assert output.count("k-NN (k=20) on the held-out split") == 1
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] >= 1
    assert any((run_dir / "plots").glob("*.png"))
    return checkpoint


@pytest.mark.parametrize(("config", "launcher"), RECIPE_LAUNCHES,
                         ids=[f"{config.stem}-{launcher}" for config, launcher in RECIPE_LAUNCHES])
def test_every_recipe_runs_on_two_processes(config: Path, launcher: str, image_root: Path, tmp_path: Path):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    code = launch(launcher, shrunk_recipe_args(config, image_root, run_dir), log)
    assert code == 0, tail(log)
    checkpoint = assert_run_complete(run_dir, log)
    if recipe(config).get("contrastive_crop", {}).get("enabled"):
        crop_state = next(state for key, state in checkpoint["callbacks"].items() if key.startswith("ContrastiveCrop"))
        assert crop_state["updated_epochs"] == [0], "the recipe's boxes were never computed"


DEMO = REPO / "configs" / "pretrain" / "demo.yaml"


def test_python_dash_m_bam_with_lightnings_launcher(image_root: Path, tmp_path: Path):
    """`python -m bam pretrain --trainer.devices 2`: Lightning re-executes `-m bam` for rank 1."""
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    command = [sys.executable, "-m", "bam", *lightning_launch(shrunk_recipe_args(DEMO, image_root, run_dir))[1:]]
    assert run(command, log) == 0, tail(log)
    assert_run_complete(run_dir, log)


def test_two_torchrun_nodes_on_localhost(tmp_path: Path):
    """`launch/torchrun_multi_node.sh` on two "nodes" (one process each) meeting at 127.0.0.1."""
    run_dir, port = tmp_path / "run", free_port()
    args = shrunk_recipe_args(DEMO, tmp_path, run_dir)
    logs = [tmp_path / f"node{rank}.txt" for rank in range(2)]
    nodes = []
    for rank, log in enumerate(logs):
        command, env = torchrun_multi_node(args, node_rank=rank, nodes=2, port=port)
        nodes.append(start(command, log, **env))
    for node, log in zip(nodes, logs):
        assert wait(node, log) == 0, tail(log)
    assert_run_complete(run_dir, logs[0])
    assert "k-NN (k=20)" not in logs[1].read_text()  # the report is rank 0's


def test_sigterm_to_one_rank_saves_on_both_and_the_same_command_resumes(tmp_path: Path):
    """docs/distributed.md's torchrun row, SIGTERM to rank 1 only in the middle of training: both ranks
    save one checkpoint and exit 0; running the same command again continues at the next step."""
    run_dir, epochs = tmp_path / "run", 15
    args = shrunk_recipe_args(DEMO, tmp_path, run_dir, max_epochs=epochs) + [
        "--knn.every_n_epochs", "100", "--checkpoint.every_n_epochs", "2"]
    command, env = torchrun_single_node(args)
    first_log = tmp_path / "first.txt"
    launcher = start(command, first_log, **env)
    while not any((run_dir / "checkpoints").glob("epoch=*.ckpt")):  # in the middle of training; a hang is pytest-timeout's
        assert launcher.poll() is None, tail(first_log)
        time.sleep(0.2)
    victim = rank_pid(launcher.pid, 1)
    assert victim is not None, "rank 1 not found"
    os.kill(victim, signal.SIGTERM)
    assert wait(launcher, first_log) == 0, tail(first_log)
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert 0 < saved < 2 * epochs, tail(first_log)
    assert "Signal received: saving" in first_log.read_text()

    second_log = tmp_path / "second.txt"
    assert run(command, second_log, **env) == 0, tail(second_log)
    assert min(logged_losses(run_dir, versions="version_1")) == saved
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == 2 * epochs, (saved, final["epoch"], sorted(logged_losses(run_dir, versions="version_1")))


def test_two_processes_train_like_one_on_the_same_global_batch(tmp_path: Path):
    """The demo recipe on the CPU augmentation path (each image's views seeded by its index):
    `bam pretrain` on 2 processes of 4 images logs the losses of 1 process of 8 images, step by
    step, so the objective is balanced over the global batch, gradients are summed over the
    processes and batch norm is synchronised. SGD, whose step follows the gradient's scale (Adam
    would hide a gradient off by the number of processes). Measured: 2 vs 1 process differ by at
    most 4.7e-5 of the loss (float32 reduction order); halving the step, as a gradient divided by
    the number of processes would, moves steps 2 and 3 by 4e-3 and 1.3e-2. Equality of the
    gradients themselves, in float64, is `test_scale_ddp.py`'s."""
    def train(processes: int, name: str) -> dict[int, float]:
        run_dir, log = tmp_path / name, tmp_path / f"{name}.txt"
        args = shrunk_recipe_args(DEMO, tmp_path, run_dir, max_epochs=2) + [
            "--data.init_args.augment_on", "cpu", "--data.init_args.batch_size", str(8 // processes),
            "--knn.every_n_epochs", "100", "--precise_bn.enabled", "false",
            "--model.init_args.optimizer", "sgd", "--model.init_args.lr", "0.5"]
        command = lightning_launch(args, processes) if processes > 1 else [BAM, "pretrain", *args]
        assert run(command, log) == 0, tail(log)
        return logged_losses(run_dir)

    one, two = train(1, "one"), train(2, "two")
    assert sorted(one) == sorted(two) == [0, 1, 2, 3]
    for step, loss in one.items():
        assert abs(two[step] - loss) <= 3e-4 * abs(loss), (step, loss, two[step])
