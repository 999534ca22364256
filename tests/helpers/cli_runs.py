"""Real `bam pretrain` runs for tests: the demo shrunk on the command line, the losses its CSV
logs hold, and faults injected as callbacks that the command line adds:

    PYTHONPATH=<repo>:<repo>/tests bam pretrain ... \
        --trainer.callbacks+=cli_runs.SignalAtStep --trainer.callbacks.init_args.step=8
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from processes import finish_process_group
from repo_paths import REPO

# a demo config (BAM's by default; any method's demo), shrunk: 200 digits in batches of 32 (6 steps
# per epoch), 2 epochs, a small head, one loss row per step, no plots or pictures, k-NN only after the last epoch
SHRUNK_DEMO = ["--trainer.max_epochs=2", "--trainer.log_every_n_steps=1",
               "--trainer.enable_progress_bar=false", "--data.init_args.fraction=0.05", "--data.init_args.batch_size=32",
               "--model.init_args.projector.hidden_dim=64", "--model.init_args.projector.out_dim=32", "--knn.every_n_epochs=100",
               "--knn.compare_baselines=false", "--plots.enabled=false", "--pictures.enabled=false"]
DEMO = ["--config", "configs/pretrain/demo.yaml", *SHRUNK_DEMO]
DEMO_STEPS = 12


def bam_env(**extra: str) -> dict[str, str]:
    """The user's environment with this checkout (and the test helpers, for callbacks added on the
    command line) first on the path, whatever `bam` the virtual environment links to, and one
    thread per process: a fixed summation order, and 2 processes share 2 cores."""
    path = os.pathsep.join([str(REPO), str(REPO / "tests" / "helpers")])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)


def start_bam(args: list[str], *, cwd: Path = REPO, env: dict[str, str] | None = None,
              **popen: Any) -> subprocess.Popen:
    """`bam ARGS` started as a user starts it (`python -m bam`, this checkout), in a session of its
    own so that its whole process group can be signalled (Ctrl-C) or killed (a hang); for a run
    the test talks to while it runs (wrap it in `processes.process_group`)."""
    return subprocess.Popen([sys.executable, "-m", "bam", *args], cwd=cwd, env=env or bam_env(), text=True,
                            start_new_session=True, **popen)


def run_bam(args: list[str], *, separate_stderr: bool = False, cwd: Path = REPO,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`bam ARGS` run to its end: output and errors together in `stdout` (or apart, with
    `separate_stderr`); a hang is ended by pytest-timeout, and the whole process group with it."""
    return finish_bam(start_bam(args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE if separate_stderr else subprocess.STDOUT))


def finish_bam(process: subprocess.Popen) -> subprocess.CompletedProcess:
    """The end of a run that `start_bam` started: its status and piped output."""
    out, err = finish_process_group(process)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def pretrain(run_dir: Path, *options: str, config: str = "demo") -> subprocess.CompletedProcess:
    """`bam pretrain` of the shrunk demo (`configs/pretrain/<config>.yaml`) into `run_dir`, with
    `options` appended."""
    demo = ["--config", f"configs/pretrain/{config}.yaml", *SHRUNK_DEMO]
    return run_bam(["pretrain", *demo, f"--trainer.default_root_dir={run_dir}", *options])


def logged_losses(run_dir: Path, version: str = "*") -> dict[int, float]:
    """`train/loss` by step in the CSV logs of `run_dir` (one `version_N` per start; all of them
    by default); a step logged twice is an error."""
    losses: dict[int, float] = {}
    for path in sorted(run_dir.glob(f"csv/version_{version}/metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("train/loss"):
                step = int(row["step"])
                assert step not in losses, f"step {step} logged twice ({path})"
                losses[step] = float(row["train/loss"])
    return losses


class SignalAtStep(pl.Callback):
    """Sends `signal_name` to this process when global step `step` starts (as a preemption would)."""

    def __init__(self, step: int, signal_name: str = "SIGTERM") -> None:
        self.step, self.signum = step, signal.Signals[signal_name]

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class NaNOnce(pl.Callback):
    """A transient fault: at global step `step`, a NaN lands in the student's projector, once.

    `marker` is created when it fires; a run that finds it (the resumed one) is left alone, like
    a fault that does not recur. `target="optimizer"` puts the NaN into the optimiser's moments
    after the step instead (parameters and loss stay finite until the next step).
    """

    def __init__(self, step: int, marker: str, target: str = "weights") -> None:
        if target not in ("weights", "optimizer"):
            raise ValueError(f"target must be 'weights' or 'optimizer', got {target!r}")
        self.step, self.marker, self.target = step, Path(marker), target

    def _fires(self, trainer: pl.Trainer, step: int) -> bool:
        if trainer.global_step != step or self.marker.exists():
            return False
        self.marker.touch()
        return True

    @torch.no_grad()
    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.target == "weights" and self._fires(trainer, self.step):
            next(module.student.projector.parameters()).fill_(float("nan"))

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # global_step already counts this batch's optimiser step here
        if self.target == "optimizer" and self._fires(trainer, self.step + 1):
            state = trainer.optimizers[0].state
            next(iter(state.values()))["exp_avg_sq"].fill_(float("nan"))


class RecordCheckpointIO(pl.Callback):
    """Writes the qualified class name of the checkpoint I/O plugin that the run really uses to `path`."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        plugin = type(trainer.strategy.checkpoint_io)
        self.path.write_text(f"{plugin.__module__}.{plugin.__qualname__}")


class RecordTrainedImages(pl.Callback):
    """Appends the dataset indices of every batch the run trains on to `path` ("epoch: i j k ...",
    one line per batch): the device path's batches carry them until `on_after_batch_transfer`
    turns them into views, which happens for the batch about to be trained, never a prefetched one."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        augment = datamodule.on_after_batch_transfer

        def recording(batch: Any, dataloader_idx: int) -> Any:
            if trainer.training and len(batch) == 3:
                with self.path.open("a") as file:
                    file.write(f"{trainer.current_epoch}: {' '.join(map(str, batch[2].tolist()))}\n")
            return augment(batch, dataloader_idx)

        datamodule.on_after_batch_transfer = recording


def trained_images(path: Path) -> list[tuple[int, list[int]]]:
    """(epoch, dataset indices) of each batch `RecordTrainedImages` wrote to `path`, in order."""
    rows = [line.split(":") for line in path.read_text().splitlines()]
    return [(int(epoch), [int(index) for index in indices.split()]) for epoch, indices in rows]


class SignalDuringEvaluation(pl.Callback):
    """Sends `signal_name` to this process when the first epoch-end evaluation at or after global
    step `step` asks for its images (precise batch norm and k-NN both read the k-NN loaders), and
    writes to `record` the step of the `last.ckpt` on disk at that moment (null: none)."""

    def __init__(self, step: int, record: str, signal_name: str = "SIGTERM") -> None:
        self.step, self.record, self.signum = step, Path(record), signal.Signals[signal_name]

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        loaders = datamodule.knn_dataloaders

        def signalling() -> Any:
            if trainer.global_step >= self.step and not self.record.exists():
                last = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
                step = torch.load(last, weights_only=True)["global_step"] if last.exists() else None
                self.record.write_text(str(step))
                os.kill(os.getpid(), self.signum)
            return loaders()

        datamodule.knn_dataloaders = signalling


def printed_pretrain_config(config: Path, capsys: Any) -> dict[str, Any]:
    """What `bam pretrain --config CONFIG --print_config` prints, parsed (in this process; an
    ImageFolder recipe is given a root, which printing does not read)."""
    import yaml
    from bam.cli import main as bam_main

    argv = ["pretrain", "--config", str(config), "--print_config"]
    if "ImageFolder" in config.read_text():
        argv += ["--data.init_args.root", "/nonexistent"]
    try:
        bam_main(argv)
    except SystemExit as done:
        assert done.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)
