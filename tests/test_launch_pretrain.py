"""Every shipped pretraining recipe on 2 CPU processes, started the two ways users start them.

- Lightning's launcher: `bam pretrain --config RECIPE --trainer.devices 2 --trainer.strategy ddp`
  (the `bam` console script; Lightning re-executes the command line for rank 1);
- torchrun: `launch/torchrun_single_node.sh --config RECIPE` with `GPUS=2`.

Each recipe keeps its own callbacks (online k-NN, ContrastiveCrop where enabled, batch norm
re-estimation, checkpoints, plots); only sizes and schedules shrink (see `product_runs`). A
collective called on one rank only hangs or kills the run at the end of fit, so each run must exit
0 with its report, checkpoint and plots written once.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from product_runs import (PRETRAIN_CONFIGS, lightning_launch, run, shrunk_recipe_args, tail,
                          torchrun_single_node, write_image_folder)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LAUNCHERS = ("lightning", "torchrun")


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


@pytest.mark.parametrize("launcher", LAUNCHERS)
@pytest.mark.parametrize("config", PRETRAIN_CONFIGS, ids=lambda path: path.stem)
def test_every_recipe_runs_on_two_processes(config: Path, launcher: str, image_root: Path, tmp_path: Path):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    code = launch(launcher, shrunk_recipe_args(config, image_root, run_dir), log)
    assert code == 0, tail(log)
    checkpoint = assert_run_complete(run_dir, log)
    if recipe(config).get("contrastive_crop", {}).get("enabled"):
        crop_state = next(state for key, state in checkpoint["callbacks"].items() if key.startswith("ContrastiveCrop"))
        assert crop_state["updated_epochs"] == [0], "the recipe's boxes were never computed"
