"""Q calibration against Monte-Carlo returns: is the model's Q over- or under-estimating on real episodes?

`q_calibration(model, episodes, gamma)` reads, for every step t of each episode, the expected Q of the
action the data took, E[Q](s_t, a_t), the way greedy acting reads it (a window of the last min(H, t+1)
frames ending at o_t, Q at its last frame, ensemble mean), and compares it with the discounted return
that followed, G_t = sum_k gamma^k r_{t+k} (rewards transformed as in training, summed to the episode's
end). An episode cut by a cap (truncated) has a G_t that misses the rewards after the cut, so its last
`TRUNCATION_MARGIN` steps are left out (the rest changes by at most gamma^1000 / (1 - gamma) = 0.004 at
gamma 0.99). Per game: `q_mc_gap` (mean E[Q] - G: > 0 over-estimates), `q_mc_abs_gap`, `q_data_mean`,
`mc_return_mean`, `q_mc_steps`. `wam pretrain`/`finetune --calibration-episodes N` log it on held-out
episodes during training, `wam diagnose` after it (docs/training.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from wam.datasets.returns import TRUNCATION_MARGIN, episode_mc_returns
from wam.worldmodel.model import WorldActionModel


@dataclass
class EpisodeTokens:
    """One episode as the model sees it."""

    obs_tokens: np.ndarray  # [T+1, K] int
    actions: np.ndarray  # [T] int
    rewards: np.ndarray  # [T] float (raw)
    game_id: int
    truncated: bool = False

    @classmethod
    def from_store(cls, store, i: int, game_id: int) -> EpisodeTokens:
        """Episode `i` of a `TrajectoryStore` with its token cache."""
        ep = store.read_episode(i, tokens=True)
        return cls(obs_tokens=ep.obs_tokens, actions=ep.actions, rewards=ep.rewards, game_id=game_id,
                   truncated=bool(len(ep.truncations) and ep.truncations[-1]))


@torch.no_grad()
def episode_q(model: WorldActionModel, ep: EpisodeTokens, chunk: int = 256) -> np.ndarray:
    """E[Q](s_t, .) [T, 18] of every action (ensemble mean) at each step, each read the way greedy acting
    reads it: from a window of the last min(H, t+1) frames, at its last frame."""
    h = model.cfg.horizon
    device = model.ln_f.weight.device
    obs = torch.as_tensor(np.asarray(ep.obs_tokens, np.int64), device=device)
    act = torch.as_tensor(np.asarray(ep.actions, np.int64), device=device)
    n = len(act)
    q = np.zeros((n, 18), np.float64)
    for t in range(min(h - 1, n)):  # short windows at the episode's start
        out, _ = model(obs[None, : t + 1], act[None, :t], torch.tensor([ep.game_id], device=device), world_model=False)
        q[t] = model.expected_q(out.q_logits[0, -1]).mean(0).double().cpu().numpy()
    starts = np.arange(h - 1, n) - (h - 1)  # full windows: frames s..s+H-1 for t = s+H-1
    for i in range(0, len(starts), chunk):
        s = torch.as_tensor(starts[i:i + chunk], device=device)
        frames = obs[s[:, None] + torch.arange(h, device=device)]  # [C, H, K]
        acts = act[s[:, None] + torch.arange(h - 1, device=device)] if h > 1 else act.new_zeros(len(s), 0)
        out, _ = model(frames, acts, torch.full((len(s),), ep.game_id, device=device), world_model=False)
        q[(s + h - 1).cpu().numpy()] = model.expected_q(out.q_logits[:, -1]).mean(1).double().cpu().numpy()
    return q


def data_action_q(model: WorldActionModel, ep: EpisodeTokens, chunk: int = 256) -> np.ndarray:
    """E[Q](s_t, a_t) [T] of the data actions, each read from a window of the last min(H, t+1) frames."""
    q = episode_q(model, ep, chunk)
    return q[np.arange(len(q)), np.asarray(ep.actions, np.int64)]


def mc_returns(ep: EpisodeTokens, gamma: float, reward_transform: str = "sign",
               truncation_margin: int | None = TRUNCATION_MARGIN) -> np.ndarray:
    """Discounted returns G_t of the episode's steps whose return the data knows, [T'] float64: every step, or of a
    truncated episode all but the last `truncation_margin` (None: every step). Rewards transformed as in training."""
    ret = episode_mc_returns(ep.rewards, ep.truncated, gamma, reward_transform, truncation_margin)
    return ret[~np.isnan(ret)]


def q_calibration(model: WorldActionModel, episodes: list[EpisodeTokens], gamma: float,
                  reward_transform: str = "sign", truncation_margin: int | None = TRUNCATION_MARGIN
                  ) -> dict[int, dict[str, float]]:
    """Per game id: mean (and mean absolute) gap between E[Q] of the data actions and their discounted
    Monte-Carlo return, the two means, and the number of steps compared. Of a truncated episode the last
    `truncation_margin` steps are left out (None: kept)."""
    was_training = model.training
    model.eval()
    per: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    try:
        for ep in episodes:
            ret = mc_returns(ep, gamma, reward_transform, truncation_margin)
            if len(ret):
                per.setdefault(ep.game_id, []).append((data_action_q(model, ep)[:len(ret)], ret))
    finally:
        model.train(was_training)
    out = {}
    for g, rows in per.items():
        q = np.concatenate([a for a, _ in rows])
        ret = np.concatenate([b for _, b in rows])
        if len(q) == 0:
            continue
        out[g] = calibration_figures(q, ret)
    return out


def calibration_figures(q: np.ndarray, ret: np.ndarray) -> dict[str, float]:
    """How E[Q] of the data actions `q` compares with their Monte-Carlo returns `ret` (same length, > 0):
    the mean and mean absolute gap, the two means, the number of steps, the mean absolute deviation of the
    returns from their mean (`mc_abs_dev`: the absolute gap of the best-calibrated constant, so an absolute
    gap near it means Q does not follow the state), and the correlation of Q with the returns (`q_mc_corr`,
    only where both vary)."""
    out = {"q_mc_gap": float((q - ret).mean()), "q_mc_abs_gap": float(np.abs(q - ret).mean()),
           "q_data_mean": float(q.mean()), "mc_return_mean": float(ret.mean()), "q_mc_steps": float(len(q)),
           "mc_abs_dev": float(np.abs(ret - ret.mean()).mean())}
    if len(q) > 1 and q.std() > 0 and ret.std() > 0:
        out["q_mc_corr"] = float(np.corrcoef(q, ret)[0, 1])
    return out


__all__ = ["EpisodeTokens", "calibration_figures", "data_action_q", "episode_q", "mc_returns",
           "q_calibration"]
