"""After a NaN, a resumable good state: no checkpoint holds a non-finite state, each records its
last loss, and the stop message names the newest sound checkpoint and the command resuming it."""
from __future__ import annotations

import math
import os
import shlex
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml

from bam.io import load_checkpoint_file
from bam.methods import BAMModule
from bam.training import AtomicCheckpointIO, PreemptionCheckpoint
from bam.training.health import (
    HEALTH_KEY,
    NonFiniteStateError,
    SoundCheckpoint,
    newest_sound_checkpoint,
    resume_command,
)
from cli_runs import NaNOnce, logged_losses, pretrain, run_bam
from repo_paths import REPO
from tiny_runs import TinyCropsDataModule

SMALL = dict(backbone="bam_cnn4", num_local_crops=2, projector=dict(hidden_dim=32, out_dim=16, num_layers=2))


class RecordLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = outputs["loss"].item()  # keyed by the step count after it


def _fit(tmp_path: Path, *callbacks: pl.Callback, max_steps: int = 6) -> tuple[pl.Trainer, Path]:
    directory = tmp_path / "checkpoints"
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=directory, save_last=True, every_n_train_steps=1, save_top_k=-1)
    trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()],
                         callbacks=[*callbacks, checkpoint, PreemptionCheckpoint()])
    trainer.fit(BAMModule(**SMALL), TinyCropsDataModule(num_images=32, batch_size=4))
    return trainer, directory


def test_each_checkpoint_records_its_step_last_loss_and_finiteness(tmp_path):
    record = RecordLosses()
    _, directory = _fit(tmp_path, record, max_steps=3)
    for step in (1, 2, 3):
        health = load_checkpoint_file(directory / f"epoch=0-step={step}.ckpt")[HEALTH_KEY]
        assert health == {"step": step, "last_loss": record.losses[step], "finite": True}


def test_a_non_finite_optimiser_state_is_never_checkpointed(tmp_path):
    # the NaN lands in Adam's second moments after step 3's update, when a checkpoint is due:
    # parameters and loss are still finite at that moment
    poison = NaNOnce(step=2, marker=str(tmp_path / "fired"), target="optimizer")
    with pytest.raises(NonFiniteStateError) as error:
        _fit(tmp_path, poison)
    directory = tmp_path / "checkpoints"
    assert sorted(p.name for p in directory.iterdir()) == ["epoch=0-step=1.ckpt", "epoch=0-step=2.ckpt", "last.ckpt"]
    assert load_checkpoint_file(directory / "last.ckpt")["global_step"] == 2
    message = str(error.value)
    assert "refusing to write a checkpoint at step 3" in message and "exp_avg_sq" in message
    assert error.value.checkpoint.path == directory / "epoch=0-step=2.ckpt"  # not last.ckpt: the next run rewrites it
    assert f"newest sound checkpoint is {directory / 'epoch=0-step=2.ckpt'} (step 2" in message


def _save(path: Path, step: int, weight: float, record: bool, mtime: float) -> None:
    checkpoint = {"global_step": step, "state_dict": {"w": torch.full((2,), weight)}, "optimizer_states": []}
    if record:
        checkpoint[HEALTH_KEY] = {"step": step, "last_loss": 1.5, "finite": True}
    torch.save(checkpoint, path)
    os.utime(path, (mtime, mtime))


def test_newest_sound_checkpoint_skips_broken_and_non_finite_files(tmp_path):
    _save(tmp_path / "old.ckpt", 2, 1.0, record=True, mtime=1000)
    _save(tmp_path / "before-records.ckpt", 4, 1.0, record=False, mtime=2000)  # checked tensor by tensor
    _save(tmp_path / "exploded.ckpt", 6, math.inf, record=False, mtime=3000)
    (tmp_path / "truncated.ckpt").write_bytes(b"PK\x03\x04 cut short")
    os.utime(tmp_path / "truncated.ckpt", (4000, 4000))
    assert newest_sound_checkpoint(tmp_path) == SoundCheckpoint(tmp_path / "before-records.ckpt", 4, None)
    _save(tmp_path / "last.ckpt", 4, 1.0, record=True, mtime=5000)  # same step: the named file wins
    assert newest_sound_checkpoint(tmp_path).path == tmp_path / "before-records.ckpt"
    _save(tmp_path / "last.ckpt", 5, 1.0, record=True, mtime=5000)  # a newer step: last.ckpt it is
    assert newest_sound_checkpoint(tmp_path) == SoundCheckpoint(tmp_path / "last.ckpt", 5, 1.5)
    assert newest_sound_checkpoint(tmp_path / "missing") is None


def test_resume_command_replaces_ckpt_path_and_lr_in_either_form():
    found = SoundCheckpoint(Path("runs/a b/epoch=0-step=4.ckpt"), 4, 2.0)
    argv = ["--config", "c.yaml", "--ckpt_path", "last", "--model.init_args.lr=1e6", "--trainer.max_epochs", "3"]
    assert resume_command("bam pretrain", argv, found, lr=1e6) == (
        "bam pretrain --config c.yaml --trainer.max_epochs 3 --ckpt_path 'runs/a b/epoch=0-step=4.ckpt' "
        "--model.init_args.lr=100000")
    argv = ["--ckpt_path=last", "--model.init_args.lr", "0.5"]
    assert resume_command("bam pretrain", argv, None, lr=0.5) == "bam pretrain --model.init_args.lr=0.05"


@pytest.mark.process
@pytest.mark.slow
def test_nan_stop_names_a_sound_checkpoint_whose_command_trains_on(tmp_path):
    run = tmp_path / "run"
    options = ["--checkpoint.every_n_train_steps=2", "--checkpoint.every_n_epochs=0",
               "--trainer.callbacks+=cli_runs.NaNOnce", "--trainer.callbacks.init_args.step=7",
               f"--trainer.callbacks.init_args.marker={tmp_path / 'fired'}"]
    first = pretrain(run, *options)
    assert first.returncode == 1, first.stdout[-3000:]
    named = run / "checkpoints" / "epoch=0-step=6.ckpt"
    assert "the loss became nan at step 7" in first.stdout
    assert f"The newest sound checkpoint is {named} (step 6" in first.stdout
    last_line = first.stdout.strip().splitlines()[-1]
    command = shlex.split(last_line)
    demo_lr = yaml.safe_load((REPO / "configs" / "pretrain" / "demo.yaml").read_text())["model"]["init_args"]["lr"]
    assert command[:2] == ["bam", "pretrain"] and command[-3:] == ["--ckpt_path", str(named),
                                                                    f"--model.init_args.lr={demo_lr / 10:g}"]
    state = load_checkpoint_file(named)
    assert all(torch.isfinite(value).all() for value in state["state_dict"].values() if value.is_floating_point())

    second = run_bam(command[1:])  # as the message says (this checkout's `bam`)
    assert second.returncode == 0, second.stdout[-3000:]
    losses = logged_losses(run, version="1")
    assert sorted(losses) == list(range(6, 12))  # from the named checkpoint's step to the end
    assert all(math.isfinite(loss) for loss in losses.values())
