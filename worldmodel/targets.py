"""The pieces TD targets are built from (`losses.td_loss` assembles them).

- `c51_project`: the C51 projection of r + discount * Z onto the fixed support (Bellemare et al. 2017).
- `nstep_returns`: n-step reward sums, discounts and bootstrap frames inside a segment.
- `data_next_action`: the data action at each bootstrap frame (in-sample targets, `bootstrap="data"`).
- `last_frame_q`: Q of a segment's last frame read at a trained slot (`last_bootstrap="shifted"`).
- `mix_mc_target`: mixed Monte-Carlo targets, the TD target mixed with the data's own return (`mc_mix`).
"""

from __future__ import annotations

import torch

from wam.datasets.batch import Batch
from wam.datasets.errors import WamError
from wam.worldmodel.model import WorldActionModel


def c51_project(next_probs: torch.Tensor, rewards: torch.Tensor, discounts: torch.Tensor,
                support: torch.Tensor) -> torch.Tensor:
    """Project the distribution of r + discount * Z onto `support` (C51, Bellemare et al. 2017).

    next_probs [N, A] (rows sum to 1), rewards [N], discounts [N] (gamma * (1 - terminal)),
    support [A] evenly spaced. Returns [N, A], rows summing to 1.
    """
    n, a = next_probs.shape
    v_min, v_max = float(support[0]), float(support[-1])
    dz = (v_max - v_min) / (a - 1)
    tz = (rewards[:, None] + discounts[:, None] * support[None, :]).clamp(v_min, v_max)  # [N, A]
    b = (tz - v_min) / dz
    lower, upper = b.floor(), b.ceil()
    lower_idx = lower.long().clamp(0, a - 1)
    upper_idx = upper.long().clamp(0, a - 1)
    same = (upper == lower).to(next_probs.dtype)  # b exactly on an atom: all mass to it
    w_lower = next_probs * (upper - b + same)
    w_upper = next_probs * (b - lower)
    out = torch.zeros_like(next_probs)
    out.scatter_add_(1, lower_idx, w_lower)
    out.scatter_add_(1, upper_idx, w_upper)
    return out


def nstep_returns(rewards: torch.Tensor, terminations: torch.Tensor, truncations: torch.Tensor,
                  mask: torch.Tensor, gamma: float, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n-step returns inside segments. All inputs [B, H] (rewards already transformed).

    For each step t: G = sum_{j<k} gamma^j r_{t+j}, the discount gamma^k (0 when the episode terminated
    on the way) and the frame index t+k to bootstrap from, where k <= n stops early after a
    termination, a truncation, the last step inside the episode or the segment's last step (frame H).
    With n = 1 this is (r_t, gamma * (1 - term_t), t + 1). Returns (G, discount, boot_index) [B, H].
    """
    assert n >= 1, f"n-step returns need n >= 1, got {n}"
    b, h = rewards.shape
    t = torch.arange(h, device=rewards.device)
    ret = torch.zeros_like(rewards)
    scale = torch.ones_like(rewards)  # gamma^j of the next reward to add
    end = t.expand(b, h).clone()  # last step summed (its successor frame is the bootstrap frame)
    terminated = torch.zeros_like(mask)
    alive = mask.clone()
    for j in range(n):
        idx = (t + j).clamp(max=h - 1)
        take = alive & (t + j < h)[None, :] & mask[:, idx]
        ret = ret + torch.where(take, scale * rewards[:, idx], torch.zeros_like(ret))
        scale = torch.where(take, scale * gamma, scale)
        end = torch.where(take, idx[None, :].expand(b, h), end)
        terminated = terminated | (take & terminations[:, idx])
        alive = take & ~terminations[:, idx] & ~truncations[:, idx]
    discount = scale * (~terminated).to(scale.dtype)
    return ret, discount, end + 1


def mix_mc_target(target: torch.Tensor, batch: Batch, beta: float, support: torch.Tensor) -> torch.Tensor:
    """(1 - beta) * target + beta * (point mass at G_t, C51-projected) at the steps whose Monte-Carlo return
    `batch.mc_return` [B, H] is known; `target` [B, H, E, A] unchanged elsewhere."""
    if batch.mc_return is None:
        raise WamError("mc_mix > 0 needs each step's Monte-Carlo return: build the sampler with "
                       "returns=(gamma, reward_transform)")
    g = batch.mc_return.to(target.device).float()  # [B, H]
    known = ~torch.isnan(g)
    b, h, e, a = target.shape
    point = torch.zeros(b * h, a, dtype=target.dtype, device=target.device)
    point[:, 0] = 1.0  # any distribution: a zero discount keeps only the reward's place
    mc = c51_project(point, torch.nan_to_num(g).flatten(), torch.zeros(b * h, dtype=target.dtype,
                                                                          device=target.device), support)
    mixed = (1.0 - beta) * target + beta * mc.view(b, h, 1, a)
    return torch.where(known[:, :, None, None], mixed, target)


def last_frame_q(model: WorldActionModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Q logits (online, target) [B, E, 18, A] of each segment's last frame o_H read at a trained slot: the model
    run without gradient over the window o_1..o_H (actions a_1..a_{H-1}), where o_H sits at slot H-1."""
    with torch.no_grad():
        out, _ = model(batch.obs[:, 1:], batch.actions[:, 1:], batch.game_ids, with_target=True, world_model=False)
    assert out.target_q_logits is not None
    return out.q_logits[:, -1], out.target_q_logits[:, -1]


def data_next_action(batch: Batch, boot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(has, action) [B, H]: the data action taken at each bootstrap frame `boot` [B, H] (indices 1..H), and
    whether there is a legal one (frame H's is `batch.next_action`; a frame outside the episode has none)."""
    acts = torch.cat([batch.actions, batch.next_action[:, None].clamp(min=0)], 1)  # [B, H+1]
    has = torch.cat([batch.mask, (batch.next_action >= 0)[:, None]], 1)  # [B, H+1]
    has = has & batch.legal_actions.gather(1, acts)
    return has.gather(1, boot), acts.gather(1, boot)


__all__ = ["c51_project", "data_next_action", "last_frame_q", "mix_mc_target", "nstep_returns"]
