"""Child processes that cannot hang a test: each runs in a session of its own, so a timeout kills
the whole process group (a launcher's workers included) and fails the test with the output so far;
every blocking read has a limit. Every runner in tests/helpers builds on these."""
from __future__ import annotations

import os
import selectors
import signal
import subprocess
from pathlib import Path

import pytest


def finish_process_group(process: subprocess.Popen, timeout: float, log: Path | None = None) -> tuple[str, str]:
    """Wait for `process` (started with `start_new_session=True`) and return its (stdout, stderr)
    ("" where not piped); on a hang kill its whole group and fail with the output or `log`'s tail."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        seen = log.read_text(errors="replace") if log is not None else f"{out or ''}{err or ''}"
        pytest.fail(f"{process.args} did not finish within {timeout} s (hang?):\n{seen[-4000:]}")
    return out or "", err or ""


def run_process_group(command: list[str], timeout: float, *, stderr: int = subprocess.PIPE,
                      **popen: object) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True)` in a session of its own
    (`stderr=subprocess.STDOUT` merges the two streams into `stdout`)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                               start_new_session=True, **popen)
    out, err = finish_process_group(process, timeout)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def readline_within(stream, timeout: float) -> str:
    """The next line of a child's text pipe, failing the test instead of blocking forever when
    the child hangs before writing it."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            pytest.fail(f"no line from the child process within {timeout} s (hang?)")
    return stream.readline()
