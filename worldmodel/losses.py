"""Losses of the world-action model (JOWA stage 2) and its baselines. Each returns `(loss, logs)`.

Objectives (`LossConfig.objective`, `--objective`):

    jowa:   lambda_wm * (CE obs tokens + CE reward sign + CE termination) + C51 TD + lambda_cql * CQL
    q-only: C51 TD + lambda_cql * CQL    (the paper's "no WM loss" ablation; also `jowa` with lambda_wm = 0)
    bc:     CE(data action | legal-masked expected Q as logits)    (behaviour cloning)
    (+ lambda_distill * distillation toward planner-corrected Q when the batch carries targets)

- **World model**: cross-entropy of every next observation token (frames inside the episode),
  of the reward sign (3 classes) and of the termination flag at each action token.
- **C51 TD** (n-step, 1 by default): the target distribution at o_{t+k} comes from the target Q head
  (hard-updated copy), at the legal action with the highest expected value (ensemble mean) of the
  target head, or of the online head with `double_q` (double DQN: the online head picks, the target
  head values), or at the action the data took there with `bootstrap="data"` (in-sample targets); it is shifted by the discounted sum of the transformed rewards r_t .. r_{t+k-1} and
  shrunk by gamma^k, cut at terminations (a truncation still bootstraps). k is `n_step`, fewer where
  the segment or the episode ends first (the segment holds H+1 frames, so step t can look at most
  H-t steps ahead). The target is projected onto the support and compared with the online
  distribution of the data action by cross-entropy. Gradients flow through the online logits into
  the core (never through the target). The last frame o_H of a segment has no successor, so its Q
  gets no gradient; by default (`last_bootstrap="shifted"`) the targets that bootstrap from it read
  its Q from a second pass without gradient over o_1..o_H, where o_H sits at a trained slot.
  The target head follows the online head by hard copies every `target_update_every` steps or by
  Polyak averaging (`target_tau`).
- **CQL** on the expected C51 Q: logsumexp over the legal actions minus Q of the data action.
- **Behaviour prior** (models with `behaviour_prior` > 0): cross-entropy of the data action under the prior
  head's legal-masked logits, weight `lambda_prior`; acting adds `behaviour_prior` x its log-probabilities to
  the expected Q (`WorldActionModel.acting_values`).

- **Behaviour cloning** (`bc_loss`): the logits of the 18 actions are `model.q_values(...)`, the
  legal-masked ensemble mean of the Q head's expected values, so a BC checkpoint acts through the very
  function a Q-learning one does (argmax over legal actions of `q_values`). Only the Q head and what
  feeds it train.
- **Distillation** (`distill_loss`): for each (step, action) with a target value (the planner's
  offline-corrected Q, `wam plan correct`), cross-entropy of the online C51 distribution against the
  two-hot projection of the target value onto the support (whose expected value is the target): the
  same scale and bounded gradients as the TD term. Targets arrive as plain tensors in a `QTargetBatch`.

The objectives that do not use the world-model heads (`q-only`, `bc`) skip them in the forward pass
and freeze them (`WorldActionObjective`), so they are neither computed, decayed nor reduced by DDP.

Illegal actions never enter a max, an argmax, a logsumexp or a loss; padded steps (mask False)
never enter a loss. Ensemble members each get their own TD, CQL and distillation term (averaged).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from wam.datasets.batch import Batch
from wam.datasets.errors import WamError
from wam.datasets.returns import transform_reward
from wam.worldmodel.model import WorldActionModel, WorldActionOutput
from wam.worldmodel.targets import c51_project, data_next_action, last_frame_q, mix_mc_target, nstep_returns

log = logging.getLogger(__name__)

Logs = dict[str, float]
Objective = Literal["jowa", "q-only", "bc"]
WORLD_MODEL_HEADS = ("obs_head", "reward_head", "termination_head")


@dataclass
class LossConfig:
    """Weights and settings of the joint objective (JOWA defaults)."""

    lambda_wm: float = 0.1
    """Weight of the world-model cross-entropy (observation tokens + reward + termination); 0 = `q-only`."""
    lambda_cql: float = 0.1
    """Weight of the CQL regulariser."""
    gamma: float = 0.99
    """Discount of the TD target."""
    n_step: int = 1
    """Steps of reward summed before the TD target bootstraps (fewer where the segment or episode ends)."""
    double_q: bool = False
    """Double DQN: the online Q head picks the bootstrap action, the target head gives its distribution."""
    bootstrap: Literal["max", "data"] = "max"
    """Which action's value the TD target bootstraps from: `max`, the greedy legal action (Q-learning, JOWA);
    `data`, the action the data took there (in-sample, SARSA-like: the head learns the behaviour policy's
    Q, whose greedy policy is one step of policy improvement; no max over actions the data never tried,
    so no over-estimation compounding through the bootstrap). Where the bootstrap frame has no data
    action (an episode's truncated last frame) it falls back to `max`."""
    target_update_every: int = 1000
    """Hard-update the target Q head every N optimiser steps (when `target_tau` is 0)."""
    last_bootstrap: Literal["shifted", "same-pass"] = "shifted"
    """Where the last step's TD target reads Q of the segment's last frame o_H: `shifted` runs the model
    (no gradient) over the window o_1..o_H, where o_H sits at slot H-1, a slot whose Q the losses train;
    `same-pass` reads it at slot H of the training pass, whose Q never gets a gradient (JOWA's way; on the
    toy MDP of `wam.worldmodel.toy_mdp` its values there drift and the learned Q diverges)."""
    critic_warmup_steps: int = 0
    """JOWA's `train_critic_after_n_steps`: for the first N optimiser steps only the world-model loss trains
    (objective `jowa`; the Q terms enter with weight 0, so every parameter stays in the graph); the
    target head is copied from the Q head when the critic starts. 0 = the critic trains from step 0."""
    target_tau: float = 0.0
    """Polyak averaging of the target Q head: after every optimiser step target <- (1 - tau) target + tau
    online; 0 = hard updates every `target_update_every` steps instead."""
    reward_transform: Literal["sign", "clip", "raw"] = "sign"
    """Reward used in the TD target: its sign, clipped to [-1, 1], or raw."""
    objective: Objective = "jowa"
    """What to train: jowa (world model + C51 TD + CQL), q-only (TD + CQL, no world-model loss: the
    "no WM loss" ablation) or bc (behaviour cloning: cross-entropy of the data action on the legal-masked
    expected Q, which is what an agent acts on)."""
    lambda_distill: float = 1.0
    """Weight of the distillation toward planner-corrected Q-values (used only with --q-targets FILE)."""
    mc_mix: float = 0.0
    """Mixed Monte-Carlo targets (Bellemare et al. 2016; Ostrovski et al. 2017): the TD target
    distribution is mixed with weight beta = `mc_mix` with a point mass at the step's Monte-Carlo return
    G_t (the data's discounted, transformed rewards to its episode's end; C51-projected), where the data
    knows it (not in a truncated episode's tail). With `bootstrap="data"` both targets estimate the
    behaviour policy's Q, the MC one without waiting for Bellman iterations to carry rewards back; with
    `max` it pulls Q toward the data's returns. 0 = plain TD (JOWA)."""
    lambda_prior: float = 1.0
    """Weight of the behaviour prior's cross-entropy (the data action under the prior head's legal-masked
    logits); only models built with `--behaviour-prior` > 0 have that head."""


def objective_name(cfg: LossConfig) -> str:
    """The objective a run trains, as reports name it: `bc`, `q-only` (also `jowa` with lambda_wm = 0) or `jowa`."""
    if cfg.objective not in ("jowa", "q-only", "bc"):
        raise WamError(f"unknown objective {cfg.objective!r}; choose jowa, q-only or bc")
    if cfg.objective == "jowa" and cfg.lambda_wm == 0:
        return "q-only"
    return cfg.objective


@dataclass
class QTargetBatch(Batch):
    """A token `Batch` with distillation targets for its steps (planner-corrected Q, training scale)."""

    q_target: torch.Tensor  # [B, H, 18] float32 target value of each (step, action); anything where not masked
    q_target_mask: torch.Tensor  # [B, H, 18] bool, True where a target exists (a planned candidate)


# ------------------------------------------------------------------------------------- helpers
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the True entries of mask (same shape); 0 when mask is empty (keeps the graph)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


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
    assert out.obs_logits is not None and out.reward_logits is not None and out.termination_logits is not None, \
        "world_model_loss needs the forward pass run with world_model=True"
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


def td_loss(model: WorldActionModel, out: WorldActionOutput, batch: Batch, cfg: LossConfig,
            last: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, Logs]:
    """C51 n-step TD with the target head; masked mean over valid steps, mean over the ensemble.

    `last` = (online, target) Q logits [B, E, 18, A] of the last frame o_H to bootstrap from instead of
    those of the training pass (see `last_frame_q`); None: the training pass's (slot H).
    """
    assert out.target_q_logits is not None, "td_loss needs the forward pass run with with_target=True"
    h = batch.actions.shape[1]
    legal = batch.legal_actions[:, None, :]  # [B, 1, 18]
    logp = out.q_logits[:, :h].float().log_softmax(-1)  # [B, H, E, 18, A]
    idx = batch.actions[:, :, None, None, None].expand(-1, -1, logp.shape[2], 1, logp.shape[-1])
    logp_a = logp.gather(3, idx).squeeze(3)  # [B, H, E, A]
    with torch.no_grad():
        r = transform_reward(batch.rewards.float(), cfg.reward_transform)  # [B, H]
        ret, disc, boot = nstep_returns(r, batch.terminations, batch.truncations, batch.mask, cfg.gamma, cfg.n_step)
        tl = out.target_q_logits[:, : h + 1]
        ql = out.q_logits[:, : h + 1].detach()
        if last is not None:
            ql = torch.cat([ql[:, :h], last[0][:, None].to(ql.dtype)], 1)
            tl = torch.cat([tl[:, :h], last[1][:, None].to(tl.dtype)], 1)
        bidx = boot[:, :, None, None, None].expand(-1, -1, *tl.shape[2:])  # [B, H, E, 18, A]
        next_probs = tl.gather(1, bidx).float().softmax(-1)  # [B, H, E, 18, A] at the bootstrap frames
        if cfg.double_q:
            chooser = ql.gather(1, bidx).float().softmax(-1)
        else:
            chooser = next_probs
        next_q = (chooser * model.support).sum(-1).mean(2)  # [B, H, 18] ensemble mean
        next_a = next_q.masked_fill(~legal, float("-inf")).argmax(-1)  # [B, H] legal actions only
        if cfg.bootstrap == "data":
            next_a = torch.where(*data_next_action(batch, boot), next_a)
        nidx = next_a[:, :, None, None, None].expand(-1, -1, next_probs.shape[2], 1, next_probs.shape[-1])
        p_next = next_probs.gather(3, nidx).squeeze(3)  # [B, H, E, A]
        e = p_next.shape[2]
        target = c51_project(p_next.flatten(0, 2), ret[:, :, None].expand(-1, -1, e).flatten(),
                             disc[:, :, None].expand(-1, -1, e).flatten(), model.support.float())
        target = target.view_as(p_next)
        if cfg.mc_mix > 0:
            target = mix_mc_target(target, batch, cfg.mc_mix, model.support.float())
    ce = -(target * logp_a).sum(-1)  # [B, H, E]
    steps = q_steps(batch)  # [B, H]
    loss = masked_mean(ce, steps[:, :, None].expand_as(ce))
    with torch.no_grad():
        q_data = (logp_a.exp() * model.support).sum(-1)  # [B, H, E]
        q_mean = masked_mean(q_data, steps[:, :, None].expand_as(q_data))
        entropy = -(target * target.clamp(min=1e-12).log()).sum(-1)  # [B, H, E]
        kl = masked_mean(ce - entropy, steps[:, :, None].expand_as(ce))  # TD loss above its floor
        tv = (target * model.support).sum(-1).mean(-1)  # [B, H] expected target value, ensemble mean
        tv_mean = masked_mean(tv, steps)
        tv_std = masked_mean((tv - tv_mean) ** 2, steps).sqrt()
        boot_max = next_q.masked_fill(~legal, float("-inf")).max(-1).values  # [B, H]
        boots = steps & (disc > 0)  # steps whose target bootstraps
    return loss, {"td_loss": loss.item(), "td_kl": kl.item(), "q_data": q_mean.item(),
                  "td_target_mean": tv_mean.item(), "td_target_std": tv_std.item(),
                  "td_target_max": tv.masked_fill(~steps, float("-inf")).max().item() if steps.any() else 0.0,
                  "q_next_max": masked_mean(boot_max, boots).item()}


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
    with torch.no_grad():
        frequent_gap = frequent_action_gap(q.mean(2), batch, steps)
    return loss, {"cql_loss": loss.item(), "illegal_data_actions": illegal.item(), "q_gap_frequent": frequent_gap}


def legal_action_ce(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, accuracy) of the data actions under action logits [B, H, 18] (illegal actions already -inf):
    cross-entropy, masked mean over the steps whose data action is legal (`q_steps`), and the share of them
    where the argmax is the data action."""
    steps = q_steps(batch).flatten()  # [B*H]
    logits, actions = logits.flatten(0, 1), batch.actions.flatten()
    ce = F.cross_entropy(logits, actions, reduction="none")  # inf where the data action is illegal
    loss = masked_mean(torch.where(steps, ce, torch.zeros_like(ce)), steps)
    with torch.no_grad():
        acc = masked_mean((logits.argmax(-1) == actions).float(), steps)
    return loss, acc


def prior_loss(out: WorldActionOutput, batch: Batch) -> tuple[torch.Tensor, Logs]:
    """Behaviour prior: `legal_action_ce` of the prior head's logits over the legal actions; logs `prior_ce` and
    `prior_acc`."""
    assert out.prior_logits is not None
    h = batch.actions.shape[1]
    legal = batch.legal_actions[:, None, :].expand(-1, h, -1)  # [B, H, 18]
    loss, acc = legal_action_ce(out.prior_logits[:, :h].float().masked_fill(~legal, float("-inf")), batch)
    return loss, {"prior_ce": loss.item(), "prior_acc": acc.item()}


def frequent_action_gap(q: torch.Tensor, batch: Batch, steps: torch.Tensor) -> float:
    """Mean over `steps` [B, H] of Q(s, f) - mean of Q(s, a) over the other legal actions a, where f is the most
    frequent data action of the row's game in this batch (ties: the lowest id). q [B, H, 18].

    A Q-function that copies the behaviour policy keeps this large and positive whatever the returns.
    """
    n_games = int(batch.game_ids.max()) + 1 if batch.game_ids.numel() else 1
    counts = torch.zeros(n_games, q.shape[-1], device=q.device)
    rows = batch.game_ids[:, None].expand_as(batch.actions)[steps]
    counts.index_put_((rows, batch.actions[steps]), torch.ones_like(rows, dtype=counts.dtype), accumulate=True)
    frequent = counts.argmax(-1)[batch.game_ids]  # [B]
    legal = batch.legal_actions[:, None, :].expand_as(q)  # [B, H, 18]
    q_f = q.gather(-1, frequent[:, None, None].expand(-1, q.shape[1], 1)).squeeze(-1)  # [B, H]
    others = legal.clone()
    others.scatter_(-1, frequent[:, None, None].expand(-1, q.shape[1], 1), False)
    n_others = others.sum(-1)
    mean_others = torch.where(others, q, torch.zeros_like(q)).sum(-1) / n_others.clamp(min=1)
    ok = steps & (n_others > 0)
    return masked_mean(q_f - mean_others, ok).item()


def bc_loss(model: WorldActionModel, out: WorldActionOutput, batch: Batch) -> tuple[torch.Tensor, Logs]:
    """Behaviour cloning: cross-entropy of the data action, logits = `model.q_values` (legal-masked expected Q).

    Masked mean over the steps inside the episode whose data action is legal; logs `bc_acc`, the share of
    those steps where the argmax over legal actions is the data action.
    """
    b, h = batch.actions.shape
    legal = batch.legal_actions[:, None, :].expand(-1, h, -1).flatten(0, 1)  # [B*H, 18]
    logits = model.q_values(out.q_logits[:, :h].flatten(0, 1), legal)  # [B*H, 18], illegal -inf
    loss, acc = legal_action_ce(logits.view(b, h, -1), batch)
    with torch.no_grad():
        illegal = masked_mean((~q_steps(batch)).float(), batch.mask)
    return loss, {"bc_loss": loss.item(), "bc_acc": acc.item(), "illegal_data_actions": illegal.item()}


def distill_loss(model: WorldActionModel, out: WorldActionOutput, q_target: torch.Tensor, q_target_mask: torch.Tensor,
                 valid_steps: torch.Tensor | None = None) -> tuple[torch.Tensor, Logs]:
    """Pull the online C51 distributions of the targeted (step, action) pairs toward target values.

    q_target [B, H, 18] float (values outside the mask are ignored, -inf allowed), q_target_mask [B, H, 18]
    bool. Cross-entropy against the two-hot projection of each target onto the support (values beyond
    the support are clipped to its ends); masked mean over pairs, mean over the ensemble. Logs
    `distill_loss`, `distill_mae` (|E[Q] - target|, ensemble mean) and `distill_coverage` (share of
    steps with at least one target, among `valid_steps` [B, H] bool when given, else among all steps).
    """
    b, h, n_act = q_target.shape
    logp = out.q_logits[:, :h].float().log_softmax(-1)  # [B, H, E, 18, A]
    n_atoms = logp.shape[-1]
    with torch.no_grad():
        values = torch.where(q_target_mask, q_target.float(), torch.zeros_like(q_target, dtype=torch.float32))
        flat = values.flatten()  # [B*H*18]
        uniform = torch.full((flat.numel(), n_atoms), 1.0 / n_atoms, device=flat.device)
        # r + 0 * Z projected onto the support: a two-hot distribution whose mean is r (clipped to the support)
        target = c51_project(uniform, flat, torch.zeros_like(flat), model.support.float())
        target = target.view(b, h, 1, n_act, n_atoms)
    ce = -(target * logp).sum(-1)  # [B, H, E, 18]
    mask = q_target_mask[:, :, None, :].expand_as(ce)
    loss = masked_mean(ce, mask)
    with torch.no_grad():
        q = (logp.exp() * model.support).sum(-1).mean(2)  # [B, H, 18] ensemble mean
        mae = masked_mean((q - values.clamp(float(model.support[0]), float(model.support[-1]))).abs(), q_target_mask)
        has_target = q_target_mask.any(-1).float()  # [B, H]
        coverage = has_target.mean() if valid_steps is None else masked_mean(has_target, valid_steps)
    return loss, {"distill_loss": loss.item(), "distill_mae": mae.item(), "distill_coverage": coverage.item()}


def world_action_loss(model: WorldActionModel, batch: Batch, cfg: LossConfig, critic: bool = True
                      ) -> tuple[torch.Tensor, Logs]:
    """The objective `cfg.objective` on a token batch (obs [B, H+1, 36] int64); see the module docstring.

    A `QTargetBatch` adds `cfg.lambda_distill` x the distillation term (not with `bc`). `critic=False`
    (the `jowa` objective's warm-up) weighs the Q terms by 0: only the world model learns.
    """
    assert batch.is_tokens, "world_action_loss needs token observations; encode frames with the tokenizer first"
    objective = objective_name(cfg)
    distill = isinstance(batch, QTargetBatch)
    if objective == "bc":
        if distill:
            raise WamError("--q-targets (distillation toward corrected Q) does not apply to --objective bc; "
                           "use --objective jowa or q-only")
        out, _ = model(batch.obs, batch.actions, batch.game_ids, world_model=False)
        loss, logs = bc_loss(model, out, batch)
        return loss, {"loss": loss.item(), **logs}
    use_wm = objective == "jowa"
    out, _ = model(batch.obs, batch.actions, batch.game_ids, with_target=True, world_model=use_wm)
    last = last_frame_q(model, batch) if cfg.last_bootstrap == "shifted" else None
    td, td_logs = td_loss(model, out, batch, cfg, last)
    cql, cql_logs = cql_loss(model, out, batch)
    q_weight = 1.0 if critic or not use_wm else 0.0
    loss = q_weight * (td + cfg.lambda_cql * cql)
    logs: Logs = {**td_logs, **cql_logs}
    if out.prior_logits is not None:
        pl, pl_logs = prior_loss(out, batch)
        loss = loss + cfg.lambda_prior * pl
        logs.update(pl_logs)
    if use_wm:
        wm, wm_logs = world_model_loss(out, batch)
        loss = loss + cfg.lambda_wm * wm
        logs.update(wm_logs)
    if distill:
        h = batch.actions.shape[1]
        mask = batch.q_target_mask & batch.mask[:, :, None] & batch.legal_actions[:, None, :]  # [B, H, 18]
        dl, dl_logs = distill_loss(model, out, batch.q_target[:, :h], mask, valid_steps=batch.mask)
        loss = loss + q_weight * cfg.lambda_distill * dl
        logs.update(dl_logs)
    return loss, {"loss": loss.item(), **logs}


class WorldActionObjective(torch.nn.Module):
    """The model and its loss as one module (what the trainer and DDP wrap): `forward(batch) -> (loss, logs)`.

    Objectives without the world-model loss (`q-only`, `bc`) freeze the observation, reward and
    termination heads here (they get no gradient, no weight decay and no DDP reduction).
    `after_step(step)` updates the target Q head: Polyak averaging after every step when `cfg.target_tau`
    > 0, else a hard update every `cfg.target_update_every` optimiser steps (counted from the end of the
    critic's warm-up, `cfg.critic_warmup_steps`, during which the target is kept equal to the Q head).
    """

    def __init__(self, model: WorldActionModel, cfg: LossConfig) -> None:
        super().__init__()
        if not 0.0 <= cfg.target_tau <= 1.0:
            raise WamError(f"--target-tau must lie in [0, 1], got {cfg.target_tau}")
        if cfg.bootstrap not in ("max", "data"):
            raise WamError(f"--bootstrap must be max or data, got {cfg.bootstrap!r}")
        if cfg.last_bootstrap not in ("shifted", "same-pass"):
            raise WamError(f"--last-bootstrap must be shifted or same-pass, got {cfg.last_bootstrap!r}")
        if cfg.target_tau == 0 and cfg.target_update_every < 1:
            raise WamError(f"--target-update-every must be at least 1, got {cfg.target_update_every}")
        if not 0.0 <= cfg.mc_mix <= 1.0:
            raise WamError(f"--mc-mix must lie in [0, 1], got {cfg.mc_mix}")
        if cfg.critic_warmup_steps < 0:
            raise WamError(f"--critic-warmup-steps must be >= 0, got {cfg.critic_warmup_steps}")
        self.model, self.cfg = model, cfg
        self.step = 0  # optimiser steps done (the trainer sets it on resume through `resume_at`)
        self.objective = objective_name(cfg)
        if self.objective != "jowa":
            log.info("objective %s: the world-model heads (%s) are not trained", self.objective,
                     ", ".join(WORLD_MODEL_HEADS))
            model.freeze(WORLD_MODEL_HEADS)
        else:
            log.info("objective jowa: lambda_wm=%g, lambda_cql=%g", cfg.lambda_wm, cfg.lambda_cql)

    @property
    def uses_world_model(self) -> bool:
        return self.objective == "jowa"

    @property
    def critic_trains(self) -> bool:
        return self.step >= self.cfg.critic_warmup_steps

    def forward(self, batch: Batch) -> tuple[torch.Tensor, Logs]:
        return world_action_loss(self.model, batch, self.cfg, critic=self.critic_trains)

    def resume_at(self, step: int) -> None:
        """Continue a run at `step` (the target head's state comes with the model's)."""
        self.step = step

    def after_step(self, step: int) -> None:
        self.step = step
        warmup = self.cfg.critic_warmup_steps
        if step <= warmup:  # the critic has not trained yet (or starts now): keep the target equal to it
            self.model.update_target()
        elif self.cfg.target_tau > 0:
            self.model.update_target(self.cfg.target_tau)
        elif (step - warmup) % self.cfg.target_update_every == 0:
            self.model.update_target()
