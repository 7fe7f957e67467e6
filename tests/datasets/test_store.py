"""The trajectory store: round trips, resume, token cache, validation of real corrupted files, atomicity."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from wam.datasets.errors import DataError
from wam.datasets.store import (
    TIME_CHUNK,
    Episode,
    TrajectoryStore,
    dataset_dir,
    find_datasets,
    frames_crc32,
)
from wam.datasets.validate import dataset_info, validate

PROV = {"protocol": "jowa", "policy": "random", "epsilon": 1.0, "seed": 0}

# Deterministic episodes, shared with the writer subprocesses of the atomicity tests (exec'd there).
EPISODE_SOURCE = textwrap.dedent("""
    import numpy as np
    from wam.datasets.store import Episode

    def make_episode(i, noise=False):
        rng = np.random.default_rng(1000 + i)
        t = 20 + (7 * i) % 23
        if noise:  # incompressible frames: bigger files, so a kill can land inside a copy
            obs = rng.integers(0, 256, (t + 1, 84, 84), dtype=np.uint8)
        else:
            obs = np.zeros((t + 1, 84, 84), np.uint8)
            for k in range(t + 1):
                obs[k, (3 * k + i) % 84, :] = 200
                obs[k, :, (5 * k + 2 * i) % 84] = 90
        term = np.zeros(t, bool)
        trunc = np.zeros(t, bool)
        (term if i % 3 else trunc)[-1] = True
        ram = rng.integers(0, 256, (t + 1, 128), dtype=np.uint8)  # one console RAM row per frame
        return Episode(observations=obs, actions=rng.integers(0, 18, t), rewards=rng.normal(size=t).astype(np.float32),
                       terminations=term, truncations=trunc, lives=np.full(t, 3 - i % 3, np.int32), seed=i,
                       attrs={"worker": i % 2, "episode_key": f"k{i}"}, ram=ram)
""")
_ns: dict = {}
exec(EPISODE_SOURCE, _ns)
make_episode = _ns["make_episode"]


def _assert_same(a: Episode, b: Episode) -> None:
    for k in ("observations", "actions", "rewards", "terminations", "truncations", "lives", "ram"):
        x, y = getattr(a, k), getattr(b, k)
        assert x.dtype == y.dtype and np.array_equal(x, y), k
    assert a.seed == b.seed
    assert {k: a.attrs[k] for k in b.attrs} == b.attrs


def _store(tmp_path: Path, n: int = 3, name: str = "test") -> TrajectoryStore:
    store = TrajectoryStore.create(dataset_dir(tmp_path, "Pong", name), game="Pong", provenance=PROV)
    with store.writer(commit_every=2) as w:
        for i in range(n):
            assert w.append(make_episode(i)) == i
    return store


def test_round_trip_layout_and_windows(tmp_path):
    store = _store(tmp_path, 4)
    d = tmp_path / "atari" / "pong" / "test-v0"
    assert store.directory == d and (d / "data" / "main_data.hdf5").is_file()
    assert store.num_episodes == 4 and store.game == "Pong"
    lengths = [make_episode(i).length for i in range(4)]
    assert list(store.episode_lengths()) == lengths and store.num_steps == sum(lengths)
    np.testing.assert_allclose(store.episode_returns(), [make_episode(i).total_return for i in range(4)], rtol=1e-6)
    reopened = TrajectoryStore.open(d)
    for i in range(4):
        _assert_same(reopened.read_episode(i), make_episode(i))
    ep = make_episode(2)
    np.testing.assert_array_equal(reopened.read_window(2, 5, 12, "observations"), ep.observations[5:12])
    np.testing.assert_array_equal(reopened.read_window(2, 3, 9, "actions"), ep.actions[3:9])
    np.testing.assert_array_equal(reopened.read_window(2, 0, 4, "lives"), ep.lives[:4])
    ram = reopened.read_window(2, 30, 35, "ram")  # the last 5 frames' RAM (35 frames)
    assert ram.shape == (5, 128) and ram.dtype == np.uint8
    np.testing.assert_array_equal(ram, ep.ram[30:35])
    assert reopened.has_ram and reopened.num_episodes_with_ram == 4
    attrs = reopened.episode_attrs(1)
    assert attrs["id"] == 1 and attrs["seed"] == 1 and attrs["total_steps"] == lengths[1]
    assert attrs["episode_key"] == "k1" and attrs["worker"] == 1
    # HDF5 layout: chunked along time, gzip, fletcher32; provenance as file attributes
    with h5py.File(d / "data" / "main_data.hdf5", "r") as f:
        obs = f["episode_2/observations"]  # 35 frames: two chunks
        assert obs.chunks == (TIME_CHUNK, 84, 84) and obs.compression == "gzip" and obs.fletcher32
        ram = f["episode_2/infos/ram"]  # Minari-style infos entry beside infos/lives
        assert ram.shape == (35, 128) and ram.dtype == np.uint8
        assert ram.compression == "gzip" and ram.fletcher32
        assert f["episode_2"].attrs["ram_crc32"] == frames_crc32(make_episode(2).ram)
        assert f["episode_0/actions"].dtype == np.int64 and f["episode_0/terminations"].dtype == bool
        assert f.attrs["game"] == "Pong" and f.attrs["protocol"] == "jowa" and f.attrs["policy"] == "random"
        assert f.attrs["wam_schema_version"] == 1 and "ale_py_version" in f.attrs and "wam_version" in f.attrs
    meta = json.loads((d / "data" / "metadata.json").read_text())
    assert meta["dataset_id"] == "atari/pong/test-v0" and meta["jpeg_encoding"] is False
    assert meta["data_format"] == "hdf5" and meta["total_episodes"] == 4 and meta["total_steps"] == sum(lengths)
    assert json.loads(meta["observation_space"])["shape"] == [84, 84]
    assert json.loads(meta["action_space"]) == {"type": "Discrete", "dtype": "int64", "start": 0, "n": 18}
    # Pong's minimal action set, in full-space ids, for tools that do not know ALE's sets
    assert meta["wam_legal_actions"] == {"ids": [0, 1, 3, 4, 11, 12],
                                         "names": ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"]}
    assert (tmp_path / "atari" / "namespace_metadata.json").is_file()
    assert (tmp_path / "atari" / "pong" / "namespace_metadata.json").is_file()
    # picklable without its handle, and readable after unpickling
    clone = pickle.loads(pickle.dumps(reopened))
    np.testing.assert_array_equal(clone.read_window(3, 0, 2, "rewards"), make_episode(3).rewards[:2])
    assert find_datasets([tmp_path]) == [d.resolve()]
    assert find_datasets(d / "data" / "main_data.hdf5") == [d.resolve()]


def test_episode_checks_are_programmer_errors():
    ep = make_episode(0)
    with pytest.raises(ValueError, match="observations"):
        Episode(ep.observations.astype(np.float32), ep.actions, ep.rewards, ep.terminations, ep.truncations)
    with pytest.raises(ValueError, match="actions"):
        Episode(ep.observations, ep.actions[:-1], ep.rewards, ep.terminations, ep.truncations)
    with pytest.raises(ValueError, match="18-action|\\[0, 18\\)"):
        Episode(ep.observations, ep.actions + 18, ep.rewards, ep.terminations, ep.truncations)
    assert Episode(ep.observations, ep.actions.astype(np.int32), ep.rewards, ep.terminations,
                   ep.truncations).actions.dtype == np.int64


def test_ram_is_optional_and_checked(tmp_path):
    ep = make_episode(0)
    t = ep.length
    for bad in (ep.ram[:-1], ep.ram[:, :64], ep.ram.astype(np.float32), ep.ram.astype(np.int32) + 256):
        with pytest.raises(ValueError, match="ram"):
            Episode(ep.observations, ep.actions, ep.rewards, ep.terminations, ep.truncations, ram=bad)
    assert Episode(ep.observations, ep.actions, ep.rewards, ep.terminations, ep.truncations,
                   ram=ep.ram.astype(np.int64)).ram.dtype == np.uint8
    store = TrajectoryStore.create(dataset_dir(tmp_path, "Pong", "mixed"), game="Pong", provenance=PROV)
    assert not store.has_ram  # empty
    with store.writer() as w:
        w.append(dataclasses.replace(ep, ram=None))  # e.g. data without RAM (DQN-Replay imports)
    assert not store.has_ram and store.num_episodes_with_ram == 0
    assert store.read_episode(0).ram is None
    with pytest.raises(DataError, match="episode 0 has no infos/ram"):
        store.read_window(0, 0, 2, "ram")
    with store.writer() as w:
        w.append(make_episode(1))
    for s in (store, TrajectoryStore.open(store.directory)):  # the writer's index and a fresh open agree
        assert not s.has_ram and s.num_episodes_with_ram == 1
        np.testing.assert_array_equal(s.read_episode(1).ram, make_episode(1).ram)
    info = dataset_info(store.directory)
    assert info["has_ram"] is False and info["episodes_with_ram"] == 1 and validate(store.directory) == []
    assert _info_ram_column(info) == "1/2"  # `wam data info` says which part of the dataset has RAM
    with h5py.File(_main(store), "r") as f:
        assert "infos/ram" not in f["episode_0"] and "ram_crc32" not in f["episode_0"].attrs
    assert t == store.episode_lengths()[0]


def test_resume_appends_and_refuses_other_data(tmp_path):
    _store(tmp_path, 2)
    d = dataset_dir(tmp_path, "Pong", "test")
    again = TrajectoryStore.create(d, game="Pong", provenance={**PROV, "seed": 0})
    assert again.num_episodes == 2
    with again.writer() as w:
        assert w.append(make_episode(2)) == 2
    assert TrajectoryStore.open(d).num_episodes == 3
    with pytest.raises(DataError, match="policy"):
        TrajectoryStore.create(d, game="Pong", provenance={**PROV, "policy": "scripted"})
    with pytest.raises(DataError, match="already holds"):
        TrajectoryStore.create(d, game="Pong", provenance=PROV, exist_ok=False)
    with pytest.raises(DataError, match="does not exist"):
        TrajectoryStore.open(tmp_path / "nope")
    with pytest.raises(DataError, match="not a wam dataset"):
        TrajectoryStore.open(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        find_datasets([tmp_path / "nope"])


def test_second_writer_is_refused(tmp_path):
    store = _store(tmp_path, 1)
    with store.writer():
        with pytest.raises(DataError, match="another process"):
            with TrajectoryStore.open(store.directory).writer():
                pass


def test_exception_inside_writer_keeps_full_episodes(tmp_path):
    store = _store(tmp_path, 1)
    with pytest.raises(KeyboardInterrupt):
        with store.writer(commit_every=100) as w:
            w.append(make_episode(1))
            raise KeyboardInterrupt
    assert TrajectoryStore.open(store.directory).num_episodes == 2
    assert validate(store.directory) == []


def test_token_cache(tmp_path):
    store = _store(tmp_path, 3)
    assert not store.has_tokens() and store.tokenizer_id() is None
    rng = np.random.default_rng(0)
    toks = {i: rng.integers(0, 2048, (store.episode_lengths()[i] + 1, 36)) for i in range(3)}
    store.write_tokens([(0, toks[0]), (1, toks[1])], tokenizer_id="vq-a")
    assert not store.has_tokens() and store.episodes_without_tokens() == [2]
    store.write_tokens([(2, toks[2])], tokenizer_id="vq-a")
    s = TrajectoryStore.open(store.directory)
    assert s.has_tokens() and s.tokenizer_id() == "vq-a"
    np.testing.assert_array_equal(s.read_episode(1, tokens=True).obs_tokens, toks[1])
    np.testing.assert_array_equal(s.read_window(2, 3, 8, "obs_tokens"), toks[2][3:8])
    assert s.read_window(0, 0, 1, "obs_tokens").dtype == np.uint16
    with pytest.raises(DataError, match="vq-a"):
        s.write_tokens([(0, toks[0])], tokenizer_id="vq-b")

    def failing():  # the write is atomic: an error midway leaves the previous cache untouched
        yield 0, toks[0] + 1
        raise RuntimeError("tokenizer crashed")

    with pytest.raises(RuntimeError):
        s.write_tokens(failing(), tokenizer_id="vq-a")
    np.testing.assert_array_equal(TrajectoryStore.open(s.directory).read_window(0, 0, 5, "obs_tokens"), toks[0][:5])
    s.write_tokens([(0, toks[0] + 1)], tokenizer_id="vq-b", overwrite=True)
    s2 = TrajectoryStore.open(s.directory)
    assert s2.tokenizer_id() == "vq-b" and s2.episodes_without_tokens() == [1, 2] and not s2.has_tokens()
    with pytest.raises(ValueError, match="tokens of episode 1"):
        s2.write_tokens([(1, toks[1][:-1])], tokenizer_id="vq-b")
    assert validate(s2.directory) == []


def test_token_cache_of_an_11x11_grid(tmp_path):
    """121 tokens a frame (the 11x11 tokenizer grid): stored, read back, validated; one count per store."""
    store = _store(tmp_path, 2)
    assert store.tokens_per_frame == 36  # the default, before any cache
    rng = np.random.default_rng(1)
    toks = [rng.integers(0, 1024, (store.episode_lengths()[i] + 1, 121)) for i in range(2)]
    with pytest.raises(ValueError, match="the same for every episode"):
        store.write_tokens([(0, toks[0]), (1, toks[1][:, :36])], tokenizer_id="vq-11")
    with pytest.raises(ValueError, match="K in"):
        store.write_tokens([(0, toks[0][:, :100])], tokenizer_id="vq-11")
    store.write_tokens([(i, toks[i]) for i in range(2)], tokenizer_id="vq-11")
    s = TrajectoryStore.open(store.directory)
    assert s.has_tokens() and s.tokens_per_frame == 121
    np.testing.assert_array_equal(s.read_window(1, 2, 6, "obs_tokens"), toks[1][2:6])
    assert validate(s.directory) == []
    s.close()
    with h5py.File(_main(s), "a") as f:  # a cache whose width disagrees with the store's count is caught
        f.attrs["tokens_per_frame"] = 36
    assert any("obs_tokens" in str(p) for p in validate(s.directory))


# ------------------------------------------------------------------------------------ validation


def _main(store: TrajectoryStore) -> Path:
    return store.directory / "data" / "main_data.hdf5"


def test_validate_names_each_kind_of_damage(tmp_path):
    good = _store(tmp_path, 3, "good")
    assert validate(good.directory) == []

    def copy(name: str) -> TrajectoryStore:
        dst = dataset_dir(tmp_path, "Pong", name)
        shutil.copytree(good.directory, dst)
        return TrajectoryStore.open(dst)

    # truncated file (still passes h5py.is_hdf5)
    s = copy("trunc")
    size = _main(s).stat().st_size
    with open(_main(s), "r+b") as fh:
        fh.truncate(size // 2)
    assert h5py.is_hdf5(_main(s))
    probs = validate(s.directory)
    assert len(probs) == 1 and "truncated" in probs[0].reason and str(_main(s)) in str(probs[0])

    # one flipped byte inside a data chunk: fletcher32 names the episode, field and rows
    s = copy("flip")
    with h5py.File(_main(s), "r") as f:
        n_chunks = f["episode_2/observations"].id.get_num_chunks()
        info = f["episode_2/observations"].id.get_chunk_info(n_chunks - 1)  # the last chunk: frames 32-34 (35 frames)
    with open(_main(s), "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        b = fh.read(1)
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes([b[0] ^ 0xFF]))
    probs = validate(s.directory)
    assert [(p.episode, f"'observations' rows {(n_chunks - 1) * TIME_CHUNK}-34" in p.reason and "corrupt" in p.reason) for p in probs] == [(2, True)]
    assert str(probs[0]).startswith(f"{_main(s)}: episode 2: ")

    # a missing field
    s = copy("missing")
    with h5py.File(_main(s), "a") as f:
        del f["episode_2/rewards"]
    assert [(p.episode, p.reason) for p in validate(s.directory)] == [(2, "missing field 'rewards'")]

    # mismatched lengths
    s = copy("lengths")
    with h5py.File(_main(s), "a") as f:
        t = f["episode_0/actions"].shape[0]
        del f["episode_0/actions"]
        f["episode_0"].create_dataset("actions", data=np.zeros(t + 3, np.int64), chunks=True, fletcher32=True)
    probs = validate(s.directory)
    assert len(probs) == 1 and probs[0].episode == 0 and "mismatched lengths: 'actions'" in probs[0].reason


def _flip_byte_in_chunk(path: Path, dataset: str, chunk: int) -> None:
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(chunk)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        b = fh.read(1)
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes([b[0] ^ 0xFF]))


def test_validate_catches_damaged_ram(tmp_path):
    good = _store(tmp_path, 3, "good")
    assert validate(good.directory) == [] and dataset_info(good.directory)["has_ram"] is True

    def copy(name: str) -> TrajectoryStore:
        dst = dataset_dir(tmp_path, "Pong", name)
        shutil.copytree(good.directory, dst)
        return TrajectoryStore.open(dst)

    def reasons(s: TrajectoryStore) -> list[tuple[int | None, str]]:
        return [(p.episode, p.reason) for p in validate(s.directory)]

    # bytes flipped on disk: the fletcher32 checksum of the chunk fails
    s = copy("flip")
    _flip_byte_in_chunk(_main(s), "episode_1/infos/ram", 0)
    probs = reasons(s)
    assert len(probs) == 1 and probs[0][0] == 1, probs
    assert probs[0][1].startswith("'infos/ram' rows 0-") and "corrupt" in probs[0][1]

    # well-formed chunks with other content (rewritten in place): the episode's CRC-32 catches it
    s = copy("content")
    with h5py.File(_main(s), "a") as f:
        f["episode_2/infos/ram"][7, 100] ^= 1
    assert reasons(s) == [(2, "'infos/ram' does not match its checksum (attribute ram_crc32): damaged")]

    # wrong length, wrong row width, wrong dtype, missing checksum: one line each, naming the problem
    s = copy("shape")
    with h5py.File(_main(s), "a") as f:
        t0, t1 = (int(f[f"episode_{i}"].attrs["total_steps"]) for i in (0, 1))
        for i, data in ((0, np.zeros((t0, 128), np.uint8)), (1, np.zeros((t1 + 1, 64), np.uint8)),
                        (2, None)):
            g = f[f"episode_{i}/infos"]
            if data is None:
                del f["episode_2"].attrs["ram_crc32"]
                continue
            del g["ram"]
            g.create_dataset("ram", data=data, chunks=True, fletcher32=True)
    assert reasons(s) == [
        (0, f"mismatched lengths: 'infos/ram' has shape ({t0}, 128), expected ({t0 + 1}, 128) "
            f"(total_steps={t0}: one 128-byte RAM row per frame, {t0 + 1} frames)"),
        (1, f"wrong shape: 'infos/ram' has shape ({t1 + 1}, 64), expected ({t1 + 1}, 128) "
            f"(total_steps={t1}: one 128-byte RAM row per frame, {t1 + 1} frames)"),
        (2, "'infos/ram' has no checksum (attribute ram_crc32)"),
    ]
    s = copy("dtype")
    with h5py.File(_main(s), "a") as f:
        t0 = int(f["episode_0"].attrs["total_steps"])
        del f["episode_0/infos/ram"]
        f["episode_0/infos"].create_dataset("ram", data=np.zeros((t0 + 1, 128), np.int16), chunks=True,
                                            fletcher32=True)
    assert reasons(s) == [(0, "'infos/ram' has dtype int16, expected uint8")]


def test_validate_token_cache_and_non_datasets(tmp_path):
    s = _store(tmp_path, 2)
    lengths = s.episode_lengths()
    s.write_tokens([(i, np.full((lengths[i] + 1, 36), i)) for i in range(2)], tokenizer_id="vq")
    assert validate(s.directory) == []
    with h5py.File(_main(s), "a") as f:
        f["episode_1/obs_tokens"][3, 4] = 999  # well-formed chunk, wrong content
    assert [(p.episode, "obs_tokens_crc32" in p.reason) for p in validate(s.directory)] == [(1, True)]
    with h5py.File(_main(s), "a") as f:
        del f["episode_0/obs_tokens"]
        f["episode_0"].create_dataset("obs_tokens", data=np.zeros((lengths[0] + 1, 35), np.uint16), fletcher32=True,
                                      chunks=True)
    probs = validate(s.directory)
    assert any(p.episode == 0 and "mismatched lengths: 'obs_tokens'" in p.reason for p in probs)

    # not a wam dataset: a plain directory, an HDF5 file without wam attributes
    (tmp_path / "plain").mkdir()
    assert "not a wam dataset" in validate(tmp_path / "plain")[0].reason
    other = tmp_path / "other" / "data"
    other.mkdir(parents=True)
    with h5py.File(other / "main_data.hdf5", "w") as f:
        f["x"] = np.arange(3)
    assert "not a wam dataset" in validate(other.parent)[0].reason
    with pytest.raises(DataError, match="does not exist"):
        validate(tmp_path / "missing")


def test_stale_metadata_is_repaired(tmp_path):
    s = _store(tmp_path, 2)
    meta_path = s.directory / "data" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "total_episodes": 1}))  # as after a crash between the two renames
    assert validate(s.directory) == []
    assert json.loads(meta_path.read_text())["total_episodes"] == 2


def test_dataset_info(tmp_path):
    s = _store(tmp_path, 3)
    info = dataset_info(s.directory)
    rets = [make_episode(i).total_return for i in range(3)]
    assert info["game"] == "Pong" and info["episodes"] == 3 and info["transitions"] == s.num_steps
    assert info["policy"] == "random" and info["protocol"] == "jowa"
    assert info["return_mean"] == pytest.approx(np.mean(rets), rel=1e-5)
    assert info["return_min"] == pytest.approx(min(rets), rel=1e-5)
    assert info["raw_bytes"] / info["stored_bytes"] > 5  # synthetic frames compress well
    assert info["compression_ratio"] == pytest.approx(info["raw_bytes"] / info["bytes_on_disk"])
    assert info["raw_bytes"] >= info["frames"] * 84 * 84
    assert info["has_ram"] is True and info["episodes_with_ram"] == 3 and _info_ram_column(info) == "yes"


def _info_ram_column(info: dict) -> str:
    """The RAM column of `wam data info`'s table for one dataset."""
    from wam.runs.data_cmds import _total, format_info

    head, row = format_info([info], _total([info])).splitlines()[:2]
    col = head.split().index("RAM") - len(head.split())  # from the right: the return column has spaces
    return row.split()[col]


# ------------------------------------------------------------------------------------ atomicity

WRITER = EPISODE_SOURCE + textwrap.dedent("""
    import signal
    import sys
    from wam.datasets.store import TrajectoryStore, dataset_dir
    # Ctrl-C as in an interactive shell: a test run launched in the background (`cmd &` in a script)
    # inherits SIGINT ignored, and an ignored Ctrl-C must stay ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    root, commit_every = sys.argv[1], int(sys.argv[2])
    store = TrajectoryStore.create(dataset_dir(root, "Pong", "kill"), game="Pong",
                                   provenance={"protocol": "jowa", "policy": "random"})
    with store.writer(commit_every=commit_every, commit_seconds=1e9) as w:
        print("start", store.num_episodes, flush=True)
        while True:
            i = w.append(make_episode(w.num_episodes, noise=True))
            print("appended", i, "committed", store.num_episodes, flush=True)
""")


def _run_writer(root: Path, commit_every: int, kill_after: float, sig: int) -> list[str]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(commit_every)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # wait until the writer is running
    assert line.startswith("start"), proc.stderr.read()
    time.sleep(kill_after)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, err
    return [line] + out.splitlines()


def _check_holds_exactly(root: Path, at_least: int, at_most: int) -> int:
    d = dataset_dir(root, "Pong", "kill")
    assert validate(d) == []
    store = TrajectoryStore.open(d)
    assert at_least <= store.num_episodes <= at_most, (at_least, store.num_episodes, at_most)
    for i in range(store.num_episodes):
        _assert_same(store.read_episode(i), make_episode(i, noise=True))
    with store.writer():  # a dead writer's temp file is removed by the next writer (which holds the lock)
        pass
    assert not list((d / "data").glob(".main_data.hdf5.tmp-*"))
    assert TrajectoryStore.open(d).num_episodes == store.num_episodes and validate(d) == []
    return store.num_episodes


@pytest.mark.parametrize("commit_every", [1, 3])
def test_sigkill_during_appends_keeps_every_committed_episode(tmp_path, commit_every):
    rng = np.random.default_rng(commit_every)
    for _ in range(3):  # kill at random moments, resume from what survived each time
        lines = _run_writer(tmp_path, commit_every, float(rng.uniform(0.2, 0.9)), signal.SIGKILL)
        # the writer's progress lines; anything else on stdout (a library's message) is not one
        progress = [m for m in map(re.compile(r"appended (\d+) committed (\d+)").fullmatch, lines[1:]) if m]
        committed = int(progress[-1][2]) if progress else int(lines[0].split()[1])
        appended = int(progress[-1][1]) + 1 if progress else committed
        # every episode reported committed survives; at most the in-flight batch beyond it
        _check_holds_exactly(tmp_path, committed, max(appended, committed) + commit_every)


def test_ctrl_c_commits_appended_episodes(tmp_path):
    lines = _run_writer(tmp_path, 1000, 0.8, signal.SIGINT)
    appended = int(lines[-1].split()[1]) + 1 if len(lines) > 1 else 0
    n = _check_holds_exactly(tmp_path, appended, appended + 1)
    assert n >= 1
