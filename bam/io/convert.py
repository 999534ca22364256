"""`bam convert`: turn the authors' released pretraining file into a bam backbone export.

Same code path as `bam export`, restricted to the authors' format so that a mix-up of files is
reported instead of converted.
"""
from __future__ import annotations

from bam.io.export_cli import build_parser, parse_command_line, run_export
from bam.io.export_layout import CONFIG_FILE, WEIGHTS_FILE
from bam.io.released import RELEASED_ARCHS

CONVERT_EPILOG = f"""\
The architecture comes from the file's args.arch and args.patch_size ({', '.join(sorted(RELEASED_ARCHS))});
--arch overrides it. The export is read back with bam.load_backbone(DIR) (a timm model in eval mode).

examples:
    bam convert bam_vitb16_checkpoint.pth --output exported/vit_b16
    bam convert checkpoint.pth --output exported/caformer --arch caformer_m36 --encoder student"""


def main(argv: list[str] | None = None) -> None:
    """`bam convert RELEASED_CKPT --output DIR [--encoder teacher|student] [--arch NAME]`."""
    prog = "bam convert"
    parser = build_parser(
        prog,
        f"Convert an authors' released BAM pretraining file (keys model, optimizer, epoch, args, ...) into "
        f"{WEIGHTS_FILE} plus {CONFIG_FILE}, the backbone only, matched strictly to its timm architecture.",
        CONVERT_EPILOG,
    )
    run_export(parse_command_line(parser, argv, prog), prog, source_format="released")
