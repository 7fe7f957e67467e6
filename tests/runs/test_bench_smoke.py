"""Every benchmark runs end to end at its `--quick` size through the CLI, writes its JSON figures and its
section of the report, so a broken benchmark is caught here rather than when its figures are needed.
(Figures at this size are noise; the targets are not checked.)"""

from __future__ import annotations

import json

import pytest

from wam.runs.bench import BENCHMARKS
from wam.runs.cli import run_command


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_runs_at_its_quick_size(name, tmp_path, ray_session):
    out, md = tmp_path / "bench", tmp_path / "BENCHMARKS.md"
    assert run_command(["bench", name, "--quick", "--out", str(out), "--markdown", str(md)]) == 0
    result = json.loads((out / f"{name}.json").read_text())
    assert result["quick"] is True and result["command"] == f"wam bench {name} --quick"
    assert result["machine"].get("cpus", 0) >= 1
    report = md.read_text()
    assert f"## {name}" in report and "_Machine:" in report
