"""Tiny `bam` runs for the fail-safe tests, started by cli_runs.run_bam (the one way tests start bam)."""
from __future__ import annotations

from pathlib import Path

import pytest
from cli_runs import run_bam
from shared_runs import made_once

from bam.training.run_folder import LOCK_NAME

# a 4-layer CNN on the built-in digits, batch 8, a checkpoint every 2 steps
TINY_PRETRAIN = [
    "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    "--checkpoint.every_n_train_steps=2", "--checkpoint.every_n_epochs=null",
    "--knn.every_n_epochs=1000", "--precise_bn.enabled=false", "--plots.enabled=false",
    "--model=bam.methods.BAMModule", "--model.backbone=bam_cnn4", "--model.projector.hidden_dim=32",
    "--model.projector.out_dim=16", "--model.projector.num_layers=2", "--model.projector.batch_norm=true",
    "--model.lr=1e-3", "--model.warmup_epochs=10",
    "--data=bam.data.BuiltinDataModule", "--data.name=mnist", "--data.augment_on=device",
    "--data.batch_size=8", "--data.num_workers=0", "--data.crops.global_size=28",
    "--data.crops.num_local_crops=1", "--data.crops.local_size=14",
]


def pretrain(run_dir: Path, *extra: str) -> tuple[int, str, str]:
    """(status, stdout, stderr) of a tiny `bam pretrain` into `run_dir`, with `extra` appended."""
    done = run_bam(["pretrain", *TINY_PRETRAIN, f"--trainer.default_root_dir={run_dir}", *extra], separate_stderr=True)
    return done.returncode, done.stdout, done.stderr


EMPTY_LOCK_KNN_ARGS = ("--trainer.max_steps=3", "--knn.compare_baselines=true", "--data.knn_bank_fraction=0.1")


def empty_lock_knn_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny `bam pretrain` (EMPTY_LOCK_KNN_ARGS) into a folder holding an empty run lock (what a
    full disk left behind), ended by `max_steps` with the k-NN baselines on; made once per session
    for the stuck-lock and the k-NN report tests. Its output is in `stdout.txt` and `stderr.txt`."""

    def make(run_dir: Path) -> None:
        run_dir.mkdir(parents=True)
        (run_dir / LOCK_NAME).write_bytes(b"")
        status, out, err = pretrain(run_dir, *EMPTY_LOCK_KNN_ARGS)
        assert status == 0, err[-3000:]
        (run_dir / "stdout.txt").write_text(out)
        (run_dir / "stderr.txt").write_text(err)

    return made_once(tmp_path_factory, "empty_lock_knn_run", make)


def dead_pid() -> int:
    """The id of no process on this host (Linux /proc): the highest free one, as the kernel hands
    ids out upwards and wraps only at its limit, it stays free for a test's seconds. Found without
    starting a process, so that the lock tests stay in-process."""
    limit = int(Path("/proc/sys/kernel/pid_max").read_text())
    return next(pid for pid in range(limit - 1, 1, -1) if not Path(f"/proc/{pid}").exists())
