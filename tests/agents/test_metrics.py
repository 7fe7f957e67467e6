"""Metrics of wam.agents.metrics against values computed by hand (and against rliable, the field's tool)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from wam.agents.metrics import (
    EPISODE_COLUMNS,
    EpisodeRecord,
    bootstrap_replicates,
    interval,
    point_estimate,
    read_episodes,
    scores_by_game,
    stat_iqm,
    stat_mean,
    stat_median,
    stat_optimality_gap,
    summarize,
    trimmed_mean,
)
from wam.datasets.errors import DataError


def _record(game: str, episode: int, score: float, hns: float | None, **kw) -> EpisodeRecord:
    base = dict(game=game, episode=episode, seed=1000 + episode, score=score, length=100 + episode, truncated=False,
                hns=hns, protocol="jowa", epsilon=0.001, plan="none", beam_width=None, horizon=None, max_steps=108000,
                agent="random", agent_spec="random", checkpoint_id="", eval_seed=0)
    base.update(kw)
    return EpisodeRecord(**base)


def test_trimmed_mean_matches_hand_values():
    assert trimmed_mean(np.arange(1, 9)) == pytest.approx(4.5)  # drop 1,2 and 7,8 -> mean(3,4,5,6)
    assert trimmed_mean(np.array([0.0, 1.0, 2.0, 3.0, 100.0])) == pytest.approx(2.0)  # floor(1.25)=1 cut each end
    assert trimmed_mean(np.array([5.0, 1.0, 3.0])) == pytest.approx(3.0)  # floor(0.75)=0: plain mean
    batch = np.array([[1, 2, 3, 4, 100], [0, 0, 0, 0, 0]], dtype=float)
    np.testing.assert_allclose(trimmed_mean(batch, axis=-1), [3.0, 0.0])


def test_aggregates_match_hand_values():
    per_game = {"A": np.array([0.0, 1.0, 2.0, 3.0]), "B": np.array([10.0, 20.0, 30.0, 40.0]), "C": np.array([5.0])}
    # pooled sorted: 0 1 2 3 5 10 20 30 40 (n=9, cut 2 each end) -> mean(2, 3, 5, 10, 20) = 8
    assert point_estimate(per_game, stat_iqm) == pytest.approx(8.0)
    # per-game means 1.5, 25, 5
    assert point_estimate(per_game, stat_mean) == pytest.approx((1.5 + 25 + 5) / 3)
    assert point_estimate(per_game, stat_median) == pytest.approx(5.0)
    gap = {"A": np.array([0.2, 1.5]), "B": np.array([0.5, 2.0])}
    # min(x, 1) = 0.2, 1, 0.5, 1 -> mean 0.675 -> gap 0.325
    assert point_estimate(gap, stat_optimality_gap) == pytest.approx(0.325)


def test_bootstrap_is_stratified_and_matches_a_hand_resample():
    per_game = {"B": np.array([4.0, 8.0, 15.0]), "A": np.array([1.0, 2.0])}
    reps = 50
    got = bootstrap_replicates(per_game, stat_mean, reps=reps, seed=7)
    rng = np.random.default_rng(7)  # games in sorted order: A then B, each [reps, n_g]
    a = per_game["A"][rng.integers(0, 2, size=(reps, 2))]
    b = per_game["B"][rng.integers(0, 3, size=(reps, 3))]
    np.testing.assert_allclose(got, (a.mean(1) + b.mean(1)) / 2)
    iv = interval(per_game, stat_mean, reps=reps, seed=7)
    assert (iv.low, iv.high) == pytest.approx(tuple(np.percentile(got, [2.5, 97.5])))
    assert iv.point == pytest.approx((1.5 + 9.0) / 2)
    # constant within each game: a stratified resample can never change the statistic
    const = {"A": np.zeros(5), "B": np.ones(7)}
    for stat in (stat_mean, stat_iqm, stat_median):
        assert np.ptp(bootstrap_replicates(const, stat, reps=200, seed=0)) == 0.0
    # seeded: same seed same interval, another seed another one
    assert interval(per_game, stat_iqm, 300, seed=1) == interval(per_game, stat_iqm, 300, seed=1)
    r1, r2 = (bootstrap_replicates(per_game, stat_iqm, 300, seed=s) for s in (1, 2))
    assert not np.array_equal(r1, r2)


def test_bootstrap_interval_of_a_mean_is_close_to_the_normal_interval():
    x = np.random.default_rng(3).normal(10.0, 2.0, size=400)
    iv = interval({"G": x}, stat_mean, reps=4000, seed=0)
    half = 1.96 * x.std(ddof=1) / np.sqrt(x.size)
    assert iv.low < x.mean() < iv.high
    assert (iv.high - iv.low) / 2 == pytest.approx(half, rel=0.1)


def test_csv_round_trip_and_summary(tmp_path):
    counts = tuple(range(18))
    records = [_record("Pong", i, s, (s + 20.7) / 35.3, action_counts=counts)
               for i, s in enumerate([-21.0, -20.0, -19.0, -15.0])]
    records += [_record("Carnival", i, s, None) for i, s in enumerate([500.0, 700.0])]  # no counts (older files)
    path = tmp_path / "episodes.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(EPISODE_COLUMNS))
        w.writeheader()
        for r in reversed(records):
            w.writerow(r.to_row())
    back = read_episodes(tmp_path)
    assert back == sorted(records, key=lambda r: (r.game, r.episode))
    assert [r.action_counts for r in back if r.game == "Pong"] == [counts] * 4
    assert set(scores_by_game(back, "hns")) == {"Pong"}  # Carnival has no HNS
    s = summarize(back, reps=500, seed=0)
    assert s["games"]["Pong"]["return"]["point"] == pytest.approx(-18.75)
    assert s["games"]["Pong"]["return"]["median"] == pytest.approx(-19.5)
    assert s["games"]["Carnival"]["hns"] is None and s["games"]["Carnival"]["return"]["point"] == 600.0
    assert s["games_without_hns"] == ["Carnival"] and s["games_with_hns"] == ["Pong"]
    hns = np.array([(v + 20.7) / 35.3 for v in [-21.0, -20.0, -19.0, -15.0]])
    assert s["hns_aggregates"]["iqm"]["point"] == pytest.approx(hns[1:3].mean())
    assert s["hns_aggregates"]["mean"]["point"] == pytest.approx(hns.mean())


def test_plan_changed_round_trips_and_older_tables_without_it_read_as_none(tmp_path):
    import dataclasses

    planned = [dataclasses.replace(_record("Pong", i, -20.0, 0.02), plan_changed=c) for i, c in enumerate([0, 37])]
    path = tmp_path / "episodes.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(EPISODE_COLUMNS))
        w.writeheader()
        for r in planned:
            w.writerow(r.to_row())
    assert [r.plan_changed for r in read_episodes(tmp_path)] == [0, 37]
    old_columns = [c for c in EPISODE_COLUMNS if c != "plan_changed"]  # a table written before the column
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_columns)
        w.writeheader()
        for r in planned:
            w.writerow({k: v for k, v in r.to_row().items() if k in old_columns})
    assert [r.plan_changed for r in read_episodes(tmp_path)] == [None, None]


def test_a_damaged_csv_is_a_data_error(tmp_path):
    (tmp_path / "episodes.csv").write_text("game,return\nPong,1\n")
    with pytest.raises(DataError, match="missing columns"):
        read_episodes(tmp_path)
    with pytest.raises(DataError, match="no episode table"):
        read_episodes(tmp_path / "nowhere")


@pytest.mark.filterwarnings("ignore:random_state is deprecated:FutureWarning")  # rliable's own call into arch
def test_matches_rliable():
    """rliable is in the dev extra (with pandas<3, which its `arch` needs), so this runs wherever the tests do."""
    from rliable import library as rly
    from rliable import metrics as rmetrics

    scores = np.random.default_rng(0).gamma(2.0, 0.5, size=(10, 5))  # [runs, games]
    per_game = {f"g{j}": scores[:, j] for j in range(scores.shape[1])}
    assert point_estimate(per_game, stat_iqm) == pytest.approx(rmetrics.aggregate_iqm(scores))
    assert point_estimate(per_game, stat_optimality_gap) == pytest.approx(rmetrics.aggregate_optimality_gap(scores))
    _, cis = rly.get_interval_estimates({"x": scores}, lambda s: np.array([rmetrics.aggregate_iqm(s)]), reps=4000,
                                       random_state=np.random.RandomState(0))
    ours = interval(per_game, stat_iqm, reps=4000, seed=0)
    assert ours.low == pytest.approx(cis["x"][0, 0], abs=0.03)
    assert ours.high == pytest.approx(cis["x"][1, 0], abs=0.03)
