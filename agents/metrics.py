"""Scores of an evaluation: raw, human-normalised, aggregates and stratified-bootstrap confidence intervals.

Everything is computed from the per-episode CSV that `wam eval` writes (`episodes.csv`, one row per
episode; columns `EPISODE_COLUMNS`). Definitions (rliable's, Agarwal et al. 2021), over the scores
x[g] (one per evaluation episode, the "runs" of game g):

- raw score: the undiscounted episode return; HNS = (score - random) / (human - random)
  (`wam.datasets.scores`; games outside the table have no HNS and are left out of HNS aggregates);
- mean = mean over games of the per-game mean; median = median over games of the per-game mean;
- IQM = the 25 % trimmed mean of all (episode, game) scores pooled (scipy's `trim_mean`: drop
  floor(0.25 n) scores at each end of the sorted list, average the rest);
- optimality gap (gamma = 1) = gamma - mean over all scores of min(score, gamma);
- confidence intervals: stratified bootstrap, i.e. each replicate resamples, within every game
  independently and with replacement, as many episodes as the game has; the statistic of each
  replicate gives its bootstrap distribution and the interval is its (alpha/2, 1 - alpha/2)
  percentiles (numpy's linear interpolation). Replicates come from `np.random.default_rng(seed)`,
  games drawn in sorted order, so an interval is a pure function of (scores, reps, seed).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from wam.datasets.errors import DataError

EPISODE_COLUMNS: tuple[str, ...] = (
    "game", "episode", "seed", "return", "length", "truncated", "hns", "protocol", "epsilon", "plan",
    "beam_width", "horizon", "max_steps", "agent", "agent_spec", "checkpoint_id", "eval_seed", "action_counts",
    "plan_changed",
)
"""Columns of `episodes.csv`, in order."""
OPTIONAL_COLUMNS: tuple[str, ...] = ("plan_changed",)
"""Columns that tables written before they existed lack (read as None)."""


@dataclass(frozen=True)
class EpisodeRecord:
    """One evaluated episode: a row of `episodes.csv` (`score` is the CSV's `return` column)."""

    game: str
    episode: int  # index of the episode within its game, 0..N-1
    seed: int  # the episode's seed (environment reset seed; the agent's generator derives from it)
    score: float  # undiscounted raw return
    length: int  # agent steps
    truncated: bool  # cut by the episode cap rather than ended by the game
    hns: float | None  # human-normalised score; None when the game has no reference scores
    protocol: str
    epsilon: float
    plan: str  # "none" or the planning method ("beam")
    beam_width: int | None
    horizon: int | None
    max_steps: int  # the episode cap in agent steps that applied
    agent: str  # the agent's name
    agent_spec: str  # what was passed as --agent
    checkpoint_id: str
    eval_seed: int  # the --seed of the evaluation
    action_counts: tuple[int, ...] | None = None  # times each of the 18 actions was played (None: older files)
    plan_changed: int | None = None  # agent decisions where planning chose another action than greedy acting
    # would have (None: no planner, or older files)

    def to_row(self) -> dict[str, str]:
        d = asdict(self)
        d["return"] = repr(float(d.pop("score")))
        for k in ("hns", "beam_width", "horizon", "plan_changed"):
            d[k] = "" if d[k] is None else repr(d[k])
        d["truncated"] = "1" if self.truncated else "0"
        d["action_counts"] = "" if self.action_counts is None else " ".join(map(str, self.action_counts))
        return {k: str(d[k]) for k in EPISODE_COLUMNS}

    @classmethod
    def from_row(cls, row: Mapping[str, str]) -> EpisodeRecord:
        def opt(v: str, t: type) -> Any:
            return None if v in ("", None) else t(v)

        return cls(game=row["game"], episode=int(row["episode"]), seed=int(row["seed"]), score=float(row["return"]),
                   length=int(row["length"]), truncated=row["truncated"] in ("1", "True", "true"),
                   hns=opt(row["hns"], float), protocol=row["protocol"], epsilon=float(row["epsilon"]),
                   plan=row["plan"], beam_width=opt(row["beam_width"], int), horizon=opt(row["horizon"], int),
                   max_steps=int(row["max_steps"]), agent=row["agent"], agent_spec=row["agent_spec"],
                   checkpoint_id=row["checkpoint_id"], eval_seed=int(row["eval_seed"]),
                   action_counts=tuple(int(x) for x in row["action_counts"].split()) if row.get("action_counts") else None,
                   plan_changed=opt(row.get("plan_changed", ""), int))


assert [f.name for f in fields(EpisodeRecord)] == [c if c != "return" else "score" for c in EPISODE_COLUMNS], \
    "EpisodeRecord fields and EPISODE_COLUMNS disagree"


def read_episodes(path: str | Path) -> list[EpisodeRecord]:
    """The rows of an `episodes.csv` (a directory means `<dir>/episodes.csv`), sorted by (game, episode)."""
    path = Path(path)
    if path.is_dir():
        path = path / "episodes.csv"
    if not path.is_file():
        raise DataError(f"no episode table at {path}; give a directory written by `wam eval`")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(EPISODE_COLUMNS) - set(OPTIONAL_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path} is not a wam episode table (missing columns {sorted(missing)})")
        try:
            records = [EpisodeRecord.from_row(r) for r in reader]
        except (ValueError, TypeError, KeyError) as e:
            raise DataError(f"{path} has a malformed row ({e}); re-run `wam eval` into a fresh --out") from None
    return sorted(records, key=lambda r: (r.game, r.episode))


def scores_by_game(records: Iterable[EpisodeRecord], column: str = "score") -> dict[str, np.ndarray]:
    """game -> float64 [n_episodes] of `score` or `hns` (games without HNS are left out for `hns`)."""
    out: dict[str, list[float]] = {}
    for r in records:
        value = getattr(r, column)
        if value is not None:
            out.setdefault(r.game, []).append(float(value))
    return {g: np.asarray(v, dtype=np.float64) for g, v in sorted(out.items())}


# ------------------------------------------------------------------------------------ statistics
# A statistic maps per-game score arrays, each [R, n_g] (R bootstrap replicates), to [R] values.
Statistic = Callable[[Sequence[np.ndarray]], np.ndarray]


def trimmed_mean(x: np.ndarray, proportion: float = 0.25, axis: int = -1) -> np.ndarray:
    """scipy.stats.trim_mean: sort, drop floor(proportion * n) values at each end, average the rest."""
    x = np.sort(np.asarray(x, dtype=np.float64), axis=axis)
    n = x.shape[axis]
    cut = int(proportion * n)
    assert n - 2 * cut > 0, f"nothing left after trimming {cut} of {n} values at each end"
    return np.take(x, np.arange(cut, n - cut), axis=axis).mean(axis=axis)


def stat_iqm(per_game: Sequence[np.ndarray]) -> np.ndarray:
    """Interquartile mean of all (episode, game) scores pooled."""
    return trimmed_mean(np.concatenate(per_game, axis=-1), 0.25, axis=-1)


def stat_mean(per_game: Sequence[np.ndarray]) -> np.ndarray:
    """Mean over games of the per-game mean score."""
    return np.stack([x.mean(axis=-1) for x in per_game], axis=-1).mean(axis=-1)


def stat_median(per_game: Sequence[np.ndarray]) -> np.ndarray:
    """Median over games of the per-game mean score."""
    return np.median(np.stack([x.mean(axis=-1) for x in per_game], axis=-1), axis=-1)


def stat_optimality_gap(per_game: Sequence[np.ndarray], gamma: float = 1.0) -> np.ndarray:
    """gamma - mean of min(score, gamma) over all (episode, game) scores (lower is better)."""
    return gamma - np.minimum(np.concatenate(per_game, axis=-1), gamma).mean(axis=-1)


AGGREGATES: dict[str, Statistic] = {
    "iqm": stat_iqm, "mean": stat_mean, "median": stat_median, "optimality_gap": stat_optimality_gap,
}
"""The aggregate metrics reported over games (computed on HNS)."""


def point_estimate(per_game: Mapping[str, np.ndarray], statistic: Statistic) -> float:
    """The statistic of the observed scores."""
    return float(statistic([np.asarray(per_game[g], dtype=np.float64)[None] for g in sorted(per_game)])[0])


def bootstrap_replicates(per_game: Mapping[str, np.ndarray], statistic: Statistic, reps: int = 2000,
                         seed: int = 0) -> np.ndarray:
    """float64 [reps]: the statistic on `reps` stratified resamples (episodes resampled within each game)."""
    assert per_game, "no scores to bootstrap"
    rng = np.random.default_rng(seed)
    resampled = []
    for g in sorted(per_game):
        x = np.asarray(per_game[g], dtype=np.float64)
        assert x.ndim == 1 and x.size > 0, f"scores of {g} must be a non-empty 1-D array"
        resampled.append(x[rng.integers(0, x.size, size=(reps, x.size))])  # [R, n_g]
    return np.asarray(statistic(resampled), dtype=np.float64)


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap confidence interval."""

    point: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"point": self.point, "low": self.low, "high": self.high}

    def fmt(self, digits: int = 3) -> str:
        return f"{self.point:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def interval(per_game: Mapping[str, np.ndarray], statistic: Statistic, reps: int = 2000,
             confidence: float = 0.95, seed: int = 0) -> Interval:
    """Point estimate and stratified-bootstrap percentile interval of `statistic`."""
    assert 0.0 < confidence < 1.0, f"confidence must be in (0, 1), got {confidence}"
    reps_values = bootstrap_replicates(per_game, statistic, reps=reps, seed=seed)
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(reps_values, [tail, 100.0 - tail])
    return Interval(point_estimate(per_game, statistic), float(low), float(high))


def summarize(records: Sequence[EpisodeRecord], reps: int = 2000, confidence: float = 0.95,
              seed: int = 0) -> dict[str, Any]:
    """Per-game and aggregate figures of an evaluation (JSON-able); see the module docstring."""
    raw = scores_by_game(records, "score")
    hns = scores_by_game(records, "hns")
    lengths = scores_by_game(records, "length")
    games: dict[str, Any] = {}
    for g, x in raw.items():
        entry: dict[str, Any] = {
            "episodes": int(x.size),
            "return": {**interval({g: x}, stat_mean, reps, confidence, seed).as_dict(),
                       "median": float(np.median(x)), "std": float(x.std(ddof=0)),
                       "min": float(x.min()), "max": float(x.max())},
            "hns": interval({g: hns[g]}, stat_mean, reps, confidence, seed).as_dict() if g in hns else None,
            "length_mean": float(lengths[g].mean()),
            "truncated": int(sum(r.truncated for r in records if r.game == g)),
        }
        games[g] = entry
    aggregates = ({name: interval(hns, fn, reps, confidence, seed).as_dict() for name, fn in AGGREGATES.items()}
                  if hns else {})
    return {
        "games": games,
        "hns_aggregates": aggregates,
        "games_with_hns": sorted(hns),
        "games_without_hns": sorted(set(raw) - set(hns)),
        "episodes": len(records),
        "bootstrap": {"method": "stratified bootstrap, percentile interval", "reps": reps,
                      "confidence": confidence, "seed": seed},
    }


# ------------------------------------------------------------------- several training seeds
Groups = Sequence[np.ndarray]  # one array of episode scores per seed (or a single group: one array)


def _seed_strata(x: Groups | Sequence[Groups]) -> list[list[np.ndarray]]:
    """A list of seed groups is one stratum; a list of such lists is one stratum each (e.g. per game)."""
    return [list(x)] if isinstance(x[0], np.ndarray) else [list(g) for g in x]


def _seed_point(strata: list[list[np.ndarray]]) -> float:
    return float(np.mean([np.mean([g.mean() for g in seeds]) for seeds in strata]))


def _seed_bootstrap(strata: list[list[np.ndarray]], reps: int, rng: np.random.Generator) -> np.ndarray:
    """`reps` bootstrap replicates of the mean over strata of the mean over seeds of the mean episode score.

    Two levels: the seeds of a stratum are resampled with replacement, and the episodes within each seed,
    so the interval carries seed-to-seed variance (three seeds whose greedy episodes are each identical,
    -21, -21 and -7, give an interval spanning -21 to -7, not a point). Strata (games) are kept fixed.
    """
    total = np.zeros(reps)
    for seeds in strata:
        per_seed = np.stack([g[rng.integers(0, g.size, size=(reps, g.size))].mean(1) for g in seeds], 1)
        pick = rng.integers(0, len(seeds), size=(reps, len(seeds)))
        total += np.take_along_axis(per_seed, pick, 1).mean(1)
    return total / len(strata)


def seed_mean_ci(groups: Groups | Sequence[Groups], reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean over training seeds of each seed's mean episode score (over strata, if given); 95 % percentile CI from the
    two-level bootstrap (seeds, then episodes within seeds)."""
    strata = _seed_strata(groups)
    low, high = np.percentile(_seed_bootstrap(strata, reps, np.random.default_rng(seed)), [2.5, 97.5])
    return _seed_point(strata), float(low), float(high)


def seed_diff_ci(a: Groups | Sequence[Groups], b: Groups | Sequence[Groups], reps: int = 2000,
             seed: int = 0) -> tuple[float, float, float]:
    """(mean of b) - (mean of a), each bootstrapped independently as in `seed_mean_ci`; 95 % percentile CI."""
    rng = np.random.default_rng(seed)
    sa, sb = _seed_strata(a), _seed_strata(b)
    low, high = np.percentile(_seed_bootstrap(sb, reps, rng) - _seed_bootstrap(sa, reps, rng), [2.5, 97.5])
    return _seed_point(sb) - _seed_point(sa), float(low), float(high)
