"""Training runs for the scale-out tests, as a script that DDP launchers can start.

`python tests/helpers/scale_worker.py --out DIR --scenarios equality,syncbn,preempt [--trainer.devices N
--trainer.num_nodes M]` trains tiny float64 BAM models on deterministic data and writes, from
rank 0, `DIR/<scenario>.pt` with the final student parameters and the losses of every step.
The same functions give the 1-process references inside the tests (imported, not launched).

Scenarios:
- equality: a ViT without batch norm (the gather-with-gradient path of the objective, no teacher).
- syncbn: a CNN with batch norm, converted to SyncBatchNorm when there are several processes.
- preempt: the equality run, interrupted by a signal to the last rank in the middle of an epoch,
  then resumed from `last.ckpt` in the same process; it must end like the equality run.
- interrupt: the equality run with a signal at step PREEMPT_AT_STEP, which ends the process (exit
  status 0); the same command run again resumes from `last.ckpt` (given `--ckpt_path last`),
  past that step, and completes.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from repo_paths import REPO  # this folder is on the path, as a script and under pytest
from torch.utils.data import TensorDataset

sys.path.insert(0, str(REPO))  # the repository, when run as a script

from bam.methods import BAMModule  # noqa: E402
from bam.data.resumable import ResumableDataLoader, ResumableSampler  # noqa: E402
from bam.training import AtomicCheckpointIO, CPUSyncBatchNorm, PreemptionCheckpoint  # noqa: E402

GLOBAL_BATCH = 8
NUM_IMAGES = 32  # 4 steps per epoch
EPOCHS = 2
HEAD = dict(projector=dict(hidden_dim=32, out_dim=16, num_layers=2))
MODELS: dict[str, dict[str, Any]] = {
    "vit": dict(backbone="vit_tiny_patch16_224",
                backbone_kwargs=dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2)),
    "cnn": dict(backbone="bam_cnn4", backbone_kwargs=dict(width=8)),
}
PREEMPT_AT_STEP = 5  # global step (epoch 1, second batch): mid-epoch, after a reshuffle


class DeterministicViews(pl.LightningDataModule):
    """Fixed random images, shuffled per epoch by `ResumableSampler`, cut into 2 global (16 px)
    + 2 local (8 px) views by deterministic crops and flips."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(NUM_IMAGES, 3, 16, 16, generator=generator)
        self.batch_size = batch_size

    def train_dataloader(self) -> ResumableDataLoader:
        dataset = TensorDataset(self.images, torch.zeros(NUM_IMAGES, dtype=torch.long))
        sampler = ResumableSampler(dataset, shuffle=True, seed=0, drop_last=True)
        return ResumableDataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        return [images, images.flip(-1), images[..., :8, :8], images[..., 8:, 8:]], labels


class RecordLosses(pl.Callback):
    """The loss of every step, averaged over processes (the single-process loss of the global batch)."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
        self.losses[trainer.global_step] = loss.item()


class SignalAt(pl.Callback):
    """Sends `signum` to this process at `step`, on the last rank only: the others must follow."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step and trainer.global_rank == trainer.world_size - 1:
            os.kill(os.getpid(), self.signum)


def make_trainer(run_dir: Path, devices: int, num_nodes: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    multi = devices * num_nodes > 1
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True)
    return pl.Trainer(
        accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy="ddp" if multi else "auto",
        precision="64-true", max_epochs=EPOCHS, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=run_dir, plugins=[AtomicCheckpointIO()],
        callbacks=[*callbacks, checkpoint, PreemptionCheckpoint()],
    )


def train(model_name: str, run_dir: Path, devices: int = 1, num_nodes: int = 1, interrupt_at: int | None = None,
          ckpt_path: str | None = None, signum: int = signal.SIGTERM) -> tuple[pl.Trainer, BAMModule, dict[int, float]]:
    """One fit of `EPOCHS` epochs at global batch `GLOBAL_BATCH`, from seed 0."""
    record = RecordLosses()
    callbacks: list[pl.Callback] = [record] + ([SignalAt(interrupt_at, signum)] if interrupt_at is not None else [])
    trainer = make_trainer(run_dir, devices, num_nodes, callbacks)
    pl.seed_everything(0, verbose=False)
    # Built in float64 directly: a float32 model would be converted only after a checkpoint is
    # loaded into it, rounding the restored weights to float32.
    with trainer.init_module():
        model = BAMModule(num_local_crops=2, warmup_epochs=0, stuck_loss_patience=0, **MODELS[model_name], **HEAD)
    data = DeterministicViews(GLOBAL_BATCH // (devices * num_nodes))
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer, model, record.losses


def result(model: BAMModule, losses: dict[int, float], **extra: Any) -> dict[str, Any]:
    params = {name: p.detach().clone() for name, p in model.student.state_dict().items()}
    return {"params": params, "losses": losses, **extra}


def run_scenario(name: str, out: Path, devices: int, num_nodes: int, ckpt_path: str | None, signum: int) -> None:
    run_dir = out / f"run_{name}"
    extra: dict[str, Any] = {}
    if name == "equality":
        trainer, model, losses = train("vit", run_dir, devices, num_nodes, ckpt_path=ckpt_path)
    elif name == "syncbn":
        trainer, model, losses = train("cnn", run_dir, devices, num_nodes, ckpt_path=ckpt_path)
        extra["sync_batchnorm_layers"] = sum(isinstance(m, CPUSyncBatchNorm) for m in model.modules())
    elif name == "preempt":
        try:
            train("vit", run_dir, devices, num_nodes, interrupt_at=PREEMPT_AT_STEP, ckpt_path=ckpt_path, signum=signum)
        except SystemExit as stop:  # the clean exit of PreemptionCheckpoint
            extra["exit_code"] = stop.code
        extra["checkpoint_step"] = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
        trainer, model, losses = train("vit", run_dir, devices, num_nodes, ckpt_path="last")
    elif name == "interrupt":
        trainer, model, losses = train("vit", run_dir, devices, num_nodes, PREEMPT_AT_STEP, ckpt_path, signum)
    else:
        raise ValueError(f"unknown scenario {name!r}")
    if trainer.is_global_zero:
        torch.save(result(model, losses, **extra), out / f"{name}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenarios", default="equality")
    parser.add_argument("--trainer.devices", dest="devices", type=int, default=1)
    parser.add_argument("--trainer.num_nodes", dest="num_nodes", type=int, default=1)
    parser.add_argument("--trainer.strategy", dest="strategy", default="ddp")  # passed by the launch scripts
    parser.add_argument("--ckpt_path", default=None)  # "last" from the launch scripts: a fresh run here
    parser.add_argument("--signal", default="SIGTERM", help="the signal of the preempt/interrupt scenarios")
    args = parser.parse_args()
    torch.set_num_threads(1)  # several processes share two cores in CI
    for name in args.scenarios.split(","):
        run_scenario(name, args.out, args.devices, args.num_nodes, args.ckpt_path, signal.Signals[args.signal])


if __name__ == "__main__":
    main()
