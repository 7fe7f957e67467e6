"""Rewards as the value losses see them, and the Monte-Carlo returns the data itself gives.

One definition for training and for diagnostics: `transform_reward` (sign, clip or raw: what TD
targets sum), `discounted_returns` (G_t = sum_k gamma^k r_{t+k} to the episode's end) and
`episode_mc_returns`, which marks where G_t is known. An episode that terminated knows every step's
return; one cut by a cap (truncated) misses the rewards after the cut, so its last `TRUNCATION_MARGIN`
steps have no known return (the others change by at most gamma^1000 / (1 - gamma) = 0.004 at gamma
0.99).
"""

from __future__ import annotations

import numpy as np
import torch

TRUNCATION_MARGIN = 1000
"""Steps before a cap's cut whose Monte-Carlo return counts as unknown."""

REWARD_TRANSFORMS = ("sign", "clip", "raw")


def transform_reward(rewards: torch.Tensor, how: str) -> torch.Tensor:
    """The reward a value target sums: its sign, clipped to [-1, 1], or raw."""
    if how == "sign":
        return torch.sign(rewards)
    if how == "clip":
        return rewards.clamp(-1.0, 1.0)
    assert how == "raw", f"unknown reward transform {how!r}"
    return rewards


def discounted_returns(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """G_t = sum_{k >= 0} gamma^k r_{t+k} to the end of the sequence, [T] float64."""
    out = np.zeros(len(rewards), np.float64)
    acc = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        acc = float(rewards[t]) + gamma * acc
        out[t] = acc
    return out


def episode_mc_returns(rewards: np.ndarray, truncated: bool, gamma: float, reward_transform: str = "sign",
                       truncation_margin: int | None = TRUNCATION_MARGIN) -> np.ndarray:
    """G_t [T] float64 of one episode's raw rewards [T], transformed as in training; NaN where the return is
    unknown (a truncated episode's last `truncation_margin` steps; None: every step counts as known)."""
    r = transform_reward(torch.as_tensor(np.asarray(rewards, np.float32)), reward_transform).numpy()
    out = discounted_returns(r, gamma)
    if truncated and truncation_margin is not None:
        out[max(0, len(out) - truncation_margin):] = np.nan
    return out


__all__ = ["REWARD_TRANSFORMS", "TRUNCATION_MARGIN", "discounted_returns", "episode_mc_returns", "transform_reward"]
