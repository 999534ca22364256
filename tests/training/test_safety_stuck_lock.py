"""Stuck run locks (issue 27 item 4): the lock file appears complete or not at all (a full disk at
start-up leaves none behind), and a lock whose contents cannot be read as a holder (empty, `[]`,
a pid that is not a number or is out of range, binary garbage) is stale: the next run takes it
over and says so, instead of being refused forever or stopping with a traceback."""
from __future__ import annotations

import errno
import json
import os
import socket

import pytest

from bam.training.run_folder import LOCK_NAME, RunLock
from safety_runs import empty_lock_knn_run

UNREADABLE_LOCKS = {
    "empty": b"",
    "a list": b"[]",
    "a pid that is no number": json.dumps({"host": socket.gethostname(), "pid": "abc"}).encode(),
    "a huge pid": json.dumps({"host": socket.gethostname(), "pid": 10**30}).encode(),
    "binary garbage": b"\x00\xff\xfe{",
}


def takeover_message(lock) -> str:
    return f"bam: taking over an unreadable lock (left by a run that died while writing it): {lock}\n"


@pytest.mark.parametrize("case", sorted(UNREADABLE_LOCKS))
def test_an_unreadable_lock_is_stale_and_taken_over(tmp_path, capsys, case):
    lock_file = tmp_path / LOCK_NAME
    lock_file.write_bytes(UNREADABLE_LOCKS[case])
    lock = RunLock(tmp_path)
    lock.acquire()
    assert capsys.readouterr().out == takeover_message(lock_file)
    holder = json.loads(lock_file.read_text())
    assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
    lock.release()
    assert not lock_file.exists()


def test_a_full_disk_at_start_up_leaves_no_lock_behind(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", disk_full)
    monkeypatch.setattr(json, "dumps", disk_full)
    with pytest.raises(OSError, match="No space left"):
        RunLock(tmp_path).acquire()
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{LOCK_NAME}.guard"]  # no lock, no temporary
    monkeypatch.undo()
    lock = RunLock(tmp_path)
    lock.acquire()  # the next run is not refused
    lock.release()


@pytest.mark.process
def test_pretraining_into_a_folder_with_an_empty_lock_runs(tmp_path_factory):
    """The run is shared with test_safety_settings' k-NN report test (safety_runs.empty_lock_knn_run)."""
    run_dir = empty_lock_knn_run(tmp_path_factory)
    assert takeover_message(run_dir / LOCK_NAME) in (run_dir / "stdout.txt").read_text()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / LOCK_NAME).exists()
