"""Fault injection for the tests of wam's fault-tolerant loops, read from the environment in one place.

The Ray loops (`wam data collect`, `wam eval`, the planner pool) re-run the work of a worker that died and
finish an interrupted job on resume. Their tests need a worker that dies and a driver that is interrupted
on cue; production code must not carry hooks for that in its signatures. So the faults are set by
environment variables on the driver:

``WAM_FAULT_DIE_ON="<scope>:<key>:<marker>"``
    A worker of ``scope`` (``collect``, ``evaluate`` or ``plan``) exits (``os._exit(1)``, as a crashed
    process does) when it starts the unit of work named ``key`` (``Pong/1`` for a game's episode 1,
    ``3`` for planner chunk 3). With a ``marker`` file path it dies once and creates the marker; with an
    empty marker it dies every time.
``WAM_FAULT_INTERRUPT_AFTER="<n>"``
    The driver of ``wam eval`` raises ``KeyboardInterrupt`` after ``n`` finished batches (as Ctrl-C does).

The driver reads the variables with `die_on(scope)` / `interrupt_after()` when it starts its workers and
hands the `DieOn` to each actor's constructor (Ray workers may have started before the variable was set).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from wam.datasets.errors import WamError

ENV_DIE_ON = "WAM_FAULT_DIE_ON"
ENV_INTERRUPT_AFTER = "WAM_FAULT_INTERRUPT_AFTER"
SCOPES = ("collect", "evaluate", "plan")


@dataclass(frozen=True)
class DieOn:
    """Which unit of work kills its worker, and the marker file that makes it happen once ('' = always)."""

    scope: str
    key: str
    marker: str = ""

    def check(self, *keys: str) -> None:
        """Exit the calling process if one of `keys` is the doomed unit of work (once, with a marker)."""
        if self.key not in keys:
            return
        if self.marker:
            marker = Path(self.marker)
            if marker.exists():
                return
            marker.touch()
        os._exit(1)


def die_on(scope: str) -> DieOn | None:
    """The worker fault set for `scope` by ``WAM_FAULT_DIE_ON``, or None."""
    spec = os.environ.get(ENV_DIE_ON, "")
    if not spec:
        return None
    parts = spec.split(":", 2)
    if len(parts) < 2 or parts[0] not in SCOPES:
        raise WamError(f"{ENV_DIE_ON}={spec!r}: expected '<scope>:<key>[:<marker file>]' with scope one of "
                       f"{', '.join(SCOPES)}")
    fault = DieOn(parts[0], parts[1], parts[2] if len(parts) == 3 else "")
    return fault if fault.scope == scope else None


def check(fault: DieOn | None, *keys: str) -> None:
    """`fault.check(*keys)` where a fault is set; nothing otherwise."""
    if fault is not None:
        fault.check(*keys)


def interrupt_after() -> int | None:
    """Finished batches after which the driver raises KeyboardInterrupt (``WAM_FAULT_INTERRUPT_AFTER``)."""
    value = os.environ.get(ENV_INTERRUPT_AFTER, "")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise WamError(f"{ENV_INTERRUPT_AFTER}={value!r} is not an integer") from None
