"""What happened to every image file a run listed: read, skipped (and why), or never needed.

A ``FileStatuses`` holds one status code per listed file in shared memory, so the reads made by
DataLoader worker processes land in the statuses of the process that owns the loader. At the end
of a conversion, an evaluation stage or a pretraining run, ``count_file_statuses`` merges the
statuses of every process (a collective: call it on every rank) into counts; ``report_files``
then prints them as one line on rank 0, writes the skipped paths to a log file and returns the
``files`` field the stage stores in its JSON results.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from bam.ops.distributed import all_reduce_, rank

# why a file was skipped; its status code is 2 + its position here (0: not read yet, 1: read)
# (``already_listed``: a link to a folder or file the listing met before, e.g. a loop to a parent)
SKIP_REASONS = ("empty", "undecodable", "too_many_pixels", "unsupported", "already_listed")
NOT_READ, READ = 0, 1
SKIPPED_LOG = "skipped_files.tsv"


def skip_code(reason: str) -> int:
    """Status code of a file skipped for ``reason`` (one of ``SKIP_REASONS``)."""
    return 2 + SKIP_REASONS.index(reason)


class FileStatuses:
    """One status code per file of a listing, shared with DataLoader workers.

    Args:
        paths: Every file the listing found, also those it will not try to read.
        unsupported: Positions in ``paths`` of files that are not images bam reads (wrong or no
            extension): counted as skipped from the start.
        already_listed: Positions in ``paths`` of links to a folder or file listed before, left
            out: counted as skipped from the start.
    """

    def __init__(self, paths: Sequence[str], unsupported: Iterable[int] = (), already_listed: Iterable[int] = ()) -> None:
        self.paths = list(paths)
        # shared memory: workers (forked or spawned) write into the parent's buffer
        self.status = torch.zeros(len(self.paths), dtype=torch.uint8).share_memory_()
        self.status[list(unsupported)] = skip_code("unsupported")
        self.status[list(already_listed)] = skip_code("already_listed")

    def __len__(self) -> int:
        return len(self.paths)

    def mark(self, position: int, code: int) -> None:
        self.status[position] = code

    def skipped(self, position: int) -> bool:
        return int(self.status[position]) > READ


def count_file_statuses(listings: Iterable[Optional[FileStatuses]], device: torch.device | str = "cpu") -> Optional[dict[str, Any]]:
    """Counts of the distinct files of ``listings`` over every process; None without any listing.

    Collective under ``torch.distributed``: every rank must call it with the same listings (it
    takes each file's highest status over processes, so a file one process read and another never
    needed counts once as read). ``device`` must suit the process group's backend (CUDA for NCCL).

    Returns:
        ``found``, ``read``, ``skipped``, ``skipped_by_reason``, ``not_read`` (listed but never
        needed, e.g. outside a ``fraction``) and ``skipped_files`` (``[reason, path]`` pairs).
    """
    unique = list({id(listing): listing for listing in listings if listing is not None}.values())
    if not unique:
        return None
    codes = [all_reduce_(listing.status.to(device, torch.int32), "max").cpu() for listing in unique]
    status = torch.cat(codes)
    paths = [path for listing in unique for path in listing.paths]
    counts = torch.bincount(status, minlength=2 + len(SKIP_REASONS)).tolist()
    by_reason = {reason: counts[skip_code(reason)] for reason in SKIP_REASONS}
    return {
        "found": len(paths),
        "read": counts[READ],
        "skipped": sum(by_reason.values()),
        "skipped_by_reason": by_reason,
        "not_read": counts[NOT_READ],
        "skipped_files": [[SKIP_REASONS[code - 2], paths[i]] for i, code in enumerate(status.tolist()) if code > READ],
    }


def format_file_counts(summary: dict[str, Any], log: Optional[Path] = None) -> str:
    """One line: ``files: 62 found, 60 read, 2 skipped (1 empty, 1 undecodable); paths in LOG``."""
    line = f"files: {summary['found']} found, {summary['read']} read, {summary['skipped']} skipped"
    reasons = [f"{count} {reason.replace('_', ' ')}" for reason, count in summary["skipped_by_reason"].items() if count]
    if reasons:
        line += f" ({', '.join(reasons)})"
    if summary["not_read"]:
        line += f", {summary['not_read']} not needed"
    if log is not None:
        line += f"; skipped paths in {log}"
    return line


def write_skipped_log(summary: dict[str, Any], path: Path) -> None:
    """Write the skipped files as ``reason<TAB>path`` lines to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{reason}\t{file}\n" for reason, file in summary["skipped_files"]))


def report_files(
    listings: Iterable[Optional[FileStatuses]], log_path: Path, device: torch.device | str = "cpu"
) -> Optional[dict[str, Any]]:
    """The end-of-stage file report: counted over processes (a collective: call it on every rank), then
    on rank 0 only printed as one line, with the skipped paths written to ``log_path`` (when there
    are any). Returns the JSON field (counts and the log's path) on every rank; None without files.
    """
    summary = count_file_statuses(listings, device)
    if summary is None:
        return None
    log = log_path if summary["skipped_files"] else None
    if rank() == 0:
        if log is not None:
            write_skipped_log(summary, log)
        print(format_file_counts(summary, log), flush=True)
    field = {key: value for key, value in summary.items() if key != "skipped_files"}
    return {**field, "skipped_log": None if log is None else str(log)}


def file_statuses_of(*sources: Any) -> list[FileStatuses]:
    """The file statuses behind image sources (in-memory sources have none)."""
    return [source.statuses for source in sources if getattr(source, "statuses", None) is not None]
