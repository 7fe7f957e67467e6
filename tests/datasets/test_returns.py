"""Monte-Carlo returns and reward transforms shared by training and diagnostics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wam.datasets.returns import TRUNCATION_MARGIN, discounted_returns, episode_mc_returns, transform_reward


def test_discounted_returns_hand_checked():
    np.testing.assert_allclose(discounted_returns(np.array([1.0, 0.0, 2.0]), 0.5), [1.5, 1.0, 2.0])
    assert discounted_returns(np.zeros(0), 0.9).shape == (0,)


def test_transforms():
    r = torch.tensor([-3.0, -0.5, 0.0, 0.25, 7.0])
    assert transform_reward(r, "sign").tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]
    assert transform_reward(r, "clip").tolist() == [-1.0, -0.5, 0.0, 0.25, 1.0]
    assert transform_reward(r, "raw").tolist() == r.tolist()


def test_episode_returns_transform_and_mark_a_truncated_tail_unknown():
    rewards = np.array([5.0, -2.0, 0.0, 3.0], np.float32)  # signs: 1, -1, 0, 1
    want = discounted_returns(np.array([1.0, -1.0, 0.0, 1.0]), 0.9)
    np.testing.assert_allclose(episode_mc_returns(rewards, False, 0.9), want)
    assert np.isnan(episode_mc_returns(rewards, True, 0.9)).all()  # shorter than the margin: nothing known
    np.testing.assert_allclose(episode_mc_returns(rewards, True, 0.9, truncation_margin=None), want)
    got = episode_mc_returns(rewards, True, 0.9, truncation_margin=1)
    np.testing.assert_allclose(got[:3], want[:3])
    assert np.isnan(got[3])
    long = np.ones(TRUNCATION_MARGIN + 3, np.float32)
    assert (~np.isnan(episode_mc_returns(long, True, 0.99))).sum() == 3


@pytest.mark.parametrize("how", ["sign", "clip"])
def test_episode_returns_use_the_transform(how):
    r = np.array([0.5, -4.0], np.float32)
    t = np.sign(r) if how == "sign" else np.clip(r, -1, 1)
    np.testing.assert_allclose(episode_mc_returns(r, False, 0.5, how), [t[0] + 0.5 * t[1], t[1]])
