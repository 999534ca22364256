"""Child processes that cannot hang a test: each runs in a session of its own, so a timeout kills
the whole process group (a launcher's workers included), and every blocking read has a limit."""
from __future__ import annotations

import os
import selectors
import signal
import subprocess

import pytest


def run_process_group(command: list[str], timeout: float, **popen: object) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True)` in a session of its own: on a hang
    the whole process group (launchers' workers included) is killed, not only the first process,
    and the test fails with the output so far."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **popen)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"{command} did not finish within {timeout} s (hang?):\n{(out or '')[-2000:]}{(err or '')[-2000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def readline_within(stream, timeout: float) -> str:
    """The next line of a child's text pipe, failing the test instead of blocking forever when
    the child hangs before writing it."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            pytest.fail(f"no line from the child process within {timeout} s (hang?)")
    return stream.readline()
