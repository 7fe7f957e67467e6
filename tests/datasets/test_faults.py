"""The fault-injection switch the fault-tolerance tests use: parsed in one place, scoped, and die-once."""

import os
import subprocess
import sys

import pytest

from wam.datasets import faults
from wam.datasets.errors import WamError


def test_unset_means_no_fault(monkeypatch):
    monkeypatch.delenv(faults.ENV_DIE_ON, raising=False)
    monkeypatch.delenv(faults.ENV_INTERRUPT_AFTER, raising=False)
    assert faults.die_on("collect") is None and faults.interrupt_after() is None


def test_spec_is_parsed_and_scoped(monkeypatch):
    monkeypatch.setenv(faults.ENV_DIE_ON, "evaluate:Pong/3:/tmp/m:x")
    assert faults.die_on("evaluate") == faults.DieOn("evaluate", "Pong/3", "/tmp/m:x")  # a marker may hold ':'
    assert faults.die_on("collect") is None
    monkeypatch.setenv(faults.ENV_DIE_ON, "plan:2")
    assert faults.die_on("plan") == faults.DieOn("plan", "2", "")
    monkeypatch.setenv(faults.ENV_INTERRUPT_AFTER, "3")
    assert faults.interrupt_after() == 3


@pytest.mark.parametrize("spec", ["train:1:m", "collect", "nonsense"])
def test_bad_spec_is_one_clear_error(monkeypatch, spec):
    monkeypatch.setenv(faults.ENV_DIE_ON, spec)
    with pytest.raises(WamError, match=faults.ENV_DIE_ON):
        faults.die_on("collect")


def test_bad_interrupt_count_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(faults.ENV_INTERRUPT_AFTER, "two")
    with pytest.raises(WamError, match="not an integer"):
        faults.interrupt_after()


def _run_check(fault: faults.DieOn, key: str) -> int:
    code = ("from wam.datasets.faults import DieOn; import sys; "
            f"DieOn({fault.scope!r}, {fault.key!r}, {fault.marker!r}).check(*sys.argv[1:])")
    return subprocess.run([sys.executable, "-c", code, key], env=os.environ.copy()).returncode


def test_a_worker_dies_once_with_a_marker_and_every_time_without(tmp_path):
    marker = tmp_path / "died"
    once = faults.DieOn("collect", "Pong/1", str(marker))
    assert _run_check(once, "Pong/2") == 0 and not marker.exists()  # another unit of work: no fault
    assert _run_check(once, "Pong/1") == 1 and marker.exists()  # dies, leaves the marker
    assert _run_check(once, "Pong/1") == 0  # the rerun survives
    always = faults.DieOn("collect", "Pong/1")
    assert _run_check(always, "Pong/1") == 1 and _run_check(always, "Pong/1") == 1
