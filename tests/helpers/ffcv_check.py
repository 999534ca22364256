"""FFCV in the suite: a skip only where FFCV was never installed; where the install provided it,
an import that fails is a test failure (a broken FFCV build must not pass CI as a row of skips)."""
from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

# scripts/install.sh writes this file into the environment it builds with the `ffcv` extra
FFCV_EXPECTED_MARKER = "bam-expects-ffcv"


def ffcv_expected() -> str | None:
    """Why this environment should have FFCV (None: it was set up without it)."""
    if (Path(sys.prefix) / FFCV_EXPECTED_MARKER).is_file():
        return f"scripts/install.sh marked {sys.prefix} with {FFCV_EXPECTED_MARKER}"
    try:
        return f"the ffcv {importlib.metadata.version('ffcv')} distribution is installed"
    except importlib.metadata.PackageNotFoundError:
        return None


def require_ffcv() -> None:
    """Skip the calling test where FFCV was never installed (a user without the `ffcv` extra);
    fail it where FFCV should be there and does not import."""
    try:
        import ffcv  # noqa: F401
    except Exception as error:  # a broken build raises ImportError, OSError (libturbojpeg), numba errors...
        reason = ffcv_expected()
        if reason is not None:
            pytest.fail(f"FFCV does not import although {reason}: {type(error).__name__}: {error}")
        pytest.skip("FFCV is not installed (pip install -e '.[ffcv]', see docs/install.md)")
