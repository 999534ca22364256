"""Child processes that cannot outlive a test: each runs in a session of its own, and whatever
ends the wait for it (pytest-timeout's hang guard, `timeout` in setup.cfg; a failed assertion;
Ctrl-C) kills its whole process group (a launcher's workers included) and prints the output so
far into the test's report. There is no time limit here: a hang is pytest-timeout's to end.
Every runner in tests/helpers builds on these."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Iterator


def _kill_group(process: subprocess.Popen, log: Path | None) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    out, err = process.communicate()
    seen = log.read_text(errors="replace") if log is not None else f"{out or ''}{err or ''}"
    print(f"{process.args} was stopped by the test's end; its output so far:\n{seen[-4000:]}")


@contextlib.contextmanager
def process_group(process: subprocess.Popen, log: Path | None = None) -> Iterator[subprocess.Popen]:
    """`process` (started with `start_new_session=True`) for the block; if the block is left by an
    exception, its whole group is killed first (the output, or `log`'s tail, goes to the report)."""
    try:
        yield process
    except BaseException:
        _kill_group(process, log)
        raise


def finish_process_group(process: subprocess.Popen, log: Path | None = None) -> tuple[str, str]:
    """Wait for `process` (started with `start_new_session=True`) and return its (stdout, stderr)
    ("" where not piped)."""
    with process_group(process, log):
        out, err = process.communicate()
    return out or "", err or ""


def run_process_group(command: list[str], *, stderr: int = subprocess.PIPE, **popen: object) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True)` in a session of its own
    (`stderr=subprocess.STDOUT` merges the two streams into `stdout`)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                               start_new_session=True, **popen)
    out, err = finish_process_group(process)
    return subprocess.CompletedProcess(command, process.returncode, out, err)
