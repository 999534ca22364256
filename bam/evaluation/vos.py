"""`bam vos`: semi-supervised video object segmentation (DAVIS-2017) by label propagation over a
frozen backbone's patch features, scored by J&F as the DAVIS-2017 toolkit computes it.

Propagation (the protocol of DINO's `eval_video_segmentation.py`, which the BAM authors use):

- every frame is resized so that its short side is `short_side` px (480) and its long side is
  the proportional length rounded down to a multiple of `long_side_multiple` (64), bilinearly,
  and normalised with the backbone's data recipe;
- its features are a ViT's last-block patch tokens after the final norm (the model is built with
  `dynamic_img_size`), or a CNN's last feature map; L2-normalised per position;
- the first frame's annotation, resized to the feature grid (nearest), is one channel per object
  (background included); each later frame takes its labels from a context of the first frame
  and the `context_frames` (7) previous frames with their soft labels: each position's
  affinity to a context position is `exp(cosine / temperature)` (0.1), only within `radius`
  (12) feature positions in both directions; the `top_k` (5) largest over the whole context
  are normalised to sum to 1 and average the context's labels;
- the soft labels are upsampled bilinearly to the resized frame, each channel rescaled to
  [0, 1], the arg-max taken and resized (nearest) to the frame's size, and written as an indexed
  PNG in the DAVIS layout, `output_dir/<sequence>/<frame>.png`, with the DAVIS palette.

J&F, as the DAVIS-2017 toolkit's semi-supervised evaluation: per object (1..K, K the largest
label of the first annotation), over every frame but the first and the last, J is the IoU of the
predicted and annotated masks and F the F-measure of their boundaries (one-pixel boundary maps
matched within a disc of radius `ceil(0.008 * image diagonal)`); pixels annotated 255 (void)
count for neither. Per object, the mean, the recall (fraction of frames above 0.5) and the decay
(mean of the first quarter of frames minus that of the last, in the toolkit's four overlapping
bins); the reported numbers average the objects, and J&F is the mean of J and F. The toolkit's
code zeroes 255 before its void test (so void counts as background there); on annotations
without 255, as DAVIS-2017's, both agree. `first_mask_baseline` scores copying the first
annotation to every frame: the propagation should beat it.

Under `torchrun` each process segments its share of the sequences; the per-object scores are
gathered, so the result equals a single-process run.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from jsonargparse import CLI
from matplotlib.figure import Figure
from PIL import Image
from scipy.ndimage import binary_dilation
from torch import Tensor

from bam.data.synthetic_video import davis_palette, write_indexed_png, write_synthetic_davis
from bam.evaluation.backbone import build_from_spec, resolve_backbone
from bam.evaluation.frozen import init_distributed, report_on_first_process, select_device, stage_arguments
from bam.features.extract import patch_feature_map, progress_bar
from bam.io.backbone_reader import ENCODER_MOVED_KEY
from bam.moved_keys import MovedKey
from bam.ops import is_vit
from bam.ops.distributed import rank, world_size
from bam.recipe import DataRecipe

RESULTS_FILE = "vos_results.json"
OVERLAY_FILE = "vos_overlay.png"
VOID_LABEL = 255
BOUNDARY_TOLERANCE = 0.008  # of the image diagonal


# -- J&F ----------------------------------------------------------------------------------------
def jaccard(annotation: np.ndarray, prediction: np.ndarray, void: Optional[np.ndarray] = None) -> float:
    """IoU of two boolean masks, void pixels left out; 1 when both are empty."""
    keep = np.ones_like(annotation, dtype=bool) if void is None else ~void
    union = np.sum((annotation | prediction) & keep)
    return 1.0 if union == 0 else float(np.sum(annotation & prediction & keep) / union)


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel boundary of a boolean mask: pixels that differ from their right, lower or
    lower-right neighbour (outside the image counts as background only along the last row and
    column, and the corner pixel is never a boundary), as the DAVIS toolkit draws it."""
    right, down, diagonal = (np.zeros_like(mask) for _ in range(3))
    right[:, :-1], down[:-1, :], diagonal[:-1, :-1] = mask[:, 1:], mask[1:, :], mask[1:, 1:]
    boundary = (mask ^ right) | (mask ^ down) | (mask ^ diagonal)
    boundary[-1, :] = mask[-1, :] ^ right[-1, :]
    boundary[:, -1] = mask[:, -1] ^ down[:, -1]
    boundary[-1, -1] = False
    return boundary


def disc(radius: int) -> np.ndarray:
    """Boolean disc of the given radius: the offsets (dy, dx) with dy^2 + dx^2 <= radius^2."""
    offsets = np.arange(-radius, radius + 1)
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2


def boundary_f(
    annotation: np.ndarray, prediction: np.ndarray, void: Optional[np.ndarray] = None, tolerance: float = BOUNDARY_TOLERANCE
) -> float:
    """Boundary F-measure of two boolean masks: a boundary pixel of one matches if the other's
    boundary lies within `ceil(tolerance * diagonal)` px (a disc); void pixels are cleared first."""
    keep = np.ones_like(annotation, dtype=bool) if void is None else ~void
    predicted, annotated = boundary_map(prediction & keep), boundary_map(annotation & keep)
    footprint = disc(int(math.ceil(tolerance * math.hypot(*annotation.shape))))
    num_predicted, num_annotated = predicted.sum(), annotated.sum()
    if num_predicted == 0 or num_annotated == 0:  # the toolkit's conventions for empty boundaries
        precision, recall = float(num_predicted == 0), float(num_annotated == 0)
    else:
        precision = float(np.sum(predicted & binary_dilation(annotated, footprint)) / num_predicted)
        recall = float(np.sum(annotated & binary_dilation(predicted, footprint)) / num_annotated)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def statistics(per_frame: np.ndarray) -> dict[str, float]:
    """`mean`, `recall` (fraction above 0.5) and `decay` (first-quarter mean minus last-quarter
    mean, the toolkit's four bins, which share their edge frames) of per-frame scores."""
    edges = (np.round(np.linspace(1, len(per_frame), 5) + 1e-10) - 1).astype(int)
    bins = [per_frame[edges[i] : edges[i + 1] + 1] for i in range(4)]
    return {"mean": float(np.mean(per_frame)), "recall": float(np.mean(per_frame > 0.5)),
            "decay": float(np.mean(bins[0]) - np.mean(bins[3]))}


def score_sequence(annotations: np.ndarray, predictions: np.ndarray) -> list[dict[str, dict[str, float]]]:
    """Per object of the first annotation: J and F statistics over frames 1 .. T-2 of `(T, H, W)`
    label arrays."""
    if len(annotations) < 3:
        raise ValueError(f"J&F leaves out the first and last frames: a sequence needs 3 frames, this one has {len(annotations)}")
    first = annotations[0]
    objects = int(first[first != VOID_LABEL].max(initial=0))
    scores = []
    for label in range(1, objects + 1):
        frames = list(zip(annotations[1:-1], predictions[1:-1]))
        j = np.array([jaccard(gt == label, pred == label, gt == VOID_LABEL) for gt, pred in frames])
        f = np.array([boundary_f(gt == label, pred == label, gt == VOID_LABEL) for gt, pred in frames])
        scores.append({"J": statistics(j), "F": statistics(f)})
    return scores


def summarise(per_object: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """`J` and `F` (mean, recall, decay averaged over the objects) and `J&F`, in percent."""
    summary: dict[str, Any] = {
        measure: {name: round(100 * float(np.mean([scores[measure][name] for scores in per_object.values()])), 4)
                  for name in ("mean", "recall", "decay")}
        for measure in ("J", "F")
    }
    summary["J&F"] = round((summary["J"]["mean"] + summary["F"]["mean"]) / 2, 4)
    return summary


# -- the DAVIS layout ---------------------------------------------------------------------------
@dataclass(frozen=True)
class VideoSequence:
    name: str
    frames: list[Path]
    annotations: list[Path]


def read_sequences(davis_root: str | Path, sequences_file: str, resolution: str = "480p") -> list[VideoSequence]:
    """The sequences `sequences_file` (relative to the root) names, with their frames (sorted) and
    each frame's annotation; a missing folder or annotation is an error naming it."""
    root = Path(davis_root)
    if not root.is_dir():
        raise FileNotFoundError(f"DAVIS root not found: {root} (it holds JPEGImages/, Annotations/ and ImageSets/)")
    listing = root / sequences_file
    if not listing.is_file():
        raise FileNotFoundError(f"sequence list not found: {listing} (set sequences_file, e.g. ImageSets/2017/val.txt)")
    names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    frames_root, annotations_root = root / "JPEGImages" / resolution, root / "Annotations" / resolution
    absent = [name for name in names if not (frames_root / name).is_dir()]
    if absent:
        raise FileNotFoundError(f"{listing} names {len(absent)} sequence(s) with no folder in {frames_root}: {', '.join(absent)}")
    if not names:
        raise ValueError(f"{listing} names no sequence")
    sequences = []
    for name in names:
        frames = sorted((frames_root / name).glob("*.jpg"))
        if not frames:
            raise FileNotFoundError(f"no .jpg frames in {frames_root / name}")
        annotations = [annotations_root / name / f"{frame.stem}.png" for frame in frames]
        missing = [path for path in annotations if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"annotation missing: {missing[0]} ({len(missing)} of sequence {name}'s {len(frames)} frames have "
                "none; the first frame's starts the propagation and J&F needs every frame's)"
            )
        sequences.append(VideoSequence(name, frames, annotations))
    return sequences


def read_labels(path: Path) -> np.ndarray:
    """An annotation's labels, `(H, W)` uint8 (an indexed PNG's indices, not its colours)."""
    image = Image.open(path)
    if image.mode not in ("P", "L"):
        raise ValueError(f"{path} is a {image.mode} image, not an indexed PNG of object labels (DAVIS annotations are)")
    return np.asarray(image, dtype=np.uint8)


def read_annotations(sequence: VideoSequence) -> np.ndarray:
    """`(T, H, W)` labels of every frame of `sequence`; all annotations must have one size."""
    labels = [read_labels(path) for path in sequence.annotations]
    for path, frame in zip(sequence.annotations, labels):
        if frame.shape != labels[0].shape:
            raise ValueError(
                f"sequence {sequence.name}: annotation {path} is {frame.shape[1]}x{frame.shape[0]} px but "
                f"{sequence.annotations[0].name} is {labels[0].shape[1]}x{labels[0].shape[0]}: a sequence has one size"
            )
    return np.stack(labels)


def resized_size(height: int, width: int, short_side: int, long_side_multiple: int) -> tuple[int, int]:
    """`(height, width)` with the short side `short_side` and the long one proportional, rounded
    down to a multiple of `long_side_multiple` (as DINO resizes DAVIS frames)."""
    if height <= width:
        return short_side, max(long_side_multiple, int(short_side * width / height) // long_side_multiple * long_side_multiple)
    return max(long_side_multiple, int(short_side * height / width) // long_side_multiple * long_side_multiple), short_side


# -- propagation --------------------------------------------------------------------------------
def neighbourhood(height: int, width: int, radius: int, device: torch.device) -> Tensor:
    """`(h*w, h*w)` boolean: position pairs at most `radius` apart in both rows and columns."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    columns = torch.arange(width, device=device).repeat(height)
    return ((rows[:, None] - rows[None]).abs() <= radius) & ((columns[:, None] - columns[None]).abs() <= radius)


def propagate(
    query: Tensor, context_features: list[Tensor], context_labels: list[Tensor], allowed: Optional[Tensor],
    top_k: int = 5, temperature: float = 0.1,
) -> Tensor:
    """Soft labels `(n, C)` of the `n` L2-normalised `query` positions: the `top_k` largest
    affinities `exp(cosine / temperature)` over every context frame's positions (0 where `allowed`
    is False), normalised to sum to 1, weight the context positions' labels `(n', C)`."""
    best_affinity = query.new_zeros(len(query), 0)
    best_labels = query.new_zeros(len(query), 0, context_labels[0].shape[1])
    for features, labels in zip(context_features, context_labels):
        affinity = (query @ features.T / temperature).exp()
        if allowed is not None:
            affinity = affinity * allowed
        values, index = affinity.topk(min(top_k, affinity.shape[1]), dim=1)
        merged_affinity = torch.cat([best_affinity, values], dim=1)
        merged_labels = torch.cat([best_labels, labels[index]], dim=1)
        best_affinity, keep = merged_affinity.topk(min(top_k, merged_affinity.shape[1]), dim=1)
        best_labels = merged_labels.gather(1, keep[..., None].expand(-1, -1, merged_labels.shape[2]))
    weights = best_affinity / best_affinity.sum(dim=1, keepdim=True)
    return (weights[..., None] * best_labels).sum(dim=1)


@dataclass(frozen=True)
class Propagation:
    """The protocol's settings (see the module docstring); in a config or on the command line
    `propagation.short_side`, ...

    Args:
        propagation: The label propagation's settings (`Propagation`: frame size, context,
            radius, top-k, temperature).
    """

    short_side: int = 480
    long_side_multiple: int = 64
    context_frames: int = 7
    radius: int = 12
    top_k: int = 5
    temperature: float = 0.1

    def __post_init__(self) -> None:
        if min(self.short_side, self.long_side_multiple, self.top_k) < 1 or min(self.context_frames, self.radius) < 0 \
                or self.temperature <= 0:
            raise ValueError(f"short_side, long_side_multiple and top_k must be positive, context_frames and radius "
                             f"non-negative, temperature positive; got {self}")


# the propagation settings were flat keys (`short_side`, ...) before they became one group
PROPAGATION_MOVED_KEYS = tuple(MovedKey(field.name, f"propagation.{field.name}") for field in fields(Propagation))


class FrameReader:
    """Frames of one sequence, resized and normalised for the backbone, checked against the size
    of the sequence's first annotation."""

    def __init__(self, recipe: DataRecipe, settings: Propagation, size: tuple[int, int], sequence: str) -> None:
        self.mean = torch.tensor(recipe.mean).view(3, 1, 1)
        self.std = torch.tensor(recipe.std).view(3, 1, 1)
        self.size, self.sequence = size, sequence
        self.resized = resized_size(*size, settings.short_side, settings.long_side_multiple)

    def __call__(self, path: Path) -> tuple[Tensor, np.ndarray]:
        """`(3, h, w)` normalised resized frame, and the frame as read (H, W, 3) uint8."""
        pixels = np.asarray(Image.open(path).convert("RGB"))
        if pixels.shape[:2] != self.size:
            raise ValueError(
                f"sequence {self.sequence}: frame {path} is {pixels.shape[1]}x{pixels.shape[0]} px but its first "
                f"annotation is {self.size[1]}x{self.size[0]}: frames and annotations must have one size"
            )
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(255)
        image = F.interpolate(image[None], size=self.resized, mode="bilinear", align_corners=False, antialias=True)[0]
        return (image - self.mean) / self.std, pixels


@torch.no_grad()
def segment_sequence(
    model: torch.nn.Module, sequence: VideoSequence, recipe: DataRecipe, settings: Propagation, device: torch.device,
    output_dir: Optional[Path] = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Predicted labels `(T, H, W)` of every frame (the first is its annotation), written as DAVIS
    PNGs into `output_dir/<sequence>/` when given; and the frames as read."""
    first_labels = read_labels(sequence.annotations[0])
    first_labels = np.where(first_labels == VOID_LABEL, 0, first_labels)
    reader = FrameReader(recipe, settings, first_labels.shape, sequence.name)

    def features_of(path: Path) -> tuple[Tensor, tuple[int, int], np.ndarray]:
        image, pixels = reader(path)
        grid = patch_feature_map(model, image[None].to(device))[0].float()
        return F.normalize(grid.flatten(1).T, dim=1), tuple(grid.shape[1:]), pixels

    first_features, grid, first_pixels = features_of(sequence.frames[0])
    small = np.asarray(Image.fromarray(first_labels).resize(grid[::-1], Image.NEAREST)).astype(np.int64)
    channels = int(first_labels.max()) + 1
    first_soft = F.one_hot(torch.from_numpy(small).flatten(), channels).float().to(device)
    allowed = neighbourhood(*grid, settings.radius, device) if settings.radius > 0 else None
    recent: list[tuple[Tensor, Tensor]] = []
    predictions, frames = [first_labels], [first_pixels]
    steps = range(1, len(sequence.frames))
    for index in progress_bar(steps, f"VOS: {sequence.name}", len(steps)):
        features, _, pixels = features_of(sequence.frames[index])
        soft = propagate(features, [first_features, *(f for f, _ in recent)], [first_soft, *(s for _, s in recent)],
                         allowed, settings.top_k, settings.temperature)
        recent = (recent + [(features, soft)])[-settings.context_frames :] if settings.context_frames else []
        predictions.append(_hard_labels(soft, grid, reader.resized, first_labels.shape))
        frames.append(pixels)
    if output_dir is not None:
        folder = output_dir / sequence.name
        folder.mkdir(parents=True, exist_ok=True)
        for path, labels in zip(sequence.frames, predictions):
            write_indexed_png(folder / f"{path.stem}.png", labels)
    return np.stack(predictions), frames


def _hard_labels(soft: Tensor, grid: tuple[int, int], resized: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """Soft labels on the feature grid -> (H, W) uint8 labels: bilinear upsampling to the resized
    frame, each channel rescaled to [0, 1], arg-max, nearest resize to the frame's size."""
    maps = F.interpolate(soft.T.reshape(1, -1, *grid), size=resized, mode="bilinear", align_corners=False)[0]
    low = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - low
    maps = torch.where(span > 0, (maps - low) / span.clamp(min=1e-12), maps)
    labels = maps.argmax(dim=0).to(torch.uint8).cpu().numpy()
    return np.asarray(Image.fromarray(labels).resize(size[::-1], Image.NEAREST))


# -- the stage ----------------------------------------------------------------------------------
def load_vos_backbone(backbone: str, encoder: Optional[str], arch: Optional[str]) -> tuple[torch.nn.Module, DataRecipe]:
    """The frozen backbone (a ViT rebuilt with `dynamic_img_size`, for frames of any size) and its
    data recipe (ImageNet's when it records none)."""
    spec = resolve_backbone(backbone, encoder, arch)
    model = build_from_spec(spec)
    if is_vit(model):
        model = build_from_spec(spec, dynamic_img_size=True)
    return model.requires_grad_(False).eval(), spec.recipe or DataRecipe()


def run_vos(
    backbone: str,
    davis_root: str,
    encoder: Optional[str] = None,
    arch: Optional[str] = None,
    sequences_file: str = "ImageSets/2017/val.txt",
    resolution: str = "480p",
    propagation: Propagation = Propagation(),
    overlay_frames: int = 4,
    write_synthetic: bool = False,
    seed: int = 0,
    accelerator: str = "auto",
    output_dir: str = "runs/vos",
) -> dict[str, Any]:
    """Segment DAVIS sequences by label propagation from their first annotation and score them by J&F.

    Writes the PNGs, prints J&F, writes `output_dir/vos_results.json` and `output_dir/vos_overlay.png`.

    Args:
        backbone: Export directory or file, bam pretraining checkpoint, the authors' released
            file, or a timm model name (random initialisation, a baseline).
        davis_root: Folder with JPEGImages/<resolution>/, Annotations/<resolution>/ and the list.
        encoder: The encoder of a checkpoint to evaluate ("teacher" or "student"; default: the teacher).
        arch: Architecture of a checkpoint, instead of the one it records.
        sequences_file: The sequence list, relative to `davis_root`.
        resolution: The sub-folder of JPEGImages/ and Annotations/ read.
        short_side: Frames are resized to this short side (px).
        long_side_multiple: The long side is rounded down to a multiple of this (px).
        context_frames: Previous frames in the context (besides the first frame).
        radius: Affinities only within this many feature positions (0: everywhere).
        top_k: Context positions whose labels each position averages.
        temperature: Affinity `exp(cosine / temperature)`.
        overlay_frames: Frames of the first sequence drawn in the overlay (0: no overlay).
        write_synthetic: Write the synthetic videos of `bam.data.synthetic_video` into `davis_root`
            first if it does not exist (the demo).
        seed: Seed of a random-init backbone (a timm name): the same baseline on every run and process.
        accelerator: "auto" (CUDA when available), "cpu" or "cuda".
        output_dir: Where the PNGs (`<sequence>/<frame>.png`), the JSON and the overlay go.

    Returns:
        `J&F`, `J` and `F` (mean, recall, decay; percent), `per_object` scores, the same for
        `first_mask_baseline`, and the settings used.
    """
    settings = propagation
    device = select_device(accelerator)
    init_distributed(device)
    if write_synthetic and not Path(davis_root).exists() and rank() == 0:
        write_synthetic_davis(davis_root)
    if write_synthetic and dist.is_initialized():
        dist.barrier()  # the others read what process 0 wrote
    sequences = read_sequences(davis_root, sequences_file, resolution)
    torch.manual_seed(seed)
    model, recipe = load_vos_backbone(backbone, encoder, arch)
    model = model.to(device)
    out = Path(output_dir)
    mine: dict[str, Any] = {}
    for sequence in sequences[rank() :: world_size()]:
        predictions, frames = segment_sequence(model, sequence, recipe, settings, device, out)
        annotations = read_annotations(sequence)
        copied = np.repeat(annotations[:1], len(annotations), axis=0)
        mine[sequence.name] = {"propagated": score_sequence(annotations, predictions),
                               "first_mask": score_sequence(annotations, copied)}
        if sequence is sequences[0] and overlay_frames > 0:
            draw_overlay(frames, predictions, annotations, overlay_frames, out / OVERLAY_FILE, sequence.name)
    scores = _gathered(mine)
    result = {
        **_named_scores(scores, sequences, "propagated"),
        "first_mask_baseline": _named_scores(scores, sequences, "first_mask"),
        "num_sequences": len(sequences), "backbone": backbone, "davis_root": str(davis_root),
        "seed": seed, "settings": settings.__dict__,
    }
    _report(result, out)
    return result


def _gathered(mine: dict[str, Any]) -> dict[str, Any]:
    if world_size() == 1:
        return mine
    everyone: list[dict[str, Any]] = [{} for _ in range(world_size())]
    dist.all_gather_object(everyone, mine)
    return {name: scores for part in everyone for name, scores in part.items()}


def _named_scores(scores: dict[str, Any], sequences: list[VideoSequence], prediction: str) -> dict[str, Any]:
    per_object = {
        f"{sequence.name}_{number}": object_scores
        for sequence in sequences
        for number, object_scores in enumerate(scores[sequence.name][prediction], start=1)
    }
    if not per_object:
        raise ValueError("no sequence has an object in its first annotation: nothing to segment")
    rounded = {name: {measure: {key: round(100 * value, 4) for key, value in stats.items()}
                      for measure, stats in object_scores.items()} for name, object_scores in per_object.items()}
    return {**summarise(per_object), "num_objects": len(per_object), "per_object": rounded}


def draw_overlay(
    frames: list[np.ndarray], predictions: np.ndarray, annotations: np.ndarray, count: int, path: Path, name: str
) -> None:
    """`count` evenly spaced frames: the prediction (top) and the annotation (bottom) in the DAVIS
    colours, blended half and half over the frame."""
    palette = davis_palette().astype(np.float64)
    chosen = np.unique(np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int))
    figure = Figure(figsize=(3 * len(chosen), 5), layout="constrained")
    for row, (labels, title) in enumerate(((predictions, "propagated"), (annotations, "annotation"))):
        for column, index in enumerate(chosen):
            axes = figure.add_subplot(2, len(chosen), row * len(chosen) + column + 1)
            mask = labels[index]
            blended = np.where((mask > 0)[..., None], 0.5 * frames[index] + 0.5 * palette[mask], frames[index])
            axes.imshow(blended.astype(np.uint8))
            axes.set_title(f"{name} frame {index}: {title}", fontsize="small")
            axes.axis("off")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)


def format_table(result: dict[str, Any]) -> str:
    """J&F, J and F (mean, recall, decay; percent) of the propagation and of the first-mask copy."""
    settings = result["settings"]
    columns = ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
    lines = [
        f"DAVIS VOS by label propagation: {result['num_sequences']} sequences, {result['num_objects']} objects "
        f"(short side {settings['short_side']} px, first + {settings['context_frames']} previous frames, radius "
        f"{settings['radius']}, top-{settings['top_k']}, T {settings['temperature']}; %)",
        f"{'':<20}" + "".join(f"{column:>10}" for column in columns),
    ]
    for label, scores in (("propagated", result), ("first mask copied", result["first_mask_baseline"])):
        values = [scores["J&F"], *(scores[m][k] for m in ("J", "F") for k in ("mean", "recall", "decay"))]
        lines.append(f"{label:<20}" + "".join(f"{value:>10.2f}" for value in values))
    return "\n".join(lines)


def _report(result: dict[str, Any], output_dir: Path) -> None:
    report_on_first_process(format_table(result), result, output_dir / RESULTS_FILE)


def main(argv: list[str]) -> None:
    """`bam vos --backbone PATH --davis_root DIR [--config FILE] [--print_config] [overrides]`."""
    try:
        CLI(run_vos, args=stage_arguments("vos", argv, (*PROPAGATION_MOVED_KEYS, ENCODER_MOVED_KEY)),
            as_positional=False, prog="bam vos")
    except (ValueError, FileNotFoundError) as error:  # a setting or the data: one line, no traceback
        sys.exit(f"bam vos: {error}")
