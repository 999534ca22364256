"""Settings objects of the objectives: one frozen dataclass per objective holds its defaults."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

Settings = TypeVar("Settings")


def settings_of(
    kind: type[Settings], given: Settings | Mapping[str, Any] | None, overrides: dict[str, Any], what: str = "objective"
) -> Settings:
    """`given` (default: `kind()`, the defaults; a mapping: its fields, as a YAML config or a
    checkpoint's settings hold them) with the fields named in `overrides` replaced; `what` names
    the argument in the error for a value of another type."""
    if isinstance(given, Mapping):
        given = kind(**given)
    if given is not None and not isinstance(given, kind):
        raise TypeError(
            f"{what} must be a {kind.__name__}, got {given!r}; give the settings as a mapping of "
            f"its fields or as {kind.__name__}(...)"
        )
    return dataclasses.replace(given or kind(), **overrides)


def require_positive(**values: float) -> None:
    """Reject settings that must be positive (regularisations, temperatures), naming each given."""
    if any(value <= 0 for value in values.values()):
        raise ValueError(" and ".join(f"{name}={value}" for name, value in values.items()) + " must be positive")
