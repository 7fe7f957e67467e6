"""Minari interchange: wam datasets load in the real `minari` package; Minari Atari datasets import."""

from __future__ import annotations

import importlib.util
import json

import h5py
import numpy as np
import pytest

from wam.datasets.errors import DataError
from wam.datasets.minari_io import _ram_of, export_minari, import_minari
from wam.datasets.store import Episode, TrajectoryStore, dataset_dir
from wam.datasets.validate import validate

HAS_MINARI = importlib.util.find_spec("minari") is not None
needs_minari = pytest.mark.skipif(not HAS_MINARI, reason="minari not installed (pip install 'wam[minari]')")


def _episode(i: int) -> Episode:
    rng = np.random.default_rng(i)
    t = 30 + 5 * i
    obs = (rng.random((t + 1, 84, 84)) < 0.05).astype(np.uint8) * 255
    term = np.zeros(t, bool)
    term[-1] = True
    return Episode(observations=obs, actions=rng.integers(0, 18, t), rewards=rng.normal(size=t).astype(np.float32),
                   terminations=term, truncations=np.zeros(t, bool), lives=np.full(t, 5, np.int32), seed=i)


def _pong_store(tmp_path, name: str, episodes: list[Episode]) -> TrajectoryStore:
    store = TrajectoryStore.create(dataset_dir(tmp_path / "wam", "Pong", name), game="Pong",
                                   provenance={"protocol": "jowa", "policy": "random"})
    with store.writer() as w:
        for ep in episodes:
            w.append(ep)
    return store


@pytest.fixture
def wam_dataset(tmp_path):
    return _pong_store(tmp_path, "test", [_episode(i) for i in range(3)])


def test_export_layout_with_h5py_alone(wam_dataset, tmp_path):
    target = export_minari(wam_dataset.directory, tmp_path / "minari")
    assert target == tmp_path / "minari" / "atari" / "pong" / "test-v0"
    meta = json.loads((target / "data" / "metadata.json").read_text())
    assert meta["dataset_id"] == "atari/pong/test-v0" and meta["minari_version"] == "0.5.4"
    assert meta["jpeg_encoding"] is False and meta["total_episodes"] == 3
    assert (tmp_path / "minari" / "atari" / "namespace_metadata.json").is_file()
    with h5py.File(target / "data" / "main_data.hdf5", "r") as f:
        g = f["episode_1"]
        assert g.attrs["id"] == 1 and g.attrs["seed"] == 1 and g.attrs["total_steps"] == 35
        np.testing.assert_array_equal(g["observations"][()], _episode(1).observations)
        np.testing.assert_array_equal(g["infos/lives"][()], _episode(1).lives)
    assert validate(target) == []
    with pytest.raises(DataError, match="already exists"):
        export_minari(wam_dataset.directory, tmp_path / "minari")


def test_export_refuses_damaged_data(wam_dataset, tmp_path):
    with h5py.File(wam_dataset.path, "a") as f:
        del f["episode_0/rewards"]
    with pytest.raises(DataError, match="missing field 'rewards'"):
        export_minari(wam_dataset.directory, tmp_path / "minari")


@needs_minari
def test_minari_loads_the_export(wam_dataset, tmp_path, monkeypatch):
    import minari

    export_minari(wam_dataset.directory, tmp_path / "minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    assert "atari/pong/test-v0" in minari.list_local_datasets()
    ds = minari.load_dataset("atari/pong/test-v0")
    assert ds.total_episodes == 3 and ds.total_steps == sum(_episode(i).length for i in range(3))
    assert ds.observation_space.shape == (84, 84) and ds.action_space.n == 18
    for i, ep in enumerate(ds.iterate_episodes()):
        ref = _episode(i)
        np.testing.assert_array_equal(ep.observations, ref.observations)  # raw, not JPEG-decoded
        np.testing.assert_array_equal(ep.actions, ref.actions)
        np.testing.assert_array_equal(ep.rewards, ref.rewards)
        np.testing.assert_array_equal(ep.terminations, ref.terminations)
        np.testing.assert_array_equal(ep.truncations, ref.truncations)
    # the dataset directory itself is readable by Minari too, without exporting
    assert minari.MinariDataset(wam_dataset.directory / "data").total_episodes == 3
    # and the environment is recoverable: wam's own, with the dataset's game and protocol
    env = ds.recover_environment()
    assert type(env.unwrapped).__name__ == "AtariEnv"
    assert env.unwrapped.game == "Pong" and env.unwrapped.protocol.name == "jowa"
    obs, _ = env.reset(seed=0)
    assert obs.shape == (84, 84) and obs.dtype == np.uint8
    env.close()


def _minari_atari_dataset(root, monkeypatch):
    """A tiny dataset in the layout of Minari's `atari/pong/expert-v0`: real ALE RGB frames, 18 actions.

    Also returns ALE's own grayscale screens of the same steps, resized like wam's env does.
    """
    import ale_py
    import cv2
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    gym.register_envs(ale_py)
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    env = gym.make("ALE/Pong-v5", repeat_action_probability=0.0, full_action_space=True)
    rng = np.random.default_rng(0)
    buffers, grays = [], []
    for e, t in enumerate((25, 18)):
        obs, info = env.reset(seed=e)
        frames, gray, acts, lives = [obs], [env.unwrapped.ale.getScreenGrayscale()], [], [info["lives"]]
        for _ in range(t):
            a = int(rng.integers(0, 18))
            obs, r, term, trunc, info = env.step(a)
            frames.append(obs)
            gray.append(env.unwrapped.ale.getScreenGrayscale())
            acts.append(a)
            lives.append(info["lives"])
        rewards = rng.normal(size=t).astype(np.float32)
        terms = np.zeros(t, bool)
        truncs = np.zeros(t, bool)
        (terms if e == 0 else truncs)[-1] = True
        buffers.append(EpisodeBuffer(seed=e, observations=np.stack(frames), actions=np.array(acts),
                                     rewards=rewards, terminations=terms, truncations=truncs,
                                     infos={"lives": np.array(lives)}))
        grays.append(np.stack([cv2.resize(g, (84, 84), interpolation=cv2.INTER_AREA) for g in gray]))
    minari.create_dataset_from_buffers("atari/pong/expert-v0", buffers, env=env, algorithm_name="test",
                                       action_space=gym.spaces.Discrete(18), observation_space=env.observation_space,
                                       author="wam", author_email="-", code_permalink="-", description="tiny",
                                       jpeg_encoding=False)
    return root / "atari" / "pong" / "expert-v0", buffers, grays


@needs_minari
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_import_minari_atari_layout(tmp_path, monkeypatch):
    src, buffers, grays = _minari_atari_dataset(tmp_path / "minari", monkeypatch)
    summary = import_minari(src, tmp_path / "wam")
    assert (summary.game, summary.episodes, summary.steps) == ("Pong", 2, 43)
    store = TrajectoryStore.open(summary.dataset)
    assert store.directory == tmp_path / "wam" / "atari" / "pong" / "expert-v0"
    assert store.provenance["protocol"] == "minari" and store.provenance["sticky_action_prob"] == 0.0
    for i, (buf, gray) in enumerate(zip(buffers, grays)):
        ep = store.read_episode(i)
        assert ep.observations.shape == (len(buf.rewards) + 1, 84, 84) and ep.seed == i
        # cv2's RGB->gray of Minari's frames is within 1 grey level of ALE's own grayscale screen
        assert np.abs(ep.observations.astype(int) - gray.astype(int)).max() <= 1
        np.testing.assert_array_equal(ep.actions, buf.actions)
        np.testing.assert_array_equal(ep.rewards, buf.rewards)
        np.testing.assert_array_equal(ep.terminations, buf.terminations)
        np.testing.assert_array_equal(ep.truncations, buf.truncations)
        np.testing.assert_array_equal(ep.lives, buf.infos["lives"][1:])
        assert ep.ram is None  # Minari's Atari datasets hold no RAM
    assert validate(store.directory) == [] and not store.has_ram
    with pytest.raises(DataError, match="does not exist"):
        import_minari(tmp_path / "nope", tmp_path / "wam")
    with pytest.raises(DataError, match="not a Minari dataset"):
        import_minari(tmp_path, tmp_path / "wam")


def _episode_with_ram(i: int) -> Episode:
    ep = _episode(i)
    ram = np.random.default_rng(100 + i).integers(0, 256, (ep.length + 1, 128), dtype=np.uint8)
    return Episode(ep.observations, ep.actions, ep.rewards, ep.terminations, ep.truncations, lives=ep.lives,
                   seed=ep.seed, ram=ram)


@pytest.fixture
def wam_dataset_with_ram(tmp_path):
    return _pong_store(tmp_path, "ram", [_episode_with_ram(i) for i in range(2)])


def test_export_keeps_ram(wam_dataset_with_ram, tmp_path):
    target = export_minari(wam_dataset_with_ram.directory, tmp_path / "minari")
    with h5py.File(target / "data" / "main_data.hdf5", "r") as f:
        np.testing.assert_array_equal(f["episode_1/infos/ram"][()], _episode_with_ram(1).ram)
    assert validate(target) == [] and TrajectoryStore.open(target).has_ram


@needs_minari
def test_minari_reads_exported_ram_and_import_keeps_it(wam_dataset_with_ram, tmp_path, monkeypatch):
    import minari

    target = export_minari(wam_dataset_with_ram.directory, tmp_path / "minari")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    for i, ep in enumerate(minari.load_dataset("atari/pong/ram-v0").iterate_episodes()):
        np.testing.assert_array_equal(ep.infos["ram"], _episode_with_ram(i).ram)  # T+1 rows, as Minari's infos
    summary = import_minari(target, tmp_path / "back")
    assert summary.episodes == summary.episodes_with_ram == 2 and summary.dropped_ram == 0
    store = TrajectoryStore.open(summary.dataset)
    assert store.has_ram and validate(store.directory) == []
    for i in range(2):
        ref = _episode_with_ram(i)
        np.testing.assert_array_equal(store.read_episode(i).ram, ref.ram)
        np.testing.assert_array_equal(store.read_window(i, 2, 6, "ram"), ref.ram[2:6])
        np.testing.assert_array_equal(store.read_episode(i).observations, ref.observations)


def test_only_ram_aligned_with_frames_is_imported():
    t = 5
    ram = np.arange((t + 1) * 128).reshape(t + 1, 128) % 256  # int64, as Minari may store it
    np.testing.assert_array_equal(_ram_of({"ram": ram}, t), ram.astype(np.uint8))
    assert _ram_of({"ram": ram}, t).dtype == np.uint8
    for bad in (ram[1:], ram[:, :64], ram + 256, ram.astype(np.float32)):  # no reset row, not bytes, ...
        assert _ram_of({"ram": bad}, t) is None
    assert _ram_of(None, t) is None and _ram_of({"lives": np.zeros(t + 1)}, t) is None
