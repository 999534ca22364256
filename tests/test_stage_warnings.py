"""A stage run prints no warning that bam causes or expects (frozen modules, a 1-step cosine)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

from bam.evaluation import finetune
from bam.training.schedules import warmup_cosine_lr
from processes import run_process_group
from eval_fixtures import synthetic_args, trainer_args, write_checkpoint

import torch


def test_finetune_with_ema_runs_without_warnings(tmp_path):
    checkpoint = write_checkpoint(tmp_path, "bam_cnn4", {"width": 8})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finetune.main([
            "--model.backbone", str(checkpoint), "--model.ema", "true", "--model.drop_path_rate", "0",
            "--model.layer_decay", "null", *synthetic_args(batch_size=16), *trainer_args(tmp_path / "run"),
        ])
    shown = [f"{w.category.__name__}: {w.message}" for w in caught if "bam" in w.filename or "lightning" in w.filename]
    assert not [text for text in shown if "eval mode" in text or "LeafSpec" in text], shown


def test_a_schedule_that_is_all_warm_up_is_silent_and_reaches_the_peak(caplog):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine_lr(optimizer, total_steps=4, warmup_steps=4, min_lr=0.0)
    scheduler.step_update(num_updates=4)
    assert "no effect" not in caplog.text
    assert optimizer.param_groups[0]["lr"] == 1.0


@pytest.mark.process
@pytest.mark.parametrize("stage", ["pretrain", "linear", "finetune"])
def test_stage_help_names_the_stage_and_warns_of_nothing(stage):
    """Through the console script, as a user types it: no LightningCLI warning about `args` and
    command-line arguments, and help reads `usage: bam <stage>`, not the internal `fit`."""
    bam = str(Path(sys.executable).parent / "bam")
    done = run_process_group([bam, stage, "--help"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"usage: bam {stage} ") and " fit " not in done.stdout.splitlines()[0]
    assert "args parameter is intended" not in done.stderr
