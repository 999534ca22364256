"""Item 9 of issue 14: checkpoints readable as the umask says, bad settings and a missing data
path rejected at start-up in one line naming them, and the k-NN report of a run ended by
`max_steps` includes the trained backbone."""
from __future__ import annotations

import json
import os
import stat
import sys

import pytest

from bam.pretrain import main as pretrain_main
from bam.training import atomic_save
from cli_runs import run_bam
from safety_runs import TINY_PRETRAIN, empty_lock_knn_run


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_checkpoints_get_the_permissions_the_umask_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_save({"step": 1}, tmp_path / "last.ckpt")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "last.ckpt").stat().st_mode) == 0o666 & ~umask


@pytest.mark.process
def test_a_missing_data_path_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "no-such-folder"
    done = run_bam(["pretrain", *TINY_PRETRAIN, f"--trainer.default_root_dir={tmp_path / 'run'}",
                    "--data=bam.data.ImageFolderDataModule", f"--data.root={missing}"], separate_stderr=True)
    status, err = done.returncode, done.stderr
    assert status != 0
    assert "Traceback" not in err and "Namespace(" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == f"bam pretrain: image folder or list not found: {missing}"


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("--data.batch_size=0", "batch_size and knn_batch_size must be at least 1, got 0"),
        ("--data.batch_size=-8", "batch_size and knn_batch_size must be at least 1, got -8"),
        ("--model.reg_final=0", "reg_final must be positive"),
        ("--model.reg_final=-0.1", "reg_final must be positive"),
        ("--data.crops.num_local_crops=-2", "num_local_crops must be >= 0, got -2"),
    ],
)
def test_impossible_settings_are_rejected_at_start_up_naming_them(tmp_path, monkeypatch, setting, named):
    monkeypatch.setattr(sys, "argv", ["bam"])
    with pytest.raises(SystemExit) as stop:
        pretrain_main([*TINY_PRETRAIN, f"--trainer.default_root_dir={tmp_path}", setting])
    assert stop.value.code.startswith("bam pretrain: ")  # the stage, then what was wrong
    assert named in stop.value.code and "\n" not in stop.value.code
    assert not (tmp_path / "checkpoints").exists()  # nothing ran


@pytest.mark.process
def test_knn_report_of_a_run_ended_by_max_steps_has_the_trained_backbone(tmp_path_factory):
    """The run (3 steps) is shared with test_safety_stuck_lock's empty-lock test (safety_runs.empty_lock_knn_run)."""
    run_dir = empty_lock_knn_run(tmp_path_factory)
    (report,) = run_dir.glob("csv/version_*/knn_report.json")
    rows = json.loads(report.read_text())
    assert list(rows) == ["trained backbone", "random init (same architecture)", "raw pixels"]
    assert 0 < rows["trained backbone"]["top1"] <= 100
