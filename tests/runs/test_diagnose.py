"""`wam diagnose`: Q against Monte-Carlo returns, the frequent-action gap and the action histograms, checked
against the same figures computed by hand from the model's Q on a small real HDF5 dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wam.datasets.errors import WamError
from wam.datasets.returns import TRUNCATION_MARGIN, discounted_returns
from wam.datasets.store import Episode, TrajectoryStore, dataset_dir
from wam.runs.diagnose_cmds import DiagnoseArgs, diagnose, diagnose_model
from wam.worldmodel.checkpoint import save_checkpoint
from wam.worldmodel.diagnostics import EpisodeTokens, episode_q
from wam.worldmodel.model import CHECKPOINT_KIND, WorldActionModel, WorldActionModelConfig

TID = "vq-test"


def _dataset(root, game: str, lengths: list[int], truncate_last: bool, seed: int):
    rng = np.random.default_rng(seed)
    store = TrajectoryStore.create(dataset_dir(root, game, "scripted"), game=game,
                                   provenance={"protocol": "jowa", "policy": "scripted"})
    tokens = []
    with store.writer(commit_every=len(lengths)) as w:
        for k, t in enumerate(lengths):
            term = np.zeros(t, bool)
            trunc = np.zeros(t, bool)
            (trunc if truncate_last and k == len(lengths) - 1 else term)[-1] = True
            actions = np.where(rng.random(t) < 0.6, 3, rng.choice([0, 1, 4, 11, 12], size=t))  # RIGHT most often
            w.append(Episode(observations=rng.integers(0, 255, (t + 1, 84, 84), dtype=np.uint8), actions=actions,
                             rewards=rng.choice([-1.0, 0.0, 0.0, 2.0], size=t).astype(np.float32),
                             terminations=term, truncations=trunc, seed=k))
            tokens.append((k, rng.integers(0, 16, (t + 1, 36)).astype(np.uint16)))
    store.write_tokens(tokens, TID)
    return store.directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    torch.manual_seed(0)
    cfg = WorldActionModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, horizon=3, games=("Pong",))
    model = WorldActionModel(cfg).eval()
    ckpt = {"kind": CHECKPOINT_KIND, "tokenizer": {"id": TID},
            "config": {"model": model.config_dict(), "loss": {"gamma": 0.9, "reward_transform": "sign"}},
            "model": model.state_dict()}
    data = _dataset(root, "Pong", [30, 25, TRUNCATION_MARGIN + 40], truncate_last=True, seed=1)
    return root, model, ckpt, data


def test_figures_equal_hand_computed_ones(setup):
    _, model, ckpt, data = setup
    res = diagnose_model(model, ckpt, (str(data),), episodes=2)["games"]["Pong"]
    store = TrajectoryStore.open(data)
    eps = [store.read_episode(i, tokens=True) for i in (1, 2)]
    qs = [episode_q(model, EpisodeTokens(e.obs_tokens, e.actions, e.rewards, 0)) for e in eps]
    acts = np.concatenate([e.actions for e in eps])
    q_all = np.concatenate(qs)
    legal = np.zeros(18, bool)
    legal[[0, 1, 3, 4, 11, 12]] = True  # Pong's minimal action set: NOOP FIRE RIGHT LEFT RIGHTFIRE LEFTFIRE
    greedy = np.where(legal, q_all, -np.inf).argmax(1)
    assert res["steps"] == len(acts) and res["frequent_action"] == "RIGHT"
    assert res["greedy_agrees_with_data"] == pytest.approx((greedy == acts).mean())
    others = legal.copy()
    others[3] = False
    assert res["q_gap_frequent"] == pytest.approx((q_all[:, 3] - q_all[:, others].mean(1)).mean())
    assert sum(res["data_histogram"].values()) == pytest.approx(1.0)
    assert res["data_histogram"]["RIGHT"] == pytest.approx((acts == 3).mean())
    # calibration: episode 1 whole; the truncated episode 2 without its last TRUNCATION_MARGIN steps
    q_cal, ret = [], []
    for e, q, keep in ((eps[0], qs[0], len(eps[0].actions)), (eps[1], qs[1], 40)):
        q_cal.append(q[np.arange(keep), e.actions[:keep]])
        ret.append(discounted_returns(np.sign(e.rewards), 0.9)[:keep])
    q_cal, ret = np.concatenate(q_cal), np.concatenate(ret)
    assert res["q_mc_steps"] == len(q_cal) == 25 + 40
    assert res["q_mc_gap"] == pytest.approx((q_cal - ret).mean())
    assert res["q_mc_abs_gap"] == pytest.approx(np.abs(q_cal - ret).mean())


def test_command_writes_outputs_and_refuses_bad_input(setup, capsys):
    root, model, ckpt, data = setup
    path = root / "model.pt"
    save_checkpoint(path, ckpt)
    out = root / "out"
    assert diagnose(DiagnoseArgs(run=str(path), data=(str(data),), out=str(out))) == 0
    result = json.loads((out / "diagnose.json").read_text())
    assert set(result["games"]) == {"Pong"} and "Pong" in (out / "diagnose.md").read_text()
    assert (out / "diagnose.png").read_bytes()[:4] == b"\x89PNG"
    assert "Q vs Monte-Carlo return: Pong gap" in capsys.readouterr().out
    other = _dataset(root / "other", "Pong", [10, 10], truncate_last=False, seed=2)
    TrajectoryStore.open(other).write_tokens([(0, np.zeros((11, 36), np.uint16)), (1, np.zeros((11, 36), np.uint16))],
                                             "vq-another", overwrite=True)
    with pytest.raises(WamError, match="not of the model's"):
        diagnose(DiagnoseArgs(run=str(path), data=(str(other),), out=str(out)))
    with pytest.raises(WamError, match="no dataset of a game the model knows"):
        diagnose(DiagnoseArgs(run=str(path), data=(str(_dataset(root / "b", "Breakout", [5, 5], False, 3)),),
                              out=str(out)))
    with pytest.raises(WamError, match="--episodes"):
        diagnose(DiagnoseArgs(run=str(path), data=(str(data),), out=str(out), episodes=0))
