"""Tiny backbones saved as bam pretraining checkpoints, and tiny labelled data, for the evaluation tests."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torchvision.io import write_jpeg

from bam import study
from bam.evaluation.data import BuiltinClassificationData
from bam.models.backbones import build_backbone
from cli_runs import DEMO, run_bam
from io_layouts import bam_checkpoint, randomise_buffers
from shared_runs import made_once

CNN = ("bam_cnn4", {"width": 8})
VIT = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 3})


def write_checkpoint(directory: Path, name: str, kwargs: dict[str, Any], seed: int = 0) -> Path:
    """A bam Lightning checkpoint whose teacher and student are seeded random `name` backbones."""
    torch.manual_seed(seed)
    teacher, student = (randomise_buffers(build_backbone(name, **kwargs)) for _ in range(2))
    path = directory / f"{name}.ckpt"
    torch.save(bam_checkpoint(student, teacher, {"backbone": name, "backbone_kwargs": kwargs}), path)
    return path


def synthetic_data(
    batch_size: int = 16, train_size: int = 64, val_size: int = 32, **kwargs: Any
) -> BuiltinClassificationData:
    """4 classes of 32-px coloured shapes, evaluated at their stored size."""
    options = {"train_size": train_size, "val_size": val_size, "image_size": 32, "num_classes": 4}
    kwargs = {"image_size": 32, "resize_size": 32, "num_workers": 0, "batch_size": batch_size, **kwargs}
    return BuiltinClassificationData("synthetic", options, **kwargs)


def synthetic_args(batch_size: int = 16, train_size: int = 64, val_size: int = 32) -> list[str]:
    """The same data as `synthetic_data`, as stage command-line arguments."""
    options = f"{{train_size: {train_size}, val_size: {val_size}, image_size: 32, num_classes: 4}}"
    return [
        "--data", "bam.evaluation.data.BuiltinClassificationData", "--data.name", "synthetic",
        "--data.options", options, "--data.image_size", "32", "--data.resize_size", "32",
        "--data.num_workers", "0", "--data.batch_size", str(batch_size),
    ]


def trainer_args(run_dir: Path, max_epochs: int = 1) -> list[str]:
    return [
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_epochs", str(max_epochs),
        "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
        "--trainer.logger", "false",
    ]


def record_figures(monkeypatch, module: Any) -> list:
    """Every `module.Figure` (matplotlib's Figure class, as `module` names it) created from now on
    in the test, in order: plots are checked on the figure objects, not on the PNG's pixels."""
    created = []

    class RecordedFigure(module.Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(module, "Figure", RecordedFigure)
    return created


def write_imagenet_like_folder(root: Path, classes: int = 5, train_per_class: int = 4, val_per_class: int = 20,
                               size: int = 24) -> Path:
    """`root/train` and `root/val` of JPEGs named as ImageNet's (`n0000000C/n0000000C_I.JPEG`), each
    class a colour, so that SimCLR-style subset lists and class lists can name them."""
    generator = torch.Generator().manual_seed(0)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            wnid = f"n{label:08d}"
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                pixels = (torch.rand(3, size, size, generator=generator) * 96).to(torch.uint8)
                pixels[label % 3] += 100 + 30 * (label // 3)
                write_jpeg(pixels, str(folder / f"{wnid}_{index}.JPEG"))
    return root


def _pretrain_and_export_the_demo(folder: Path) -> None:
    for args in (["pretrain", *DEMO, f"--trainer.default_root_dir={folder / 'run'}", "--knn.include_student=true"],
                 ["export", str(folder / "run" / "checkpoints" / "last.ckpt"), "--output", str(folder / "backbone")]):
        done = run_bam(args)
        assert done.returncode == 0, done.stdout[-4000:]


def demo_export(tmp_path_factory) -> dict[str, Path]:
    """The shrunk demo (cli_runs.DEMO) pretrained with the online k-NN of teacher and student, then
    exported, as docs/demo.md's chain, through `python -m bam`: `run` (its run folder) and
    `backbone` (the export). Made once per test session for every evaluation file that runs a
    stage's demo config on it (shared_runs.made_once); read it, copy what you change."""
    folder = made_once(tmp_path_factory, "demo_export", _pretrain_and_export_the_demo)
    return {"run": folder / "run", "backbone": folder / "backbone"}


def assert_study_reads(stage: str, document: dict) -> None:
    """`bam study` finds its default columns of this stage in the stage's real results file."""
    for path in study.STAGES[stage].default_metrics.values():
        study.json_value(document, path)
