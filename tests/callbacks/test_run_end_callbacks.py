"""The callbacks that close a run, on stand-in trainers (no fitting): when an epoch end is the last
one (`is_final_epoch_end`), the file report written by `FileReport`, and what
`pretrain_trainer_arguments` hands a Python user's Trainer."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

import bam
from bam.callbacks import FileReport, OnlineKNN, PreciseBatchNorm
from bam.callbacks.training_end import is_final_epoch_end
from bam.data.file_report import FileStatuses, skip_code
from bam.training.fault_tolerance import PreemptionCheckpoint, RunCheckpoint
from bam.training.plots import CurvePlots


def stand_in(should_stop=False, max_steps=-1, global_step=0, max_epochs=None, current_epoch=0) -> SimpleNamespace:
    return SimpleNamespace(should_stop=should_stop, max_steps=max_steps, global_step=global_step,
                           max_epochs=max_epochs, current_epoch=current_epoch)


# (trainer state, is it the last epoch end?) worked out by hand from Lightning's stopping rules:
# fitting stops when asked to, at `max_steps` optimiser steps, or after `max_epochs` epochs
# (epochs count from 0); -1 and None mean "no limit".
FINAL_EPOCH_CASES = [
    (dict(should_stop=True), True),
    (dict(should_stop=True, max_epochs=100, current_epoch=3), True),
    (dict(max_steps=12, global_step=12), True),
    (dict(max_steps=12, global_step=11), False),
    (dict(max_steps=12, global_step=11, max_epochs=3, current_epoch=2), True),
    (dict(max_steps=None, max_epochs=4, current_epoch=3), True),
    (dict(max_steps=None, max_epochs=4, current_epoch=2), False),
    (dict(max_epochs=4, current_epoch=3), True),
    (dict(max_epochs=4, current_epoch=2), False),
    (dict(max_epochs=1, current_epoch=0), True),
    (dict(max_epochs=-1, current_epoch=50), False),
    (dict(max_epochs=None, current_epoch=50, max_steps=None), False),
    (dict(max_steps=-1, global_step=10**6, max_epochs=None), False),
]


@pytest.mark.parametrize("state, final", FINAL_EPOCH_CASES)
def test_final_epoch_end_follows_the_trainers_stopping_rules(state, final):
    assert is_final_epoch_end(stand_in(**state)) is final


# ------------------------------------------------------------------------------------------ FileReport
class ListedData:
    def __init__(self, statuses):
        self._statuses = statuses

    def file_statuses(self):
        return self._statuses


def report_trainer(run_dir, datamodule, global_zero=True) -> SimpleNamespace:
    return SimpleNamespace(datamodule=datamodule, default_root_dir=str(run_dir),
                           strategy=SimpleNamespace(root_device=torch.device("cpu")), is_global_zero=global_zero)


def two_listings() -> list[FileStatuses]:
    first = FileStatuses([f"a/{i}.jpg" for i in range(5)], unsupported=[4])
    for position in (0, 1):
        first.mark(position, 1)  # read
    first.mark(2, skip_code("empty"))
    second = FileStatuses([f"b/{i}.jpg" for i in range(3)])
    second.mark(0, 1)
    second.mark(1, skip_code("undecodable"))
    return [first, second, first]  # the same listing twice counts once


def test_file_report_writes_the_summed_counts_and_the_skipped_paths(tmp_path, capsys):
    FileReport().on_fit_end(report_trainer(tmp_path, ListedData(two_listings())), None)
    # counted here: a/0, a/1, b/0 read; a/2 empty, b/1 undecodable, a/4 unsupported; a/3, b/2 never needed
    text = (tmp_path / "file_report.json").read_text()
    files = json.loads(text)["files"]
    assert text == json.dumps({"files": files}, indent=2)  # indented for people to read
    assert files == {"found": 8, "read": 3, "skipped": 3, "not_read": 2,
                     "skipped_by_reason": {"empty": 1, "undecodable": 1, "too_many_pixels": 0, "unsupported": 1, "already_listed": 0},
                     "skipped_log": str(tmp_path / "skipped_files.tsv")}
    assert sorted((tmp_path / "skipped_files.tsv").read_text().splitlines()) == [
        "empty\ta/2.jpg", "undecodable\tb/1.jpg", "unsupported\ta/4.jpg"]
    assert "files: 8 found, 3 read, 3 skipped" in capsys.readouterr().out


def test_file_report_is_written_by_rank_zero_only_and_not_when_disabled(tmp_path):
    FileReport().on_fit_end(report_trainer(tmp_path / "other_rank", ListedData(two_listings()), False), None)
    assert not (tmp_path / "other_rank" / "file_report.json").exists()
    FileReport(enabled=False).on_fit_end(report_trainer(tmp_path / "off", ListedData(two_listings())), None)
    assert not (tmp_path / "off").exists()


def test_data_without_files_on_disk_has_no_file_report(tmp_path):
    FileReport().on_fit_end(report_trainer(tmp_path, SimpleNamespace()), None)  # no file_statuses()
    FileReport().on_fit_end(report_trainer(tmp_path, ListedData([None])), None)  # in-memory sources
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ pretrain_trainer_arguments
def test_pretrain_trainer_arguments_defaults_write_under_runs_pretrain():
    extras = bam.pretrain_trainer_arguments()
    assert extras["default_root_dir"] == os.path.join("runs", "pretrain")
    checkpoint, *_ = extras["callbacks"]
    # the relative default is resolved against the working directory, whichever it is
    assert checkpoint.dirpath == os.path.abspath(os.path.join("runs", "pretrain", "checkpoints"))
    assert (checkpoint.save_last, checkpoint.save_top_k) == (True, -1)
    knn = next(callback for callback in extras["callbacks"] if isinstance(callback, OnlineKNN))
    assert (knn.every_n_epochs, knn.compare_baselines) == (1, False)
    loggers = extras["logger"]
    assert [(type(logger), logger.save_dir, logger.name) for logger in loggers] == [
        (CSVLogger, os.path.join("runs", "pretrain"), "csv"),
        (TensorBoardLogger, os.path.join("runs", "pretrain"), "tensorboard")]


def test_pretrain_trainer_arguments_options_reach_the_callbacks(tmp_path):
    extras = bam.pretrain_trainer_arguments(str(tmp_path), knn_every_n_epochs=5, compare_baselines=True)
    knn = next(callback for callback in extras["callbacks"] if isinstance(callback, OnlineKNN))
    assert (knn.every_n_epochs, knn.compare_baselines) == (5, True)
    precise = next(callback for callback in extras["callbacks"] if isinstance(callback, PreciseBatchNorm))
    assert precise.enabled


@pytest.mark.parametrize("off, left_out", [("knn", OnlineKNN), ("precise_bn", PreciseBatchNorm), ("plots", CurvePlots)])
def test_pretrain_trainer_arguments_leave_out_what_is_switched_off(tmp_path, off, left_out):
    kinds = [type(callback) for callback in bam.pretrain_trainer_arguments(str(tmp_path), **{off: False})["callbacks"]]
    everything = [RunCheckpoint, PreciseBatchNorm, OnlineKNN, PreemptionCheckpoint, CurvePlots]
    assert kinds == [kind for kind in everything if kind is not left_out]


def test_pretrain_trainer_arguments_without_loggers_leave_the_logger_to_the_caller(tmp_path):
    assert "logger" not in bam.pretrain_trainer_arguments(str(tmp_path), loggers=False)


def test_the_old_name_trainer_extras_still_answers_with_one_warning(tmp_path):
    with pytest.warns(FutureWarning, match=r"^bam.trainer_extras is now called bam.pretrain_trainer_arguments "):
        old = bam.trainer_extras(str(tmp_path), loggers=False)
    new = bam.pretrain_trainer_arguments(str(tmp_path), loggers=False)
    assert [type(callback) for callback in old["callbacks"]] == [type(callback) for callback in new["callbacks"]]
