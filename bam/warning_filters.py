"""Warnings that the `bam` stages would print on every run although nothing is wrong.

Each entry says why it is not a problem here; anything else still shows.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

# message (regular expression, start of the text) -> why it is silenced
EXPECTED_WARNINGS = {
    r"Found \d+ module\(s\) in eval mode at the start of training": (
        "the linear probe's frozen backbone and fine-tuning's weight average are kept in eval mode on purpose"
    ),
    r"`isinstance\(treespec, LeafSpec\)` is deprecated": (
        "Lightning's call of a torch API that torch deprecated; nothing a bam user can change"
    ),
}


@contextlib.contextmanager
def expected_warnings_silenced() -> Iterator[None]:
    """Run a stage without the `EXPECTED_WARNINGS`; every other warning is shown as usual."""
    with warnings.catch_warnings():
        for message in EXPECTED_WARNINGS:
            warnings.filterwarnings("ignore", message=message)
        yield
