"""End-of-run report of the image files a pretraining run read (see `bam.data.file_report`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl

from bam.data.file_report import SKIPPED_LOG, report_files

REPORT_FILE = "file_report.json"


class FileReport(pl.Callback):
    """At the end of fitting, one line with the files found, read and skipped (by reason), summed
    over every process and DataLoader worker; also `<run dir>/file_report.json` (field `files`)
    and the skipped paths in `<run dir>/skipped_files.tsv`.

    Training replaces an unreadable image by the next readable one (batches keep their size), so
    this report is where skipped files show. Data modules without files on disk (built-in
    datasets, FFCV files) have nothing to report.

    Args:
        enabled: Report at the end of fitting.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        statuses = getattr(trainer.datamodule, "file_statuses", None)
        if not self.enabled or statuses is None:
            return
        run_dir = Path(trainer.default_root_dir)
        # every rank; on the root device: Lightning has moved the module to the CPU by now
        files = report_files(statuses(), run_dir / SKIPPED_LOG, trainer.strategy.root_device)
        if files is not None and trainer.is_global_zero:
            (run_dir / REPORT_FILE).write_text(json.dumps({"files": files}, indent=2))
