"""`wam data info/validate/import-dqn-replay/import-minari/export-minari` end to end through the CLI."""

from __future__ import annotations

import gzip
import importlib.util
import json

import h5py
import numpy as np
import pytest

from wam.datasets.store import TIME_CHUNK, Episode, TrajectoryStore, dataset_dir
from wam.runs.cli import run_command


def _dataset(root, game="Pong", n=2):
    store = TrajectoryStore.create(dataset_dir(root, game, "cli"), game=game,
                                   provenance={"protocol": "jowa", "policy": "random"})
    with store.writer() as w:
        for i in range(n):
            t = 40 + i
            obs = np.zeros((t + 1, 84, 84), np.uint8)
            obs[:, i, :] = np.arange(t + 1, dtype=np.uint8)[:, None]
            term = np.zeros(t, bool)
            term[-1] = True
            w.append(Episode(obs, np.full(t, 3), np.full(t, float(i), np.float32), term, np.zeros(t, bool)))
    return store


def test_info_table_and_json(tmp_path, capsys):
    _dataset(tmp_path, "Pong")
    _dataset(tmp_path, "Breakout", n=3)
    assert run_command(["data", "info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "atari/pong/cli-v0" in out and "atari/breakout/cli-v0" in out
    assert "total: 2 dataset(s), 2 game(s), 5 episodes" in out
    assert run_command(["data", "info", str(tmp_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    by_game = {d["game"]: d for d in doc["datasets"]}
    assert by_game["Breakout"]["episodes"] == 3 and by_game["Breakout"]["transitions"] == 40 + 41 + 42
    assert by_game["Breakout"]["return_max"] == 2.0 * 42 and by_game["Pong"]["return_mean"] == pytest.approx(20.5)
    assert doc["total"]["episodes"] == 5 and by_game["Pong"]["compression_ratio"] > 1


def test_validate_ok_damaged_and_missing(tmp_path, capsys):
    store = _dataset(tmp_path)
    assert run_command(["data", "validate", str(store.directory)]) == 0
    assert capsys.readouterr().out.startswith("ok: 1 dataset(s), 2 episodes, 81 transitions")
    with h5py.File(store.path, "r") as f:
        info = f["episode_1/observations"].id.get_chunk_info(0)
    with open(store.path, "r+b") as fh:
        fh.seek(info.byte_offset + 5)
        b = fh.read(1)
        fh.seek(info.byte_offset + 5)
        fh.write(bytes([b[0] ^ 1]))
    assert run_command(["data", "validate", str(tmp_path)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{store.path}: episode 1: 'observations' rows 0-{TIME_CHUNK - 1}: data chunk is corrupt")
    assert lines[-1] == "1 problem(s) in 1 file(s)"
    assert run_command(["data", "validate", str(tmp_path / "nope")]) == 2
    assert "nope does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_command(["data", "validate", str(tmp_path / "empty")]) == 1
    assert "not a wam dataset" in capsys.readouterr().out
    assert run_command(["data", "info", str(tmp_path / "nope")]) == 2


def test_import_dqn_replay_command(tmp_path, capsys):
    d = tmp_path / "Pong" / "1" / "replay_logs"
    d.mkdir(parents=True)
    blank = [np.zeros((84, 84), np.uint8)] * 3
    frames = [np.full((84, 84), k + 1, np.uint8) for k in range(6)]
    rows = {"observation": np.stack(blank + frames), "action": np.array([0, 0, 0, 1, 2, 3, 4, 5, 2], np.int32),
            "reward": np.array([0, 0, 0, 0, 1, 0, 0, -1, 0], np.float32),
            "terminal": np.array([0, 0, 0, 0, 0, 0, 0, 0, 1], np.uint8)}
    for kind, arr in rows.items():
        with gzip.open(d / f"$store$_{kind}_ckpt.0.gz", "wb") as f:
            np.save(f, arr)
    assert run_command(["data", "import-dqn-replay", str(tmp_path / "Pong"), "--game", "Pong",
                        "--out", str(tmp_path / "wam"), "--checkpoints", "0"]) == 0
    assert "imported 1 episodes (6 transitions)" in capsys.readouterr().out
    ep = TrajectoryStore.open(dataset_dir(tmp_path / "wam", "Pong", "dqn-replay-run1")).read_episode(0)
    np.testing.assert_array_equal(ep.actions, [1, 3, 4, 11, 12, 3])  # Pong's minimal set [0, 1, 3, 4, 11, 12]
    np.testing.assert_array_equal(ep.observations[:, 0, 0], [1, 2, 3, 4, 5, 6, 6])
    assert run_command(["data", "import-dqn-replay", str(tmp_path / "none"), "--game", "Pong",
                        "--out", str(tmp_path / "wam")]) == 2


@pytest.mark.skipif(importlib.util.find_spec("minari") is None, reason="minari not installed")
def test_export_then_import_minari_commands(tmp_path, capsys):
    store = _dataset(tmp_path / "wam")
    assert run_command(["data", "export-minari", str(store.directory), "--out", str(tmp_path / "minari")]) == 0
    exported = tmp_path / "minari" / "atari" / "pong" / "cli-v0"
    assert f"to {exported}" in capsys.readouterr().out
    # a Minari dataset of 84x84 frames imports as-is (no conversion)
    assert run_command(["data", "import-minari", str(exported), "--out", str(tmp_path / "back"), "--name", "back"]) == 0
    back = TrajectoryStore.open(dataset_dir(tmp_path / "back", "Pong", "back"))
    for i in range(2):
        a, b = store.read_episode(i), back.read_episode(i)
        np.testing.assert_array_equal(a.observations, b.observations)
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.rewards, b.rewards)
    assert run_command(["data", "export-minari", str(store.directory), "--out", str(tmp_path / "minari")]) == 2
    assert "already exists" in capsys.readouterr().err
