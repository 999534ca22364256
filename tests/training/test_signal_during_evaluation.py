"""Issue 27, item 7: a signal during the epoch-end evaluations (precise batch norm, online k-NN).
The epoch's checkpoint is written before they start, and a SIGTERM that arrives during them stops
the run with that checkpoint named (exit 0), also in the last epoch, where nothing used to act on
it; the same command with `--ckpt_path last` then goes on with the next epoch. The first run also
records the checkpoint I/O that `bam pretrain` really saves with (atomic writes, issue #5's fault
tolerance; test_scale_fault_tolerance checks the writes themselves in-process)."""
from __future__ import annotations

import pytest
import torch

from bam.training import AtomicCheckpointIO
from cli_runs import DEMO_STEPS, logged_losses, pretrain

STEPS_PER_EPOCH = DEMO_STEPS // 2


def signal_during_evaluation(run_dir, record, step: int, *options: str):
    return pretrain(run_dir, "--ckpt_path=last", "--trainer.callbacks+=cli_runs.SignalDuringEvaluation",
                    f"--trainer.callbacks.init_args.step={step}", f"--trainer.callbacks.init_args.record={record}",
                    *options)


@pytest.mark.process
def test_a_sigterm_during_the_last_epochs_evaluation_stops_after_saving_first(tmp_path):
    record, checkpoint_io = tmp_path / "saved_when_signalled.txt", tmp_path / "checkpoint_io.txt"
    # one epoch, the last: its evaluation is the run's final one
    run = signal_during_evaluation(tmp_path / "run", record, STEPS_PER_EPOCH, "--trainer.max_epochs=1",
                                   "--trainer.callbacks+=cli_runs.RecordCheckpointIO",
                                   f"--trainer.callbacks.init_args.path={checkpoint_io}")
    assert run.returncode == 0, run.stdout[-3000:]
    assert checkpoint_io.read_text().rsplit(".", 1)[-1] == AtomicCheckpointIO.__name__  # what `bam pretrain` saves with
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))  # no temporary file left behind
    assert record.read_text() == str(STEPS_PER_EPOCH)  # last.ckpt of the final step was on disk before the evaluation
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert (f"Signal received during the epoch-end evaluation (precise batch norm): {last} holds step "
            f"{STEPS_PER_EPOCH}, saved before it; stopping") in run.stdout
    assert "k-NN (k=20)" not in run.stdout  # the run stopped instead of evaluating on
    assert torch.load(last, weights_only=True)["global_step"] == STEPS_PER_EPOCH


@pytest.mark.process
def test_a_sigterm_during_a_mid_run_knn_stops_and_the_same_command_resumes_with_the_next_epoch(tmp_path):
    record = tmp_path / "saved_when_signalled.txt"
    knn_every_epoch = ["--knn.every_n_epochs=1", "--precise_bn.enabled=false"]
    first = signal_during_evaluation(tmp_path / "run", record, STEPS_PER_EPOCH, *knn_every_epoch)
    assert first.returncode == 0, first.stdout[-3000:]
    assert record.read_text() == str(STEPS_PER_EPOCH)
    assert "Signal received during the epoch-end evaluation (k-NN)" in first.stdout
    assert sorted(logged_losses(tmp_path / "run")) == list(range(STEPS_PER_EPOCH))  # stopped before epoch 1

    second = signal_during_evaluation(tmp_path / "run", record, STEPS_PER_EPOCH, *knn_every_epoch)
    assert second.returncode == 0, second.stdout[-3000:]
    assert sorted(logged_losses(tmp_path / "run")) == list(range(DEMO_STEPS))  # epoch 1 once, nothing repeated
    assert "k-NN (k=20) on the held-out split" in second.stdout
