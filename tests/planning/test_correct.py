"""Offline Q-correction: `wam plan correct` over a real HDF5 dataset with real Ray actors writes the local
planner's answers with provenance; the file round-trips; damage and edits are detected; the subset is seeded."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from wam.datasets.atari import legal_action_mask
from wam.datasets.errors import DataError, WamError
from wam.datasets.store import Episode, TrajectoryStore, dataset_dir
from wam.planning.beam import BeamSearchPlanner, PlannerSettings
from wam.planning.correct import correct_q_values, load_q_targets, select_states
from wam.worldmodel.checkpoint import save_checkpoint
from wam.worldmodel.model import CHECKPOINT_KIND, WorldActionModel, WorldActionModelConfig

TOKENIZER_ID = "vq-test"


def make_data(root, lengths=(6, 9)):
    store = TrajectoryStore.create(dataset_dir(root, "Pong", "random"), game="Pong",
                                   provenance={"game": "Pong", "protocol": "jowa", "policy": "random"})
    rng = np.random.default_rng(0)
    legal = np.flatnonzero(legal_action_mask("Pong"))
    with store.writer() as w:
        for t in lengths:
            w.append(Episode(observations=rng.integers(0, 256, (t + 1, 84, 84), dtype=np.uint8),
                             actions=rng.choice(legal, t), rewards=np.zeros(t, np.float32),
                             terminations=np.eye(t, dtype=bool)[-1], truncations=np.zeros(t, bool)))
    store.write_tokens([(i, rng.integers(0, 16, (t + 1, 36))) for i, t in enumerate(lengths)], tokenizer_id=TOKENIZER_ID)
    return TrajectoryStore.open(store.directory)


def make_agent(build, path):
    cfg = WorldActionModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, horizon=3, games=("Breakout", "Pong"))
    model = build(cfg)
    save_checkpoint(path, {"kind": CHECKPOINT_KIND, "config": {"model": model.config_dict()},
                           "model": model.state_dict(), "tokenizer": {"id": TOKENIZER_ID, "path": ""}, "step": 1})
    return model


SETTINGS = PlannerSettings(beam_width=2, horizon=1, gamma=0.9)


def test_correct_writes_the_planners_answers_with_provenance(ray_session, tmp_path, build_sharp_model):
    store = make_data(tmp_path / "data")
    model = make_agent(build_sharp_model, tmp_path / "agent.pt")
    out = tmp_path / "q.h5"
    s = correct_q_values(tmp_path / "agent.pt", tmp_path / "data", out, SETTINGS, stride=2, workers=2, batch_size=3,
                         progress=False)
    assert s.states == 3 + 5 and out.exists()
    qt = load_q_targets(out)
    assert len(qt) == 8 and qt.games == ["Breakout", "Pong"] and (qt.game_id == 1).all()
    assert qt.step.tolist() == [0, 2, 4, 0, 2, 4, 6, 8] and qt.episode.tolist() == [0] * 3 + [1] * 5
    assert json.loads(qt.attrs["planner"])["beam_width"] == 2 and qt.attrs["context_frames"] == 2  # H=3, 1 planned step
    assert qt.attrs["tokenizer_id"] == TOKENIZER_ID and len(qt.attrs["agent_sha256"]) == 64
    assert qt.datasets[0]["game"] == "Pong"
    # every row equals the local planner on the same context window
    planner = BeamSearchPlanner(model, SETTINGS.beam_width, SETTINGS.horizon, SETTINGS.gamma)
    legal = torch.as_tensor(legal_action_mask("Pong").copy())[None]
    for i in range(len(qt)):
        e, t = int(qt.episode[i]), int(qt.step[i])
        ep = store.read_episode(e, tokens=True)
        lo = max(0, t - 1)
        res = planner.plan_context(torch.as_tensor(ep.obs_tokens[lo:t + 1].astype(np.int64))[None],
                                   torch.as_tensor(ep.actions[lo:t])[None], torch.tensor([1]), legal)
        assert qt.action[i] == res.action.item()
        assert qt.candidates[i].tolist() == res.candidates[0].tolist()
        np.testing.assert_allclose(qt.candidate_q[i], res.candidate_q[0].numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(qt.raw_q[i][legal[0].numpy()], res.raw_q[0][legal[0]].numpy(), rtol=1e-4, atol=1e-4)
    assert qt.lookup(store.directory, 1, 6) == 6 and qt.lookup(store.directory, 1, 7) is None
    # an existing file is not replaced without --overwrite
    with pytest.raises(WamError, match="exists"):
        correct_q_values(tmp_path / "agent.pt", tmp_path / "data", out, SETTINGS, progress=False)


def test_damaged_or_edited_file_fails_to_load(tmp_path):
    from wam.planning.correct import _DTYPES, ROW_FIELDS, _content_digest

    n, k, h = 5000, 2, 1
    arrays = {"dataset": np.zeros(n), "episode": np.zeros(n), "step": np.arange(n), "game_id": np.zeros(n),
              "action": np.zeros(n), "candidates": np.zeros((n, k)), "candidate_q": np.random.rand(n, k),
              "raw_q": np.random.rand(n, 18), "plans": np.zeros((n, k, h))}
    arrays = {name: a.astype(_DTYPES[name]) for name, a in arrays.items()}
    path = tmp_path / "q.h5"
    with h5py.File(path, "w") as f:
        for name in ROW_FIELDS:
            f.create_dataset(name, data=arrays[name], chunks=(1024, *arrays[name].shape[1:]), fletcher32=True)
        f.attrs.update({"format": "wam-q-targets", "format_version": 1, "content_sha256": _content_digest(arrays),
                        "datasets": "[]", "games": "[]"})
    assert len(load_q_targets(path)) == n
    with h5py.File(path, "a") as f:  # an edit through HDF5 keeps the checksums valid but not the hash
        f["raw_q"][0, 0] = 99.0
    with pytest.raises(DataError, match="SHA-256"):
        load_q_targets(path)
    raw = bytearray(path.read_bytes())  # flip bytes inside the raw_q data: fletcher32 catches it
    with h5py.File(path, "r") as f:
        off = f["raw_q"].id.get_chunk_info(1).byte_offset
    raw[off + 100:off + 108] = b"\xff" * 8
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="damaged"):
        load_q_targets(path)
    with pytest.raises(DataError, match="not found"):
        load_q_targets(tmp_path / "none.h5")


def test_select_states_stride_and_seeded_subset():
    rows = select_states([[3, 0, 5]], stride=2, max_states=None, seed=0)
    assert rows.tolist() == [[0, 0, 0], [0, 0, 2], [0, 2, 0], [0, 2, 2], [0, 2, 4]]
    a = select_states([[50, 40], [30]], 1, 17, seed=3)
    assert len(a) == 17 and (select_states([[50, 40], [30]], 1, 17, seed=3) == a).all()
    assert not (select_states([[50, 40], [30]], 1, 17, seed=4) == a).all()
    with pytest.raises(WamError, match="stride"):
        select_states([[3]], 0, None, 0)


def test_cli_rejects_missing_agent_and_unknown_game(tmp_path, capsys):
    from wam.runs.cli import run_command

    assert run_command(["plan", "correct", "--data", str(tmp_path)]) == 2
    assert "--agent" in capsys.readouterr().err
    make_data(tmp_path / "data")
    cfg = WorldActionModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, horizon=3, games=("Breakout",))
    model = WorldActionModel(cfg)
    save_checkpoint(tmp_path / "a.pt", {"kind": CHECKPOINT_KIND, "config": {"model": model.config_dict()},
                                        "model": model.state_dict()})
    rc = run_command(["plan", "correct", "--agent", str(tmp_path / "a.pt"), "--data", str(tmp_path / "data"),
                      "--out", str(tmp_path / "q.h5")])
    assert rc == 2 and "no task embedding" in capsys.readouterr().err
    rc = run_command(["plan", "correct", "--agent", str(tmp_path / "a.pt"), "--data", str(tmp_path / "data"),
                      "--horizon", "4"])
    assert rc == 2 and "does not fit" in capsys.readouterr().err
