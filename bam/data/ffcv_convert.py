"""``bam data ffcv``: write a dataset (an image folder, a file list or a built-in dataset) to a
FFCV ``.beton`` file, once per readable image, with a report of what was written and skipped.

``bam data ffcv --source <folder | list file | built-in name> --output x.beton`` calls ``main``;
``bam.data.ffcv_loader`` trains from the files written here.
"""
from __future__ import annotations

import _thread
import argparse
import json
import multiprocessing
import os
import signal
import threading
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, Literal, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from bam.data.builtin import BUILTIN_DATASETS, load_builtin
from bam.data.ffcv_install import require_ffcv
from bam.data.file_report import file_statuses_of, report_files
from bam.data.sources import DEFAULT_MAX_PIXELS, ImageSource, stratified_split
from bam.data.splits import listed_image_splits

PARTIAL_SUFFIX = ".partial"  # a .beton being written; renamed to its name once complete
WriteMode = Literal["raw", "jpg", "proportion"]


class _NumpyImages:
    """A source as FFCV's writer wants it: ``(HWC uint8 array, label)`` per index."""

    def __init__(self, source: ImageSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        image, label = self.source[index]
        return image.permute(1, 2, 0).numpy(), label


@dataclass
class Selection:
    """Images a conversion writes to one file, and in words which ones they are."""

    images: ImageSource
    description: str


def select_images(
    source: str,
    split: Literal["train", "val"] = "train",
    val_fraction: Optional[float] = None,
    seed: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[Selection]:
    """What a conversion of ``source`` writes: every listed image of ``split``, or with
    ``val_fraction`` the training images split into (kept, held out), stratified by class and
    seeded by ``seed``. Nothing is held out unless asked: the split is made on the listing,
    before any file is read, so an unreadable file does not move the others.

    Raises:
        ValueError: the request does not fit the source (a ``val`` split it lacks, a fraction
            where it has its own validation split); the message says what to pass instead.
    """
    if source in BUILTIN_DATASETS:
        if val_fraction is not None:
            raise ValueError(f"built-in dataset {source!r} has its own val split: convert it with --split val, "
                             "not --val-fraction")
        train, val = load_builtin(source)
        return [Selection(train if split == "train" else val, f"the {split} split of built-in {source}")]
    train, val = listed_image_splits(source, max_pixels=max_pixels)
    if val_fraction is None:
        if split == "val" and val is None:
            raise ValueError(f"{source} has no val/ folder (and is not a val list): convert the training images "
                             "with --split train, or hold out a fraction of them with --val-fraction F --val-output FILE")
        return [Selection(train if split == "train" else val, f"every {split} image listed in {source}")]
    if val is not None:
        raise ValueError(f"{source} has its own val/ folder: convert it with --split val, not --val-fraction")
    if split != "train":
        raise ValueError("--val-fraction holds out part of the training images: use it with --split train")
    kept, held_out = stratified_split(train.labels, val_fraction, seed)
    share = f"{val_fraction:g} of each class (seed {seed})"
    return [Selection(train.subset(kept), f"the training images of {source} without the held-out {share}"),
            Selection(train.subset(held_out), f"the held-out {share} of the training images of {source}")]


def readable_images(images: ImageSource, num_workers: int = 4) -> ImageSource:
    """The images whose files decode, in order; each file is tried once (in ``num_workers``
    processes) and the unreadable ones are counted in the listing's file statuses."""
    check = images.dropping_unreadable()
    if check is images:  # in memory: all readable
        return images
    loader = DataLoader(_Decodes(check), batch_size=64, num_workers=num_workers, collate_fn=list)
    decodes = torch.tensor([ok for batch in loader for ok in batch], dtype=torch.bool)
    return images.subset(torch.nonzero(decodes).flatten())


class _Decodes:
    """Whether each item of a source that drops unreadable files decodes."""

    def __init__(self, source: ImageSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> bool:
        return self.source[index] is not None


def write_beton(
    source: str,
    output: str,
    split: Literal["train", "val"] = "train",
    val_fraction: Optional[float] = None,
    val_output: Optional[str] = None,
    seed: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    write_mode: WriteMode = "jpg",
    max_resolution: Optional[int] = None,
    jpeg_quality: int = 90,
    compress_probability: float = 0.5,
    num_workers: int = 4,
) -> dict[str, Any]:
    """Write every readable image of one split of ``source`` to the FFCV file ``output``, once.

    Unreadable files (empty, corrupt, more than ``max_pixels`` pixels) are left out, never
    replaced: each file is decoded once to check it, then again to write it. Prints which images
    went to which file and one file-report line; writes the report (returned) to ``<output>.json``
    and the skipped paths to ``<output>.skipped.tsv``.

    Args:
        source: Built-in dataset name (see ``BUILTIN_DATASETS``), ImageFolder root or list file.
        output: Path of the ``.beton`` file to create.
        split: ``"train"`` or ``"val"`` (the ``val/`` folder or the built-in's val split).
        val_fraction: Hold out this fraction of each class of the training images (for sources
            without their own val split) and write it to ``val_output``; default: hold out nothing.
        val_output: The ``.beton`` file of the held-out images (required with ``val_fraction``).
        seed: Seed of the held-out split (the same seed gives the same split).
        max_pixels: Images with more pixels (by their header) are skipped without decoding.
        write_mode: How FFCV stores images: ``jpg`` (small files), ``raw`` pixels (about 7x
            faster to decode, several times larger), ``proportion`` (a random
            ``compress_probability`` of the images as JPEG, the rest raw).
        max_resolution: Longest side stored (larger images are downscaled); None keeps them.
        jpeg_quality: JPEG quality of the images stored as JPEG.
        compress_probability: Share of JPEG images in ``proportion`` mode.
        num_workers: Reader and writer processes.

    Returns:
        ``outputs`` (path, images written, which images) and ``files`` (found, read, skipped by
        reason; None for a built-in dataset).
    """
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField

    if (val_fraction is None) != (val_output is None):
        raise ValueError("--val-fraction and --val-output go together: the held-out images need their own file")
    selections = select_images(source, split, val_fraction, seed, max_pixels)
    outputs = []
    for selection, path in zip(selections, (output, val_output)):
        images = readable_images(selection.images, num_workers)
        fields = {
            "image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                                   compress_probability=compress_probability),
            "label": IntField(),
        }
        write_complete(images, Path(path), fields, num_workers)
        print(f"wrote {len(images)} images to {path}: {selection.description}", flush=True)
        outputs.append({"path": str(path), "images": len(images), "selection": selection.description})
    statuses = file_statuses_of(*(selection.images for selection in selections))
    files = report_files(statuses, Path(f"{output}.skipped.tsv"))
    report = {"outputs": outputs, "files": files, "split": split, "val_fraction": val_fraction, "seed": seed,
              "max_pixels": max_pixels}
    Path(f"{output}.json").write_text(json.dumps(report, indent=2))
    return report


class ConverterWorkerDied(RuntimeError):
    """A process of FFCV's writer ended before its share of the images was written."""


def write_complete(images: ImageSource, path: Path, fields: dict[str, Any], num_workers: int) -> None:
    """Write ``images`` with FFCV's writer to ``path``, which appears only once complete.

    The file is written as ``<path>.partial`` and renamed at the end, so an interrupted or failed
    conversion never leaves a ``.beton`` that looks usable. FFCV's writer waits for its sample
    count forever if one of its processes dies (a crash, the OOM killer): a watcher ends the wait
    with ``ConverterWorkerDied`` instead (``write_complete`` must run in the main thread, where
    the watcher's interrupt lands).
    """
    from ffcv import writer as ffcv_writer

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    writer = ffcv_writer.DatasetWriter(str(partial), fields, num_workers=num_workers)
    try:
        with _dead_workers_raise(ffcv_writer, partial):
            writer.from_indexed_dataset(_NumpyImages(images))
        os.replace(partial, path)
    except BaseException:
        _free_metadata(writer)
        raise
    finally:
        partial.unlink(missing_ok=True)


def _free_metadata(writer: Any) -> None:
    """Release the shared memory of a writer that failed (FFCV frees it only on success)."""
    metadata = getattr(writer, "metadata_sm", None)  # absent if it failed before allocating it
    if metadata is not None:
        metadata.close()
        with suppress(FileNotFoundError):
            metadata.unlink()


# The watcher thread reaches the main thread through Python's handler of this signal, simulated
# (`_thread.interrupt_main`), never sent: SIGINT's handler is not Python's where SIGINT is ignored
# (a job started in the background, CI, nohup), and the wait would then never end.
WORKER_DEATH_SIGNAL = signal.SIGUSR2


@contextmanager
def _dead_workers_raise(ffcv_writer: ModuleType, partial: Path) -> Iterator[None]:
    """Inside, the processes FFCV's writer starts are watched; the first that exits with an
    error interrupts the main thread, the others are stopped and ``ConverterWorkerDied`` is raised."""
    started: list[multiprocessing.Process] = []

    class WatchedProcess(multiprocessing.Process):
        def start(self) -> None:
            super().start()
            started.append(self)

    dead: list[multiprocessing.Process] = []
    finished = threading.Event()

    def watch() -> None:
        while not finished.wait(0.2):
            dead.extend(process for process in list(started) if process.exitcode not in (None, 0))
            if dead:
                _thread.interrupt_main(WORKER_DEATH_SIGNAL)
                return

    def raise_in_main_thread(signum: int, frame: Any) -> None:
        if dead:  # not a real SIGUSR2 from elsewhere
            raise ConverterWorkerDied(
                f"a writer process of FFCV (pid {dead[0].pid}) died with exit code {dead[0].exitcode} while writing "
                f"{partial}; nothing was written (its error is printed above). Fix its cause and run again, or try "
                "--num-workers 1"
            )

    # FFCV's writer keeps no handle on its processes; the class it starts them with records them
    original, ffcv_writer.Process = ffcv_writer.Process, WatchedProcess
    previous_handler = signal.signal(WORKER_DEATH_SIGNAL, raise_in_main_thread)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield
    except ConverterWorkerDied:
        for process in started:
            process.kill()
        raise
    finally:
        finished.set()
        watcher.join()
        signal.signal(WORKER_DEATH_SIGNAL, previous_handler)
        ffcv_writer.Process = original


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of ``bam data ffcv``: write a ``.beton`` file (see ``write_beton``)."""
    parser = argparse.ArgumentParser(prog="bam data ffcv", description=write_beton.__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="built-in name, ImageFolder root or list file")
    parser.add_argument("--output", required=True, help="the .beton file to write")
    parser.add_argument("--split", choices=["train", "val"], default="train")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="hold out this fraction of each class of the training images (default: none)")
    parser.add_argument("--val-output", default=None, help="the .beton file of the held-out images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="skip images with more pixels, read from their header (default: %(default)s)")
    parser.add_argument("--write-mode", choices=["raw", "jpg", "proportion"], default="jpg")
    parser.add_argument("--max-resolution", type=int, default=None)
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--compress-probability", type=float, default=0.5, help="JPEG share in proportion mode")
    parser.add_argument("--num-workers", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        write_beton(args.source, args.output, args.split, args.val_fraction, args.val_output, args.seed,
                    args.max_pixels, args.write_mode, args.max_resolution, args.jpeg_quality,
                    args.compress_probability, args.num_workers)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    except ConverterWorkerDied as error:
        raise SystemExit(f"bam data ffcv: {error}") from None
    return 0
