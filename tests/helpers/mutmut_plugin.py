"""A pytest plugin for tests/mutation.sh only (passed with `-p`), for two things mutmut 3.8.1 gets
wrong with bam's tests. Outside mutmut runs it changes nothing.

1. Lightning's `save_hyperparameters` must see through mutmut's trampolines, so that modules that
   define a LightningModule (bam/methods) can be mutation-tested with their `__init__` mutated too.
   mutmut moves every mutated function's body into a copy named `xǁClassǁ__init____mutmut_orig`
   (or `..._mutmut_3`, a mutant) and calls it from a generic `trampoline` in its own module.
   Lightning collects the constructor arguments by walking the call stack from
   `save_hyperparameters` up through the frames named `__init__` that have a `__class__` cell, and
   stops at the first frame that is neither: the copies are not named `__init__` and the trampoline
   frames sit between a subclass's `__init__` and its parent's, so the hyper-parameters came out
   empty and every test that builds a method failed before any mutant ran. Lightning's own two
   functions (pytorch_lightning.utilities.parsing) still do the work; they are wrapped so that
   they never see a trampoline frame and see a mutmut copy of `__init__` under that name.

2. No child process may outlive a test session. mutmut runs the clean tests in its own process,
   then waits for each mutant's forked run with `os.wait()`, which reaps any child: a DataLoader
   worker left behind by a test (persistent workers) that exits later was taken for a mutant's
   run, and mutmut stopped with a KeyError on its pid.
"""
from __future__ import annotations

import gc
import multiprocessing
import re
import types
from typing import Any, Optional

from pytorch_lightning.utilities import parsing

_MUTMUT_INIT = re.compile(r"^x\u01c1.+\u01c1__init____mutmut_(orig|\d+)$")
_TRAMPOLINE_FILE = "/mutmut/mutation/trampoline.py"
_lightning_init_args = parsing._get_init_args
_lightning_collect_init_args = parsing.collect_init_args


class _InitFrame:
    """The two attributes Lightning reads of a constructor's frame (through inspect.getargvalues),
    for a mutmut copy of `__init__`, with the copy's code renamed `__init__`."""

    def __init__(self, frame: types.FrameType) -> None:
        self.f_code = frame.f_code.replace(co_name="__init__")
        self.f_locals = frame.f_locals


def _is_trampoline(frame: types.FrameType) -> bool:
    return frame.f_code.co_filename.replace("\\", "/").endswith(_TRAMPOLINE_FILE)


def _init_args(frame: types.FrameType) -> tuple[Optional[Any], dict[str, Any]]:
    if _MUTMUT_INIT.match(frame.f_code.co_name):
        return _lightning_init_args(_InitFrame(frame))
    return _lightning_init_args(frame)


def _collect_init_args(frame: types.FrameType, path_args: list[dict[str, Any]], inside: bool = False,
                       classes: tuple[type, ...] = ()) -> list[dict[str, Any]]:
    while _is_trampoline(frame) and isinstance(frame.f_back, types.FrameType):
        frame = frame.f_back
    return _lightning_collect_init_args(frame, path_args, inside, classes)


# Lightning's collect_init_args looks both names up in its module at each call, its own recursion included
parsing._get_init_args = _init_args
parsing.collect_init_args = _collect_init_args


def pytest_sessionfinish(session, exitstatus) -> None:
    gc.collect()  # DataLoader iterators shut their workers down when collected
    for child in multiprocessing.active_children():
        child.terminate()
        child.join()
