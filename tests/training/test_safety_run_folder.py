"""Item 4 of issue 14: one run per folder. A second run is refused naming the holder, a lock left
by a dead run is taken over, and only temporary files whose writer is dead are removed."""
from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest
import torch

from bam.training import atomic_save
from bam.training.run_folder import LOCK_NAME, RunFolderBusyError, RunLock
from cli_runs import finish_bam, start_bam
from safety_runs import TINY_PRETRAIN, dead_pid


@pytest.mark.process
def test_two_runs_racing_for_one_folder_one_is_refused_naming_the_other(tmp_path):
    runs = [
        start_bam(["pretrain", *TINY_PRETRAIN, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=60",
                   "--checkpoint.every_n_train_steps=20", f"--seed_everything={seed}"],
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for seed in (1, 2)
    ]
    results = [(done.returncode, done.stdout, done.stderr) for done in map(finish_bam, runs)]
    statuses = sorted(status for status, _, _ in results)
    assert statuses[0] == 0 and statuses[1] != 0, [err[-2000:] for _, _, err in results]
    winner, loser = (0, 1) if results[0][0] == 0 else (1, 0)
    last_line = results[loser][2].strip().splitlines()[-1]
    assert "Traceback" not in results[loser][2]
    assert f"is in use by another run (host {socket.gethostname()}, pid {runs[winner].pid}, started " in last_line
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "epoch=0-step=20.ckpt", "epoch=0-step=40.ckpt", "epoch=0-step=60.ckpt", "last.ckpt"]  # no temporaries
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 60
    assert not (tmp_path / LOCK_NAME).exists()  # released at the end


def _write_lock(directory, host: str, pid: int) -> None:
    (directory / LOCK_NAME).write_text(json.dumps({"host": host, "pid": pid, "started": "earlier"}))


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path, capsys):
    _write_lock(tmp_path, socket.gethostname(), dead_pid())
    lock = RunLock(tmp_path)
    lock.acquire()
    assert "taking over the lock of a run that is gone" in capsys.readouterr().out
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
    with pytest.raises(RunFolderBusyError):  # now held: a second acquirer is refused
        RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_live_run_or_one_on_another_host_keeps_its_lock(tmp_path):
    live_pid = os.getppid()  # a live process of this host that is not this one
    _write_lock(tmp_path, socket.gethostname(), live_pid)
    with pytest.raises(RunFolderBusyError, match=f"pid {live_pid}, started earlier"):
        RunLock(tmp_path).acquire()
    _write_lock(tmp_path, "another-node", dead_pid())  # bam cannot see that host's processes
    with pytest.raises(RunFolderBusyError, match=f"delete '{tmp_path / LOCK_NAME}'"):
        RunLock(tmp_path).acquire()


def test_only_temporary_files_of_dead_writers_are_removed(tmp_path):
    host = socket.gethostname()
    live = tmp_path / f".last.ckpt.{host}.{os.getppid()}.00000000.tmp"  # a live process, not this one
    dead = tmp_path / f".last.ckpt.{host}.{dead_pid()}.11111111.tmp"
    remote = tmp_path / f".last.ckpt.another-node.{dead_pid()}.22222222.tmp"
    for path in (live, dead, remote):
        path.write_bytes(b"partial")
    atomic_save({"step": 1}, tmp_path / "last.ckpt")
    assert live.exists() and remote.exists() and not dead.exists()


def test_a_requeued_slurm_job_takes_over_the_lock_of_its_earlier_run(tmp_path, monkeypatch):
    earlier = {"host": "node-that-ran-it-before", "pid": 4242, "slurm_job": "77", "slurm_restart": 0}
    (tmp_path / LOCK_NAME).write_text(json.dumps(earlier))
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job: that lock may be alive
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(RunFolderBusyError):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.delenv("SLURM_RESTART_COUNT")  # the same job, not requeued: a second run in it
    with pytest.raises(RunFolderBusyError):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the same job, requeued
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
