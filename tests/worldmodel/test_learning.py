"""Tests of learning: the real model, loss and trainer find Q* on a tiny MDP whose most frequent data action is
not the optimal one (`wam.worldmodel.toy_mdp`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wam.worldmodel.losses import LossConfig
from wam.worldmodel.toy_mdp import BEHAVIOUR, ToyData, behaviour_q, optimal_q, train_toy


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_toy_mdp_is_what_it_claims():
    q = optimal_q(0.99)
    np.testing.assert_allclose(q, [[0.99 * 1.99, 1 + 0.99 * 1.99, 0], [0.99, 1.99, 0], [0, 1, 0]])
    data = ToyData(horizon=2, seed=0)
    share = data.action_share()
    assert share.argmax() == 0 and share[0] > 0.6 and np.argmax(BEHAVIOUR) == 0, "action 0 dominates the data"
    assert (q.argmax(1) == 1).all(), "action 1 is optimal everywhere"
    b = data.sample()
    assert b.obs.shape == (32, 3, 4) and b.mask[:, 0].all() and (b.terminations <= b.mask).all()


@pytest.mark.parametrize("schedule", [dict(target_tau=0.02), dict(target_update_every=50)])
def test_q_learning_converges_to_q_star_and_greedy_is_optimal(schedule):
    """TD (+ world model, no CQL) with the presets' target schedules: Q within 0.15 of Q* everywhere after 600
    steps, and the greedy action is the optimal one, not the data's most frequent one."""
    res = train_toy(LossConfig(lambda_cql=0.0, **schedule), steps=600, eval_every=100)
    assert res.final_error < 0.15, f"max |Q - Q*| = {res.final_error:.3f}\n{res.q}\n{res.q_star}"
    assert res.greedy_optimal


def test_in_sample_targets_converge_to_the_behaviour_q_and_greedy_is_optimal():
    """bootstrap="data" (SARSA-like targets): Q within 0.15 of Q^b, not Q*; greedy on it still picks action 1."""
    qb = behaviour_q(0.99)
    v2 = 0.15  # V^b(s2) = 0.7 * 0 + 0.15 * 1 + 0.15 * 0
    np.testing.assert_allclose(qb[2], [0, 1, 0])
    np.testing.assert_allclose(qb[1], [0.99 * v2, 1 + 0.99 * v2, 0])
    res = train_toy(LossConfig(lambda_cql=0.0, target_tau=0.02, bootstrap="data"), steps=600, eval_every=100)
    assert res.final_error < 0.15, f"max |Q - Q^b| = {res.final_error:.3f}\n{res.q}\n{res.q_star}"
    assert np.abs(res.q - optimal_q(0.99)).max() > 0.5, "in-sample targets must not reach Q*"
    assert res.greedy_optimal


def test_presets_use_the_measured_target_schedule():
    from wam.runs.train_cmds import FinetuneConfig, PretrainConfig

    for make in (PretrainConfig.from_preset, FinetuneConfig.from_preset):
        for name in ("debug", "small"):
            assert make(name).loss.target_tau == 0.02 and make(name).loss.bootstrap == "data"
        for name in ("jowa-40m", "jowa-70m", "jowa-150m"):  # JOWA: a hard copy every 1,000 steps, max targets
            loss = make(name).loss
            assert loss.target_tau == 0.0 and loss.target_update_every == 1000 and loss.bootstrap == "max"
