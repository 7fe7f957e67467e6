"""`wam report` from real small evaluation directories and a training run directory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wam.agents.evaluate import evaluate
from wam.agents.metrics import read_episodes, summarize
from wam.datasets.errors import WamError
from wam.runs.report import write_report

GAMES = ["Pong", "Breakout"]


@pytest.fixture(scope="module")
def inputs(ray_session, tmp_path_factory):
    """Three small evaluations (random, random with planning flags, scripted) and one training run dir."""
    root = tmp_path_factory.mktemp("report_inputs")
    kw = dict(episodes=3, workers=2, seed=0, max_steps=120, envs_per_worker=3, progress=False)
    evaluate("random", GAMES, out_dir=root / "evals" / "random", **kw)
    evaluate("random", GAMES, out_dir=root / "evals" / "random-plan", plan={"beam_width": 3, "horizon": 2}, **kw)
    evaluate("scripted", GAMES, out_dir=root / "evals" / "scripted", video=True, **kw)
    run = root / "runs" / "tokenizer"
    (run / "plots").mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": 2.0 / (1 + s), "lr": 1e-4}) for s in range(0, 100, 10)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n{\"step\": 100, \"lo")  # a torn last line
    import matplotlib.pyplot as plt

    plt.imsave(run / "plots" / "reconstructions.png", np.random.default_rng(0).random((16, 32)))
    return root


def test_report_holds_the_numbers_of_the_csv(inputs, tmp_path):
    out = tmp_path / "report"
    data = write_report([inputs / "evals", inputs / "runs"], out, reps=500, seed=0)
    md = (out / "report.md").read_text()
    for name in ("iqm.png", "per_game_return.png", "per_game_hns.png", "curves_tokenizer.png",
                 "recon_tokenizer_reconstructions.png", "report.json"):
        assert (out / name).is_file(), name
    for label in ("random", "random-plan", "scripted"):
        s = summarize(read_episodes(inputs / "evals" / label), reps=500, seed=0)
        iqm = s["hns_aggregates"]["iqm"]
        assert f"{iqm['point']:.3f} [{iqm['low']:.3f}, {iqm['high']:.3f}]" in md
        for g in GAMES:
            r = s["games"][g]["return"]
            assert f"| {label} | 3 | {r['point']:.2f} [{r['low']:.2f}, {r['high']:.2f}] |" in md
        assert data["evaluations"][label]["summary"] == s
    assert "## Planning vs no planning" in md and "beam K=3 H=2" in md
    (pair,) = data["planning"]
    assert (pair["without"], pair["with"]) == ("random", "random-plan")
    assert pair["iqm_difference"]["point"] == pytest.approx(0.0)  # the random agent ignores planning
    assert "## Agent comparisons" in md and len(data["comparisons"]) == 3
    assert "episodes capped at 120 agent steps" in md
    assert "[Pong_ep0.mp4](" in md and "## Training runs" in md
    # actions played: shares of the counts in episodes.csv, summed over the episodes of a game
    assert (out / "actions.png").is_file() and "## Actions played" in md
    from wam.datasets.atari import ACTION_NAMES, legal_action_mask

    for label in ("random", "scripted"):
        recs = [r for r in read_episodes(inputs / "evals" / label) if r.game == "Pong"]
        total = np.sum([r.action_counts for r in recs], axis=0)
        assert total.sum() == sum(r.length for r in recs)  # every step counted once
        legal = np.flatnonzero(legal_action_mask("Pong"))
        want = {ACTION_NAMES[a]: total[a] / total.sum() for a in legal}
        assert data["action_shares"]["Pong"][label] == pytest.approx(want)
    assert data["runs"]["tokenizer"]["records"] == 10  # the torn line is skipped
    assert data["runs"]["tokenizer"]["final"]["loss"] == pytest.approx(2.0 / 91)


def test_any_subset_of_inputs(inputs, tmp_path):
    evals_only = write_report([inputs / "evals" / "scripted"], tmp_path / "a", reps=200)
    md = (tmp_path / "a" / "report.md").read_text()
    assert list(evals_only["evaluations"]) == ["scripted"] and "Training runs" not in md
    assert "Planning vs no planning" not in md and "Agent comparisons" not in md
    runs_only = write_report([inputs / "runs"], tmp_path / "b", reps=200)
    md = (tmp_path / "b" / "report.md").read_text()
    assert runs_only["evaluations"] == {} and "## Training runs" in md and "Evaluations" not in md
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WamError, match="no evaluation"):
        write_report([empty], tmp_path / "c")


def test_cli_report(inputs, tmp_path):
    from wam.runs.cli import run_command

    assert run_command(["report", str(inputs / "evals" / "random"), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.md").is_file()
    assert run_command(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r2")]) == 2


def test_curves_show_the_q_diagnostics_of_a_jowa_run():
    """A jowa run logs ~20 figures; the 8 curves drawn keep the losses and the Q diagnostics, not lr or grad_norm."""
    from wam.runs.report_plots import MAX_CURVES, curve_keys

    row = {k: 1.0 for k in ("loss", "td_loss", "td_kl", "q_data", "td_target_mean", "td_target_std", "td_target_max",
                            "q_next_max", "cql_loss", "illegal_data_actions", "q_gap_frequent", "wm_loss", "obs_ce",
                            "reward_ce", "termination_ce", "obs_acc", "reward_acc", "grad_norm", "lr", "tokens_per_s")}
    keys = curve_keys([{"step": 1, **row}])
    assert len(keys) == MAX_CURVES
    assert {"loss", "td_loss", "wm_loss", "q_data", "td_target_mean", "q_gap_frequent", "cql_loss"} <= set(keys)
    assert "lr" not in keys and "grad_norm" not in keys
