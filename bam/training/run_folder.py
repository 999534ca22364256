"""One run per folder: a lock file naming its holder, and which writer's leftovers are stale.

Two runs writing into one run folder remove each other's half-written checkpoints and leave
checkpoints of different runs side by side. `RunLock` stops the second one at start-up: the lock
file `<run dir>/.bam-run.lock` is linked into place complete and exclusively (atomic also on NFS)
and records the host, process id and start time of its holder; a lock that names no holder (empty
or damaged, as a full disk left them before) is stale and taken over, said so. A lock whose holder
is a dead process on this host is taken over, and so is one left by an earlier run of the same SLURM
job (a requeued job keeps its id, possibly on another node). Any other lock held from another host
is never taken over (bam cannot tell whether that process lives); the message says which file to
delete once that run is gone. A folder that cannot be written (permissions, a read-only file
system) is refused at start-up, before any work, with `RunFolderNotWritableError`.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from bam.ops.errors import UserInputError

LOCK_NAME = ".bam-run.lock"
# what creating or writing a file in a folder the user may not write to fails with
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class RunFolderBusyError(RuntimeError):
    """Another live run holds the run folder."""


class RunFolderNotWritableError(UserInputError):
    """The run folder cannot be created or written to."""


def this_host() -> str:
    return socket.gethostname()


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    if pid <= 0:  # os.kill would address a process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def writer_is_dead(host: str, pid: int) -> bool:
    """True only when the writer certainly no longer runs: same host, no such process."""
    return host == this_host() and not process_alive(pid)


class RunLock:
    """Exclusive use of a run folder by one process (a run's rank 0), released by `release`.

    Acquiring it when another live process holds it raises `RunFolderBusyError` naming the
    holder; a lock left by a dead process on this host is taken over (and said so).
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        with _writable(self.path.parent):  # the lock is the run's first write
            self._acquire()

    def _acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _host_guard(self.path):  # check-and-take-over is one step for the processes of a host
            holder = _read_holder(self.path)
            if holder is UNREADABLE:
                print(f"bam: taking over an unreadable lock (left by a run that died while writing it): {self.path}",
                      flush=True)
                self.path.unlink(missing_ok=True)
            elif holder is not None:
                if not _holder_is_gone(holder):
                    raise RunFolderBusyError(_busy_message(self.path, holder))
                print(f"bam: taking over the lock of a run that is gone ({_describe(holder)}): {self.path}", flush=True)
                self.path.unlink(missing_ok=True)
            self._create()
        self.held = True

    def _create(self) -> None:
        """Write the record to a temporary file, then link it as the lock: the link is atomic and
        exclusive (on NFS too), so the lock appears complete or not at all, and a write that fails
        (a full disk) leaves no lock behind."""
        record = {"host": this_host(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": _restart_count()}
        temporary = self.path.with_name(f"{self.path.name}.{this_host()}.{os.getpid()}.tmp")
        try:
            temporary.write_text(json.dumps(record))
            os.link(temporary, self.path)
        except FileExistsError:  # created from another host between our read and now
            raise RunFolderBusyError(_busy_message(self.path, _holder_or_unknown(self.path))) from None
        finally:
            temporary.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        holder = _holder_or_unknown(self.path)
        if holder.get("pid") == os.getpid() and holder.get("host") == this_host():
            self.path.unlink(missing_ok=True)
        self.held = False


def _holder_is_gone(holder: dict) -> bool:
    """A dead process on this host, or a run of this very SLURM job before it was requeued (a
    requeued job keeps its id, counts its restarts and may start on another node)."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is not None and holder.get("slurm_job") == job and int(holder.get("slurm_restart") or 0) < _restart_count():
        return True
    return writer_is_dead(holder["host"], holder["pid"])


def _restart_count() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0)


@contextlib.contextmanager
def _writable(run_dir: Path) -> Iterator[None]:
    """Turns a refused write in `run_dir` into a `RunFolderNotWritableError` saying what to do."""
    try:
        yield
    except OSError as error:
        if error.errno not in NOT_WRITABLE:
            raise
        raise RunFolderNotWritableError(
            f"cannot write to the run folder {str(run_dir)!r} ({error.strerror}): choose a folder you can write to "
            "with --trainer.default_root_dir (to resume a run kept where you cannot write, copy its folder there "
            "first and resume the copy)"
        ) from None


@contextlib.contextmanager
def _host_guard(lock_path: Path) -> Iterator[None]:
    """An flock on a side file: serialises lock checks between the processes of one host."""
    guard = lock_path.with_name(lock_path.name + ".guard")
    with open(guard, "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


UNREADABLE: dict = {}  # what `_read_holder` returns for a lock that names no holder


def _read_holder(path: Path) -> dict | None:
    """The lock's record (None: no lock; `UNREADABLE`: a lock that names no holder, as one left
    half-written by earlier versions on a full disk, or damaged). Locks are now written whole
    (`RunLock._create`), so an unreadable one cannot belong to a run in progress."""
    try:
        holder = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError:  # not JSON, not UTF-8 (UnicodeDecodeError is a ValueError)
        return UNREADABLE
    valid = (isinstance(holder, dict) and isinstance(holder.get("host"), str) and isinstance(holder.get("pid"), int)
             and 0 < holder["pid"] <= MAX_PID)
    return holder if valid else UNREADABLE


MAX_PID = 2**22  # Linux's largest process id (pid_max's ceiling)


def _holder_or_unknown(path: Path) -> dict:
    holder = _read_holder(path)
    return {} if holder is None or holder is UNREADABLE else holder


def _describe(holder: dict) -> str:
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


def _busy_message(path: Path, holder: dict) -> str:
    return (
        f"run folder {str(path.parent)!r} is in use by another run ({_describe(holder)}). "
        f"Choose another --trainer.default_root_dir, or wait for that run to end; if it is certainly "
        f"no longer running, delete {str(path)!r}"
    )
