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
   empty and every test that builds a method failed before any mutant ran. The two functions below
   are Lightning's (pytorch_lightning.utilities.parsing) with two changes: a frame whose function
   is a mutmut copy of `__init__` counts as `__init__`, and mutmut's trampoline frames are stepped
   over.

2. No child process may outlive a test session. mutmut runs the clean tests in its own process,
   then waits for each mutant's forked run with `os.wait()`, which reaps any child: a DataLoader
   worker left behind by a test (persistent workers) that exits later was taken for a mutant's
   run, and mutmut stopped with a KeyError on its pid.
"""
from __future__ import annotations

import gc
import inspect
import multiprocessing
import re
import types
from typing import Any, Optional

from pytorch_lightning.utilities import parsing

_MUTMUT_INIT = re.compile(r"^x\u01c1.+\u01c1__init____mutmut_(orig|\d+)$")
_TRAMPOLINE_FILE = "/mutmut/mutation/trampoline.py"


def _is_init(code: types.CodeType) -> bool:
    return code.co_name == "__init__" or bool(_MUTMUT_INIT.match(code.co_name))


def _is_trampoline(frame: types.FrameType) -> bool:
    return frame.f_code.co_filename.replace("\\", "/").endswith(_TRAMPOLINE_FILE)


def _get_init_args(frame: types.FrameType) -> tuple[Optional[Any], dict[str, Any]]:
    _, _, _, local_vars = inspect.getargvalues(frame)
    if "__class__" not in local_vars or not _is_init(frame.f_code):
        return None, {}
    cls = local_vars["__class__"]
    init_parameters = inspect.signature(cls.__init__).parameters
    self_var, args_var, kwargs_var = parsing.parse_class_init_keys(cls)
    filtered_vars = [n for n in (self_var, args_var, kwargs_var) if n]
    exclude_argnames = (*filtered_vars, "__class__", "frame", "frame_args")
    local_args = {k: local_vars[k] for k in init_parameters}
    if kwargs_var:
        local_args.update(local_args.get(kwargs_var, {}))
    local_args = {k: v for k, v in local_args.items() if k not in exclude_argnames}
    return local_vars.get(self_var, None), local_args


def collect_init_args(frame: types.FrameType, path_args: list[dict[str, Any]], inside: bool = False,
                      classes: tuple[type, ...] = ()) -> list[dict[str, Any]]:
    while _is_trampoline(frame) and isinstance(frame.f_back, types.FrameType):
        frame = frame.f_back
    _, _, _, local_vars = inspect.getargvalues(frame)
    if not isinstance(frame.f_back, types.FrameType):
        return path_args
    local_self, local_args = _get_init_args(frame)
    if "__class__" in local_vars and (not classes or isinstance(local_self, classes)):
        path_args.append(local_args)
        return collect_init_args(frame.f_back, path_args, inside=True, classes=classes)
    if not inside:
        return collect_init_args(frame.f_back, path_args, inside=False, classes=classes)
    return path_args


parsing._get_init_args = _get_init_args
parsing.collect_init_args = collect_init_args


def pytest_sessionfinish(session, exitstatus) -> None:
    gc.collect()  # DataLoader iterators shut their workers down when collected
    for child in multiprocessing.active_children():
        child.terminate()
        child.join()
