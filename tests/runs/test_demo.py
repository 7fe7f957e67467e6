"""`wam demo` end to end (slow: minutes). Run with `make test-slow`."""

from __future__ import annotations

import json

import pytest

from wam.runs.cli import run_command


@pytest.mark.slow
def test_demo_runs_every_stage_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    code = run_command(["demo", "--out", str(out), "--steps-per-game", "800", "--finetune-transitions", "500",
                        "--tokenizer-steps", "30", "--pretrain-steps", "20", "--finetune-steps", "10", "--eval-episodes", "2",
                        "--eval-max-steps", "60"])
    assert code == 0
    text = capsys.readouterr().out
    assert "7 report" in text and "FAILED" not in text
    report = (out / "report" / "report.md").read_text()
    for label in ("random", "behaviour_scripted", "behaviour_cloning", "from_scratch", "pretrained_fine-tuned",
                  "pretrained_fine-tuned_planning"):
        assert label in report
        results = json.loads((out / "eval" / label / "results.json").read_text())
        assert results["status"] == "complete" and results["episodes_on_disk"] == 2
