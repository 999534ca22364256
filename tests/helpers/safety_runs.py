"""Tiny `bam` runs for the fail-safe tests: the console entry point in a subprocess of its own
session, so a hang is ended by killing its whole process group."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from processes import finish_process_group
from repo_paths import REPO

HANG_GUARD_S = 300  # only to turn a hang into a failure, not a performance limit

# a 4-layer CNN on the built-in digits, batch 8, a checkpoint every 2 steps
TINY_PRETRAIN = [
    "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    "--checkpoint.every_n_train_steps=2", "--checkpoint.every_n_epochs=null",
    "--knn.every_n_epochs=1000", "--precise_bn.enabled=false", "--plots.enabled=false",
    "--model=bam.methods.BAMModule", "--model.backbone=bam_cnn4", "--model.proj_hidden_dim=32",
    "--model.proj_out_dim=16", "--model.proj_layers=2", "--model.proj_batch_norm=true",
    "--model.lr=1e-3", "--model.warmup_epochs=10",
    "--data=bam.data.BuiltinDataModule", "--data.name=mnist", "--data.augment_on=device",
    "--data.batch_size=8", "--data.num_workers=0", "--data.crops.global_size=28",
    "--data.crops.num_local_crops=1", "--data.crops.local_size=14",
]


def bam_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def start_bam(args: list[str], **popen: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bam", *args], cwd=REPO, env=bam_env(), text=True,
                            start_new_session=True, **popen)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    """Wait for `process` (its whole group is killed if it hangs); (status, stdout, stderr)."""
    out, err = finish_process_group(process, HANG_GUARD_S)
    return process.returncode, out, err


def run_bam(args: list[str]) -> tuple[int, str, str]:
    return finish(start_bam(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE))


def pretrain(run_dir: Path, *extra: str) -> tuple[int, str, str]:
    return run_bam(["pretrain", *TINY_PRETRAIN, f"--trainer.default_root_dir={run_dir}", *extra])


def dead_pid() -> int:
    """The id of a process that has exited."""
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True, timeout=HANG_GUARD_S)
    return int(finished.stdout)
