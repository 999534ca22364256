"""Items 5 and 8 of issue 14: Ctrl-C saves and stops like SIGTERM (a second one aborts), and a
full disk is reported in one line with the last complete checkpoint kept and the metrics written."""
from __future__ import annotations

import csv
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from bam.training import PreemptionCheckpoint, atomic_save
from bam.training.fault_tolerance import DiskFullError
from cli_runs import bam_env, finish_bam, start_bam
from processes import process_group
from safety_runs import TINY_PRETRAIN


@pytest.mark.process
def test_ctrl_c_saves_a_checkpoint_and_stops_cleanly(tmp_path):
    run = start_bam(["pretrain", *TINY_PRETRAIN, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2000"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = tmp_path / "checkpoints" / "epoch=0-step=2.ckpt"
    with process_group(run):
        while not first.exists() and run.poll() is None:
            time.sleep(0.2)
    os.killpg(run.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    done = finish_bam(run)
    status, err = done.returncode, done.stderr
    assert status == 0, err[-3000:]
    assert "Ctrl-C: saving a checkpoint after this step" in err
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert 2 <= saved["global_step"] < 2000  # written when the signal came, not at the end


def test_a_second_ctrl_c_aborts_at_once():
    callback = PreemptionCheckpoint()
    callback._install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert callback.received == signal.SIGINT  # the first one only asks for a checkpoint
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        callback._restore()


FULL_DISK = textwrap.dedent(
    """
    import errno, os, sys

    real_fdopen, binary_writes = os.fdopen, 0

    class FullDisk:
        # every write fails as on a full file system
        def __init__(self, file):
            self.file = file
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        def __getattr__(self, name):
            return getattr(self.file, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

    def fdopen(descriptor, mode="r", *args, **kwargs):
        global binary_writes
        file = real_fdopen(descriptor, mode, *args, **kwargs)
        binary_writes += mode.startswith("w") and "b" in mode
        return FullDisk(file) if binary_writes > 2 else file  # the disk fills after two checkpoints

    os.fdopen = fdopen
    from bam.cli import main
    main(sys.argv[1:])
    """
)


@pytest.mark.process
def test_full_disk_one_line_last_checkpoint_kept_metrics_written(tmp_path):
    command = [sys.executable, "-c", FULL_DISK, "pretrain", *TINY_PRETRAIN, f"--trainer.default_root_dir={tmp_path}",
               "--trainer.max_steps=6"]
    run = subprocess.Popen(command, env=bam_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    done = finish_bam(run)
    status, err = done.returncode, done.stderr
    checkpoints = tmp_path / "checkpoints"
    assert status != 0
    assert "Traceback" not in err and "unexpected pos" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(f"bam pretrain: no space left on {checkpoints} ")
    # step 2's checkpoint and last.ckpt were written; step 4's failed and left nothing behind
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 2
    (metrics,) = tmp_path.glob("csv/version_*/metrics.csv")
    with metrics.open() as file:
        steps = {int(row["step"]) for row in csv.DictReader(file) if row.get("train/loss")}
    # every row Lightning had handed to the logger (the failing step's own row would come after
    # the checkpoint callbacks): flushed although the run failed
    assert steps == {0, 1, 2}


def test_atomic_save_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_save({"step": 1}, path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError, match=f"no space left on {tmp_path}"):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
