"""Every shipped pretraining recipe on 2 CPU processes, started one of the two ways users start them.

- Lightning's launcher: `bam pretrain --config RECIPE --trainer.devices 2 --trainer.strategy ddp`
  (the `bam` console script; Lightning re-executes the command line for rank 1), and the same as
  `python -m bam pretrain ...`;
- torchrun: `launch/torchrun_single_node.sh --config RECIPE` with `GPUS=2`, and
  `launch/torchrun_multi_node.sh` on two "nodes" of localhost.

The recipes take the launchers in turn (RECIPE_LAUNCHES): what a launcher does (how rank 1 starts,
where the process layout is read from) is the same for every recipe, and what a recipe brings (its
model, callbacks and their collectives) runs the same DDP strategy under all of them, so each
launcher runs a quarter of the recipes (every recipe under every launcher made the suite's longest
runs for no case that one launcher would miss). The
demos of DINO, DeepCluster-v2 and SeLa run on 2 processes in tests/methods/test_method_demo_runs.py,
with their export and evaluations, and not again here.

Each recipe keeps its own callbacks (online k-NN, ContrastiveCrop where enabled, batch norm
re-estimation, checkpoints, plots) and method; sizes, schedules and depth shrink (see
`product_runs`). A collective called on one rank only hangs or kills the run at the end of fit, so
each run must exit 0 with its report, checkpoint and plots written once.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from product_runs import (BAM, METHOD_DEMOS, PRETRAIN_CONFIGS, REPO, assert_run_complete, free_port,
                          lightning_launch, logged_losses, rank_pid, run, shrunk_recipe_args, start, tail,
                          torchrun_multi_node, torchrun_single_node, wait, write_image_folder)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

def lightning(args: list[str], log: Path) -> int:
    """`bam pretrain ... --trainer.devices 2`: Lightning re-executes the command line for rank 1."""
    return run(lightning_launch(args), log)


def python_dash_m_bam(args: list[str], log: Path) -> int:
    """`python -m bam pretrain ... --trainer.devices 2`: Lightning re-executes `-m bam` for rank 1."""
    return run([sys.executable, "-m", "bam", *lightning_launch(args)[1:]], log)


def torchrun(args: list[str], log: Path) -> int:
    """`GPUS=2 launch/torchrun_single_node.sh ...`."""
    command, env = torchrun_single_node(args)
    return run(command, log, **env)


def two_torchrun_nodes(args: list[str], log: Path) -> int:
    """`launch/torchrun_multi_node.sh` on two "nodes" (one process each) meeting at 127.0.0.1;
    node 0 logs to `log`, node 1 beside it, and only node 0 prints the k-NN report."""
    port, logs = free_port(), [log, log.with_suffix(".node1.txt")]
    nodes = []
    for rank, node_log in enumerate(logs):
        command, env = torchrun_multi_node(args, node_rank=rank, nodes=2, port=port)
        nodes.append(start(command, node_log, **env))
    codes = [wait(node, node_log) for node, node_log in zip(nodes, logs)]
    assert codes[1] == 0, tail(logs[1])
    assert "k-NN (k=20)" not in logs[1].read_text()
    return codes[0]


LAUNCHERS: dict[str, Callable[[list[str], Path], int]] = {
    "lightning": lightning, "torchrun": torchrun, "python-m-bam": python_dash_m_bam, "two-torchrun-nodes": two_torchrun_nodes}
LAUNCHED_HERE = [config for config in PRETRAIN_CONFIGS if config.stem not in METHOD_DEMOS]
# each recipe with one launcher, in turn over the sorted recipes
RECIPE_LAUNCHES = [(config, list(LAUNCHERS)[index % len(LAUNCHERS)]) for index, config in enumerate(LAUNCHED_HERE)]


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"))


def recipe(config: Path) -> dict:
    return yaml.safe_load(config.read_text())


@pytest.mark.parametrize(("config", "launcher"), RECIPE_LAUNCHES,
                         ids=[f"{config.stem}-{launcher}" for config, launcher in RECIPE_LAUNCHES])
def test_every_recipe_runs_on_two_processes(config: Path, launcher: str, image_root: Path, tmp_path: Path):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    code = LAUNCHERS[launcher](shrunk_recipe_args(config, image_root, run_dir), log)
    assert code == 0, tail(log)
    checkpoint = assert_run_complete(run_dir, log)
    if recipe(config).get("contrastive_crop", {}).get("enabled"):
        crop_state = next(state for key, state in checkpoint["callbacks"].items() if key.startswith("ContrastiveCrop"))
        assert crop_state["updated_epochs"] == [0], "the recipe's boxes were never computed"


DEMO = REPO / "configs" / "pretrain" / "demo.yaml"


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
        # the demo's own head, on which the tolerance was measured (with a 64-32 head the float32
        # reduction order moved step 3 by 1.3e-3)
        args = shrunk_recipe_args(DEMO, tmp_path, run_dir, max_epochs=2, shrink_model=False) + [
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
