"""The configs shipped with bam, by name: `bam pretrain --config demo` instead of a path.

A checkout keeps them in `configs/` beside the package; a built wheel carries a copy inside it as
`bam/configs/` (see setup.py). Pretraining names are the files of `configs/pretrain/`, study names
those of `configs/study/`; an
evaluation stage's are the files of `configs/eval/`, with or without the stage's prefix
(`bam knn --config demo` is `configs/eval/knn_demo.yaml`).
"""
from __future__ import annotations

from pathlib import Path

CONFIG_OPTION = "--config"


def configs_dir() -> Path:
    """Where the shipped configs are: inside an installed package, else in the checkout."""
    packaged = Path(__file__).parent / "configs"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "configs"


# stages whose configs are every file of a folder of their own (the others share configs/eval/)
OWN_FOLDER_STAGES = ("pretrain", "study")


def shipped_configs(stage: str) -> dict[str, Path]:
    """Name -> file of the configs shipped for `stage`."""
    if stage in OWN_FOLDER_STAGES:
        return {path.stem: path for path in sorted((configs_dir() / stage).glob("*.yaml"))}
    configs = {}
    for path in sorted((configs_dir() / "eval").glob(f"{stage}_*.yaml")):
        configs[path.stem] = path
        configs[path.stem.removeprefix(f"{stage}_")] = path
    return configs


def resolve_config(stage: str, value: str) -> str:
    """`value` when it names an existing file (or is not a plain name), else the shipped config
    of that name; an unknown name is an error listing the shipped ones."""
    if Path(value).exists() or Path(value).suffix or "/" in value or value.lstrip().startswith("{"):
        return value
    configs = shipped_configs(stage)
    if value not in configs:
        raise SystemExit(
            f"bam {stage}: error: --config {value!r} is neither a file nor a shipped config; shipped configs: "
            f"{', '.join(sorted(configs)) or 'none'}"
        )
    return str(configs[value])


def with_config_names(stage: str, argv: list[str]) -> list[str]:
    """`argv` with the value of every `--config NAME` / `--config=NAME` resolved (`resolve_config`)."""
    resolved, follows_option = [], False
    for argument in argv:
        if follows_option:
            argument = resolve_config(stage, argument)
        elif argument.startswith(f"{CONFIG_OPTION}="):
            argument = f"{CONFIG_OPTION}={resolve_config(stage, argument.split('=', 1)[1])}"
        follows_option = argument == CONFIG_OPTION
        resolved.append(argument)
    return resolved
