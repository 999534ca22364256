"""The methods beside BAM as users run them: `bam pretrain --config configs/pretrain/<demo>.yaml` on
2 processes (Lightning's launcher), then `bam export`, `bam knn` and `bam linear` on what it wrote,
each through the console script; each method's state beyond the networks (DINO's centre,
DeepCluster-v2's bank and clusters, SeLa's labels) is checked in the checkpoint. (Every shipped recipe also runs under torchrun in
tests/launch/test_launch_pretrain.py; exact resume is tests/training/test_exact_resume.py's.)"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch

from cli_runs import run_bam
from product_runs import lightning_launch, run, shrunk_recipe_args, tail
from repo_paths import REPO

pytestmark = [pytest.mark.process, pytest.mark.distributed]

SMALL_HEAD = ["--model.init_args.projector.hidden_dim", "64", "--model.init_args.projector.out_dim", "32"]


def dino_state_is_saved(checkpoint: dict) -> None:
    assert checkpoint["hyper_parameters"]["teacher_temperature_final"] == 0.07
    center = checkpoint["state_dict"]["loss_fn.center"]
    assert center.shape == (1, 128) and center.abs().sum() > 0  # trained and saved with the model
    assert "teacher.projector.last_layer.parametrizations.weight.original1" in checkpoint["state_dict"]


def sela_labels_are_saved(checkpoint: dict) -> None:
    """Labels per head of every training image, and the bank the two processes filled together:
    the images seen (2 steps of 2 x 4 an epoch) were re-labelled, the others keep their first labels."""
    from bam.losses import SeLaLoss

    objective = checkpoint["hyper_parameters"]["objective"]
    labels, recorded = checkpoint["sela_labels"]["labels"], checkpoint["sela_labels"]["recorded"]
    assert labels.shape[0] == objective["num_heads"] and int(recorded.sum()) >= 16
    first = SeLaLoss(checkpoint["sela_labels"]["bank"].shape[1], 1, **objective)
    first.start(labels.shape[1], checkpoint["hyper_parameters"]["label_seed"])
    assert not torch.equal(labels[:, recorded], first.labels[:, recorded])
    assert torch.equal(labels[:, ~recorded], first.labels[:, ~recorded])


def deepcluster_state_is_saved(checkpoint: dict) -> None:
    state = checkpoint["state_dict"]
    bank = state["loss_fn.bank"]  # 2 global crops x the 20 training digits x the 32-wide embedding
    assert bank.shape == (2, 20, 32) and torch.allclose(bank.norm(dim=2), torch.ones(2, 20))
    assert int(state["loss_fn.clustered_epoch"]) == 1  # clustered again at the second epoch's start
    assignments = state["loss_fn.assignments"]
    assert assignments.shape == (3, 20) and assignments.min() >= 0 and assignments.max() <= 1  # 3 heads of 2
    assert all(state[f"loss_fn.centroids_{head}"].shape == (2, 32) for head in range(3))


# demo config -> (its command-line options, the check of its checkpoint)
DEMOS: dict[str, tuple[list[str], Callable[[dict], None]]] = {
    "dino_demo": (SMALL_HEAD + ["--model.init_args.out_dim", "128"], dino_state_is_saved),
    "deepclusterv2_demo": (SMALL_HEAD, deepcluster_state_is_saved),
    "sela_demo": ([], sela_labels_are_saved),
    "sela_v2_demo": (SMALL_HEAD, sela_labels_are_saved),
}


@pytest.mark.parametrize("demo", DEMOS)
def test_demo_on_two_processes_then_export_knn_and_linear(tmp_path: Path, demo: str):
    run_dir, log = tmp_path / "run", tmp_path / "pretrain.txt"
    options, state_is_saved = DEMOS[demo]
    config = REPO / "configs" / "pretrain" / f"{demo}.yaml"
    args = shrunk_recipe_args(config, tmp_path, run_dir, max_epochs=2) + options + ["--knn.compare_baselines", "false"]
    assert run(lightning_launch(args), log) == 0, tail(log)
    state_is_saved(torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True))

    export = tmp_path / "backbone"
    exported = run_bam(["export", str(run_dir / "checkpoints" / "last.ckpt"), "--output", str(export)])
    assert exported.returncode == 0, exported.stdout[-3000:]
    knn = run_bam(["knn", "--config", "demo", "--backbone", str(export), "--bank_fraction", "0.1",
                   "--output_dir", str(tmp_path / "knn")])
    assert knn.returncode == 0, knn.stdout[-3000:]
    results = json.loads((tmp_path / "knn" / "knn_results.json").read_text())
    assert (results["bank_size"], results["num_queries"]) == (400, 1000) and 0 <= results["top1"] <= 100

    linear = run_bam(["linear", "--config", "demo", "--model.backbone", str(export), "--trainer.max_epochs", "1",
                      "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "linear"),
                      "--data.init_args.fraction", "0.1"])
    assert linear.returncode == 0, linear.stdout[-3000:]
    probe = json.loads((tmp_path / "linear" / "results.json").read_text())
    assert probe["val"]["best_epoch"] == 1
