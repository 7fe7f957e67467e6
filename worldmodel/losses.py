"""Losses of the world-action model (JOWA stage 2). Each returns `(loss, logs)`.

    total = lambda_wm * (CE obs tokens + CE reward sign + CE termination) + C51 TD + lambda_cql * CQL

- **World model**: cross-entropy of every next observation token (frames inside the episode),
  of the reward sign (3 classes) and of the termination flag at each action token.
- **C51 TD** (1-step): the target distribution at o_{t+1} comes from the target Q head (hard-updated
  copy), at the legal action with the highest expected value (ensemble mean); it is shifted by the
  transformed reward r_t and shrunk by gamma, cut at terminations (a truncation still bootstraps),
  projected onto the support and compared with the online distribution of the data action by
  cross-entropy. Gradients flow through the online logits into the core (never through the target).
- **CQL** on the expected C51 Q: logsumexp over the legal actions minus Q of the data action.

Illegal actions never enter a max, an argmax, a logsumexp or a loss; padded steps (mask False)
never enter a loss. Ensemble members each get their own TD and CQL term (averaged).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from wam.datasets.batch import Batch
from wam.worldmodel.model import WorldActionModel, WorldActionOutput

Logs = dict[str, float]


@dataclass
class LossConfig:
    """Weights and settings of the joint objective (JOWA defaults)."""

    lambda_wm: float = 0.1
    """Weight of the world-model cross-entropy (observation tokens + reward + termination)."""
    lambda_cql: float = 0.1
    """Weight of the CQL regulariser."""
    gamma: float = 0.99
    """Discount of the 1-step TD target."""
    target_update_every: int = 1000
    """Hard-update the target Q head every N optimiser steps."""
    reward_transform: Literal["sign", "clip", "raw"] = "sign"
    """Reward used in the TD target: its sign, clipped to [-1, 1], or raw."""


# ------------------------------------------------------------------------------------- helpers
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the True entries of mask (same shape); 0 when mask is empty (keeps the graph)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def transform_reward(rewards: torch.Tensor, how: str) -> torch.Tensor:
    if how == "sign":
        return torch.sign(rewards)
    if how == "clip":
        return rewards.clamp(-1.0, 1.0)
    assert how == "raw", f"unknown reward transform {how!r}"
    return rewards


def obs_token_labels(obs_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Labels [B, L] of the next-token prediction at each position of the training sequence.

    obs_tokens [B, H+1, K], mask [B, H]. Position i is labelled with token i+1 when that token is an
    observation token of a frame inside the episode, else -100 (ignored). Frame 0 counts when step 0
    is valid, frame t+1 when step t is.
    """
    b, t1, k = obs_tokens.shape
    h = t1 - 1
    frame_ok = torch.cat([mask[:, :1], mask], dim=1)  # [B, H+1]
    labels = torch.full((b, t1, k + 1), -100, dtype=torch.long, device=obs_tokens.device)
    labels[:, :, : k - 1] = obs_tokens[:, :, 1:]  # positions z1..z35 predict z2..z36 of the same frame
    labels[:, :h, k] = obs_tokens[:, 1:, 0]  # action a_t predicts z1 of frame t+1
    labels[:, :, : k - 1] = labels[:, :, : k - 1].masked_fill(~frame_ok[:, :, None], -100)
    labels[:, :h, k] = labels[:, :h, k].masked_fill(~mask, -100)
    return labels.flatten(1)[:, : t1 * (k + 1) - 1]  # [B, L]


def q_steps(batch: Batch) -> torch.Tensor:
    """[B, H] bool: steps that enter the Q losses: inside the episode, with a legal data action.

    A data action outside the game's legal set (bad data) never enters TD or CQL; the fraction of such
    steps is logged as `illegal_data_actions`.
    """
    legal_taken = batch.legal_actions.gather(1, batch.actions)  # [B, H]
    return batch.mask & legal_taken


# -------------------------------------------------------------------------------------- losses
def world_model_loss(out: WorldActionOutput, batch: Batch) -> tuple[torch.Tensor, Logs]:
    """Sum of the observation-token, reward-sign and termination cross-entropies (masked means)."""
    labels = obs_token_labels(batch.obs, batch.mask)  # [B, L]
    logits = out.obs_logits.float()
    obs_ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    reward_cls = (torch.sign(batch.rewards) + 1).long()  # [B, H] in {0, 1, 2}
    rew = F.cross_entropy(out.reward_logits.float().flatten(0, 1), reward_cls.flatten(), reduction="none")
    term = F.cross_entropy(out.termination_logits.float().flatten(0, 1), batch.terminations.long().flatten(),
                           reduction="none")
    mask = batch.mask.flatten()
    rew_ce, term_ce = masked_mean(rew, mask), masked_mean(term, mask)
    with torch.no_grad():
        valid = labels != -100
        acc = ((logits.argmax(-1) == labels) & valid).sum() / valid.sum().clamp(min=1)
        rew_acc = masked_mean((out.reward_logits.argmax(-1) == reward_cls).flatten().float(), mask)
    loss = obs_ce + rew_ce + term_ce
    return loss, {"wm_loss": loss.item(), "obs_ce": obs_ce.item(), "reward_ce": rew_ce.item(),
                  "termination_ce": term_ce.item(), "obs_acc": acc.item(), "reward_acc": rew_acc.item()}


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


def td_loss(model: WorldActionModel, out: WorldActionOutput, batch: Batch, cfg: LossConfig
            ) -> tuple[torch.Tensor, Logs]:
    """C51 1-step TD with the target head; masked mean over valid steps, mean over the ensemble."""
    assert out.target_q_logits is not None, "td_loss needs the forward pass run with with_target=True"
    h = batch.actions.shape[1]
    legal = batch.legal_actions[:, None, :]  # [B, 1, 18]
    logp = out.q_logits[:, :h].float().log_softmax(-1)  # [B, H, E, 18, A]
    idx = batch.actions[:, :, None, None, None].expand(-1, -1, logp.shape[2], 1, logp.shape[-1])
    logp_a = logp.gather(3, idx).squeeze(3)  # [B, H, E, A]
    with torch.no_grad():
        next_probs = out.target_q_logits[:, 1:].float().softmax(-1)  # [B, H, E, 18, A]
        next_q = (next_probs * model.support).sum(-1).mean(2)  # [B, H, 18] ensemble mean
        next_a = next_q.masked_fill(~legal, float("-inf")).argmax(-1)  # [B, H] legal actions only
        nidx = next_a[:, :, None, None, None].expand(-1, -1, next_probs.shape[2], 1, next_probs.shape[-1])
        p_next = next_probs.gather(3, nidx).squeeze(3)  # [B, H, E, A]
        r = transform_reward(batch.rewards.float(), cfg.reward_transform)  # [B, H]
        disc = cfg.gamma * (1.0 - batch.terminations.float())  # [B, H]
        e = p_next.shape[2]
        target = c51_project(p_next.flatten(0, 2), r[:, :, None].expand(-1, -1, e).flatten(),
                             disc[:, :, None].expand(-1, -1, e).flatten(), model.support.float())
        target = target.view_as(p_next)
    ce = -(target * logp_a).sum(-1)  # [B, H, E]
    steps = q_steps(batch)  # [B, H]
    loss = masked_mean(ce, steps[:, :, None].expand_as(ce))
    with torch.no_grad():
        q_data = (logp_a.exp() * model.support).sum(-1)  # [B, H, E]
        q_mean = masked_mean(q_data, steps[:, :, None].expand_as(q_data))
        entropy = -(target * target.clamp(min=1e-12).log()).sum(-1)  # [B, H, E]
        kl = masked_mean(ce - entropy, steps[:, :, None].expand_as(ce))  # TD loss above its floor
    return loss, {"td_loss": loss.item(), "td_kl": kl.item(), "q_data": q_mean.item()}


def cql_loss(model: WorldActionModel, out: WorldActionOutput, batch: Batch) -> tuple[torch.Tensor, Logs]:
    """CQL(H) on the expected C51 Q: logsumexp over legal actions - Q(s, a_data); masked mean."""
    h = batch.actions.shape[1]
    q = model.expected_q(out.q_logits[:, :h])  # [B, H, E, 18]
    legal = batch.legal_actions[:, None, None, :].expand_as(q)
    lse = q.masked_fill(~legal, float("-inf")).logsumexp(-1)  # [B, H, E]
    q_a = q.gather(-1, batch.actions[:, :, None, None].expand(-1, -1, q.shape[2], 1)).squeeze(-1)  # [B, H, E]
    gap = lse - q_a
    steps = q_steps(batch)
    loss = masked_mean(gap, steps[:, :, None].expand_as(gap))
    illegal = masked_mean((~steps).float(), batch.mask)
    return loss, {"cql_loss": loss.item(), "illegal_data_actions": illegal.item()}


def world_action_loss(model: WorldActionModel, batch: Batch, cfg: LossConfig) -> tuple[torch.Tensor, Logs]:
    """The joint objective on a token batch (obs [B, H+1, 36] int64)."""
    assert batch.is_tokens, "world_action_loss needs token observations; encode frames with the tokenizer first"
    out, _ = model(batch.obs, batch.actions, batch.game_ids, with_target=True)
    wm, wm_logs = world_model_loss(out, batch)
    td, td_logs = td_loss(model, out, batch, cfg)
    cql, cql_logs = cql_loss(model, out, batch)
    loss = cfg.lambda_wm * wm + td + cfg.lambda_cql * cql
    return loss, {"loss": loss.item(), **wm_logs, **td_logs, **cql_logs}


class WorldActionObjective(torch.nn.Module):
    """The model and its loss as one module (what the trainer and DDP wrap): `forward(batch) -> (loss, logs)`.

    `after_step(step)` hard-updates the target Q head every `cfg.target_update_every` optimiser steps.
    """

    def __init__(self, model: WorldActionModel, cfg: LossConfig) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, batch: Batch) -> tuple[torch.Tensor, Logs]:
        return world_action_loss(self.model, batch, self.cfg)

    def after_step(self, step: int) -> None:
        if step % self.cfg.target_update_every == 0:
            self.model.update_target()
