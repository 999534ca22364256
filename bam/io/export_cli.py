"""`bam export`: write a checkpoint's backbone as an export (`bam.io.export_writer`) from the
command line; `bam convert` shares its parser and reporting.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bam.io.backbone_reader import ENCODER_MOVED_KEY
from bam.io.export_layout import CONFIG_FILE, WEIGHTS_FILE
from bam.io.export_writer import ExportWriteError, export_backbone
from bam.io.finetune_checkpoint import MODELS
from bam.io.released import RELEASED_ARCHS
from bam.io.safe_load import NotACheckpointError, UnsafeCheckpointError
from bam.io.state import ENCODERS, CheckpointFormatError, CheckpointMismatchError
from bam.moved_keys import read_moved_keys


# what an export holds, in words, by the `encoder` it records
EXPORTED_NAMES = {"model": "fine-tuned model", "ema": "fine-tuned model's weight average (EMA)"}

# errors that the command line reports as a message instead of a traceback
CLI_ERRORS = (FileNotFoundError, UnsafeCheckpointError, NotACheckpointError, CheckpointFormatError,
              CheckpointMismatchError, ExportWriteError)


def build_parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """The arguments shared by `bam export` and `bam convert`."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", type=Path, help="checkpoint file to read (loaded weights-only: no code from it runs)"
    )
    parser.add_argument(
        "--output", "-o", type=Path, required=True,
        help=f"directory to write {WEIGHTS_FILE} and {CONFIG_FILE} into (created if needed)",
    )
    parser.add_argument(
        "--encoder", choices=(*ENCODERS, *MODELS), default=None,
        help="pretraining checkpoints: the encoder to export, by default the teacher when the checkpoint has one "
        "(the published numbers use it), else the student; fine-tuning checkpoints: the EMA of the weights "
        "(default, when kept) or the model, exported with its classifier",
    )
    parser.add_argument(
        "--arch", default=None,
        help=f"architecture to load the weights into, instead of the one the checkpoint records: one of the authors' "
        f"names {sorted(RELEASED_ARCHS)} or a timm model name",
    )
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None, prog: str) -> argparse.Namespace:
    """`argv` (default: the process's) parsed by `parser`, an old `--which` read as `--encoder`."""
    argv = sys.argv[1:] if argv is None else argv
    return parser.parse_args(read_moved_keys(argv, (ENCODER_MOVED_KEY,), prog))


def run_export(args: argparse.Namespace, prog: str, source_format: str | None = None) -> Path:
    """Export as the parsed command line says, reporting expected failures without a traceback."""
    try:
        output = export_backbone(args.checkpoint, args.output, args.encoder, args.arch, source_format)
    except CLI_ERRORS as error:
        raise SystemExit(f"{prog}: error: {error}") from error
    config = json.loads((output / CONFIG_FILE).read_text())
    recipe = config["pretrained_cfg"]
    encoder = config["bam"]["encoder"]
    print(
        f"{prog}: wrote the {EXPORTED_NAMES.get(encoder, encoder + ' backbone')} ({config['architecture']}, {config['num_features']}-d "
        f"features, {config['model_args']['num_classes']} classes) to {output / WEIGHTS_FILE} and "
        f"{output / CONFIG_FILE}; data recipe: {recipe['input_size'][-1]} px, mean {recipe['mean']}, std {recipe['std']}"
        + ("" if config["bam"]["data_recipe_recorded"] else " (the checkpoint records none: ImageNet's defaults)")
        + _trained_on(config["bam"]["train_crop_sizes"])
    )
    return output


def _trained_on(crop_sizes: list[int]) -> str:
    return f"; trained on {'/'.join(map(str, crop_sizes))}-px crops" if crop_sizes else ""


EXPORT_EPILOG = """\
The export is read back with bam.load_backbone(DIR), which returns a timm model in eval mode, or by
timm itself (after `import bam` for bam's own architectures such as bam_cnn4):
    model = bam.load_backbone("DIR"); features = model(images)  # (N, feature_dim)
    model = timm.create_model("local-dir:DIR", pretrained=True)

examples:
    bam export runs/bam/last.ckpt --output exported/vit_s16
    bam export runs/bam/last.ckpt --output exported/student --encoder student"""


def main(argv: list[str] | None = None) -> None:
    """`bam export CKPT --output DIR [--encoder teacher|student] [--arch NAME]`."""
    prog = "bam export"
    parser = build_parser(
        prog,
        "Export the backbone of a pretraining checkpoint (bam's Lightning checkpoint or the authors' released "
        f"file, detected from its contents) as {WEIGHTS_FILE} plus {CONFIG_FILE}, the layout of timm and the "
        "Hugging Face Hub. Fine-tuning checkpoints (bam finetune) export the whole classifier.",
        EXPORT_EPILOG,
    )
    run_export(parse_command_line(parser, argv, prog), prog)
