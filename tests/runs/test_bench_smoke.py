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


def test_cores_report_and_plot_survive_a_length_that_ran_out_of_memory(tmp_path):
    """A (core, T) child killed for memory is reported as such; the plot leaves its point out instead of
    failing the whole `wam bench cores` (as it did on 2026-12-07 when the per-token ATLAS ran out of memory)."""
    from wam.runs import bench_cores

    ok = {"wall_s": 1.0, "cpu_s": 1.0, "peak_mem_bytes": 2 ** 20, "B": 2, "T": 8}
    result = {"train": {"transformer": {"8": ok, "16": dict(ok, T=16, wall_s=2.0)},
                        "atlas": {"8": dict(ok, wall_s=3.0), "16": {"error": "killed (SIGKILL): out of memory"}}},
              "step": {}}
    bench_cores.plot(result, tmp_path / "cores.png")
    assert (tmp_path / "cores.png").stat().st_size > 1000
