"""Collection with real Ray actors, real ALE environments and real HDF5 files."""

from __future__ import annotations

import os

import numpy as np
import pytest

from wam.datasets import faults
from wam.datasets.atari import make_env
from wam.datasets.collect import _truncate, collect, dataset_name
from wam.datasets.errors import WamError
from wam.datasets.store import TrajectoryStore, dataset_dir
from wam.datasets.validate import validate


def _episodes(root, game, name):
    store = TrajectoryStore.open(dataset_dir(root, game, name))
    return [store.read_episode(i) for i in range(store.num_episodes)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.observations, y.observations)
        np.testing.assert_array_equal(x.actions, y.actions)
        np.testing.assert_array_equal(x.rewards, y.rewards)
        np.testing.assert_array_equal(x.terminations, y.terminations)
        np.testing.assert_array_equal(x.truncations, y.truncations)
        np.testing.assert_array_equal(x.ram, y.ram)


def test_same_seed_same_dataset_whatever_the_worker_count(ray_session, tmp_path):
    kw = dict(games=["Pong", "breakout"], policy="random", episodes=2, seed=3, progress=False)
    s2 = collect(workers=2, out=tmp_path / "a", **kw)
    s1 = collect(workers=1, out=tmp_path / "b", **kw)
    assert s2.episodes == s1.episodes == 4
    for game in ("Pong", "Breakout"):
        a, b = _episodes(tmp_path / "a", game, "random"), _episodes(tmp_path / "b", game, "random")
        assert len(a) == 2
        _same(a, b)
        assert a[0].observations.shape[1:] == (84, 84) and a[0].observations.dtype == np.uint8
        assert len(a[0].observations) == len(a[0].actions) + 1
        assert a[0].terminations[-1] or a[0].truncations[-1]
        assert not np.array_equal(a[0].actions, a[1].actions), "two episodes of a game must differ"
        assert validate(dataset_dir(tmp_path / "a", game, "random")) == []


def test_step_budget_is_exact_and_a_rerun_resumes(ray_session, tmp_path):
    name = dataset_name("scripted", 0.25)
    s = collect(["Pong"], policy="scripted", epsilon=0.25, steps=700, workers=2, seed=1, out=tmp_path, progress=False)
    assert s.steps == 700
    first = _episodes(tmp_path, "Pong", name)
    assert sum(len(e.actions) for e in first) == 700
    assert first[-1].truncations[-1] or first[-1].terminations[-1]
    again = collect(["Pong"], policy="scripted", epsilon=0.25, steps=700, workers=2, seed=1, out=tmp_path,
                    progress=False)
    assert again.steps == 0, "a complete dataset must not grow on a rerun"
    more = collect(["Pong"], policy="scripted", epsilon=0.25, steps=1500, workers=2, seed=1, out=tmp_path,
                   progress=False)
    assert more.steps == 800
    after = _episodes(tmp_path, "Pong", name)
    _same(after[: len(first)], first)  # resume never rewrites what was there
    assert sum(len(e.actions) for e in after) == 1500
    with pytest.raises(WamError, match="seed"):
        collect(["Pong"], policy="scripted", epsilon=0.25, steps=2000, workers=1, seed=2, out=tmp_path, progress=False)


def test_recorded_ram_is_the_emulators_ram_at_each_frame(ray_session, tmp_path):
    """Replaying each collected episode (same seed, same actions) in a fresh env gives RAM[t] at frame t."""
    collect(["Breakout"], policy="random", episodes=2, workers=1, seed=11, out=tmp_path, progress=False)
    d = dataset_dir(tmp_path, "Breakout", "random")
    assert validate(d) == []
    store = TrajectoryStore.open(d)
    assert store.has_ram and store.num_episodes == 2
    for i in range(2):  # episode 1 ran on the worker's reused env, reset with its own seed
        ep = store.read_episode(i)
        t = ep.length
        assert ep.terminations[-1], "a random Breakout episode ends by losing every life"
        assert ep.ram.shape == (t + 1, 128) and ep.ram.dtype == np.uint8
        assert len({r.tobytes() for r in ep.ram}) > t // 2, "RAM should change from step to step"
        np.testing.assert_array_equal(store.read_window(i, 3, 9, "ram"), ep.ram[3:9])
        env = make_env("Breakout", protocol="jowa", seed=ep.seed)
        obs, _ = env.reset(seed=ep.seed)
        np.testing.assert_array_equal(env.unwrapped.ale.getRAM(), ep.ram[0])  # the reset RAM
        np.testing.assert_array_equal(obs, ep.observations[0])
        for k, a in enumerate(ep.actions):
            obs, _, term, trunc, _ = env.step(int(a))
            np.testing.assert_array_equal(env.unwrapped.ale.getRAM(), ep.ram[k + 1], err_msg=f"step {k}")
            np.testing.assert_array_equal(obs, ep.observations[k + 1])
        assert term
        env.close()
    # the registered gymnasium id replays it too: outside tools play on wam's exact protocol
    import gymnasium as gym

    ep = store.read_episode(0)
    env = gym.make("wam.datasets.atari:wam/Breakout-v0", protocol="jowa", seed=ep.seed)
    assert env.unwrapped.game == "Breakout" and env.unwrapped.max_episode_steps == 108_000  # jowa: 30 min
    obs, _ = env.reset(seed=ep.seed)
    np.testing.assert_array_equal(obs, ep.observations[0])
    for k, a in enumerate(ep.actions):
        obs, _, term, _, _ = env.step(int(a))
        np.testing.assert_array_equal(obs, ep.observations[k + 1], err_msg=f"gym.make env, step {k}")
    assert term
    env.close()


def test_truncating_to_a_step_budget_keeps_one_ram_row_per_frame():
    t = 10
    arrays = {"observations": np.zeros((t + 1, 84, 84), np.uint8), "actions": np.arange(t),
              "rewards": np.zeros(t, np.float32), "terminations": np.eye(1, t, t - 1, dtype=bool)[0],
              "truncations": np.zeros(t, bool), "lives": np.zeros(t, np.int32),
              "ram": np.arange((t + 1) * 128).reshape(t + 1, 128).astype(np.uint8)}
    cut = _truncate(arrays, 4)
    assert cut["observations"].shape[0] == cut["ram"].shape[0] == 5 and len(cut["actions"]) == 4
    np.testing.assert_array_equal(cut["ram"], arrays["ram"][:5])
    assert cut["truncations"][-1] and not cut["terminations"][-1]


def test_a_dead_worker_has_its_episode_rerun_once(ray_session, tmp_path, monkeypatch):
    marker = tmp_path / "died"
    monkeypatch.setenv(faults.ENV_DIE_ON, f"collect:Pong/1:{marker}")
    s = collect(["Pong"], policy="random", episodes=3, workers=2, seed=5, out=tmp_path / "x", progress=False)
    assert marker.exists(), "the fault was not injected"
    assert s.restarted_workers == 1
    monkeypatch.delenv(faults.ENV_DIE_ON)
    ref = collect(["Pong"], policy="random", episodes=3, workers=1, seed=5, out=tmp_path / "y", progress=False)
    assert s.episodes == ref.episodes == 3
    _same(_episodes(tmp_path / "x", "Pong", "random"), _episodes(tmp_path / "y", "Pong", "random"))


def test_a_worker_that_always_dies_stops_collection_with_the_episodes_before_it_kept(ray_session, tmp_path, monkeypatch):
    monkeypatch.setenv(faults.ENV_DIE_ON, "collect:Pong/1")
    with pytest.raises(WamError, match="died 4 times on Pong episode 1"):
        collect(["Pong"], policy="random", episodes=3, workers=1, seed=5, out=tmp_path, progress=False)
    path = dataset_dir(tmp_path, "Pong", "random")
    assert validate(path) == []
    assert len(_episodes(tmp_path, "Pong", "random")) == 1
    monkeypatch.delenv(faults.ENV_DIE_ON)
    s = collect(["Pong"], policy="random", episodes=3, workers=1, seed=5, out=tmp_path, progress=False)
    assert s.episodes == 2 and len(_episodes(tmp_path, "Pong", "random")) == 3  # the rerun resumes


def test_bad_input_is_a_user_error(tmp_path):
    with pytest.raises(WamError, match="exactly one"):
        collect(["Pong"], steps=10, episodes=1, out=tmp_path)
    with pytest.raises(WamError, match="epsilon"):
        collect(["Pong"], steps=10, epsilon=1.5, out=tmp_path)
    with pytest.raises(WamError, match="Pong"):
        collect(["Pongg"], steps=10, out=tmp_path)


def test_ray_workers_run_at_the_drivers_priority(ray_session):
    """Ray's default worker niceness (15) starves workers beside any busy process; ray_session sets 0."""
    import ray

    @ray.remote(num_cpus=1)
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote()) == os.nice(0)
