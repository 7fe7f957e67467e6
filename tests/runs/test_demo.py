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
    assert "7 report" in text and "FAILED" not in text and "checks (one seed" in text
    report = (out / "report" / "report.md").read_text()
    for label in ("random", "behaviour_scripted", "behaviour_cloning", "from_scratch", "pretrained_fine-tuned",
                  "pretrained_fine-tuned_planning"):
        assert label in report
        results = json.loads((out / "eval" / label / "results.json").read_text())
        assert results["status"] == "complete" and results["episodes_on_disk"] == 2


def _results(path, point, low, high):
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(
        {"summary": {"games": {"Pong": {"return": {"point": point, "low": low, "high": high}}}}}))
    return path


def test_demo_checks_against_hand_values(tmp_path):
    from wam.runs.demo import demo_checks

    evals = {"random": _results(tmp_path / "r", -19.0, -21.0, -15.0),
             "from scratch": _results(tmp_path / "s", -15.0, -16.0, -14.0),
             "pretrained+fine-tuned": _results(tmp_path / "f", -10.0, -12.0, -8.0),
             "pretrained+fine-tuned, planning": _results(tmp_path / "p", -10.0, -11.0, -9.0)}
    checks = demo_checks(evals, "Pong")
    assert [ok for _, ok in checks] == [False, True, True]  # -15.0 is not above the bound -15.0; a tie plans
    assert checks[0][0] == "from scratch -15.0 <= random's upper bound -15.0"
    assert checks[2][0] == "planning -10.0 >= greedy -10.0"
    _results(tmp_path / "p2", -10.5, -11.0, -9.0)
    evals["pretrained+fine-tuned, planning"] = tmp_path / "p2"
    assert demo_checks(evals, "Pong")[2] == ("planning -10.5 < greedy -10.0", False)
    evals["from scratch"] = tmp_path / "missing"
    assert demo_checks(evals, "Pong")[0] == ("from scratch: no result", False)
