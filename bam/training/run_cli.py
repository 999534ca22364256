"""The LightningCLI base of every training stage (`bam pretrain`, `bam linear`, `bam finetune`):
launchable by every multi-process launcher, and failing safely.

- `sys.argv` is never rewritten. Lightning's subprocess launcher (`--trainer.devices N` with a
  ddp strategy) starts ranks 1..N-1 by re-executing `sys.argv` (`python <argv[0]> <argv[1:]>`, or
  `python -m <module> <argv[1:]>`), so it has to stay the user's real command line. The stage's
  arguments are passed explicitly; help reads `usage: bam <stage> ...`, not the internal `fit`.

- Resuming (`--ckpt_path`): `last` means the newest complete `last*.ckpt` of the run's
  checkpoint folder, else the newest complete checkpoint there (said so); an `http(s)://` file is
  downloaded to a temporary file first; every load is weights-only (`bam.io.safe_load`). The
  settings of this run (config files and command line) are the ones used, never the
  checkpoint's stored hyperparameters (LightningCLI's default for a named file); the settings
  that differ from the checkpoint's are listed at start-up.
- One run per folder (`RunLock`), checkpoints written atomically (`AtomicCheckpointIO`).
- Problems that are the user's to fix (a missing path, a rejected setting, a full disk, a busy
  run folder, an unsafe or damaged checkpoint) end the run with one line naming the problem,
  not a traceback.
"""
from __future__ import annotations

import contextlib
import os
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterator

from jsonargparse import Namespace
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from bam.io.safe_load import (
    NotACheckpointError,
    SafeCheckpointIO,
    UnsafeCheckpointError,
    is_remote,
    load_checkpoint_file,
    local_copy,
)
from bam.ops.errors import UserInputError
from bam.training.fault_tolerance import AtomicCheckpointIO, DiskFullError, is_disk_full
from bam.training.run_folder import RunFolderBusyError, RunLock
from bam.training.run_setup import logger_config

# environment variables through which launchers (torchrun, SLURM, Lightning's own) give ranks
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
# `--ckpt_path` values Lightning resolves itself ("last" is resolved here)
LIGHTNING_CKPT_KEYWORDS = ("best", "hpc")


class SettingError(ValueError):
    """A setting was rejected when the run's classes were built (its message names it)."""


USER_ERRORS = (
    SettingError,
    UserInputError,
    FileNotFoundError,
    NotADirectoryError,
    RunFolderBusyError,
    UnsafeCheckpointError,
    NotACheckpointError,
    DiskFullError,
)


class SafeRunCLI(LightningCLI):
    """LightningCLI that runs `Trainer.fit` for one `bam` stage from an explicit argument list, with
    safe resuming, a run-folder lock and atomic, weights-only checkpoint I/O.

    Subclasses add a `checkpoint` group (`RunCheckpoint`), and in `before_instantiate_classes` call
    `set_up_run_folder(config, stage)` and then `resolve_resume(config)`.

    Args:
        program: what help calls the command, e.g. "bam pretrain".
        argv: the stage's arguments (config files and overrides), without the stage name.
        run: False only parses and builds the model, data and trainer (`cli.trainer.fit(...)` is
            then the caller's).
        **kwargs: passed to `LightningCLI`.
    """

    def __init__(self, *args: Any, program: str, argv: list[str], run: bool = True, **kwargs: Any) -> None:
        self.program = program
        self._resources = contextlib.ExitStack()  # the run lock and a downloaded checkpoint
        with self._resources:
            super().__init__(*args, args=["fit", *argv] if run else argv, run=run, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        return {"fit": super().subcommands()["fit"]}

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]) -> None:
        super().setup_parser(add_subcommands, {**main_kwargs, "prog": self.program}, subparser_kwargs)
        for parser in getattr(self, "_subcommand_parsers", {}).values():
            parser.prog = self.program

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """The arguments always come explicitly (`sys.argv` holds them too, behind the stage name),
        so LightningCLI's warning about both does not apply."""
        self.config = parser.parse_args(args)

    def _parse_ckpt_path(self) -> None:
        """Lightning's version puts the checkpoint's stored model settings over the command line's;
        bam keeps the command line's and compares them in `resolve_resume`."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as error:  # a constructor rejected a setting; jsonargparse wraps it
            raise SettingError(str(_root_cause(error))) from error

    @staticmethod
    def set_up_run_folder(config: Namespace, stage: str) -> None:
        """The run folder `trainer.default_root_dir` (default `runs/<stage>`), its loggers
        (`logger_config`) and its `checkpoints/` folder, unless the user set them."""
        run_dir = config.trainer.default_root_dir or os.path.join("runs", stage)
        config.trainer.default_root_dir = run_dir
        config.trainer.logger = logger_config(run_dir, config.trainer.logger)
        if config.checkpoint.dirpath is None:
            config.checkpoint.dirpath = os.path.join(run_dir, "checkpoints")

    def resolve_resume(self, config: Namespace) -> None:
        """Turn `config.ckpt_path` into a local, complete checkpoint file and list the settings that
        differ from the ones it was trained with."""
        requested = config.get("ckpt_path")  # absent when the CLI is built with run=False
        if not requested:
            return
        if requested == "last":
            config.ckpt_path = find_last_checkpoint(Path(config.checkpoint.dirpath))
        elif is_remote(requested):
            config.ckpt_path = str(self._resources.enter_context(local_copy(requested)))
        elif requested not in LIGHTNING_CKPT_KEYWORDS and not Path(requested).is_file():
            raise FileNotFoundError(f"checkpoint file not found: {requested!r} (--ckpt_path)")
        if config.ckpt_path and Path(config.ckpt_path).is_file():
            checkpoint = load_checkpoint_file(config.ckpt_path, mmap=True)  # refuses unsafe files up front
            changes = changed_settings(checkpoint.get("hyper_parameters") or {}, config.model)
            if changes and _launch_rank_is_zero():
                print(_changes_message(requested, changes), file=sys.stderr, flush=True)

    def after_instantiate_classes(self) -> None:
        """Take the run folder before anything is written there (released when the run ends)."""
        if _launch_rank_is_zero():  # the other processes of this run are not rivals
            lock = RunLock(self.trainer.default_root_dir)
            lock.acquire()
            self._resources.callback(lock.release)

    def before_fit(self) -> None:
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) in (TorchCheckpointIO, SafeCheckpointIO):  # not when the user chose another
            strategy.checkpoint_io = AtomicCheckpointIO()


@contextlib.contextmanager
def one_line_errors(program: str) -> Iterator[None]:
    """Problems the user must fix end the program with `<program>: <what>`; other exceptions (bugs)
    keep their traceback."""
    try:
        yield
    except Exception as error:
        cause = _user_error(error)
        if cause is None:
            raise
        sys.exit(f"{program}: {cause}")


def _user_error(error: BaseException) -> BaseException | str | None:
    if is_disk_full(error) and not any(isinstance(e, DiskFullError) for e in _chain(error)):
        where = next((e.filename for e in _chain(error) if isinstance(e, OSError) and e.filename), None)
        return f"no space left on {where or 'the device'}"
    return next((e for e in _chain(error) if isinstance(e, USER_ERRORS)), None)


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _launch_rank_is_zero() -> bool:
    """Whether this process is the run's first (launchers set these before the process starts;
    Lightning's own launcher sets them for the processes it adds)."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def _is_complete(path: Path) -> bool:
    """A checkpoint torch finished writing (a zip archive with its closing directory)."""
    return path.is_file() and path.stat().st_size > 0 and zipfile.is_zipfile(path)


def find_last_checkpoint(directory: Path) -> str | None:
    """The newest complete `last*.ckpt` in `directory`, else its newest complete checkpoint."""
    by_age = sorted(directory.glob("*.ckpt"), key=lambda path: path.stat().st_mtime, reverse=True)
    complete = [path for path in by_age if _is_complete(path)]
    last = [path for path in complete if path.name.startswith("last")]
    if last:
        return str(last[0])
    newest = str(complete[0]) if complete else None
    if _launch_rank_is_zero():
        found = f"resuming from {newest}, the newest complete checkpoint there" if newest else "starting anew"
        print(f"bam: --ckpt_path last: no complete last.ckpt in {directory}: {found}", file=sys.stderr, flush=True)
    return newest


def changed_settings(stored: dict[str, Any], model: Namespace) -> list[tuple[str, Any, Any]]:
    """(setting, checkpoint's value, this run's value) for each model setting that differs."""
    stored = {key: value for key, value in stored.items() if key != "_instantiator"}
    class_path = stored.pop("_class_path", None)
    changes = []
    if class_path is not None:  # subclass mode: `model.class_path` + `model.init_args.*`
        if class_path != model.get("class_path"):
            changes.append(("model.class_path", class_path, model.get("class_path")))
        current, prefix = model.get("init_args") or Namespace(), "model.init_args."
    else:
        current, prefix = model, "model."
    for key, value in stored.items():
        if key in current and _plain(current[key]) != _plain(value):
            changes.append((prefix + key, value, current[key]))
    return changes


def _plain(value: Any) -> Any:
    """Comparable form: namespaces as dicts, tuples as lists."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _changes_message(requested: str, changes: list[tuple[str, Any, Any]]) -> str:
    lines = [f"bam: resuming from {requested} with settings that differ from the checkpoint's; "
             "this run's values are used:"]
    lines += [f"  {name}: {_plain(now)!r} (checkpoint: {_plain(before)!r})" for name, before, now in changes]
    example = " ".join(f"--{name}={_plain(before)!r}" for name, before, _ in changes[:2])
    lines.append(f"To continue with the checkpoint's values instead, give them on the command line (e.g. {example}).")
    return "\n".join(lines)
