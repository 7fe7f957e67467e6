"""User-facing errors.

`WamError` is raised for anything a user can cause (a bad path, an unknown game, a corrupt file, a
wrong checkpoint). Its message names the thing and what to do. The CLI prints it as one line and
exits with status 2; it never shows a traceback for these.
"""

from __future__ import annotations


class WamError(Exception):
    """An error caused by user input; the message is shown as-is, without a traceback."""


class DataError(WamError):
    """A dataset file is missing, not a wam dataset, or damaged."""
