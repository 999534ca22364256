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
"""
from __future__ import annotations

import argparse
import os
import pathlib
import pickle
from typing import Any, Callable

import numpy as np
import torch

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


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file needs a type that weights-only loading does not allow (it could run code)."""


def load_checkpoint_file(path: PathLike) -> dict[str, Any]:
    """Load a checkpoint with `torch.load(weights_only=True)` onto the CPU.

    Raises `FileNotFoundError` naming the path when it does not exist, and
    `UnsafeCheckpointError` naming the refused types when the pickle asks for anything beyond
    tensors, plain values and `SAFE_GLOBALS` (nothing from the file is executed in that case).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {str(path)!r}")
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise UnsafeCheckpointError(_refusal_message(path, _refused_types(path))) from error
    if not isinstance(checkpoint, dict):
        raise TypeError(f"{str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    return checkpoint


def _refused_types(path: pathlib.Path) -> list[str]:
    # Reads the pickle's GLOBAL opcodes statically; only possible for the zip format torch
    # writes since 1.6 (older files get the generic message, with torch's error chained).
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (ValueError, RuntimeError):
        return []


def _refusal_message(path: pathlib.Path, refused: list[str]) -> str:
    what = f"type(s) {', '.join(refused)}" if refused else "a type"
    return (
        f"refused to load {str(path)!r}: the file tried to load {what}, which weights-only loading "
        "does not allow, because unpickling it could run arbitrary code. Do not load files from "
        "untrusted sources. If you trust this file and the type is harmless, allow it explicitly: "
        "`with torch.serialization.safe_globals([TheType]): bam.io.load_checkpoint_file(path)`."
    )
