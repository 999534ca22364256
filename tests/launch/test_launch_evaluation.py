"""The evaluation chain on 2 processes, through the `bam` console script as users run it.

A short `bam pretrain` of the demo recipe, `bam export` of its checkpoint, then on that export:
`bam knn` and `bam cluster` under torchrun, `bam linear` and `bam finetune` with Lightning's
launcher (`--trainer.devices 2 --trainer.strategy ddp`) and the stages' demo configs. Each exits 0
and writes its results once.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from product_runs import BAM, BIN, REPO, run, shrunk_recipe_args, tail

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

EVAL_CONFIGS = REPO / "configs" / "eval"


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pretrained")
    log = folder / "log.txt"
    args = shrunk_recipe_args(REPO / "configs" / "pretrain" / "demo.yaml", folder, folder / "run")
    assert run([BAM, "pretrain", *args], log) == 0, tail(log)
    export = folder / "backbone"
    assert run([BAM, "export", str(folder / "run" / "checkpoints" / "last.ckpt"), "--output", str(export)], log) == 0, tail(log)
    return export


def torchrun(*args: str) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", BAM, *args]


@pytest.mark.parametrize("stage", ["knn", "cluster"])
def test_frozen_feature_stages_under_torchrun(stage: str, backbone: Path, tmp_path: Path):
    log, out = tmp_path / "log.txt", tmp_path / stage
    command = torchrun(stage, "--config", str(EVAL_CONFIGS / f"{stage}_demo.yaml"), "--backbone", str(backbone),
                       "--output_dir", str(out))
    assert run(command, log) == 0, tail(log)
    results = json.loads((out / f"{stage}_results.json").read_text())
    assert results
    assert len(list(out.iterdir())) >= 1


@pytest.mark.parametrize("stage", ["linear", "finetune"])
def test_trained_stages_with_lightnings_launcher(stage: str, backbone: Path, tmp_path: Path):
    log, run_dir = tmp_path / "log.txt", tmp_path / stage
    command = [BAM, stage, "--config", str(EVAL_CONFIGS / f"{stage}_demo.yaml"), "--model.backbone", str(backbone),
               "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "1",
               "--trainer.default_root_dir", str(run_dir), "--data.init_args.fraction", "0.05",
               "--data.init_args.batch_size", "32"]
    assert run(command, log) == 0, tail(log)
    results = json.loads((run_dir / "results.json").read_text())
    assert results
    assert log.read_text().count("(written to") == 1  # the summary is rank 0's
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
