"""Checkpoints only of sound states, and the way back after a run diverges.

A state whose parameters or optimiser moments hold a NaN or an infinity cannot be trained on: a
run resumed from it diverges again at its first step, whatever the learning rate. So:

- `check_and_record` runs as each checkpoint is assembled (`SSLMethod.on_save_checkpoint`): it
  refuses, with `NonFiniteStateError`, a state with any non-finite parameter, buffer or
  optimiser moment, so such a checkpoint is never written (the save is abandoned before any
  file is touched), and records in every checkpoint it lets through the step, the last loss and
  that its state was finite (`checkpoint["bam_health"]`).
- When a run stops on a non-finite loss or state (`TrainingDiverged`), `newest_sound_checkpoint`
  finds the most recent checkpoint of the run whose state is finite, and the error names it.
- `explain_divergence` wraps a command-line stage: it turns that error into a message that ends
  with the exact command resuming from that checkpoint with a 10x lower learning rate.
"""
from __future__ import annotations

import contextlib
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from bam.io.safe_load import load_checkpoint_file

HEALTH_KEY = "bam_health"
LR_OPTION = "--model.init_args.lr"
LR_DIVISOR = 10


@dataclass(frozen=True)
class SoundCheckpoint:
    """A checkpoint file whose parameters and optimiser moments are all finite."""

    path: Path
    step: int
    last_loss: float | None

    def describe(self) -> str:
        loss = "unknown" if self.last_loss is None else f"{self.last_loss:.6g}"
        return f"{self.path} (step {self.step}, last loss {loss})"


class TrainingDiverged(RuntimeError):
    """The run stopped because its loss or state became non-finite.

    Attributes:
        checkpoint: the newest sound checkpoint of the run (None: there is none).
        lr: the learning rate setting (`model.lr`, per 256 images) the run used.
    """

    def __init__(self, message: str, checkpoint: SoundCheckpoint | None = None, lr: float | None = None) -> None:
        super().__init__(message)
        self.checkpoint, self.lr = checkpoint, lr


class NonFiniteStateError(TrainingDiverged):
    """A checkpoint was about to be written from a state holding NaN or infinite values."""


# -- what a checkpoint holds --------------------------------------------------------------------
def _non_finite(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())


def non_finite_entries(checkpoint: dict[str, Any]) -> list[str]:
    """Names of the model tensors and optimiser state tensors of `checkpoint` that are not finite."""
    names = [name for name, value in checkpoint.get("state_dict", {}).items() if _non_finite(value)]
    for number, optimizer in enumerate(checkpoint.get("optimizer_states", [])):
        for param, state in optimizer.get("state", {}).items():
            names += [f"optimizer {number} parameter {param} {key}" for key, value in state.items() if _non_finite(value)]
    return names


def check_and_record(checkpoint: dict[str, Any], step: int, last_loss: float | None, directory: Path | None,
                     lr: float | None = None) -> None:
    """Raise `NonFiniteStateError` if `checkpoint`'s state is not finite; else record its health."""
    bad = non_finite_entries(checkpoint)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise diverged(NonFiniteStateError, f"refusing to write a checkpoint at step {step}: non-finite values in "
                       f"{shown}.", directory, lr)
    checkpoint[HEALTH_KEY] = {"step": step, "last_loss": last_loss, "finite": True}


# -- finding the way back -----------------------------------------------------------------------
def checkpoint_directory(trainer: pl.Trainer | None) -> Path | None:
    """Where the trainer writes checkpoints: the ModelCheckpoint's folder, else Lightning's default."""
    if trainer is None:
        return None
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
        return Path(callback.dirpath)
    return Path(trainer.default_root_dir) / "checkpoints"


def inspect_checkpoint(path: Path) -> SoundCheckpoint | None:
    """`path` as a sound checkpoint, or None (unreadable, or a state that is not finite). Files
    without a health record (written before it existed) are checked tensor by tensor."""
    try:
        checkpoint = load_checkpoint_file(path)
    except Exception:  # incomplete, foreign or unsafe files are simply not candidates
        return None
    record = checkpoint.get(HEALTH_KEY)
    finite = record["finite"] if isinstance(record, dict) else not non_finite_entries(checkpoint)
    if not finite:
        return None
    last_loss = record.get("last_loss") if isinstance(record, dict) else None
    return SoundCheckpoint(path, int(checkpoint.get("global_step", 0)), last_loss)


def newest_sound_checkpoint(directory: Path | None) -> SoundCheckpoint | None:
    """The most recently written sound checkpoint in `directory`.

    Files are read newest first until one is sound. `last.ckpt` is a copy of the newest state
    that the next run overwrites: a named checkpoint of the same step is preferred to it.
    """
    if directory is None or not directory.is_dir():
        return None
    dated = []
    for path in directory.glob("*.ckpt"):
        with contextlib.suppress(OSError):  # removed meanwhile
            dated.append((path.stat().st_mtime, path))
    newest_first = [path for _, path in sorted(dated, reverse=True)]
    sound = (found for found in map(inspect_checkpoint, newest_first) if found is not None)
    first = next(sound, None)
    if first is not None and first.path.name.startswith(ModelCheckpoint.CHECKPOINT_NAME_LAST):
        second = next(sound, None)
        if second is not None and second.step == first.step:
            return second
    return first


def diverged(kind: type[TrainingDiverged], message: str, directory: Path | None, lr: float | None) -> TrainingDiverged:
    """A `kind` error whose message names the newest sound checkpoint in `directory`."""
    checkpoint = newest_sound_checkpoint(directory)
    if checkpoint is None:
        way_back = "No sound checkpoint of this run exists: start again with a lower learning rate."
    else:
        way_back = (f"The newest sound checkpoint is {checkpoint.describe()}: resume from it "
                    "(ckpt_path) with a lower learning rate.")
    return kind(f"{message} {way_back}", checkpoint=checkpoint, lr=lr)


# -- the command line ---------------------------------------------------------------------------
def _without_options(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """`argv` without the options `names`, given as `--name value` or `--name=value`."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not any(arg.startswith(f"{name}=") for name in names):
            kept.append(arg)
    return kept


def resume_command(program: str, argv: Sequence[str], checkpoint: SoundCheckpoint | None, lr: float | None) -> str:
    """`program argv` resuming from `checkpoint` (from scratch if None) with a lower learning rate."""
    args = _without_options(argv, ["--ckpt_path", LR_OPTION, "--model.lr"])
    if checkpoint is not None:
        args += ["--ckpt_path", str(checkpoint.path)]
    if lr is not None:
        args.append(f"{LR_OPTION}={lr / LR_DIVISOR:g}")
    return shlex.join([*shlex.split(program), *args])


@contextlib.contextmanager
def explain_divergence(program: str, argv: Sequence[str]) -> Iterator[None]:
    """Turn a `TrainingDiverged` raised inside into an exit whose message ends with the command
    that resumes from the newest sound checkpoint with a 10x lower learning rate."""
    try:
        yield
    except TrainingDiverged as error:
        command = resume_command(program, argv, error.checkpoint, error.lr)
        raise SystemExit(f"{error}\nTo resume with a {LR_DIVISOR}x lower learning rate, run:\n  {command}") from None
