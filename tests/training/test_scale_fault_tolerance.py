"""Fault tolerance: stop on a signal with a checkpoint and resume exactly; atomic checkpoint
writes under SIGKILL; a non-finite loss leaves the last good checkpoint untouched."""
from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

import scale_worker
from bam.methods import BAMModule, NonFiniteLossError
from bam.training import AtomicCheckpointIO, PreemptionCheckpoint, atomic_save
from cli_runs import bam_env
from processes import process_group, run_process_group
from repo_paths import REPO
from tiny_runs import TinyCropsDataModule

def _run(command: list[str]) -> subprocess.CompletedProcess:
    return run_process_group(command, cwd=REPO, env=bam_env())


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.process
@pytest.mark.slow
def test_signal_mid_epoch_exits_cleanly_and_the_same_command_resumes_at_that_step(tmp_path):
    command = [sys.executable, str(REPO / "tests" / "helpers" / "scale_worker.py"), "--out", str(tmp_path),
               "--scenarios", "interrupt", "--ckpt_path", "last", "--signal", "SIGUSR1"]
    checkpoint = tmp_path / "run_interrupt" / "checkpoints" / "last.ckpt"

    first = _run(command)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = torch.load(checkpoint, weights_only=False)
    # The signal came during step 6, the 2nd of the 4 batches of epoch 1: saved right after it.
    assert saved["global_step"] == scale_worker.PREEMPT_AT_STEP + 1
    assert saved["epoch"] == 1
    assert not (tmp_path / "interrupt.pt").exists()  # the run stopped before finishing

    second = _run(command)  # exactly the same command
    assert second.returncode == 0, second.stderr[-3000:]
    resumed = torch.load(tmp_path / "interrupt.pt", weights_only=False)
    assert sorted(resumed["losses"]) == [7, 8]  # continued at the next batch, not at the epoch start

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the worker, so that even the summation order is the same
    try:
        _, model, losses = scale_worker.train("vit", tmp_path / "uninterrupted")
    finally:
        torch.set_num_threads(threads)
    for step in (7, 8):
        assert resumed["losses"][step] == pytest.approx(losses[step], abs=1e-12)
    for name, value in model.student.state_dict().items():
        torch.testing.assert_close(resumed["params"][name], value, rtol=0, atol=1e-12)


KILLED_WRITER = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from bam.training import AtomicCheckpointIO

    real_fdopen = os.fdopen

    class SlowFile:
        # Writes through, then stops for good after the first megabyte: "killed while writing".
        def __init__(self, file):
            self.file, self.written = file, 0
        def write(self, data):
            count = self.file.write(data)
            self.written += count
            if self.written > 2**20:
                self.file.flush()
                print("writing", flush=True)
                time.sleep(600)
            return count
        def __getattr__(self, name):
            return getattr(self.file, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

    os.fdopen = lambda *args, **kwargs: SlowFile(real_fdopen(*args, **kwargs))
    AtomicCheckpointIO().save_checkpoint({"state": torch.ones(2**22), "step": 2}, sys.argv[1])
    """
)


@pytest.mark.process
def test_checkpoint_killed_while_writing_leaves_the_previous_one_intact(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state": torch.zeros(4), "step": 1}, path)
    before = _digest(path)

    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], env=bam_env(), stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    with process_group(writer):  # a failed assertion or a hang (pytest-timeout) leaves no writer behind
        assert writer.stdout.readline().strip() == "writing"
        temporary = list(path.parent.glob(".last.ckpt.*.tmp"))
        assert len(temporary) == 1 and temporary[0].stat().st_size > 2**20  # really mid-write
    writer.send_signal(signal.SIGKILL)
    writer.wait()

    assert _digest(path) == before
    assert torch.load(path, weights_only=True)["step"] == 1
    AtomicCheckpointIO().save_checkpoint({"state": torch.zeros(4), "step": 3}, path)  # the next save works
    assert torch.load(path, weights_only=True)["step"] == 3
    assert not list(path.parent.glob("*.tmp"))  # and removed the killed writer's temporary file


def test_atomic_save_cleans_up_when_serialisation_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_save({"step": 1}, path)
    with pytest.raises(Exception):
        atomic_save({"step": 2, "unpicklable": lambda: None}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class PoisonAt(pl.Callback):
    """Makes the loss NaN from `step` on; remembers the checkpoint's bytes just before that step."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        self.step, self.checkpoint = step, checkpoint
        self.digest_before: str | None = None
        self.last_finite: float | None = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.last_finite = outputs["loss"].item()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.digest_before = _digest(self.checkpoint)
            with torch.no_grad():
                module.student.projector[0].weight.fill_(float("nan"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model = BAMModule(backbone="bam_cnn4", num_local_crops=2, projector=dict(hidden_dim=32, out_dim=16, num_layers=2))
    directory = tmp_path / "checkpoints"
    poison = PoisonAt(step=3, checkpoint=directory / "last.ckpt")
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=directory, save_last=True, every_n_train_steps=1, save_top_k=-1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()],
                         callbacks=[poison, checkpoint, PreemptionCheckpoint()])
    with pytest.raises(NonFiniteLossError) as error:
        trainer.fit(model, TinyCropsDataModule(num_images=32, batch_size=4))
    assert f"at step 3 (last finite loss: {poison.last_finite})" in str(error.value)
    assert _digest(directory / "last.ckpt") == poison.digest_before
    assert torch.load(directory / "last.ckpt", weights_only=False)["global_step"] == 3
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        ["last.ckpt", "epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt"]
    )


SLURM_TASK = {"SLURM_JOB_ID": "77", "SLURM_JOB_NAME": "bam", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
              "SLURM_NNODES": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}


@pytest.mark.parametrize(("signum", "requeues"), [(signal.SIGUSR1, 1), (signal.SIGTERM, 0)], ids=["SIGUSR1", "SIGTERM"])
def test_slurm_requeue_comes_after_the_complete_checkpoint(tmp_path, monkeypatch, signum, requeues):
    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    seen = []

    def requeue() -> bool:  # instead of scontrol: look at what is on disk at that moment
        seen.append(torch.load(checkpoint, weights_only=False)["global_step"])
        return True

    monkeypatch.setattr("bam.training.fault_tolerance.requeue_slurm_job", requeue)
    with pytest.raises(SystemExit) as stop:
        scale_worker.train("vit", tmp_path, interrupt_at=scale_worker.PREEMPT_AT_STEP, signum=signum)
    assert stop.value.code in (None, 0)
    assert seen == [scale_worker.PREEMPT_AT_STEP + 1] * requeues
    assert torch.load(checkpoint, weights_only=False)["global_step"] == scale_worker.PREEMPT_AT_STEP + 1



def test_bam_pretrain_handles_the_preemption_signals_by_default(monkeypatch, capsys):
    """The signals `bam pretrain` saves and stops on, from its own configuration; that a run really
    saves through AtomicCheckpointIO is checked on a `bam pretrain` run by
    test_signal_during_evaluation.py::test_a_sigterm_during_the_last_epochs_evaluation_stops_after_saving_first."""
    from bam.pretrain import main

    monkeypatch.setattr(sys, "argv", ["bam"])
    with pytest.raises(SystemExit):
        main(["--model", "BAMModule", "--data", "BuiltinDataModule", "--print_config"])
    assert "preemption:\n  signals:\n  - SIGTERM\n  - SIGUSR1\n" in capsys.readouterr().out
