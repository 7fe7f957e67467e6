"""Human/random reference scores and HNS, checked against hand-computed values from the table."""

from __future__ import annotations

import warnings

import pytest

from wam.datasets import scores
from wam.datasets.errors import WamError
from wam.datasets.scores import has_reference, human_normalized, human_score, random_score, reference_table


def test_table_has_the_atari_57_games():
    table = reference_table()
    assert len(table) == 57
    assert {"Pong", "SpaceInvaders", "MontezumaRevenge", "UpNDown", "Surround"} <= set(table)
    assert all(ref.human > ref.random for ref in table.values())


def test_reference_scores_any_spelling():
    assert random_score("Pong") == -20.7 and human_score("pong") == 14.6
    assert random_score("space_invaders") == 148.0 and human_score("ALE/SpaceInvaders-v5") == 1668.7
    assert human_score("Breakout") == 30.5


@pytest.mark.parametrize(
    "game, score, expected",
    [
        ("Pong", 14.6, 1.0),  # human score
        ("Pong", -20.7, 0.0),  # random score
        ("Pong", 0.0, 20.7 / 35.3),  # (0 + 20.7) / (14.6 + 20.7)
        ("Breakout", 30.0, (30.0 - 1.7) / (30.5 - 1.7)),
        ("SpaceInvaders", 834.35, (834.35 - 148.0) / (1668.7 - 148.0)),
        ("Skiing", -4336.9, 1.0),  # negative scores
        ("Boxing", 0.1 - 12.0, -1.0),  # below random gives a negative HNS
    ],
)
def test_human_normalized_hand_computed(game, score, expected):
    assert human_normalized(game, score) == pytest.approx(expected, rel=1e-12)


def test_missing_game_returns_none_and_warns_once():
    scores._warn_missing.cache_clear()
    assert not has_reference("Carnival") and has_reference("Pong")
    with pytest.warns(UserWarning, match="Carnival is not in the human/random score table"):
        assert human_normalized("Carnival", 1234.0) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        assert human_normalized("carnival", 99.0) is None
    with pytest.raises(WamError, match="Carnival has no human/random reference score"):
        random_score("Carnival")
    with pytest.raises(WamError, match="unknown Atari game"):
        human_normalized("Pongg", 1.0)
