"""Images per second of a full BAM step next to a backbone-only step, same recipe, same run.

Both steps see the same multi-crop batch (the recipe's crop counts and sizes) and do forward,
backward and an optimiser step; the backbone-only step replaces the projector, the momentum
teacher and the objective by the mean of the backbone's features. The ratio is the cost of BAM
over training the bare backbone on the same views.

    python tests/gpu/throughput.py --config configs/pretrain/vit_small_patch16.yaml --batch 64
    python tests/gpu/throughput.py --config configs/pretrain/demo.yaml --device cpu --steps 3

tests/gpu/test_gpu.py runs it on the GPU as a test (tests/gpu/check.sh).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from bam.data import MultiCropConfig
from bam.methods import BAMModule
from bam.methods.base import SSLMethod

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_method(config: Path) -> tuple[SSLMethod, list[tuple[int, int]]]:
    """The recipe's method and its crops as (count, size) pairs."""
    recipe = yaml.safe_load(config.read_text())
    model_args = dict(recipe["model"]["init_args"])
    method_class = BAMModule if recipe["model"]["class_path"].endswith("BAMModule") else None
    if method_class is None:
        raise SystemExit(f"{config}: throughput is measured for BAM recipes only")
    crops = MultiCropConfig(**recipe["data"]["init_args"].get("crops", {}))  # the crop counts live here
    model_args.update(num_global_crops=crops.num_global_crops, num_local_crops=crops.num_local_crops)
    layout = [(crops.num_global_crops, crops.global_size), (crops.num_local_crops, crops.local_size)]
    return method_class(**model_args), layout


def timed(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per step, after two warm-up steps."""
    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def measure(config: Path, batch: int, steps: int, device: torch.device, precision: str) -> tuple[float, float]:
    """(backbone-only, full BAM) images per second."""
    method, layout = build_method(config)
    method = method.to(device)
    crops = [torch.randn(batch, 3, size, size, device=device) for count, size in layout for _ in range(count)]
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast(device.type, dtype=PRECISIONS[precision], enabled=PRECISIONS[precision] is not None)

    def optimise(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def backbone_only() -> None:
        with autocast:
            loss = sum(method.student.backbone(view).float().mean() for view in crops)
        optimise(loss)

    def full_step() -> None:
        with autocast:
            loss = method.compute_loss(crops)
        optimise(loss)
        if method.teacher is not None:
            method.move_teacher(method.hparams.teacher_momentum)

    return batch / timed(backbone_only, steps, device), batch / timed(full_step, steps, device)


TABLE_HEADER = "| recipe | precision | backbone-only img/s | BAM img/s | BAM / backbone-only |\n|---|---|---:|---:|---:|"


def table_row(config: Path, precision: str, bare: float, full: float) -> str:
    return f"| {config.stem} | {precision} | {bare:.1f} | {full:.1f} | {full / bare:.2f}x |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, action="append", required=True)
    parser.add_argument("--batch", type=int, default=64, help="images per step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(TABLE_HEADER)
    for config in args.config:
        bare, full = measure(config, args.batch, args.steps, device, args.precision)
        print(table_row(config, args.precision, bare, full))


if __name__ == "__main__":
    main()
