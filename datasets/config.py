"""The preset lookup that turns a bad name into a user error (shared by every typed config)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from wam.datasets.errors import WamError

T = TypeVar("T")


def preset_value(table: Mapping[str, T], name: str, what: str = "preset") -> T:
    """`table[name]`, or a WamError naming the bad preset and listing the known ones."""
    if name not in table:
        raise WamError(f"unknown {what} {name!r}; choose one of {', '.join(table)}")
    return table[name]
