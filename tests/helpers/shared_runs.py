"""Runs that several test files read, made once per test session, parallel workers included."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock

MADE = ".made"  # written last: the folder is complete


def made_once(tmp_path_factory: pytest.TempPathFactory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder `name`, filled by `make(folder)` for the first test of the session that asks for
    it; the others (on any parallel worker: they wait on a lock) get the same folder, to read and
    to copy what they change. A `make` that failed leaves no mark, so the next test tries again."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker's basetemp is a folder of the session's
        root = root.parent
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (folder / MADE).exists():
            shutil.rmtree(folder, ignore_errors=True)
            make(folder)
            (folder / MADE).touch()
    return folder
