"""`bam embed`: the images of a folder (or list file) through a frozen backbone, to a file of
features with their file names, plus the pictures that show what the backbone learnt.

The backbone is read as every frozen-backbone stage reads it (an export, a bam checkpoint, the
authors' released file or a timm name) and sees the images with its own data recipe (resize,
centre crop, mean/std), as `bam knn` does. Under `torchrun` each process embeds its own shard
(`bam.features.extract.embed_rows`: no padding, no duplicates) and process 0 writes the rows in
the order of the listing, so one process and several write the same file.

Output formats (`EMBEDDING_FORMATS`), each written to a temporary file and renamed into place:

- `torch` (default, what LightlyTrain's `embed` writes by default): `embeddings.pt`, a dict with
  `embeddings` (float32 `(N, D)`), `filenames` (relative to the image folder), `labels`
  (`(N,)`) and `class_names`; `torch.load(path, weights_only=True)` reads it;
- `csv` (the layout of lightly's `lightly-embed`): `embeddings.csv`, columns
  `filenames, embedding_0, ..., embedding_{D-1}, labels`;
- `npy`: `embeddings.npy` (float32 `(N, D)`) and `filenames.csv` (`filename,label`, row for row).

Unreadable files have no row (the file report counts them; `skipped_files.tsv` lists them).
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

import numpy as np
import torch
from jsonargparse import CLI
from torch import Tensor

from bam.data.datasets import TransformedSource
from bam.data.file_report import SKIPPED_LOG, file_statuses_of, report_files
from bam.data.sources import DEFAULT_MAX_PIXELS, ImageFiles, read_file_list, scan_image_folder
from bam.data.splits import require_locations
from bam.evaluation.data import ClassificationDataModule
from bam.evaluation.frozen import frozen_extractor, init_distributed, select_device, stage_arguments
from bam.features.extract import embed_rows
from bam.features.pictures import PictureSettings, write_pictures
from bam.io.backbone_reader import ENCODER_MOVED_KEY
from bam.ops.distributed import rank
from bam.training.fault_tolerance import atomic_write
from bam.training.run_cli import SettingError, one_line_errors


# -- the output files ---------------------------------------------------------------------------
class Embeddings:
    """What `bam embed` writes: one row of `features` per readable image, in listing order."""

    def __init__(self, features: Tensor, filenames: list[str], labels: Tensor, class_names: Optional[list[str]]) -> None:
        self.features, self.filenames, self.labels, self.class_names = features.float(), filenames, labels, class_names


def _write_torch(embeddings: Embeddings, output_dir: Path) -> list[Path]:
    path = output_dir / "embeddings.pt"
    content = {"embeddings": embeddings.features, "filenames": embeddings.filenames,
               "labels": embeddings.labels, "class_names": embeddings.class_names}
    atomic_write(path, lambda file: torch.save(content, file))
    return [path]


def _write_csv(embeddings: Embeddings, output_dir: Path) -> list[Path]:
    path = output_dir / "embeddings.csv"
    header = ["filenames", *(f"embedding_{i}" for i in range(embeddings.features.shape[1])), "labels"]
    rows = [[name, *map(repr, vector), int(label)] for name, vector, label
            in zip(embeddings.filenames, embeddings.features.tolist(), embeddings.labels)]
    atomic_write(path, _csv_writer([header, *rows]))
    return [path]


def _write_npy(embeddings: Embeddings, output_dir: Path) -> list[Path]:
    array_path, names_path = output_dir / "embeddings.npy", output_dir / "filenames.csv"
    atomic_write(array_path, lambda file: np.save(file, embeddings.features.numpy()))
    rows = [["filename", "label"], *([name, int(label)] for name, label in zip(embeddings.filenames, embeddings.labels))]
    atomic_write(names_path, _csv_writer(rows))
    return [array_path, names_path]


def _csv_writer(rows: list[list[Any]]) -> Callable[[BinaryIO], None]:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return lambda file: file.write(text.getvalue().encode())


# format name -> writer (into the output directory; returns the files written)
EMBEDDING_FORMATS: dict[str, Callable[[Embeddings, Path], list[Path]]] = {
    "torch": _write_torch,
    "csv": _write_csv,
    "npy": _write_npy,
}


# -- the images ----------------------------------------------------------------------------------
def read_images(location: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[ImageFiles, Optional[list[str]]]:
    """The image files of a folder (of class folders) or a list file, as the other stages read
    them, and the class names (a folder's sub-folders; None for a list file)."""
    location = Path(location)
    require_locations(location)
    if location.is_file():
        return read_file_list(location, max_pixels), None
    return scan_image_folder(location, max_pixels=max_pixels)


def relative_name(path: str, root: Path) -> str:
    """`path` relative to the image folder (or the list file's folder) when it lies below it."""
    relative = os.path.relpath(path, root)
    return path if relative.startswith(os.pardir) else relative


# -- the stage ----------------------------------------------------------------------------------
def run_embed(
    backbone: str,
    images: str,
    output_dir: str = "runs/embed",
    format: str = "torch",
    encoder: Optional[str] = None,
    arch: Optional[str] = None,
    feature: str = "auto",
    batch_size: int = 256,
    num_workers: int = 8,
    image_size: Optional[int] = None,
    resize_size: Optional[int] = None,
    interpolation: Optional[str] = None,
    mean: Optional[tuple[float, ...]] = None,
    std: Optional[tuple[float, ...]] = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    accelerator: str = "auto",
    pictures: Optional[PictureSettings] = None,
) -> dict[str, Any]:
    """Embed every image of `images` with a frozen backbone; write the features with their file
    names to `output_dir` (by process 0) and draw the pictures there.

    Args:
        backbone: Export directory or file, bam pretraining checkpoint, the authors' released
            file, or a timm model name (random initialisation, a baseline).
        images: A folder of images in class sub-folders, or a text file of `path label` lines.
        output_dir: Where the embeddings file, the pictures and `skipped_files.tsv` go.
        format: Output format, a key of `EMBEDDING_FORMATS` (`torch`, `csv`, `npy`; see above).
        encoder: The encoder of a checkpoint to evaluate ("teacher" or "student"; default: the teacher).
        arch: Architecture of a checkpoint, instead of the one it records.
        feature: Feature readout (`bam.features.extract`); `auto`: ViT class token, else pooled.
        batch_size: Images per batch and process.
        num_workers: DataLoader worker processes (0: read in the main process).
        image_size: Side of the centre crop the backbone sees (default: its data recipe's).
        resize_size: Short side before the crop (default: from the recipe's crop fraction).
        interpolation: Resize interpolation (default: the recipe's).
        mean: Per-channel mean (default: the recipe's).
        std: Per-channel standard deviation (default: the recipe's).
        max_pixels: Images with more pixels (by their header) are skipped without decoding.
        accelerator: "auto" (CUDA when available), "cpu" or "cuda".
        pictures: The nearest-neighbour grid, the 2-D map and the attention maps (default: all,
            `PictureSettings()`; `enabled: false` for none).

    Returns:
        The number of images embedded, the feature size, the files written and the file report.
    """
    if format not in EMBEDDING_FORMATS:
        raise SettingError(f"unknown format {format!r}: choose one of {', '.join(EMBEDDING_FORMATS)}")
    pictures = pictures if pictures is not None else PictureSettings()
    device = select_device(accelerator)
    init_distributed(device)
    files, class_names = read_images(images, max_pixels)
    preprocessing = ClassificationDataModule(batch_size, num_workers, image_size, resize_size, interpolation,
                                             mean=mean, std=std)
    extractor = frozen_extractor(backbone, encoder, arch, feature, preprocessing).to(device)
    dataset = TransformedSource(files.dropping_unreadable(), preprocessing.eval_transform())
    features, labels, indices = embed_rows(dataset, extractor, device, batch_size, num_workers, progress="embedding")
    output = Path(output_dir)
    file_report = report_files(file_statuses_of(files), output / SKIPPED_LOG, device)
    root = Path(images) if Path(images).is_dir() else Path(images).parent
    embeddings = Embeddings(features, [relative_name(files.paths[i], root) for i in indices.tolist()],
                            labels, class_names)
    written = []
    if rank() == 0:
        written = EMBEDDING_FORMATS[format](embeddings, output)
        if pictures.enabled:
            written += write_pictures(pictures, features, dataset, indices, preprocessing.mean, preprocessing.std,
                                      output, labels, class_names, extractor.backbone)
        print(f"bam embed: {len(features)} images -> {features.shape[1]}-d {extractor.readout} features; wrote "
              + ", ".join(str(path) for path in written), flush=True)
    return {"num_images": len(features), "dim": int(features.shape[1]), "feature": extractor.readout,
            "files": [str(path) for path in written], "file_report": file_report}


def main(argv: list[str]) -> None:
    """`bam embed --backbone PATH --images FOLDER_OR_LIST [--output_dir DIR] [--format torch|csv|npy] ...`."""
    with one_line_errors("bam embed"):
        CLI(run_embed, args=stage_arguments("embed", argv, (ENCODER_MOVED_KEY,)), as_positional=False, prog="bam embed")
