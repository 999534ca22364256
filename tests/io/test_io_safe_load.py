"""Weights-only loading: the types real checkpoints need load, code in a crafted pickle never runs."""
from __future__ import annotations

import argparse
import builtins
import os
import pathlib

import numpy as np
import pytest
import torch

from bam.io import UnsafeCheckpointError, load_checkpoint_file


class RunsShellCommand:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class RunsPython:
    """Unpickling this executes Python source that creates `marker`."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


class Harmless:
    """A user type: refused unless the caller allows it."""

    def __init__(self, value: int = 0) -> None:
        self.value = value


# the payload's function as the pickle names it ({module}.{name}) -> payload
PAYLOADS = {f"{os.system.__module__}.system": RunsShellCommand, "builtins.exec": RunsPython}


def _crafted_file(tmp_path: pathlib.Path, payload: type) -> tuple[pathlib.Path, pathlib.Path]:
    marker = tmp_path / "code_ran"
    path = tmp_path / "crafted.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "args": payload(marker)}, path)
    return path, marker


@pytest.mark.parametrize("refused", sorted(PAYLOADS))
def test_pickle_that_runs_code_is_refused_without_running_it(tmp_path, refused):
    path, marker = _crafted_file(tmp_path, PAYLOADS[refused])
    with pytest.raises(UnsafeCheckpointError) as error:
        load_checkpoint_file(path)
    assert not marker.exists(), "the crafted pickle's code ran"
    message = str(error.value)
    assert refused in message and str(path) in message
    assert "untrusted" in message and "safe_globals" in message


def test_the_crafted_pickle_does_run_code_when_loaded_unsafely(tmp_path):
    # control: proves the refusal test above would see the marker if the payload had run
    path, marker = _crafted_file(tmp_path, RunsPython)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


def test_types_of_the_authors_args_are_allowed(tmp_path):
    args = argparse.Namespace(
        arch="vit_small", patch_size=16, scale=(0.25, 1.0), lr=np.float64(3e-4), epochs=np.int64(400),
        table=np.arange(6, dtype=np.float32).reshape(2, 3), output_dir=pathlib.Path("/out/bam"), resume=None,
    )
    path = tmp_path / "ok.pth"
    torch.save({"model": {"w": torch.arange(3.0)}, "args": args, "epoch": 7}, path)
    loaded = load_checkpoint_file(path)
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0)) and loaded["epoch"] == 7
    assert loaded["args"].lr == 3e-4 and isinstance(loaded["args"].lr, np.float64)
    assert loaded["args"].output_dir == pathlib.Path("/out/bam")
    np.testing.assert_array_equal(loaded["args"].table, args.table)
    assert vars(loaded["args"]).keys() == vars(args).keys()


def test_allowlist_is_scoped_to_the_load(tmp_path):
    path = tmp_path / "ns.pth"
    torch.save({"args": argparse.Namespace(arch="vit_base")}, path)
    load_checkpoint_file(path)
    with pytest.raises(Exception, match="Namespace"):
        torch.load(path, weights_only=True)  # nothing was registered globally


def test_refusal_names_the_type_and_the_documented_opt_in_works(tmp_path):
    path = tmp_path / "user_type.pth"
    torch.save({"extra": Harmless(5)}, path)
    with pytest.raises(UnsafeCheckpointError, match="Harmless"):
        load_checkpoint_file(path)
    with torch.serialization.safe_globals([Harmless]):
        assert load_checkpoint_file(path)["extra"].value == 5


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match="nowhere/last.ckpt"):
        load_checkpoint_file(missing)
