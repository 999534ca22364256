"""Load checkpoint files without running code from them.

A `.pth`/`.ckpt` file is a pickle, and unpickling can call any importable function (`os.system`
included). `torch.load(weights_only=True)` only rebuilds tensors, containers and plain values, and
refuses every other type. A few harmless types appear in real checkpoints and are allowed here,
only for the duration of one load (never registered globally, so bam does not widen what other
code loads):

- `argparse.Namespace`: the `args` entry of the authors' files;
- `pathlib.PosixPath`: argparse options declared with `type=Path` end up in `args`;
- numpy scalars, numeric dtypes and arrays: values computed with numpy and stored in `args` or in data
  tables (numpy >= 2 names its modules `numpy._core`, numpy 1 `numpy.core`: both are allowed).

A `http(s)://` address is downloaded to a temporary file first and loaded from there the same
way (Lightning would hand it to `torch.hub` with weights-only loading off). `SafeCheckpointIO` makes
Lightning's own checkpoint loads (`Trainer.fit(ckpt_path=...)`) go through `load_checkpoint_file`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import pickle
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from typing import Any, Callable, Iterator

import numpy as np
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

SafeGlobal = Callable[..., Any] | tuple[Callable[..., Any], str]


def _numpy_globals() -> list[SafeGlobal]:
    # numpy's pickles point to its private module path, `numpy._core` from numpy 2 on
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    rebuilders = [(core.scalar, "scalar"), (core._reconstruct, "_reconstruct")]
    modules = ("numpy._core.multiarray", "numpy.core.multiarray")
    names = [(function, f"{module}.{name}") for function, name in rebuilders for module in modules]
    # `np.dtype(...)` returns an instance of a per-type subclass, whose state is then set
    numeric_codes = "?" + np.typecodes["AllInteger"] + np.typecodes["AllFloat"]
    dtype_classes = sorted({type(np.dtype(code)) for code in numeric_codes}, key=repr)
    return [np.dtype, np.ndarray, *dtype_classes, *names]


SAFE_GLOBALS: list[SafeGlobal] = [argparse.Namespace, pathlib.PosixPath, *_numpy_globals()]

PathLike = str | os.PathLike
REMOTE_SCHEMES = ("http://", "https://")
DOWNLOAD_TIMEOUT_S = 60


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file needs a type that weights-only loading does not allow (it could run code)."""


class NotACheckpointError(ValueError):
    """The file is not one `torch.save` wrote completely (another format, truncated, empty)."""


def is_remote(path: PathLike) -> bool:
    """Whether `path` is an `http(s)://` address (the only remote form bam downloads itself)."""
    return str(path).startswith(REMOTE_SCHEMES)


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[pathlib.Path]:
    """`path` itself when it is local; an `http(s)://` address downloaded to a temporary file
    (deleted afterwards). Other remote schemes (`s3://`, ...) are refused: copy them first."""
    if not is_remote(path):
        if "://" in str(path):
            raise ValueError(f"cannot load {str(path)!r}: only local files and http(s):// addresses are supported; "
                             "copy the file to local disk first")
        yield pathlib.Path(path)
        return
    descriptor, temporary = tempfile.mkstemp(prefix="bam-download-", suffix=".ckpt")
    try:
        try:
            with os.fdopen(descriptor, "wb") as file:
                with urllib.request.urlopen(str(path), timeout=DOWNLOAD_TIMEOUT_S) as response:
                    shutil.copyfileobj(response, file)
        except urllib.error.URLError as error:  # HTTP errors included
            raise FileNotFoundError(f"could not download checkpoint {str(path)!r}: {error}") from None
        yield pathlib.Path(temporary)
    finally:
        pathlib.Path(temporary).unlink(missing_ok=True)


def load_checkpoint_file(path: PathLike, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint with `torch.load(weights_only=True)` onto the CPU.

    `path` may be an `http(s)://` address: it is downloaded to a temporary file first. `mmap`
    maps the file instead of reading it (cheap when only a few entries are needed).

    Raises `FileNotFoundError` naming the path when it does not exist, `NotACheckpointError` when
    it is not a complete checkpoint, and `UnsafeCheckpointError` naming the refused types when the
    pickle asks for anything beyond tensors, plain values and `SAFE_GLOBALS` (nothing from the file
    is executed in that case).
    """
    with local_copy(path) as local:
        if not local.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
        checkpoint = _load_weights_only(local, str(path), mmap and not is_remote(path))
    if not isinstance(checkpoint, dict):
        raise TypeError(f"{str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    return checkpoint


def _load_weights_only(local: pathlib.Path, name: str, mmap: bool) -> Any:
    # Errors are raised `from None`: torch's own messages advise `weights_only=False`, which is
    # exactly what must not be done with a file of unknown origin.
    if local.stat().st_size == 0 or (not zipfile.is_zipfile(local) and not _is_legacy_pickle(local)):
        raise NotACheckpointError(f"{name!r} is not a checkpoint: it is not a complete file written by torch.save "
                                  "(another format, an error page, or a truncated or empty file)") from None
    damage = checkpoint_damage(local, name)
    if damage is not None:
        raise NotACheckpointError(damage)
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:
            return torch.load(local, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(local))
        except pickle.UnpicklingError:
            raise UnsafeCheckpointError(_refusal_message(name, _refused_types(local))) from None
        except RuntimeError as error:  # zip archive damaged inside
            raise NotACheckpointError(f"{name!r} is not a readable checkpoint ({str(error).splitlines()[0]})") from None
        except (EOFError, IndexError):  # how the unpickler stops in a pre-1.6 (plain pickle) file cut short
            raise NotACheckpointError(f"{name!r} is not a readable checkpoint: the file ends early or is "
                                      "damaged") from None


def checkpoint_damage(path: PathLike, name: str | None = None) -> str | None:
    """Why the complete checkpoint at `path` (called `name` in the message) is damaged, or None.

    torch.save writes a zip archive with the CRC-32 of every entry; bytes changed later (a failing
    disk, a bad copy) still leave a complete archive that torch loads without a word, NaN weights
    included. Every entry is read and checked against its CRC (a few seconds per GB). Files from
    before torch 1.6 (plain pickles) carry no checksum and pass.
    """
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        entry = archive.testzip()
    if entry is None:
        return None
    return (f"{name or str(path)!r} is damaged: its entry {entry!r} does not match the checksum written with it "
            "(the file changed on disk or in a copy after it was saved); use another checkpoint, e.g. an earlier "
            "one of the run")


def _is_legacy_pickle(path: pathlib.Path) -> bool:
    """Files torch wrote before 1.6 (and plain pickles) start with the pickle protocol opcode."""
    with path.open("rb") as file:
        return file.read(1) == b"\x80"


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O whose loads are always weights-only with `SAFE_GLOBALS`, local or
    `http(s)://` (downloaded first), whatever `weights_only` Lightning asks for."""

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint_file(path)


def secure_checkpoint_loading(trainer: Any) -> None:
    """Make `trainer` load checkpoints weights-only: its default I/O is replaced by
    `SafeCheckpointIO` (an I/O plugin the user chose is left alone). Called from bam modules'
    `setup`, which runs before Lightning loads `ckpt_path`, so the Python API is covered too."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = SafeCheckpointIO()


def _refused_types(path: pathlib.Path) -> list[str]:
    # Reads the pickle's GLOBAL opcodes statically; only possible for the zip format torch
    # writes since 1.6 (older files get the generic message, with torch's error chained).
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (ValueError, RuntimeError):
        return []


def _refusal_message(name: str, refused: list[str]) -> str:
    what = f"type(s) {', '.join(refused)}" if refused else "a type"
    return (
        f"refused to load {name!r}: the file tried to load {what}, which weights-only loading "
        "does not allow, because unpickling it could run arbitrary code. Do not load files from "
        "untrusted sources. If you trust this file and the type is harmless, allow it explicitly: "
        "`with torch.serialization.safe_globals([TheType]): bam.io.load_checkpoint_file(path)`."
    )
