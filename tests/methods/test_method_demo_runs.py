"""The methods beside BAM as users run them: `bam pretrain --config configs/pretrain/<demo>.yaml` on
2 processes (Lightning's launcher), then `bam export` and `bam knn` on what it wrote, each through
the console script (an export is a timm model whatever the method: `bam linear` and the other
stages read the BAM demo's in tests/evaluation/test_eval_configs_run.py); each method's state
beyond the networks (DINO's centre, DeepCluster-v2's bank and clusters, SeLa's labels) is checked
in the checkpoint. These are the
demos' 2-process runs (product_runs.METHOD_DEMOS); the other recipes run on 2 processes in
tests/launch/test_launch_pretrain.py, and exact resume is tests/training/test_exact_resume.py's."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch

from cli_runs import run_bam
from product_runs import METHOD_DEMOS, assert_run_complete, lightning_launch, run, shrunk_recipe_args, tail
from repo_paths import REPO

pytestmark = [pytest.mark.process, pytest.mark.distributed]

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


# demo config -> the check of its method's state in its checkpoint (the model: product_runs.shrunk_model_args)
STATE_CHECKS: dict[str, Callable[[dict], None]] = {
    "dino_demo": dino_state_is_saved,
    "deepclusterv2_demo": deepcluster_state_is_saved,
    "sela_demo": sela_labels_are_saved,
    "sela_v2_demo": sela_labels_are_saved,
}


@pytest.mark.parametrize("demo", METHOD_DEMOS)
def test_demo_on_two_processes_then_export_and_knn(tmp_path: Path, demo: str):
    run_dir, log = tmp_path / "run", tmp_path / "pretrain.txt"
    config = REPO / "configs" / "pretrain" / f"{demo}.yaml"
    args = shrunk_recipe_args(config, tmp_path, run_dir, max_epochs=2) + ["--knn.compare_baselines", "false"]
    assert run(lightning_launch(args), log) == 0, tail(log)
    STATE_CHECKS[demo](assert_run_complete(run_dir, log))

    export = tmp_path / "backbone"
    exported = run_bam(["export", str(run_dir / "checkpoints" / "last.ckpt"), "--output", str(export)])
    assert exported.returncode == 0, exported.stdout[-3000:]
    knn = run_bam(["knn", "--config", "demo", "--backbone", str(export), "--bank_fraction", "0.1",
                   "--output_dir", str(tmp_path / "knn")])
    assert knn.returncode == 0, knn.stdout[-3000:]
    results = json.loads((tmp_path / "knn" / "knn_results.json").read_text())
    assert (results["bank_size"], results["num_queries"]) == (400, 1000) and 0 <= results["top1"] <= 100
