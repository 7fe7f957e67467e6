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


def test_cores_skip_the_lengths_after_a_core_ran_out_of_memory_at_no_more_tokens(monkeypatch):
    """A core killed for memory at T x B tokens is not run again at a length with as many tokens or more (its
    child would take minutes to be killed again); other cores and shorter batches still run."""
    from wam.runs import bench_cores

    quick = {"d_model": 8, "n_layers": 1, "lengths": {64: 4, 128: 4, 512: 1, 256: 2}, "reps": 1, "threads": 1,
             "step_contexts": [0], "step_tokens": 1, "window": 8, "reference_lengths": [64]}
    monkeypatch.setattr(bench_cores, "QUICK", quick)
    monkeypatch.setattr(bench_cores, "_step_costs", lambda name, kwargs, cfg: [{"state_bytes": 1, "context": 0, "step_ms": 1.0}])
    ran: list[tuple[str, int]] = []

    def child(spec):
        ran.append((spec["name"], spec["T"]))
        if spec["name"] == "atlas" and spec["T"] == 128:
            return {"error": "killed (SIGKILL): out of memory"}
        return {"wall_s": 1.0, "cpu_s": 1.0, "peak_mem_bytes": 1}

    monkeypatch.setattr(bench_cores, "_run_child", child)
    result = bench_cores.run(quick=True)
    atlas = [t for n, t in ran if n == "atlas"]
    assert atlas == [64, 128]  # 512 x 1 = 512 and 256 x 2 = 512 tokens: as many as 128 x 4, skipped
    assert result["train"]["atlas"]["512"]["error"].startswith("skipped: ran out of memory at 512 tokens")
    assert result["train"]["atlas"]["256"]["error"].startswith("skipped")
    assert [t for n, t in ran if n == "transformer"] == [64, 128, 512, 256]
    # the memory targets: atlas ran out of memory (missed whatever its ratios), mamba's growth equals the
    # transformer's (1 byte each here: 1.00x, met)
    assert result["targets"]["atlas_memory"]["out_of_memory"] == ["128", "512", "256"]
    assert result["targets_met"]["atlas_memory"] is False and result["targets_met"]["mamba_memory"] is True
    text = bench_cores.markdown(result)
    assert "| atlas peak memory <= 3x transformer, every length | T=64: 1.00x, T=128: out of memory" in text
    assert result["targets_met"]["atlas_over_transformer_t1024"] is None  # no T=1024 in this run: not measured
    assert "- **atlas_memory missed:** what grows with T is glibc's heap" in text  # what limits a miss
    assert "mamba_memory missed" not in text


def test_train_targets_are_marked_with_figures_and_limits():
    """`wam bench train`'s report marks each target at `small`/transformer met or missed, with its figure and, for
    a miss, what limits it; a CPU without native bf16 reports the bf16 target as not measured."""
    from wam.runs import bench_train

    row = {"preset": "small", "core": "transformer", "tokens_per_s": 1.0, "data_wait_share": 0.01}
    result = {"targets": bench_train.TARGETS, "peak_flops": {"fp32": 1e11, "bf16": 4e11},
              "rows": [dict(row, precision="fp32", mfu=0.60, full_vs_bare=0.80),
                       dict(row, precision="bf16", mfu=0.10, full_vs_bare=0.9, tokens_per_s=1.5)]}
    rows = {name: (fig, status, why) for name, fig, status, why in bench_train.target_rows(result)}
    assert rows["fp32 MFU ≥ 55%"] == ("60.0%", "met", "")
    assert rows["full / bare ≥ 85%"][:2] == ("0.80", "**missed**") and "heads" in rows["full / bare ≥ 85%"][2]
    assert rows["bf16 MFU ≥ 30%"][:2] == ("10.0%", "**missed**") and rows["data wait < 5%"][1] == "met"
    assert "1.50x as fast as fp32 here against a 4.0x higher matmul peak" in rows["bf16 MFU ≥ 30%"][2]
    result["rows"] = result["rows"][:1]  # no bf16 row: an AVX2-only CPU
    assert dict((n, s) for n, _, s, _ in bench_train.target_rows(result))["bf16 MFU ≥ 30%"] == "not measured"


def test_eval_report_says_what_limits_each_miss():
    from wam.runs import bench_eval

    speed = {"steps_per_s": 500.0, "share_emulator": 0.2, "share_tokenizer": 0.1, "share_rest": 0.7}
    result = {"workers": {"1": {"marginal_steps_per_s": 100.0, "steps_per_s": 90.0},
                          "2": {"marginal_steps_per_s": 150.0, "steps_per_s": 120.0}},
              "raw_ale": {"steps_per_s": 300.0}, "in_process": {"steps_per_s": 200.0}, "ray_overhead_1_worker": 0.5,
              "scaling_2_over_1": 1.5, "meets_scaling_target": False, "game": "Pong", "episode_cap": 10,
              "episode_budgets": [1, 2], "machine": {"cpus": 2},
              "model_agents": [{"envs": 4, "steps": 40, "greedy": speed, "planning": dict(speed, steps_per_s=120.0)}],
              "model_agent_best": {"greedy": 500.0, "planning": 120.0}, "meets_greedy_target": False,
              "meets_planning_target": True}
    text = bench_eval.markdown(result)
    assert "- **scaling missed:**" in text and "- **greedy missed:** model calls (70% of the time" in text
    result.update(meets_scaling_target=True, meets_greedy_target=True)
    assert "What limits each miss" not in bench_eval.markdown(result)
