"""The evaluation chain on 2 processes, through the `bam` console script as users run it, with the
stages' shipped demo configs on the export of the shrunk demo pretraining (eval_fixtures.demo_export,
made once per session and shared with tests/evaluation/test_eval_configs_run.py): `bam cluster`
under torchrun, `bam linear` and `bam finetune` with Lightning's launcher (`--trainer.devices 2
--trainer.strategy ddp`). Each exits 0 and writes its results once (the probe's and the
clustering's, results that `bam study` reads). These are the demo configs' runs (test_eval_configs_run.CONFIG_RUNS_ELSEWHERE names them).

`bam knn` under torchrun runs in test_eval_configs_run.py's
test_knn_demo_at_several_k_on_one_and_two_processes (the same launcher and console script, and its
2-process result compared with the single process's).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval_fixtures import assert_study_reads, demo_export
from product_runs import BAM, REPO, run, tail, torchrun_bam

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

EVAL_CONFIGS = REPO / "configs" / "eval"


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    return demo_export(tmp_path_factory)["backbone"]


def test_cluster_demo_under_torchrun(backbone: Path, tmp_path: Path):
    log, out = tmp_path / "log.txt", tmp_path / "cluster"
    command = torchrun_bam(["cluster", "--config", str(EVAL_CONFIGS / "cluster_demo.yaml"), "--backbone", str(backbone),
                            "--output_dir", str(out)])
    assert run(command, log) == 0, tail(log)
    results = json.loads((out / "cluster_results.json").read_text())
    assert results["num_images"] == 1000  # the held-out digits, each embedded once over the 2 processes
    assert_study_reads("cluster", results)


# what each trained stage's demo config is shrunk to: 200 digits, one epoch (fine-tuning: one step)
TRAINED_STAGE_SIZES = {
    "linear": ["--data.init_args.fraction", "0.05", "--data.init_args.batch_size", "32"],
    "finetune": ["--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
                 "--data.init_args.batch_size", "16"],
}


@pytest.mark.parametrize("stage", ["linear", "finetune"])
def test_trained_stages_with_lightnings_launcher(stage: str, backbone: Path, tmp_path: Path):
    log, run_dir = tmp_path / "log.txt", tmp_path / stage
    command = [BAM, stage, "--config", str(EVAL_CONFIGS / f"{stage}_demo.yaml"), "--model.backbone", str(backbone),
               "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "1",
               "--trainer.default_root_dir", str(run_dir), *TRAINED_STAGE_SIZES[stage]]
    assert run(command, log) == 0, tail(log)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["val"]["last_epoch"] == 1
    if stage == "linear":
        assert_study_reads("linear", results)
    else:
        assert "val_ema" in results  # the config's EMA is evaluated
    assert log.read_text().count("(written to") == 1  # the summary is rank 0's
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
