"""Throughput of the data paths on the same generated JPEGs, per CPU core.

Every path makes the full recipe (2 global + 6 local crops by default, colour jitter, grey,
blur, solarise, normalise) from the same ``--images`` JPEG files of ``--size`` px:

- the baseline: PIL decoding and torchvision v1 transforms on PIL images, one image at a time
  (the usual DINO-style loader; blur and solarise with PIL's filters);
- the "cpu" path: bam's decoding (TorchCodec) + ``CPUMultiCrop`` (torchvision v2 on tensors);
- the "device" path run on the CPU: decode to a base-size square per image, ``DeviceMultiCrop``
  per batch;
- FFCV decoding (if installed) + ``DeviceMultiCrop`` per batch;
- the same on the GPU (if one is available).

Everything runs in the main process with one torch thread (FFCV with one decoding thread), and
speed per core is images per second of CPU time (all threads of the process), so other jobs on
the machine hardly affect it; wall-clock images/s are shown too. Paths are run in turn
``--repeats`` times and the best pass of each is reported. Decode-only rows (decoding to a
uint8 tensor at the base size, no augmentation) are compared with PIL decoding as
torchvision's ImageFolder does it.

A second table compares decoders alone, on generated JPEGs and PNGs of each ``--decode-sizes``
side: bam's ``decode_image_file`` as shipped (TorchCodec), with torchvision's deprecated decoder
in its place (bam's decoder before torchvision 0.29 deprecated it) and with Pillow in its place
(what bam falls back to without TorchCodec); the same file read and header check in all three.

    python tests/benchmarks/bench_data.py --images 2000
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import random
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms.functional import pil_to_tensor

from bam.data import CPUMultiCrop, DeviceMultiCrop, MultiCropConfig, load_builtin, write_beton
from bam.data.datasets import square_base_transform
from bam.data import image_decoding
from bam.data.image_decoding import decode_image_file
from bam.data.seeding import sample_seed, seeded_random
from bam.data.sources import ImageFiles, scan_image_folder

DECODE_ONLY = "decode only"  # rows that decode to a uint8 tensor without augmenting
DECODE_FORMATS = {"JPEG": ".jpg", "PNG": ".png"}  # the decoder table's formats and their files

# -- inputs ------------------------------------------------------------------------------------


def generate_jpegs(root: Path, count: int, size: int, classes: int = 10) -> ImageFiles:
    """``count`` JPEGs (quality 90) of coloured shapes under ``root/train/<class>/``.

    ``root/val`` gets one image per class so the training split holds all ``count`` images.
    """
    train, _ = load_builtin("synthetic", num_classes=classes, image_size=size, train_size=count, val_size=classes)
    for split, images, labels in (("train", train.images, train.labels), ("val", train.images[:classes], range(classes))):
        for index, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / f"class{int(label)}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index}.jpg", quality=90)
    return scan_image_folder(root / "train")[0]


def generate_files(folder: Path, count: int, size: int, suffix: str) -> list[str]:
    """``count`` images of coloured shapes, ``size`` px, as ``folder/<index><suffix>`` (JPEG: quality 90)."""
    folder.mkdir(parents=True)
    images, _ = load_builtin("synthetic", num_classes=10, image_size=size, train_size=count, val_size=1)
    paths = [str(folder / f"{index}{suffix}") for index in range(count)]
    for image, path in zip(images.images, paths):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, quality=90)
    return paths


# -- the baseline: PIL + torchvision v1, one image at a time -----------------------------------
class PILBlur:
    """PIL's Gaussian blur with a random radius, applied with probability ``prob``."""

    def __init__(self, prob: float, sigma: tuple[float, float]) -> None:
        self.prob, self.sigma = prob, sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        if random.random() >= self.prob:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class PILSolarize:
    """PIL's solarisation (threshold 128) with probability ``prob``."""

    def __init__(self, prob: float) -> None:
        self.prob = prob

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image, 128) if random.random() < self.prob else image


def pil_baseline(crops: MultiCropConfig) -> Callable[[str], list[torch.Tensor]]:
    """Path -> views with PIL decoding and torchvision v1 transforms on PIL images."""
    jitter = T.ColorJitter(crops.brightness, crops.contrast, crops.saturation, crops.hue)
    views = [
        T.Compose([
            T.RandomResizedCrop(view.size, scale=view.scale, ratio=crops.ratio),
            T.RandomHorizontalFlip(crops.flip_prob),
            T.RandomApply([jitter], p=crops.color_jitter_prob),
            T.RandomGrayscale(crops.grayscale_prob),
            PILBlur(view.blur_prob, crops.blur_sigma),
            PILSolarize(view.solarize_prob),
            T.ToTensor(),
            T.Normalize(crops.mean, crops.std),
        ])
        for view in crops.views()
    ]

    def load(path: str) -> list[torch.Tensor]:
        with Image.open(path) as image:
            image = image.convert("RGB")
        return [view(image) for view in views]

    return load


def pil_decode(path: str) -> torch.Tensor:
    """torchvision's ImageFolder loader (PIL, RGB) followed by PILToTensor: a uint8 tensor."""
    with Image.open(path) as image:
        return pil_to_tensor(image.convert("RGB"))


# -- timing ------------------------------------------------------------------------------------
def throughput(run: Callable[[], Iterable[int]]) -> tuple[float, float]:
    """``(images per CPU second, images per wall second)`` of ``run`` (which yields batch sizes).

    The first batch is a warm-up (JIT compilation, caches). CPU time counts every thread of the
    process (FFCV decodes in its own thread), which makes it the per-core measure.
    """
    batches = iter(run())
    next(batches)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    count = sum(batches)
    return count / (time.process_time() - cpu_start), count / (time.perf_counter() - wall_start)


def batched(items: Sequence, size: int) -> Iterable[Sequence]:
    return (items[i : i + size] for i in range(0, len(items), size))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_image(files: ImageFiles, transform: Callable[[str], object]) -> Callable[[], Iterable[int]]:
    def run() -> Iterable[int]:
        for path in files.paths:
            transform(path)
            yield 1

    return run


def seeded_per_image(multicrop: CPUMultiCrop) -> Callable[[str], object]:
    """The cpu path as training runs it: each image's draws seeded from (seed, epoch, index)."""
    indices = itertools.count()

    def load(path: str) -> list[torch.Tensor]:
        with seeded_random(sample_seed(0, 0, next(indices))):
            return multicrop(decode_image_file(path))

    return load


def device_path(files: ImageFiles, crops: MultiCropConfig, base: int, batch: int, device: torch.device):
    """Decode + base-size square per image on the CPU, then the batched crops on ``device``."""
    augment, to_base = DeviceMultiCrop(crops), square_base_transform(base)

    def run() -> Iterable[int]:
        for paths in batched(files.paths, batch):
            images = torch.stack([to_base(decode_image_file(p)) for p in paths]).to(device)
            augment(images)
            sync(device)
            yield len(paths)

    return run


def ffcv_path(beton: Path, base: int, batch: int, augment: Callable | None, device: torch.device):
    """FFCV decoding (one thread) at the base size, then (optionally) the batched crops."""
    from bam.data import FFCVDataModule

    module = FFCVDataModule(str(beton), base_size=base, batch_size=batch, num_workers=1)

    def run() -> Iterable[int]:
        for images, _ in module.train_dataloader():
            if augment is not None:
                augment(images.to(device))
                sync(device)
            yield len(images)

    return run


def measure(args: argparse.Namespace, root: Path) -> list[tuple[str, float, float]]:
    """``(path name, images per CPU second, images per wall second)`` of every available path."""
    crops = MultiCropConfig(global_size=args.global_size, local_size=args.local_size)
    files = generate_jpegs(root, args.images, args.size)
    cpu = torch.device("cpu")
    rows = [
        ("PIL + torchvision v1 per image (baseline)", per_image(files, pil_baseline(crops))),
        ("cpu path: torchvision v2 per image", per_image(files, seeded_per_image(CPUMultiCrop(crops)))),
        ("device path on CPU: decode per image + batched crops", device_path(files, crops, args.size, args.batch_size, cpu)),
        (f"{DECODE_ONLY}: PIL, as ImageFolder + PILToTensor", per_image(files, pil_decode)),
        (f"{DECODE_ONLY}: bam (TorchCodec)", per_image(files, decode_image_file)),
    ]
    if importlib.util.find_spec("ffcv") is not None:
        rows += ffcv_rows(args, root, crops, cpu)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        rows.append(("device path on GPU: decode (1 core) + crops on GPU",
                     device_path(files, crops, args.size, args.batch_size, gpu)))
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.repeats):  # interleaved, so a busy spell on the machine hits every path
        for name, run in rows:
            cpu_rate, wall_rate = throughput(run)
            previous = best.get(name, (0.0, 0.0))
            best[name] = (max(previous[0], cpu_rate), max(previous[1], wall_rate))
    return [(name, *best[name]) for name, _ in rows]


def ffcv_rows(args: argparse.Namespace, root: Path, crops: MultiCropConfig, cpu: torch.device) -> list:
    """FFCV rows: decode only per storage mode, then decode (first mode) + batched crops on CPU / GPU."""
    rows = []
    for mode in args.ffcv_modes:
        beton = root / f"train_{mode}.beton"
        write_beton(str(root), str(beton), write_mode=mode, num_workers=1)
        rows.append((f"{DECODE_ONLY}: FFCV ({mode})", ffcv_path(beton, args.size, args.batch_size, None, cpu)))
    mode = args.ffcv_modes[0]
    beton = root / f"train_{mode}.beton"
    rows.append((f"FFCV ({mode}) + batched crops on CPU",
                 ffcv_path(beton, args.size, args.batch_size, DeviceMultiCrop(crops), cpu)))
    if torch.cuda.is_available():
        rows.append((f"FFCV ({mode}, 1 core) + crops on GPU",
                     ffcv_path(beton, args.size, args.batch_size, DeviceMultiCrop(crops), torch.device("cuda"))))
    return rows


# -- decoders alone: TorchCodec (shipped) vs torchvision (deprecated) vs Pillow -----------------
def torchvision_decoder(data: torch.Tensor, mode: str) -> torch.Tensor:
    """torchvision's deprecated decoder, called as bam called it before TorchCodec."""
    from torchvision.io import ImageReadMode, decode_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(data, mode=ImageReadMode[mode], apply_exif_orientation=True)


@contextmanager
def decoders_in_place(decoders: dict[str, Callable]) -> Iterator[None]:
    """``decode_image_file`` with ``decoders`` as its table of format -> decoder ({}: Pillow)."""
    shipped = image_decoding.CODEC_DECODERS
    image_decoding.CODEC_DECODERS = decoders
    try:
        yield
    finally:
        image_decoding.CODEC_DECODERS = shipped


def decoder_rows(args: argparse.Namespace, root: Path) -> list[tuple[str, int, dict[str, float]]]:
    """``(format, side, {decoder: images per CPU second})`` for every format and ``--decode-sizes``
    side; the decoders run in turn ``--repeats`` times on the same files, the best pass counts."""
    decoders = {
        "TorchCodec": image_decoding.CODEC_DECODERS,
        "torchvision": {name: torchvision_decoder for name in image_decoding.CODEC_DECODERS},
        "Pillow": {},
    }
    rows = []
    for (name, suffix), size in itertools.product(DECODE_FORMATS.items(), args.decode_sizes):
        # about the same pixel count per size, so each row takes a similar time
        count = max(args.decode_images * args.size ** 2 // size ** 2, 4)
        paths = generate_files(root / f"{name}_{size}", count, size, suffix)
        files = ImageFiles(paths, [0] * count)
        best = dict.fromkeys(decoders, 0.0)
        for _ in range(args.repeats):
            for decoder, table in decoders.items():
                with decoders_in_place(table):
                    best[decoder] = max(best[decoder], throughput(per_image(files, decode_image_file))[0])
        rows.append((name, size, best))
    return rows


def format_decoder_table(rows: list[tuple[str, int, dict[str, float]]]) -> str:
    """Markdown table: images/s per core of each decoder and its ratio to torchvision's."""
    lines = ["| format | side px | TorchCodec | torchvision | TorchCodec / torchvision | Pillow | Pillow / torchvision |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, size, rate in rows:
        old = rate["torchvision"]
        lines.append(f"| {name} | {size} | {rate['TorchCodec']:.1f} | {old:.1f} | {rate['TorchCodec'] / old:.2f}x "
                     f"| {rate['Pillow']:.1f} | {rate['Pillow'] / old:.2f}x |")
    return "\n".join(lines)


def format_table(rows: list[tuple[str, float, float]]) -> str:
    """Markdown table; ratios are per core, to the baseline (the first row), and for the
    decode-only rows to the first decode-only row (PIL decoding, as torchvision's ImageFolder)."""
    baseline = rows[0][1]
    decode_baseline = next((cpu for name, cpu, _ in rows if name.startswith(DECODE_ONLY)), baseline)
    width = max(len(name) for name, *_ in rows)
    lines = [
        f"| {'path':<{width}} | images/s per core | vs baseline | images/s (wall) |",
        f"|{'-' * (width + 2)}|------------------:|------------:|----------------:|",
    ]
    for name, cpu, wall in rows:
        reference = decode_baseline if name.startswith(DECODE_ONLY) else baseline
        lines.append(f"| {name:<{width}} | {cpu:17.1f} | {cpu / reference:10.2f}x | {wall:15.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> tuple[list[tuple[str, float, float]], list[tuple[str, int, dict[str, float]]]]:
    """The rows of both tables (paths, then decoders), printed as Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="number of generated JPEGs")
    parser.add_argument("--size", type=int, default=256, help="side of the JPEGs and of the base-size square")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3, help="passes over every path; the best is reported")
    parser.add_argument("--tables", nargs="+", default=["paths", "decoders"], choices=["paths", "decoders"],
                        help="which tables to measure: the data paths, the decoders alone")
    parser.add_argument("--decode-sizes", type=int, nargs="+", default=[64, 256, 1024],
                        help="sides of the JPEGs and PNGs the decoder table decodes")
    parser.add_argument("--decode-images", type=int, default=400,
                        help="images per format at --size px in the decoder table (as many pixels at the other sides)")
    parser.add_argument("--ffcv-modes", nargs="+", default=["jpg", "proportion", "raw"],
                        choices=["jpg", "proportion", "raw"],
                        help="FFCV storage modes to decode (proportion: half JPEG, half raw, FFCV's ImageNet setting)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    _single_threaded_opencv()
    with tempfile.TemporaryDirectory() as folder:
        rows = measure(args, Path(folder)) if "paths" in args.tables else []
        decoders = decoder_rows(args, Path(folder)) if "decoders" in args.tables else []
    if rows:
        print(f"{args.images} JPEGs of {args.size} px, 2x{args.global_size} + 6x{args.local_size} crops, one core each:")
        print(format_table(rows))
    if decoders:
        print(f"\ndecoders alone, images/s per core (decode_image_file with each decoder; {args.decode_images} images "
              f"per format at {args.size} px, as many pixels at the other sides):")
        print(format_decoder_table(decoders))
    return rows, decoders


def _single_threaded_opencv() -> None:
    """FFCV resizes with OpenCV, which would otherwise use every core."""
    if importlib.util.find_spec("cv2") is not None:
        import cv2

        cv2.setNumThreads(1)


if __name__ == "__main__":
    main(sys.argv[1:])
