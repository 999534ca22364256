"""The spawned side of tests/data/test_file_report.py's count over processes: a module of its own,
so that each spawned process imports torch and bam's data code alone, not the test module's
Lightning, FFCV and evaluation imports."""
from __future__ import annotations

import json
from pathlib import Path

import torch.distributed

from bam.data.file_report import FileStatuses, count_file_statuses
from bam.data.sources import ImageFiles


def count_file_statuses_of_two_ranks(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Rank 0 reads a.png and bad.png, rank 1 a.png and b.png, of out_dir/files/ (never.png and a
    `notes` file of no image type are listed too); each writes the summed counts to summary<rank>.json."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    folder = Path(out_dir) / "files"
    paths = [str(folder / name) for name in ("a.png", "b.png", "bad.png", "never.png")]
    files = ImageFiles(paths, [0, 1, 2, 3], statuses=FileStatuses([*paths, str(folder / "notes")], unsupported=[4]))
    files = files.dropping_unreadable()
    for index in ((0, 2) if rank == 0 else (0, 1)):  # both read a.png: counted once
        files[index]
    summary = count_file_statuses([files.statuses])
    (Path(out_dir) / f"summary{rank}.json").write_text(json.dumps(summary))
    torch.distributed.destroy_process_group()
