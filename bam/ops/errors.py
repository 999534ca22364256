"""The error type of input a user must fix (a setting, a list file), shared by every floor: the
stages print its message as one line instead of a traceback (`bam.training.run_cli.one_line_errors`)."""
from __future__ import annotations


class UserInputError(ValueError):
    """A setting or an input file is wrong; the message says what and what to do."""
