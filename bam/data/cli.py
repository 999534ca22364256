"""`bam data COMMAND [options]`: dataset tools, one module with a `main(argv)` per command."""
from __future__ import annotations

import argparse
import importlib

# command -> (module defining `main(argv)`, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "ffcv": ("bam.data.ffcv_convert", "write an FFCV .beton file from an image folder, a file list or a built-in dataset"),
}


def main(argv: list[str]) -> int:
    """Run ``bam data <command> ...``: argparse lists the commands (``--help``) and rejects an
    unknown one (exit 2); the command's own options go to its module's ``main``."""
    parser = argparse.ArgumentParser(
        prog="bam data", description="Dataset tools; `bam data COMMAND --help` for a command's options.",
        epilog="commands:\n" + "\n".join(f"  {name}: {text}" for name, (_, text) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the command's options")
    parsed = parser.parse_args(argv)
    return importlib.import_module(COMMANDS[parsed.command][0]).main(parsed.options)
