"""`bam deploy`: a backbone (an export, or anything `bam.load_backbone` reads) as a TorchScript or
ONNX file for serving without bam, checked against the eager model on the same input.

The model is traced on a batch of the size its data recipe records (`(2, C, S, S)` of seeded
noise); the written file is loaded back (TorchScript by torch, ONNX by onnxruntime), run on
another batch of another size (the batch dimension is dynamic), and the largest absolute
difference to the eager model's output is printed. A difference above `tolerance` is an error:
the file is removed and the command fails.

ONNX needs the `onnx` extra (`pip install "bam-ssl[onnx]"`: onnx and onnxruntime); it uses
torch's TorchScript-based ONNX exporter, which needs nothing else. TorchScript needs nothing
beyond torch (torch 2.14 deprecates `torch.jit.trace` in favour of `torch.export`, but the file
format is still what libtorch and TorchServe load).
"""
from __future__ import annotations

import argparse
import importlib.util
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from bam.io.backbone_reader import read_backbone
from bam.io.export_cli import CLI_ERRORS, parse_command_line

INPUT_NAME, OUTPUT_NAME = "images", "features"
TRACE_BATCH, CHECK_BATCH = 2, 3  # different sizes: the check proves the batch dimension is dynamic


class DeploymentError(RuntimeError):
    """The model could not be written in the format, or the written file's output differs from
    the eager model's by more than the tolerance."""


def _write_torchscript(model: nn.Module, example: Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's deprecation notice of torch.jit.trace
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks frozen at trace time
        traced = torch.jit.trace(model, example)
    traced.save(str(path))


def _run_torchscript(path: Path, images: Tensor) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's deprecation notice of torch.jit.load
        return torch.jit.load(str(path))(images)


def _write_onnx(model: nn.Module, example: Tensor, path: Path) -> None:
    _require_onnx()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


def _run_onnx(path: Path, images: Tensor) -> Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0])


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModuleNotFoundError(
            f"ONNX export needs {' and '.join(missing)}: pip install \"bam-ssl[onnx]\" (or pip install onnx onnxruntime)"
        )


# format -> (file suffix, writer, runner of the written file)
DEPLOY_FORMATS: dict[str, tuple[str, Callable[[nn.Module, Tensor, Path], None], Callable[[Path, Tensor], Tensor]]] = {
    "torchscript": (".pt", _write_torchscript, _run_torchscript),
    "onnx": (".onnx", _write_onnx, _run_onnx),
}


def example_input(model: nn.Module, size: int, batch: int, seed: int) -> Tensor:
    """Seeded standard-normal images `(batch, C, size, size)` (normalised images look like that)."""
    channels = next(module.in_channels for module in model.modules() if isinstance(module, nn.Conv2d))
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def deploy_backbone(
    backbone: str | Path,
    output: str | Path,
    format: str = "torchscript",
    encoder: str | None = None,
    arch: str | None = None,
    tolerance: float = 1e-4,
) -> tuple[Path, float]:
    """Write `backbone` (an export or checkpoint, see `bam.load_backbone`) to `output` as
    TorchScript or ONNX; return the file and the largest absolute difference between its output
    and the eager model's on the same seeded input. Raises `DeploymentError` when torch cannot
    write it, or (removing the file) when the difference exceeds `tolerance`."""
    if format not in DEPLOY_FORMATS:
        raise ValueError(f"unknown format {format!r}: choose one of {', '.join(DEPLOY_FORMATS)}")
    _, write, run = DEPLOY_FORMATS[format]
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    spec = read_backbone(backbone, encoder, arch)
    model, size = spec.build().float().eval(), spec.data_recipe.input_size
    with torch.no_grad():
        try:
            write(model, example_input(model, size, TRACE_BATCH, seed=0), path)
        except (torch.onnx.errors.OnnxExporterError, torch.jit.Error) as error:
            raise DeploymentError(f"torch cannot write {spec.model_name} at {size} px as {format}: "
                                  f"{str(error).splitlines()[0]}") from error
        images = example_input(model, size, CHECK_BATCH, seed=1)
        difference = (run(path, images) - model(images)).abs().max().item()
    if not difference <= tolerance:  # also catches NaN
        path.unlink(missing_ok=True)
        raise DeploymentError(
            f"the {format} file's output differs from the eager model's by up to {difference:.3g} "
            f"(tolerance {tolerance:g}); nothing was written"
        )
    return path, difference


def main(argv: list[str] | None = None) -> None:
    """`bam deploy BACKBONE --format torchscript|onnx --output FILE [--encoder ...] [--arch ...]`."""
    prog = "bam deploy"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write a backbone (a bam export, a bam checkpoint or the authors' released file) as TorchScript "
        "or ONNX, run the written file on the same input as the eager model and print the largest absolute difference.",
    )
    parser.add_argument("backbone", help="export directory (bam export) or checkpoint file")
    parser.add_argument("--format", choices=sorted(DEPLOY_FORMATS), default="torchscript")
    parser.add_argument("--output", "-o", type=Path, default=None,
                        help="file to write (default: model.pt / model.onnx in the export directory)")
    parser.add_argument("--encoder", default=None, help="checkpoints only: the encoder (see bam export --help)")
    parser.add_argument("--arch", default=None, help="checkpoints only: the architecture (see bam export --help)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest absolute difference to the eager model accepted (default 1e-4)")
    args = parse_command_line(parser, argv, prog)
    output = args.output or _default_output(Path(args.backbone), DEPLOY_FORMATS[args.format][0])
    try:
        path, difference = deploy_backbone(args.backbone, output, args.format, args.encoder, args.arch, args.tolerance)
    except (*CLI_ERRORS, ModuleNotFoundError, DeploymentError) as error:
        raise SystemExit(f"{prog}: error: {error}") from error
    print(f"{prog}: wrote {path} ({args.format}); max abs difference to the eager model on the same "
          f"{CHECK_BATCH} images: {difference:.3g}")


def _default_output(backbone: Path, suffix: str) -> Path:
    directory = backbone if backbone.is_dir() else backbone.parent
    return directory / f"model{suffix}"

