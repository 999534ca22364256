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
import json
import os
import shlex
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterator

import pytorch_lightning as pl
from jsonargparse import Namespace
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from bam.data.splits import MissingLabelsError
from bam.io.safe_load import (
    NotACheckpointError,
    SafeCheckpointIO,
    UnsafeCheckpointError,
    checkpoint_damage,
    is_remote,
    load_checkpoint_file,
    local_copy,
)
from bam.io.state import CheckpointFormatError, CheckpointMismatchError
from bam.models.projector import with_projector_gathered
from bam.ops.errors import UserInputError
from bam.training.fault_tolerance import AtomicCheckpointIO, DiskFullError, is_disk_full
from bam.training.launch_plan import LaunchPlanError
from bam.training.health import TrainingDiverged
from bam.training.run_folder import RunFolderBusyError, RunLock
from bam.training.run_setup import logger_config

# where checkpoints keep `data_order_settings` (top level, plain values)
RUN_SETTINGS_KEY = "bam_run_settings"
# trainer settings that change the data order or the global batch (the others do not)
DATA_ORDER_TRAINER_KEYS = ("devices", "num_nodes", "accumulate_grad_batches", "limit_train_batches")
# data settings that change neither: evaluation and loading speed only
NOT_DATA_ORDER_KEYS = ("num_workers", "knn_bank_fraction", "knn_batch_size", "eval_size")
# environment variables through which launchers (torchrun, SLURM, Lightning's own) give ranks
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")
# `--ckpt_path` values Lightning resolves itself ("last" is resolved here)
LIGHTNING_CKPT_KEYWORDS = ("best", "hpc")
# the start of the resume hint's last line, which the options to paste follow
HINT_PREFIX = "To continue with the checkpoint's values instead, add to the command line: "


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
    CheckpointFormatError,
    CheckpointMismatchError,
    DiskFullError,
    MissingLabelsError,
    LaunchPlanError,
    TrainingDiverged,
)


class SafeRunCLI(LightningCLI):
    """LightningCLI that runs `Trainer.fit` for one `bam` stage from an explicit argument list, with
    safe resuming, a run-folder lock and atomic, weights-only checkpoint I/O.

    Subclasses add a `checkpoint` group (`RunCheckpoint`), and in `before_instantiate_classes` call
    `set_up_run_folder(config, stage)` and then `resolve_resume(config)`. A subclass that links
    settings names them in `derived_settings` (linked name -> the name it is set from): a
    resume hint gives the source, as the linked one cannot be set on its own.

    Args:
        program: what help calls the command, e.g. "bam pretrain".
        argv: the stage's arguments (config files and overrides), without the stage name.
        run: False only parses and builds the model, data and trainer (`cli.trainer.fit(...)` is
            then the caller's).
        **kwargs: passed to `LightningCLI`.
    """

    derived_settings: dict[str, str] = {}

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
            # a checkpoint written before the projector's settings were gathered names them flat
            changes = changed_settings(with_projector_gathered(checkpoint.get("hyper_parameters") or {}), config.model)
            changes += changed_data_order(checkpoint.get(RUN_SETTINGS_KEY) or {}, data_order_settings(config))
            if changes and launch_rank_is_zero():
                print(_changes_message(requested, changes, self.derived_settings), file=sys.stderr, flush=True)

    def after_instantiate_classes(self) -> None:
        """Take the run folder before anything is written there (released when the run ends), and
        have every checkpoint record the settings that decide the data order."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        self.trainer.callbacks.append(RunSettingsRecord(data_order_settings(config)))
        if launch_rank_is_zero():  # the other processes of this run are not rivals
            lock = RunLock(self.trainer.default_root_dir)
            lock.acquire()
            self._resources.callback(lock.release)

    def before_fit(self) -> None:
        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) in (TorchCheckpointIO, SafeCheckpointIO):  # not when the user chose another
            strategy.checkpoint_io = AtomicCheckpointIO()


@contextlib.contextmanager
def one_line_errors(program: str, also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Problems the user must fix (`USER_ERRORS`, and the stage's own kinds `also`) end the program
    with `<program>: <what>`; other exceptions (bugs) keep their traceback."""
    try:
        yield
    except Exception as error:
        cause = _user_error(error, also)
        if cause is None:
            raise
        sys.exit(f"{program}: {cause}")


def _user_error(error: BaseException, also: tuple[type[BaseException], ...] = ()) -> BaseException | str | None:
    if is_disk_full(error) and not any(isinstance(e, DiskFullError) for e in _chain(error)):
        where = next((e.filename for e in _chain(error) if isinstance(e, OSError) and e.filename), None)
        return f"no space left on {where or 'the device'}"
    return next((e for e in _chain(error) if isinstance(e, (*USER_ERRORS, *also))), None)


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


def launch_rank_is_zero() -> bool:
    """Whether this process is the run's first (launchers set these before the process starts;
    Lightning's own launcher sets them for the processes it adds)."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def _is_complete(path: Path) -> bool:
    """A checkpoint torch finished writing (a zip archive with its closing directory)."""
    return path.is_file() and path.stat().st_size > 0 and zipfile.is_zipfile(path)


def find_last_checkpoint(directory: Path) -> str | None:
    """The newest sound `last*.ckpt` in `directory`, else its newest sound checkpoint.

    Incomplete files (a writer killed without `AtomicCheckpointIO`) are passed over silently, as
    Lightning would not have finished them; complete ones whose contents no longer match their
    checksums (`checkpoint_damage`) are passed over with a line each, naming the damage.
    """
    by_age = sorted(directory.glob("*.ckpt"), key=lambda path: path.stat().st_mtime, reverse=True)
    complete = [path for path in by_age if _is_complete(path)]
    candidates = [path for path in complete if path.name.startswith("last")]
    candidates += [path for path in complete if not path.name.startswith("last")]
    chosen, damaged = None, False
    for path in candidates:
        damage = checkpoint_damage(path)
        if damage is None:
            chosen = path
            break
        damaged = True
        _tell(f"passing over {path}: {damage}")
    if damaged:
        _tell(f"resuming from {chosen}, the newest sound checkpoint in {directory}" if chosen
              else f"no sound checkpoint in {directory}: starting anew")
    elif chosen is None or not chosen.name.startswith("last"):
        found = f"resuming from {chosen}, the newest complete checkpoint there" if chosen else "starting anew"
        _tell(f"no complete last.ckpt in {directory}: {found}")
    return str(chosen) if chosen else None


def _tell(message: str) -> None:
    """A `--ckpt_path last` message, once per run (from its first process)."""
    if launch_rank_is_zero():
        print(f"bam: --ckpt_path last: {message}", file=sys.stderr, flush=True)


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


def data_order_settings(config: Namespace) -> dict[str, Any]:
    """The run's settings that decide which images come in which batch and step, flat
    (`data.init_args.crops.global_size`, `trainer.devices`, `seed_everything`, ...)."""
    settings = {"seed_everything": _plain(config.get("seed_everything"))}
    settings.update(_flat(_plain(config.get("data")), "data"))
    trainer = config.get("trainer") or Namespace()
    settings.update({f"trainer.{key}": _plain(trainer.get(key)) for key in DATA_ORDER_TRAINER_KEYS})
    return {key: value for key, value in settings.items() if key.rsplit(".", 1)[-1] not in NOT_DATA_ORDER_KEYS}


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    return {key: item for name, child in value.items() for key, item in _flat(child, f"{prefix}.{name}").items()}


def changed_data_order(stored: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(setting, checkpoint's value, this run's value) for each data-order setting that differs
    (none for checkpoints written without the record)."""
    return [(key, stored[key], value) for key, value in current.items() if key in stored and stored[key] != value]


class RunSettingsRecord(pl.Callback):
    """Writes the run's `data_order_settings` into every checkpoint, for the comparison on resume."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[RUN_SETTINGS_KEY] = self.settings


def _plain(value: Any) -> Any:
    """Comparable form: namespaces as dicts, tuples as lists."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _option(name: str, value: Any) -> str:
    """`--name=value` as a shell takes it and the CLI parses it back (JSON for numbers, lists, dicts)."""
    value = _plain(value)
    return shlex.quote(f"--{name}={value if isinstance(value, str) else json.dumps(value)}")


def _changes_message(requested: str, changes: list[tuple[str, Any, Any]], derived: dict[str, str] | None = None) -> str:
    """The differing settings, and the options that give back the checkpoint's values: every one
    of them, a setting the CLI derives (`derived`: derived name -> the name it is set from) by the
    setting it comes from, so that the line can be pasted as it is."""
    lines = [f"bam: resuming from {requested} with settings that differ from the checkpoint's; "
             "this run's values are used:"]
    lines += [f"  {name}: {_plain(now)!r} (checkpoint: {_plain(before)!r})" for name, before, now in changes]
    options = {(derived or {}).get(name, name): before for name, before, _ in changes}
    lines.append(HINT_PREFIX + " ".join(_option(name, before) for name, before in options.items()))
    return "\n".join(lines)
