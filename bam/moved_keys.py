"""Config keys that moved: configs and command lines written before keep loading.

When settings are gathered into one object (the BPA settings of the frozen-feature stages, the
optimiser settings of the classifier stages) or renamed, their old keys would otherwise get
jsonargparse's page-long error (argparse's usage error in `bam export`). `read_moved_keys` rewrites
each old key, on the command line or in a `--config` file, to its new place and prints one line
naming the new key. It sits below `bam.io` so that the checkpoint I/O commands use it too.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from bam.shipped_configs import CONFIG_OPTION


def _always(value: Any) -> bool:
    return True


@dataclass(frozen=True)
class MovedKey:
    """`old` (a dotted config key, e.g. `bpa_reg`) now lives at `new` (e.g. `bpa.reg`).

    `applies` picks the old values that moved: an old `bpa: true` became `bpa.enabled`, while
    `bpa` itself is now the settings group, whose values (mappings) are left alone.
    """

    old: str
    new: str
    applies: Callable[[Any], bool] = _always

    def under(self, group: str) -> MovedKey:
        """The same move inside the settings group `group` (e.g. `model`)."""
        return MovedKey(f"{group}.{self.old}", f"{group}.{self.new}", self.applies)


def is_flag(value: Any) -> bool:
    """Whether an old value was a true/false switch (`MovedKey.applies` for switches that became groups)."""
    return isinstance(value, bool)


def read_moved_keys(argv: list[str], moves: Sequence[MovedKey], program: str) -> list[str]:
    """`argv` with every old key of `moves` at its new place, in command-line options and in the
    `--config` files (a rewritten file is passed on as its YAML text); one line on stderr per key."""
    rewritten, position = [], 0
    while position < len(argv):
        argument = argv[position]
        name, has_value, value = argument[2:].partition("=")
        if argument == CONFIG_OPTION and position + 1 < len(argv):
            rewritten += [argument, _config_with_moved_keys(argv[position + 1], moves, program)]
            position += 2
            continue
        if argument.startswith(f"{CONFIG_OPTION}="):
            rewritten.append(f"{CONFIG_OPTION}={_config_with_moved_keys(value, moves, program)}")
        elif argument.startswith("--") and not has_value and position + 1 < len(argv) and _moved(name, argv[position + 1], moves):
            move = _moved(name, argv[position + 1], moves)
            _announce(program, "the command line", move, argv[position + 1])
            rewritten += [f"--{move.new}", argv[position + 1]]
            position += 2
            continue
        elif argument.startswith("--") and has_value and _moved(name, value, moves):
            move = _moved(name, value, moves)
            _announce(program, "the command line", move, value)
            rewritten.append(f"--{move.new}={value}")
        else:
            rewritten.append(argument)
        position += 1
    return rewritten


def _moved(name: str, text: str, moves: Sequence[MovedKey]) -> MovedKey | None:
    value = _parsed(text)
    return next((move for move in moves if move.old == name and move.applies(value)), None)


def _parsed(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _config_with_moved_keys(value: str, moves: Sequence[MovedKey], program: str) -> str:
    path = Path(value)
    if not path.is_file():
        return value
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict) or not moved_in_mapping(config, moves, program, str(path)):
        return value
    return yaml.safe_dump(config, sort_keys=False)


def moved_in_mapping(config: dict[str, Any], moves: Sequence[MovedKey], program: str, source: str) -> bool:
    """Move the old keys of `config` (nested mappings) in place, announcing each; whether any moved."""
    found = False
    for move in moves:
        *parents, leaf = move.old.split(".")
        holder = _lookup(config, parents)
        if not isinstance(holder, dict) or leaf not in holder or not move.applies(holder[leaf]):
            continue
        value = holder.pop(leaf)
        *new_parents, new_leaf = move.new.split(".")
        target = config
        for key in new_parents:
            if not isinstance(target.get(key), dict):
                target[key] = {}
            target = target[key]
        target[new_leaf] = value
        _announce(program, source, move, value)
        found = True
    return found


def _lookup(config: dict[str, Any], keys: list[str]) -> Any:
    for key in keys:
        if not isinstance(config, dict):
            return None
        config = config.get(key)
    return config


def _announce(program: str, source: str, move: MovedKey, value: Any) -> None:
    print(f"{program}: note: {source}: `{move.old}` is now `{move.new}`; read as {move.new}={value}",
          file=sys.stderr, flush=True)
