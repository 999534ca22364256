"""Set-up shared by the stages that evaluate a frozen backbone without training (`bam knn`,
`bam cluster`, `bam fewshot`): the device, the process group `torchrun` describes, and the feature extractor."""
from __future__ import annotations

import atexit
import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from bam.moved_keys import MovedKey, is_flag, read_moved_keys
from bam.data.sources import Subset
from bam.ops.distributed import leave_process_group, rank
from bam.evaluation.backbone import build_from_spec, resolve_backbone
from bam.evaluation.data import ClassificationDataModule
from bam.features.extract import FeatureExtractor, embed_dataset, resolve_readout
from bam.io.backbone_reader import ENCODER_MOVED_KEY
from bam.shipped_configs import with_config_names

# the BPA settings were three flat keys (`bpa: true`, `bpa_reg`, `bpa_iterations`) before they
# became one `bpa` group (`bam.transforms.BPASettings`)
BPA_MOVED_KEYS = (
    MovedKey("bpa", "bpa.enabled", is_flag), MovedKey("bpa_reg", "bpa.reg"), MovedKey("bpa_iterations", "bpa.iterations"),
)
# what the stages with BPA (k-NN, clustering, few-shot, retrieval) read at a new place
BPA_STAGE_MOVED_KEYS = (*BPA_MOVED_KEYS, ENCODER_MOVED_KEY)


# the feature spaces the frozen-feature stages report, in order, as their tables and plots name them
SPACE_LABELS = {"raw": "raw", "bpa": "BPA"}


def spaces_in(scores: Mapping[str, Any]) -> list[str]:
    """The feature spaces (`SPACE_LABELS`) that `scores` has an entry for, in order."""
    return [name for name in SPACE_LABELS if name in scores]


@contextlib.contextmanager
def result_plot(path: Path) -> Iterator[Any]:
    """Axes of a small result figure: draw on them (labelling the series for the legend) and the
    figure is saved to `path` with its legend."""
    from matplotlib.figure import Figure  # here: importing matplotlib is slow, and only plotting needs it

    figure = Figure(figsize=(5, 3.5), dpi=120)
    axes = figure.add_subplot()
    yield axes
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def stage_arguments(stage: str, argv: list[str], moves: Sequence[MovedKey] = BPA_STAGE_MOVED_KEYS) -> list[str]:
    """`argv` of a frozen-backbone stage with shipped config names resolved and the old keys of
    `moves` read at their new place (one line each)."""
    return read_moved_keys(with_config_names(stage, argv), moves, f"bam {stage}")


def select_device(accelerator: str) -> torch.device:
    """`"auto"` (CUDA when available), `"cpu"` or `"cuda"`; under `torchrun`, this process's GPU."""
    use_cuda = accelerator == "cuda" or (accelerator == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def init_distributed(device: torch.device) -> None:
    """Join the process group `torchrun` describes in the environment (if any, and not joined yet)."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(leave_process_group)


def frozen_extractor(
    backbone: str, encoder: Optional[str], arch: Optional[str], feature: str, data: ClassificationDataModule
) -> FeatureExtractor:
    """The named backbone (see `resolve_backbone`), frozen, with its feature readout (`auto`: a ViT's
    class token, otherwise the pooled output); `data` takes the backbone's data recipe for the
    settings it leaves unset."""
    spec = resolve_backbone(backbone, encoder, arch)
    data.apply_recipe(spec.recipe, backbone)
    model = build_from_spec(spec)
    return FeatureExtractor(model, resolve_readout(feature, model, vit_default="cls"))


class EmbeddedSplit(NamedTuple):
    features: torch.Tensor
    labels: torch.Tensor
    extractor: FeatureExtractor
    device: torch.device
    split: str


def embed_split(
    backbone: str,
    data: ClassificationDataModule,
    purpose: str,
    encoder: Optional[str] = None,
    arch: Optional[str] = None,
    feature: str = "auto",
    split: str = "val",
    fraction: Subset = 1.0,
    accelerator: str = "auto",
) -> EmbeddedSplit:
    """What the frozen-feature stages (`bam cluster`, `bam fewshot`) start with: the process group
    (under torchrun), the data with the backbone's recipe, and every image of `split` embedded once
    over all processes. The stages take these settings as `**frozen` (their command-line options
    and help come from here).

    Args:
        backbone: Export directory or file, bam pretraining checkpoint, the authors' released
            file, or a timm model name (random initialisation, a baseline).
        data: The labelled data.
        purpose: What the progress bar says the embedding is for.
        encoder: The encoder of a checkpoint to evaluate ("teacher" or "student"; default: the teacher).
        arch: Architecture of a checkpoint, instead of the one it records.
        feature: Feature readout (`bam.features.extract`); `auto`: ViT class token, else pooled.
        split: The split evaluated: "val" (held out) or "train".
        fraction: Class-balanced fraction of the split embedded, or a subset list file naming the
            images to embed (one file name per line, SimCLR's format).
        accelerator: "auto" (CUDA when available), "cpu" or "cuda".
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    device = select_device(accelerator)
    init_distributed(device)
    data.require_classes(purpose)
    extractor = frozen_extractor(backbone, encoder, arch, feature, data).to(device)
    features, labels = embed_dataset(
        data.eval_dataset(split, fraction), extractor, device, data.batch_size, data.num_workers,
        progress=f"{purpose}: embedding the {split} split",
    )
    return EmbeddedSplit(features, labels, extractor, device, split)


def report_on_first_process(table: str, result: dict[str, Any], path: Path) -> bool:
    """On process 0: print a stage's `table` and write its `result` to `path` as JSON. Returns
    whether this is process 0, which then writes the stage's other files (plots)."""
    if rank() != 0:
        return False
    print(table)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return True
