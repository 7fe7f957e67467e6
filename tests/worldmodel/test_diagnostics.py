"""Q calibration against Monte-Carlo returns (`wam.worldmodel.diagnostics`), on hand values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wam.datasets.returns import discounted_returns
from wam.worldmodel.diagnostics import EpisodeTokens, data_action_q, q_calibration
from wam.worldmodel.model import WorldActionModel, WorldActionModelConfig


def test_discounted_returns_hand_checked():
    np.testing.assert_allclose(discounted_returns(np.array([1.0, 0.0, 1.0]), 0.5), [1.25, 0.5, 1.0])
    assert discounted_returns(np.zeros(0), 0.9).shape == (0,)


def _episode(rng, t, game_id, truncated=False, k=4):
    return EpisodeTokens(obs_tokens=rng.integers(0, 16, (t + 1, k)), actions=rng.integers(0, 6, t),
                         rewards=rng.choice([-3.0, 0.0, 0.0, 2.0], t), game_id=game_id, truncated=truncated)


def test_q_calibration_reads_q_like_acting_and_compares_with_returns():
    torch.manual_seed(0)
    cfg = WorldActionModelConfig(vocab_size=16, tokens_per_obs=4, d_model=32, n_layers=1, n_heads=2, horizon=3,
                                 games=("A", "B"), q_init=2.0)
    model = WorldActionModel(cfg)
    rng = np.random.default_rng(0)
    eps = [_episode(rng, 7, 0), _episode(rng, 2, 0), _episode(rng, 5, 1), _episode(rng, 6, 1, truncated=True)]
    # every Q equals a window forward ending at the step (at most H = 3 frames), at the data action
    q = data_action_q(model, eps[0])
    with torch.no_grad():
        for t in range(7):
            lo = max(0, t - 2)
            out, _ = model(torch.as_tensor(eps[0].obs_tokens[lo:t + 1])[None],
                           torch.as_tensor(eps[0].actions[lo:t])[None], torch.tensor([0]), world_model=False)
            assert q[t] == pytest.approx(float(model.expected_q(out.q_logits[0, -1]).mean(0)[eps[0].actions[t]]),
                                         abs=1e-5)
    assert np.abs(q - 2.0).max() < 0.5  # calibrated start
    cal = q_calibration(model, eps, gamma=0.9)
    assert set(cal) == {0, 1}
    assert cal[0]["q_mc_steps"] == 9 and cal[1]["q_mc_steps"] == 5, "the truncated episode is left out"
    g0 = np.concatenate([discounted_returns(np.sign(e.rewards), 0.9) for e in eps[:2]])
    q0 = np.concatenate([data_action_q(model, e) for e in eps[:2]])
    assert cal[0]["mc_return_mean"] == pytest.approx(g0.mean())
    assert cal[0]["q_mc_gap"] == pytest.approx((q0 - g0).mean())
    assert cal[0]["q_mc_abs_gap"] == pytest.approx(np.abs(q0 - g0).mean())
    assert cal[0]["q_mc_gap"] == pytest.approx(2.0 - g0.mean(), abs=0.2)
    assert q_calibration(model, eps, 0.9, truncation_margin=None)[1]["q_mc_steps"] == 11
    assert q_calibration(model, eps, 0.9, truncation_margin=2)[1]["q_mc_steps"] == 5 + 4  # its first 6 - 2 steps


def test_calibration_figures_against_hand_values():
    from wam.worldmodel.diagnostics import calibration_figures

    ret = np.array([0.0, 2.0, 4.0])
    f = calibration_figures(np.array([1.0, 2.0, 3.0]), ret)
    assert f["q_mc_gap"] == pytest.approx(0.0) and f["q_mc_abs_gap"] == pytest.approx(2 / 3)
    assert f["mc_abs_dev"] == pytest.approx(4 / 3) and f["q_mc_corr"] == pytest.approx(1.0)
    flat = calibration_figures(np.full(3, 2.0), ret)  # the best-calibrated constant
    assert flat["q_mc_abs_gap"] == pytest.approx(flat["mc_abs_dev"]) and "q_mc_corr" not in flat
    assert calibration_figures(np.array([3.0, 2.0, 1.0]), ret)["q_mc_corr"] == pytest.approx(-1.0)
