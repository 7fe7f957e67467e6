"""`wam baseline train` and `D3rlpyAgent`: the export, the agent and its checkpoint, without d3rlpy.

The datasets are real small HDF5 datasets written with wam's writer; the policies are tiny TorchScript
modules made here, whose output reveals what they were fed (which stack slots hold a frame, a pixel of
one slot), so frame stacking, resets and the action mapping are checked by value. d3rlpy itself runs
only in the `slow` test, and only where `make baselines` has made `.venv-baselines`.
"""

from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from wam.agents.base import load_agent
from wam.agents.d3rlpy_agent import (
    CHECKPOINT_KIND,
    D3rlpyAgent,
    action_indices,
    export_for_d3rlpy,
    legal_ids,
    save_policy_checkpoint,
)
from wam.datasets.atari import legal_action_mask
from wam.datasets.errors import WamError
from wam.datasets.store import Episode, TrajectoryStore, dataset_dir
from wam.runs.baseline_cmds import (
    REPO_ROOT,
    BaselineTrainArgs,
    _prepare_run_dir,
    baselines_python,
    resolve_settings,
)
from wam.runs.cli import parse_command, run_command
from wam.worldmodel.checkpoint import load_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")  # the tiny policies

PONG_IDS = [0, 1, 3, 4, 11, 12]  # NOOP FIRE RIGHT LEFT RIGHTFIRE LEFTFIRE


def _episode(rng, t: int, actions, rewards, end: str) -> Episode:
    term, trunc = np.zeros(t, bool), np.zeros(t, bool)
    (term if end == "term" else trunc)[-1] = True
    return Episode(observations=rng.integers(0, 255, (t + 1, 84, 84), dtype=np.uint8), actions=actions,
                   rewards=np.asarray(rewards, np.float32), terminations=term, truncations=trunc)


def _dataset(root: Path, game: str, name: str, episodes: list[Episode]) -> Path:
    store = TrajectoryStore.create(dataset_dir(root, game, name), game=game,
                                   provenance={"protocol": "jowa", "policy": "random"})
    with store.writer(commit_every=max(1, len(episodes))) as w:
        for ep in episodes:
            w.append(ep)
    return store.directory


@pytest.fixture(scope="module")
def pong_data(tmp_path_factory):
    """Two Pong datasets under one root: a terminated and a truncated episode, then a terminated one."""
    root = tmp_path_factory.mktemp("pong")
    rng = np.random.default_rng(0)
    a = [_episode(rng, 5, [0, 1, 3, 4, 11], [-2.0, 0.0, 3.0, 0.5, -0.25], "term"),
         _episode(rng, 4, [12, 12, 0, 3], [0.0, 7.0, 0.0, -1.0], "trunc")]
    b = [_episode(rng, 3, [4, 4, 1], [1.0, 0.0, 0.0], "term")]
    _dataset(root, "Pong", "a", a)
    _dataset(root, "Pong", "b", b)
    return root, a + b


# ---------------------------------------------------------------------------------------- export


def test_export_holds_frames_legal_indices_sign_rewards_and_separate_end_flags(pong_data, tmp_path):
    root, episodes = pong_data
    s = export_for_d3rlpy([str(root)], tmp_path / "x.h5")
    assert (s.game, s.legal_ids, s.episodes, s.steps, s.terminated, s.truncated) == ("Pong", PONG_IDS, 3, 12, 2, 1)
    with h5py.File(tmp_path / "x.h5", "r") as f:
        assert json.loads(f.attrs["legal_ids"]) == PONG_IDS and f.attrs["reward_transform"] == "sign"
        obs, acts, rews = f["observations"][()], f["actions"][()], f["rewards"][()]
        terms, outs, lengths = f["terminals"][()], f["timeouts"][()], f["episode_lengths"][()]
    assert lengths.tolist() == [5, 4, 3]
    np.testing.assert_array_equal(obs, np.concatenate([e.observations for e in episodes]))  # T+1 frames each
    full = np.concatenate([e.actions for e in episodes])
    assert acts.tolist() == [0, 1, 2, 3, 4, 5, 5, 0, 2, 3, 3, 1]  # NOOP FIRE RIGHT LEFT RIGHTFIRE | LEFTFIRE ...
    np.testing.assert_array_equal(np.asarray(PONG_IDS)[acts], full)  # index -> id gives the stored ids back
    assert rews.tolist() == [-1, 0, 1, 1, -1, 0, 1, 0, -1, 1, 0, 0]
    assert np.flatnonzero(terms).tolist() == [4, 11] and np.flatnonzero(outs).tolist() == [8]
    assert s.action_counts == np.bincount(acts, minlength=6).tolist()


def test_export_selects_like_wam_training_first_transitions_and_held_out_episodes(pong_data, tmp_path):
    """--transitions keeps the first N transitions of each dataset (the cut episode ends in a timeout);
    --hold-out-episodes leaves out the last K episodes of each dataset."""
    root, episodes = pong_data  # dataset a: episodes of 5 (term) and 4 (trunc); dataset b: 3 (term)
    s = export_for_d3rlpy([str(root)], tmp_path / "cut.h5", max_transitions=7)
    assert (s.episodes, s.steps, s.terminated, s.truncated) == (3, 10, 2, 1)
    with h5py.File(tmp_path / "cut.h5", "r") as f:
        assert f["episode_lengths"][()].tolist() == [5, 2, 3]  # a: 5 + the first 2 of 4; b: all 3 (< 7)
        np.testing.assert_array_equal(f["observations"][6:9], episodes[1].observations[:3])  # 2 steps, 3 frames
        assert np.flatnonzero(f["terminals"][()]).tolist() == [4, 9] and np.flatnonzero(f["timeouts"][()]).tolist() == [6]
        assert f["actions"][5:7].tolist() == [5, 5] and f.attrs["max_transitions"] == 7
    s = export_for_d3rlpy([str(root)], tmp_path / "held.h5", hold_out_episodes=1)
    assert (s.episodes, s.steps, s.terminated, s.truncated) == (1, 5, 1, 0)  # only a's first episode is left
    with pytest.raises(WamError, match="hold no transitions"):
        export_for_d3rlpy([str(root)], tmp_path / "none.h5", hold_out_episodes=2)
    with pytest.raises(WamError, match="--transitions must be >= 1"):
        export_for_d3rlpy([str(root)], tmp_path / "zero.h5", max_transitions=0)


def test_action_indices_round_trip_every_legal_id_and_flag_the_others():
    for game in ("Pong", "Breakout", "Boxing"):
        ids = legal_ids(game)
        assert ids.tolist() == np.flatnonzero(legal_action_mask(game)).tolist()
        np.testing.assert_array_equal(action_indices(ids, ids), np.arange(len(ids)))
        others = np.setdiff1d(np.arange(18), ids)
        assert (action_indices(others, ids) == -1).all()


def test_export_refuses_bad_input_with_one_clear_error(pong_data, tmp_path):
    root, _ = pong_data
    rng = np.random.default_rng(1)
    with pytest.raises(WamError, match="give the training data"):
        export_for_d3rlpy([], tmp_path / "x.h5")
    with pytest.raises(WamError, match="does not exist"):
        export_for_d3rlpy([str(tmp_path / "nothing")], tmp_path / "x.h5")
    mixed = _dataset(tmp_path / "mixed", "Breakout", "r", [_episode(rng, 3, [0, 1, 3], [0, 0, 0], "term")])
    with pytest.raises(WamError, match="several games .*Breakout.*Pong.*one game"):
        export_for_d3rlpy([str(root), str(mixed)], tmp_path / "x.h5")
    TrajectoryStore.create(dataset_dir(tmp_path / "empty", "Pong", "e"), game="Pong",
                           provenance={"protocol": "jowa", "policy": "random"})
    with pytest.raises(WamError, match="hold no transitions"):
        export_for_d3rlpy([str(tmp_path / "empty")], tmp_path / "x.h5")
    illegal = _dataset(tmp_path / "illegal", "Pong", "i", [_episode(rng, 3, [0, 2, 5], [0, 0, 0], "term")])
    with pytest.raises(WamError, match="episode 0 plays DOWN, UP, not in Pong's legal actions"):
        export_for_d3rlpy([str(illegal)], tmp_path / "x.h5")
    other = _dataset(tmp_path / "other", "Pong", "o", [_episode(rng, 3, [0, 1, 3], [0, 0, 0], "term")])
    meta = other / "data" / "metadata.json"
    m = json.loads(meta.read_text())
    m["wam_legal_actions"]["ids"] = [0, 1, 3, 4]
    meta.write_text(json.dumps(m))
    with pytest.raises(WamError, match="another ale-py"):
        export_for_d3rlpy([str(other)], tmp_path / "x.h5")
    assert not (tmp_path / "x.h5").exists() and not list(tmp_path.glob(".x.h5.tmp-*"))  # nothing half-written


# ----------------------------------------------------------------------------------------- agent


class _SlotPixel(torch.nn.Module):
    """Returns pixel (0, 0) of stack slot `slot` as the action index: shows what one slot holds, unscaled."""

    def __init__(self, slot: int) -> None:
        super().__init__()
        self.slot = slot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.slot, 0, 0].long()


class _Occupied(torch.nn.Module):
    """Returns a bitmask of the stack slots holding a non-zero frame (slot k -> 2**k): shows the zero padding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.tensor([1, 2, 4, 8], dtype=torch.long)
        return ((x[:, :, 0, 0] > 0).long() * weights).sum(1)


def _script_bytes(module: torch.nn.Module) -> bytes:
    import io

    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buf)
    return buf.getvalue()


def _frames(values) -> np.ndarray:
    """uint8 [N, 84, 84] frames whose every pixel is values[i]."""
    return np.stack([np.full((84, 84), v, np.uint8) for v in values])


def _act(agent, state, values, game):
    n = len(values)
    legal = np.broadcast_to(legal_action_mask(game), (n, 18))
    rngs = [np.random.default_rng(i) for i in range(n)]
    return agent.act(state, _frames(values), legal, rngs)


def test_stack_is_oldest_first_zero_padded_and_reset_per_row():
    game = "Boxing"  # 18 legal actions: index == id, so the bitmask reads back directly
    agent = D3rlpyAgent(_script_bytes(_Occupied()), game, legal_ids(game))
    state = agent.reset(agent.init_state(2), np.ones(2, bool))
    seen = [_act(agent, state, [10 + k, 20 + k], game)[0].tolist() for k in range(5)]
    assert seen == [[8, 8], [12, 12], [14, 14], [15, 15], [15, 15]]  # [0,0,0,o0], [0,0,o0,o1], ...
    assert state.frames[:, :, 0, 0].tolist() == [[11, 12, 13, 14], [21, 22, 23, 24]]  # oldest first, newest last
    assert state.steps.tolist() == [5, 5]
    state = agent.reset(state, np.array([True, False]))
    assert state.steps.tolist() == [0, 5] and (state.frames[0] == 0).all()
    actions, state, _ = _act(agent, state, [99, 25], game)
    assert actions.tolist() == [8, 15]  # the reset row starts over like a fresh agent, the other is untouched
    assert state.frames[0, :, 0, 0].tolist() == [0, 0, 0, 99] and state.frames[1, :, 0, 0].tolist() == [22, 23, 24, 25]
    for slot, want in ((0, [0, 22]), (3, [99, 25])):
        probe = D3rlpyAgent(_script_bytes(_SlotPixel(slot)), game, legal_ids(game))
        with torch.inference_mode():
            got = probe._policy(torch.from_numpy(state.frames).float())
        assert got.tolist() == want  # the policy gets raw pixel values 0..255 as float32, not scaled


def test_indices_map_to_the_games_legal_ids():
    agent = D3rlpyAgent(_script_bytes(_SlotPixel(3)), "Pong", PONG_IDS)
    state = agent.reset(agent.init_state(6), np.ones(6, bool))
    actions, _, info = _act(agent, state, [0, 1, 2, 3, 4, 5], "Pong")  # the newest frame's pixel is the index
    assert actions.dtype == np.int64 and actions.tolist() == PONG_IDS and info == {}
    assert legal_action_mask("Pong")[actions].all()
    state = agent.reset(agent.init_state(1), np.ones(1, bool))
    with pytest.raises(WamError, match="returned action index 6 for 6 legal actions"):
        _act(agent, state, [6], "Pong")


def _run(tmp_path: Path, module: torch.nn.Module, game: str = "Pong", step: int = 20) -> Path:
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    (run / "policy.pt").write_bytes(_script_bytes(module))
    save_policy_checkpoint(run, step, algo="discrete-cql", game=game, legal=legal_ids(game).tolist(),
                           config={"algo": "discrete-cql", "steps": step})
    return run


def test_load_agent_builds_the_agent_from_a_run_directory(tmp_path):
    run = _run(tmp_path, _SlotPixel(3))
    ckpt = load_checkpoint(run, kind=CHECKPOINT_KIND)
    assert (ckpt["step"], ckpt["game"], ckpt["legal_actions"], ckpt["frame_stack"]) == (20, "Pong", PONG_IDS, 4)
    for spec in (str(run), str(run / "checkpoints" / "step_00000020.pt")):
        agent = load_agent(spec, "pong")
        assert isinstance(agent, D3rlpyAgent) and agent.name == "d3rlpy-discrete-cql" and agent.game == "Pong"
        assert agent.checkpoint_id.startswith("run/step_00000020.pt@20#")
        state = agent.reset(agent.init_state(2), np.ones(2, bool))
        assert _act(agent, state, [2, 5], "Pong")[0].tolist() == [3, 12]
    clone = pickle.loads(pickle.dumps(agent))  # what a Ray worker would receive
    state = clone.reset(clone.init_state(2), np.ones(2, bool))
    assert _act(clone, state, [2, 5], "Pong")[0].tolist() == [3, 12]


def test_load_agent_refuses_a_wrong_game_option_or_policy_file(tmp_path):
    run = _run(tmp_path, _SlotPixel(3))
    with pytest.raises(WamError, match="a d3rlpy policy for Pong; it cannot play Breakout"):
        load_agent(str(run), "Breakout")
    with pytest.raises(WamError, match="takes no --memory"):
        load_agent(str(run), "Pong", memory="episode")
    (run / "policy.pt").write_bytes(_script_bytes(_Occupied()))  # another policy than the one checkpointed
    with pytest.raises(WamError, match="sha256 differs"):
        load_agent(str(run), "Pong")
    (run / "policy.pt").unlink()
    with pytest.raises(WamError, match="which is not there"):
        load_agent(str(run), "Pong")


# --------------------------------------------------------------------------------------- command


def test_missing_baselines_env_is_one_clear_error(pong_data, tmp_path, capsys):
    with pytest.raises(WamError, match=r"\.venv-baselines is missing: run `make baselines` first"):
        baselines_python("", root=tmp_path)
    with pytest.raises(WamError, match="does not exist; run `make baselines` first"):
        baselines_python(str(tmp_path / "no" / "python"))
    out = tmp_path / "out"
    code = run_command(["baseline", "train", "--data", str(pong_data[0]), "--out", str(out),
                        "--python", str(tmp_path / "no" / "python")])
    assert code == 2 and "make baselines" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written


def test_settings_fill_each_algorithms_defaults_and_refuse_bad_values(tmp_path):
    cql = resolve_settings(BaselineTrainArgs(algo="discrete-cql"))
    assert (cql["learning_rate"], cql["batch_size"], cql["adam_eps"], cql["alpha"], cql["n_quantiles"],
            cql["target_update_interval"], cql["steps"]) == (5e-5, 32, 1e-2 / 32, 4.0, 200, 2000, 12_500_000)
    bc = resolve_settings(BaselineTrainArgs(algo="discrete-bc", batch_size=64))
    assert (bc["learning_rate"], bc["batch_size"], bc["adam_eps"], bc["beta"]) == (5e-5, 64, 1e-2 / 32, 0.01)
    assert "alpha" not in bc
    with pytest.raises(WamError, match="--steps, --learning-rate out of range"):
        resolve_settings(BaselineTrainArgs(steps=0, learning_rate=-1.0))
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(WamError, match="already holds a run .*--overwrite"):
        _prepare_run_dir(tmp_path, overwrite=False)
    _prepare_run_dir(tmp_path, overwrite=True)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        parse_command("baseline train", ["--help"])
    text = capsys.readouterr().out
    for name in BaselineTrainArgs.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}" in text, name
    assert "make baselines" in text


# ------------------------------------------------------------------------------------ end to end

BASELINES_PY = REPO_ROOT / ".venv-baselines" / "bin" / "python"

# Runs in .venv-baselines: d3rlpy's own frame stacks of an exported episode and its greedy actions for them.
_D3RLPY_PROBE = r"""
import importlib.util, json, sys
import numpy as np
import d3rlpy
from d3rlpy.dataset import FrameStackTransitionPicker
spec = importlib.util.spec_from_file_location("d3rlpy_worker", sys.argv[1])
w = importlib.util.module_from_spec(spec)
spec.loader.exec_module(w)
arrays, _ = w.load_export(sys.argv[2])
episode = w.build_episodes(arrays)[0]
picker = FrameStackTransitionPicker(4)
stacks = np.stack([picker(episode, t).observation for t in range(6)])
algo = d3rlpy.load_learnable(sys.argv[3])
np.save(sys.argv[4], stacks)
print(json.dumps(algo.predict(stacks.astype(np.float32)).tolist()))
"""


@pytest.mark.slow
@pytest.mark.skipif(not BASELINES_PY.is_file(), reason=".venv-baselines is missing (`make baselines` creates it)")
def test_train_20_steps_then_evaluate(tmp_path, ray_session):
    from wam.agents.d3rlpy_agent import WORKER_SCRIPT
    from wam.agents.evaluate import evaluate

    rng = np.random.default_rng(0)
    data = _dataset(tmp_path / "data", "Boxing", "tiny",
                    [_episode(rng, t, rng.integers(0, 18, t), rng.choice([-2.0, 0.0, 1.0], t), end)
                     for t, end in ((40, "term"), (30, "trunc"))])
    run = tmp_path / "run"
    assert run_command(["baseline", "train", "--data", str(data), "--out", str(run), "--steps", "20",
                        "--log-every", "10", "--batch-size", "8", "--n-quantiles", "8", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20] and all(np.isfinite(r["loss"]) for r in rows)
    ckpt = load_checkpoint(run)
    assert ckpt["kind"] == CHECKPOINT_KIND and ckpt["step"] == 20 and ckpt["config"]["n_quantiles"] == 8

    # the agent feeds the policy the stacks d3rlpy trained on, and acts as d3rlpy's own model does
    probe = subprocess.run([str(BASELINES_PY), "-c", _D3RLPY_PROBE, str(WORKER_SCRIPT),
                            str(run / "d3rlpy_data.h5"), str(run / "d3rlpy_model.d3"), str(tmp_path / "stacks.npy")],
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    d3_actions = json.loads(probe.stdout.strip().splitlines()[-1])
    d3_stacks = np.load(tmp_path / "stacks.npy")  # [6, 4, 84, 84]: FrameStackTransitionPicker(4) at t = 0..5
    agent = load_agent(str(run), "Boxing")
    state = agent.reset(agent.init_state(1), np.ones(1, bool))
    frames = TrajectoryStore.open(data).read_episode(0).observations
    for t in range(6):
        actions, state, _ = agent.act(state, frames[t:t + 1], legal_action_mask("Boxing")[None], [rng])
        np.testing.assert_array_equal(state.frames[0], d3_stacks[t])
        assert actions[0] == legal_ids("Boxing")[d3_actions[t]]

    res = evaluate(str(run), ["Boxing"], episodes=1, workers=1, max_steps=30, out_dir=tmp_path / "eval",
                   progress=False)
    (r,) = res.records
    assert res.complete and r.length == 30 and r.agent == "d3rlpy-discrete-cql"
