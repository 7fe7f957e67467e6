"""Random and human reference scores of the Atari-57 games, and human-normalised scores (HNS).

HNS = (score - random) / (human - random), with the table DQN Zoo publishes
(`wam/datasets/data/atari_human_random_scores.csv`: columns game (snake case), random, human).
A game outside the table (e.g. Carnival, one of JOWA's pretraining games) has no HNS:
`human_normalized` returns None and warns once per game, so callers report its raw score and
leave it out of HNS aggregates.
"""

from __future__ import annotations

import csv
import functools
import importlib.resources
import warnings
from dataclasses import dataclass

from wam.datasets.atari import canonical_game
from wam.datasets.errors import WamError

SCORES_FILE = "atari_human_random_scores.csv"


@dataclass(frozen=True)
class ReferenceScores:
    """Per-episode reference scores of one game."""

    game: str  # CamelCase
    random: float
    human: float


@functools.lru_cache(maxsize=1)
def reference_table() -> dict[str, ReferenceScores]:
    """CamelCase game name -> reference scores, read once from the package's CSV."""
    text = importlib.resources.files("wam.datasets").joinpath("data", SCORES_FILE).read_text()
    table: dict[str, ReferenceScores] = {}
    for row in csv.DictReader(text.splitlines()):
        game = canonical_game(row["game"])
        table[game] = ReferenceScores(game, random=float(row["random"]), human=float(row["human"]))
    return table


def has_reference(game: str) -> bool:
    """True when `game` is in the human/random table (so it has an HNS)."""
    return canonical_game(game) in reference_table()


def _lookup(game: str) -> ReferenceScores:
    name = canonical_game(game)
    table = reference_table()
    if name not in table:
        raise WamError(
            f"{name} has no human/random reference score (the table holds the {len(table)} Atari-57 "
            "games); report its raw score instead"
        )
    return table[name]


def random_score(game: str) -> float:
    """Score of the uniform random policy on `game` (WamError for a game outside the table)."""
    return _lookup(game).random


def human_score(game: str) -> float:
    """Score of the human tester on `game` (WamError for a game outside the table)."""
    return _lookup(game).human


@functools.cache
def _warn_missing(game: str) -> None:
    message = f"{game} is not in the human/random score table; its HNS is undefined (left out of aggregates)"
    warnings.warn(message, stacklevel=3)


def human_normalized(game: str, score: float) -> float | None:
    """(score - random) / (human - random) for `game`; None (and one warning per game) when it has no reference."""
    name = canonical_game(game)
    ref = reference_table().get(name)
    if ref is None:
        _warn_missing(name)
        return None
    return (float(score) - ref.random) / (ref.human - ref.random)

