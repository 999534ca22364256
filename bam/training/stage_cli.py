"""The LightningCLI base of every `bam` stage that trains (`pretrain`, `linear`, `finetune`).

Two things a console-script front end must get right under multi-process launchers:

- `sys.argv` is never rewritten. Lightning's subprocess launcher (`--trainer.devices N` with a
  ddp strategy) starts ranks 1..N-1 by re-executing `sys.argv` (`python <argv[0]> <argv[1:]>`, or
  `python -m <module> <argv[1:]>`), so it has to stay the user's real command line.
- The stage's arguments are passed to LightningCLI explicitly, and its "args and command line
  arguments" warning does not apply: `sys.argv` holds the same arguments behind the stage name.
  Help reads `usage: bam <stage> ...` instead of the internal `... fit` subcommand.
"""
from __future__ import annotations

from typing import Any

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI


class StageCLI(LightningCLI):
    """LightningCLI that runs `Trainer.fit` for one `bam` stage from an explicit argument list.

    Args:
        program: what help calls the command, e.g. "bam pretrain".
        argv: the stage's arguments (config files and overrides), without the stage name.
        run: False only parses and builds the model, data and trainer (`cli.trainer.fit(...)` is
            then the caller's).
        **kwargs: passed to `LightningCLI`.
    """

    def __init__(self, *args: Any, program: str, argv: list[str], run: bool = True, **kwargs: Any) -> None:
        self.program = program
        super().__init__(*args, args=["fit", *argv] if run else argv, run=run, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        return {"fit": super().subcommands()["fit"]}

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]) -> None:
        super().setup_parser(add_subcommands, {**main_kwargs, "prog": self.program}, subparser_kwargs)
        for parser in getattr(self, "_subcommand_parsers", {}).values():
            parser.prog = self.program

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self.config = parser.parse_args(args)
