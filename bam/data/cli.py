"""`bam data COMMAND [options]`: dataset tools, one module with a `main(argv)` per command."""
from __future__ import annotations

import importlib
import sys

# command -> (module defining `main(argv)`, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "ffcv": ("bam.data.ffcv_data", "write an FFCV .beton file from an image folder, a file list or a built-in dataset"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: bam data COMMAND [options]   (bam data COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {description}" for name, (_, description) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Run ``bam data <command> ...``; without a known command, print the usage and exit."""
    if argv and argv[0] in COMMANDS:
        module, _ = COMMANDS[argv[0]]
        return importlib.import_module(module).main(argv[1:])
    asked = not argv or argv[0] in ("-h", "--help")
    print(usage() if asked else f"unknown command {argv[0]!r}\n\n{usage()}", file=sys.stdout if asked else sys.stderr)
    raise SystemExit(0 if asked else 2)
