"""DQN-Replay import on miniature files written in the exact Dopamine layout (gzip'd np.save)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from wam.datasets.dqn_replay import import_dqn_replay, minimal_action_set
from wam.datasets.errors import DataError
from wam.datasets.store import TrajectoryStore
from wam.datasets.validate import validate

PONG_MINIMAL = [0, 1, 3, 4, 11, 12]  # NOOP FIRE RIGHT LEFT RIGHTFIRE LEFTFIRE


def _save_gz(path: Path, array: np.ndarray) -> None:
    with gzip.open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


class _Log:
    """Builds Dopamine-style rows: 3 blank transitions before every episode, then its transitions."""

    def __init__(self):
        self.rows: list[tuple[np.ndarray, int, float, int]] = []
        self.episodes: list[dict] = []  # expected episodes (frames o_0..o_{T-1}, minimal-set actions, rewards)

    def episode(self, t: int, terminal: bool = True) -> None:
        for _ in range(3):
            self.rows.append((np.zeros((84, 84), np.uint8), 0, 0.0, 0))
        rng = np.random.default_rng(len(self.rows))
        frames = rng.integers(1, 256, (t, 84, 84), dtype=np.uint8)
        acts = rng.integers(0, len(PONG_MINIMAL), t)
        rews = rng.choice([-1.0, 0.0, 1.0], t).astype(np.float32)
        for k in range(t):
            self.rows.append((frames[k], int(acts[k]), float(rews[k]), int(terminal and k == t - 1)))
        self.episodes.append({"frames": frames, "actions": acts, "rewards": rews, "complete": terminal})

    def write(self, d: Path, splits: list[int]) -> None:
        """Checkpoint files holding rows [splits[k], splits[k+1])."""
        d.mkdir(parents=True, exist_ok=True)
        bounds = [0, *splits, len(self.rows)]
        for ckpt, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            rows = self.rows[a:b]
            _save_gz(d / f"$store$_observation_ckpt.{ckpt}.gz", np.stack([r[0] for r in rows]))
            _save_gz(d / f"$store$_action_ckpt.{ckpt}.gz", np.array([r[1] for r in rows], np.int32))
            _save_gz(d / f"$store$_reward_ckpt.{ckpt}.gz", np.array([r[2] for r in rows], np.float32))
            _save_gz(d / f"$store$_terminal_ckpt.{ckpt}.gz", np.array([r[3] for r in rows], np.uint8))


def _check(store: TrajectoryStore, i: int, exp: dict) -> None:
    ep = store.read_episode(i)
    t = len(exp["actions"])
    assert ep.length == t
    np.testing.assert_array_equal(ep.observations[:t], exp["frames"])
    np.testing.assert_array_equal(ep.observations[t], exp["frames"][-1])  # placeholder final frame
    np.testing.assert_array_equal(ep.actions, np.array(PONG_MINIMAL)[exp["actions"]])
    np.testing.assert_array_equal(ep.rewards, exp["rewards"])
    assert ep.terminations[-1] and not ep.terminations[:-1].any() and not ep.truncations.any()
    assert ep.attrs["final_observation"] == "repeated"


@pytest.fixture(scope="module")
def replay(tmp_path_factory) -> tuple[Path, _Log, list[int]]:
    log = _Log()
    log.episode(5)  # A: in checkpoint 0
    log.episode(10)  # B: starts in 0, ends in 1
    log.episode(2)  # C: in 1
    log.episode(40)  # D: starts in 1, crosses 2, ends in 3
    log.episode(4, terminal=False)  # E: still running when logging stopped
    b_start = 8 + 3 + 4  # rows of A (3 + 5) + B's padding + 4 of B's rows
    d_start = b_start + 6 + 3 + 2 + 3  # rest of B, C with padding, D's padding
    splits = [b_start, d_start + 10, d_start + 30]
    d = tmp_path_factory.mktemp("dqn") / "Pong" / "1" / "replay_logs"
    log.write(d, splits)
    return d.parent.parent, log, splits


def test_minimal_action_set_matches_ale():
    np.testing.assert_array_equal(minimal_action_set("Pong"), PONG_MINIMAL)
    from wam.datasets.atari import legal_action_mask

    assert set(minimal_action_set("Breakout")) == set(np.flatnonzero(legal_action_mask("Breakout")))


def test_import_stitches_across_files_and_drops_the_unfinished_episode(replay, tmp_path):
    src, log, _ = replay
    summary = import_dqn_replay(src, "pong", tmp_path, run=1, block_rows=7)  # blocks cut episodes too
    assert (summary.episodes, summary.dropped_trailing, summary.dropped_leading) == (4, 1, 0)
    assert summary.rows_read == len(log.rows)
    store = TrajectoryStore.open(summary.dataset)
    assert store.directory == tmp_path / "atari" / "pong" / "dqn-replay-run1-v0"
    assert store.num_episodes == 4 and list(store.episode_lengths()) == [5, 10, 2, 40]
    for i in range(4):
        _check(store, i, log.episodes[i])
    assert store.provenance["protocol"] == "dqn-replay" and store.provenance["checkpoints"] == [0, 1, 2, 3]
    assert validate(store.directory) == []
    with pytest.raises(DataError, match="--overwrite"):
        import_dqn_replay(src, "Pong", tmp_path)


def test_import_from_a_later_checkpoint_drops_the_leading_partial_episode(replay, tmp_path):
    src, log, _ = replay
    summary = import_dqn_replay(src / "1" / "replay_logs", "Pong", tmp_path, checkpoints=[1, 2, 3], name="late")
    # checkpoint 1 starts inside B (dropped); C and D are whole; E is unfinished
    assert (summary.episodes, summary.dropped_leading, summary.dropped_trailing) == (2, 1, 1)
    store = TrajectoryStore.open(summary.dataset)
    _check(store, 0, log.episodes[2])
    _check(store, 1, log.episodes[3])
    # a gap between checkpoints starts a new run: D crosses the gap (dropped), nothing else is whole
    summary = import_dqn_replay(src, "Pong", tmp_path, checkpoints=[0, 2], name="gap")
    assert (summary.episodes, summary.dropped_trailing) == (1, 1)
    _check(TrajectoryStore.open(summary.dataset), 0, log.episodes[0])


def test_bad_inputs_are_named(replay, tmp_path):
    src, log, _ = replay
    with pytest.raises(DataError, match="does not exist"):
        import_dqn_replay(tmp_path / "nope", "Pong", tmp_path)
    with pytest.raises(DataError, match=r"checkpoints \[7\]"):
        import_dqn_replay(src, "Pong", tmp_path, checkpoints=[7])
    with pytest.raises(DataError, match="minimal action set"):  # Breakout has 4 actions, the log uses 6
        import_dqn_replay(src, "Breakout", tmp_path)
    with pytest.raises(DataError, match="stack-padding 0"):  # no blank rows where Dopamine puts them
        bad = _Log()
        bad.rows = [(np.ones((84, 84), np.uint8), 1, 0.0, 0)] * 3 + [(np.ones((84, 84), np.uint8), 1, 1.0, 1)]
        bad.write(tmp_path / "bad", [])
        import_dqn_replay(tmp_path / "bad", "Pong", tmp_path, name="bad")
