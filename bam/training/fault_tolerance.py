"""Preemption-safe training: checkpoint on a signal at a step boundary, write checkpoints atomically.

Why not Lightning's own handlers: on SLURM, Lightning saves its checkpoint *inside* the SIGUSR1
handler, i.e. wherever Python happened to be (possibly between the optimiser's update of its
moments and of the parameters, or inside a collective on another rank), and without SLURM a
SIGTERM stops the run without any checkpoint. Here a signal only sets a flag; at the end of the
current batch every rank learns whether any rank was signalled (one tiny all-reduce per step),
and then all of them save one consistent mid-epoch checkpoint, requeue the SLURM job if asked to,
and leave with exit status 0. With `ResumableDataLoader`, restarting the same command with
`--ckpt_path last` continues at the next batch as if nothing had happened.

The callback also carries the position of `ResumableDataLoader`s in its own checkpoint state and
puts it back when training starts. Lightning saves a stateful loader's state too, but restores it
only when it builds the loader after the checkpoint is loaded; a method whose
`configure_optimizers` asks for `trainer.estimated_stepping_batches` (as `SSLMethod` does, for its
schedules) makes it build the loader earlier, and the restored position would be dropped.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import secrets
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO

import pytorch_lightning as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from bam.data.resumable import ResumableDataLoader
from bam.io.safe_load import SafeCheckpointIO
from bam.training.run_folder import this_host, writer_is_dead
from bam.training.slurm import in_slurm_job, requeue_slurm_job


class RunCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` whose `last.ckpt` is always the state training ended in.

    Lightning writes `last.ckpt` only together with a periodic checkpoint, so a run of 15 epochs
    saving every 8 would end with `last.ckpt` from epoch 8, without the final epochs and the
    re-estimated batch norm statistics, and that file is what users export and resume. Here
    training's end also writes it when the last periodic save was at an earlier step.
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # `_last_global_step_saved` is Lightning's own record of the step of its latest save
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        else:
            super().on_train_end(trainer, pl_module)


class PreemptionCheckpoint(pl.Callback):
    """On any of `signals`: finish the batch, save `<checkpoint dir>/last.ckpt`, exit cleanly.

    Args:
        signals: names of the signals that mean "stop and save" (SLURM sends SIGUSR1 ahead of the
            time limit with `--signal=USR1@<seconds>`; preemption and `scancel` send SIGTERM; Ctrl-C
            sends SIGINT, and a second Ctrl-C aborts at once without saving).
        requeue_signals: of those, the ones after which a SLURM job requeues itself
            (`scontrol requeue`), once the checkpoint is completely written. A SIGTERM from a
            preemption is not among them: SLURM requeues preempted jobs itself when configured to.

    The checkpoint goes to the first ModelCheckpoint's directory as `last.ckpt` (or
    `<default_root_dir>/checkpoints/last.ckpt` without one), where `--ckpt_path last` finds it.
    Exceptions (a non-finite loss included) never trigger a save: the last good checkpoint stays.
    """

    def __init__(
        self,
        signals: Sequence[str] = ("SIGTERM", "SIGUSR1", "SIGINT"),
        requeue_signals: Sequence[str] = ("SIGUSR1",),
    ) -> None:
        self.signals = [signal.Signals[name] for name in signals]
        self.requeue_signals = {signal.Signals[name] for name in requeue_signals}
        self.received: signal.Signals | None = None
        self._previous_handlers: dict[signal.Signals, Any] = {}
        self._trainer: pl.Trainer | None = None
        self._loader_states: list[dict[str, int]] = []  # restored from a checkpoint, not yet applied
        self._saved_before_evaluation: int | None = None  # the step `save_before_evaluation` last saved

    # ------------------------------------------------------------------ data position
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer  # state_dict() has no trainer argument

    def state_dict(self) -> dict[str, Any]:
        loaders = _resumable_loaders(self._trainer) if self._trainer is not None else []
        return {"train_loaders": [loader.state_dict() for loader in loaders]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loader_states = list(state_dict.get("train_loaders", []))

    # ------------------------------------------------------------------ signal handling
    def _on_signal(self, signum: int, _: FrameType | None) -> None:
        # Only a flag: the handler may run in the middle of anything, including a collective.
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: abort now, without the checkpoint
        self.received = signal.Signals(signum)
        if signum == signal.SIGINT:  # os.write: print is not safe inside a signal handler
            os.write(2, b"\nCtrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again aborts at once)\n")

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python only lets the main thread set handlers
        for signum in self.signals:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _restore(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the checkpoint is loaded and before the first batch is drawn (the loaders'
        # iterators start lazily), so the epoch resumes at the saved batch.
        loaders = _resumable_loaders(trainer)
        if self._loader_states and len(loaders) == len(self._loader_states):
            for loader, state in zip(loaders, self._loader_states):
                loader.load_state_dict(state)
                _continue_in_new_batches(trainer, loader, state)
        self._loader_states = []
        # Lightning installs its handlers just before training starts; these replace them.
        self.received = None
        self._install()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()  # no step boundary comes any more: a Ctrl-C during final evaluations interrupts them

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()

    # ------------------------------------------------------------------ the step boundary
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._signalled(trainer):
            return
        requeue = self._requeue_wanted(trainer)
        path = checkpoint_path(trainer)
        rank_zero_info(f"Signal received: saving {path} at step {trainer.global_step} and stopping")
        trainer.save_checkpoint(path, weights_only=False)  # every rank; returns after rank 0 wrote it and all met
        # The loop hands this step's metrics to the loggers only after this hook, and the exit
        # below skips that: hand them over here, as the loop would, so that the step's row is
        # logged once (the resumed run starts at the next step). The loggers flush on the exit.
        trainer._logger_connector.on_batch_end()
        trainer._logger_connector.update_train_step_metrics()
        self._stop(trainer, requeue)

    def _signalled(self, trainer: pl.Trainer) -> bool:
        """Whether any rank received a signal (a collective: every rank must ask)."""
        return trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)

    def _requeue_wanted(self, trainer: pl.Trainer) -> bool:
        return in_slurm_job() and trainer.strategy.reduce_boolean_decision(
            self.received in self.requeue_signals, all=False
        )

    @staticmethod
    def _stop(trainer: pl.Trainer, requeue: bool) -> None:
        if requeue and trainer.is_global_zero:
            requeue_slurm_job()
        # Leave the loops here (as Lightning does on SIGTERM): ending the epoch normally would run
        # the epoch-end hooks and checkpoint an unfinished epoch as finished. Exit status 0.
        raise SIGTERMException

    # ------------------------------------------------------------------ epoch-end evaluations
    def save_before_evaluation(self, trainer: pl.Trainer) -> None:
        """Write `last.ckpt` of this epoch's end (once per step) before an evaluation starts: on
        ImageNet the evaluations can outlast the time SLURM leaves between SIGTERM and SIGKILL,
        and the epoch's training must not depend on them finishing. The checkpoint callback still
        writes its own files after the evaluations (with their results and statistics)."""
        if self._saved_before_evaluation == trainer.global_step:
            return
        trainer.save_checkpoint(checkpoint_path(trainer), weights_only=False)  # the whole state: a resume needs it
        self._saved_before_evaluation = trainer.global_step

    def stop_if_signalled(self, trainer: pl.Trainer, evaluation: str) -> None:
        """After an epoch-end evaluation: a signal that arrived during it stops the run now (the
        epoch's checkpoint is already written), requeueing the SLURM job when the signal asks."""
        if not self._signalled(trainer):
            return
        requeue = self._requeue_wanted(trainer)
        rank_zero_info(f"Signal received during the epoch-end evaluation ({evaluation}): {checkpoint_path(trainer)} "
                       f"holds step {trainer.global_step}, saved before it; stopping")
        self._stop(trainer, requeue)


@contextlib.contextmanager
def epoch_end_evaluation(trainer: pl.Trainer, evaluation: str) -> Iterator[None]:
    """Run an evaluation at an epoch's end the preemption-safe way: the epoch's checkpoint first,
    then the evaluation, then stop if a signal came meanwhile (nothing to do without a
    `PreemptionCheckpoint` among the trainer's callbacks)."""
    callbacks = getattr(trainer, "callbacks", [])  # stand-in trainers of unit tests may have none
    guard = next((callback for callback in callbacks if isinstance(callback, PreemptionCheckpoint)), None)
    if guard is not None:
        guard.save_before_evaluation(trainer)
    yield
    if guard is not None:
        guard.stop_if_signalled(trainer, evaluation)


def _continue_in_new_batches(trainer: pl.Trainer, loader: ResumableDataLoader, state: dict[str, int]) -> None:
    """A position saved with another batch size or number of processes: say where the epoch goes on,
    and set Lightning's count of the epoch's batches to what that position is in this run's batches.

    Lightning ends an epoch when its count reaches the loader's length; the count it restored is
    in the interrupted run's batches, and would end the epoch early (larger batches: images left
    unseen) or late."""
    before = (state.get("world_size"), state.get("batch_size"))
    now = (loader.sampler.num_replicas, loader.batch_size)
    if None in before or before == now or state["epoch"] != trainer.current_epoch:
        return
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    shift = loader.batches_done() - progress.ready
    progress.ready, progress.started = progress.ready + shift, progress.started + shift
    progress.processed, progress.completed = progress.processed + shift, progress.completed + shift
    rank_zero_info(
        f"bam: resuming epoch {state['epoch']} at image {state['samples']} of {len(loader.dataset)} of its order, "
        f"saved by {before[0]} process(es) x batch {before[1]} (global {before[0] * before[1]}); this run: "
        f"{now[0]} x {now[1]} (global {now[0] * now[1]}), {len(loader) - loader.batches_done()} more batches "
        "this epoch, none of its images repeated or left out"
    )


def _resumable_loaders(trainer: pl.Trainer) -> list[ResumableDataLoader]:
    """The trainer's training loaders that can resume mid-epoch (any nesting of lists/dicts)."""
    pending, found = [trainer.train_dataloader], []
    while pending:
        item = pending.pop()
        if isinstance(item, ResumableDataLoader):
            found.append(item)
        elif isinstance(item, dict):
            pending.extend(reversed(list(item.values())))
        elif isinstance(item, (list, tuple)):
            pending.extend(reversed(item))
    return found


def checkpoint_path(trainer: pl.Trainer) -> str:
    """Where a preemption checkpoint goes: `last.ckpt` in the checkpoint directory, recorded as
    that callback's last checkpoint so a later save of its own overwrites it rather than adding
    `last-v1.ckpt`."""
    callback = trainer.checkpoint_callback
    if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
        path = os.path.join(callback.dirpath, callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION)
        callback.last_model_path = path
        return path
    return os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")


class DiskFullError(OSError):
    """A checkpoint could not be written because its file system is full."""

    def __init__(self, directory: Path) -> None:
        super().__init__(errno.ENOSPC, f"no space left on {directory}")
        self.directory = directory

    def __str__(self) -> str:
        return (f"no space left on {self.directory} (the last complete checkpoint there is kept; "
                "free some space and resume with --ckpt_path last)")


class AtomicCheckpointIO(SafeCheckpointIO):
    """Checkpoint writes that cannot leave a truncated file behind, whatever kills the process,
    and loads that are weights-only (see `SafeCheckpointIO`).

    The checkpoint is written to a temporary file in the destination's own directory, flushed to
    disk (fsync) and renamed over the destination (`os.replace`, atomic within one file system),
    then the directory entry is flushed. A reader sees the old file or the complete new one.
    Lightning's default writes through a temporary file in the system temp directory and moves
    it: across file systems (local /tmp, checkpoints on a shared file system: the usual cluster
    layout) that move is a copy, and a kill during the copy truncates the checkpoint. Remote
    (fsspec) paths keep Lightning's behaviour: object stores replace objects atomically.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_save(checkpoint, Path(path))


def atomic_save(obj: Any, path: Path) -> None:
    """`torch.save(obj, path)` through a same-directory temporary file, fsync and rename (see
    `atomic_write`)."""
    atomic_write(path, lambda file: torch.save(obj, file))


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """`write(file)` into a same-directory temporary file, then fsync and rename over `path`: a
    reader sees the old file or the complete new one, never a truncated one.

    The file gets the permissions the umask gives any new file (not the 0600 of `mkstemp`). A
    full file system raises `DiskFullError` naming the directory; the temporary file is removed
    and the previous file stays.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_writers_files(path)
    temporary, descriptor = _create_temporary(path)
    recorder = _ErrorRecordingFile(os.fdopen(descriptor, "wb"))
    try:
        with recorder.file as file:
            write(recorder)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if is_disk_full(error) or is_disk_full(recorder.error):
            raise DiskFullError(path.parent) from error
        raise
    _fsync_directory(path.parent)


def _create_temporary(path: Path) -> tuple[Path, int]:
    """`.<name>.<host>.<pid>.<random>.tmp` next to `path`, created exclusively with mode 0666 so
    the kernel applies the umask; the name says which writer may still be using it."""
    while True:
        temporary = path.with_name(f".{path.name}.{this_host()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return temporary, os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


def _remove_dead_writers_files(path: Path) -> None:
    """Remove temporary files of `path` left by writers that were killed (on this host); a live
    writer's file, or one from another host, is left alone."""
    prefix = f".{path.name}."
    for temporary in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        parts = temporary.name[len(prefix) : -len(".tmp")].rsplit(".", 2)
        if len(parts) == 3 and parts[1].isdigit() and writer_is_dead(parts[0], int(parts[1])):
            temporary.unlink(missing_ok=True)


class _ErrorRecordingFile:
    """A file whose write errors are remembered: torch's zip writer turns them into a generic
    RuntimeError ("unexpected pos"), which no longer says that the disk was full."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def is_disk_full(error: BaseException | None) -> bool:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (a crash of the machine could otherwise undo it)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems do not support syncing a directory; the rename still happened
    finally:
        os.close(descriptor)
