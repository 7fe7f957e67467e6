"""Batched beam search inside the world-action model: look H imagined steps ahead and correct Q.

Algorithm (JOWA's planner, REFERENCE.md "Planning", batched over environments x beams):

1. At the root (a real state, already observed) the model's Q gives the raw values; the K legal
   actions with the highest Q are the root candidates, one beam each (B environments -> B*K rows;
   the core's state -- KV cache or recurrent state -- is repeated K times, never recomputed).
2. For each depth d = 0 .. H-1, every beam feeds its action a_d (`model.act`: one token) and gets
   the reward r_d and termination of that step from the heads; the next observation is imagined by
   greedy decoding of its tokens (`model.decode_next_obs`: one `core.step` per token), which ends at
   the frame's last token where the Q head gives Q(s_{d+1}, .). The beam continues with the best
   legal action under that Q (the child a beam search would keep when beams are partitioned by root
   action, so every root candidate keeps exactly one beam and gets a corrected value).
3. Value of a root candidate a. The h-step value expansion of the branch is
   G^(h) = sum_{d<h} gamma^d alive_d r_d + gamma^h alive_h max_a' Q(s_h, a'), G^(0) = Q(s, a) (the raw Q),
   alive_0 = 1 and alive_{d+1} = alive_d * (1 - done_d): a branch that the model says terminated stops
   accruing (neither later rewards nor the bootstrap count). `backup="leaf"` (JOWA) uses Q^plan = G^(H);
   `backup="mean"` (default) their mean over h = 0..H, model-based value expansion with equal weights
   (MVE/STEVE's average of the model-free and every model-based target). Where the imagined future does
   not depend on the root action (the `small` recipe's model imagines the same next frame for both
   candidates in 87 % of Boxing states), G^(1..H) are equal across candidates and `leaf` ranks them by noise
   and the prior, dropping what Q knows; `mean` keeps Q's ranking there, divided by H+1, and still lets an
   imagined reward or termination that differs between candidates outweigh it (docs/planning.md).
4. The chosen action is the candidate with the highest planned value (ties: the higher raw Q). A model with a
   behaviour prior (`behaviour_prior` tau > 0) ranks the root candidates by Q + tau log pi_b(a | s) and adds
   that tau log pi_b term to each candidate's planned value before choosing; `candidate_q` stays pure Q.
   Inside the imagination such a model also continues, and bootstraps, with the action acting would take
   (argmax of Q + tau log pi_b at the imagined frame, `model.imagine_next_obs` giving the prior there):
   Q^plan = ... + gamma^H Q(s_H, a_acting) instead of the max over Q, which with in-sample Q picks actions
   the data rarely took (the `small` recipe's Boxing lost 48 points with the max; docs/planning.md).

H = 0 is greedy acting (the candidates' planned values are their raw Q). Every model call runs the
whole B*K batch, so one decision of B environments costs H*(1 + tokens_per_obs) model calls and
B*K*H*(1 + tokens_per_obs) tokens (37 per imagined step at 36 tokens a frame) -- the minimum for
greedy decoding, nothing is re-run.

Reward r_d: `reward="expected"` (default) uses the expected value of the sign classes
p(+1) - p(-1); `reward="argmax"` the most likely sign. Termination: done when p(terminal) > 0.5.

The planner needs only the model's incremental API (`act`, `decode_next_obs`, `q_values`, a `cfg`
with `tokens_per_obs`), so any model with that interface plans the same way (tests use a hand-built
one with known dynamics).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from wam.datasets.errors import WamError

log = logging.getLogger(__name__)

RewardMode = Literal["expected", "argmax"]
Backup = Literal["mean", "leaf"]
SIGN_VALUES = (-1.0, 0.0, 1.0)  # reward classes 0, 1, 2 of the reward head


# ----------------------------------------------------------------------------- state helpers
def map_state(state: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply `fn` to every batch-first tensor of a state (any core's, a `WamState`, nested dataclasses).

    Objects with `map_tensors(fn)` (the cores' states) use it; dataclasses, tuples, lists and dicts are
    mapped field by field; tensors get `fn`; anything else (ints such as `WamState.pos`) is kept.
    A new state is returned; the given one is not touched.
    """
    if isinstance(state, torch.Tensor):
        return fn(state)
    if hasattr(state, "map_tensors"):
        return state.map_tensors(fn)
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return dataclasses.replace(state, **{f.name: map_state(getattr(state, f.name), fn)
                                             for f in dataclasses.fields(state) if f.init})
    if isinstance(state, (tuple, list)):
        return type(state)(map_state(s, fn) for s in state)
    if isinstance(state, dict):
        return {k: map_state(v, fn) for k, v in state.items()}
    return state


def repeat_state(state: Any, k: int) -> Any:
    """Each row of the state repeated k times in place: rows [r0, r1] -> [r0 x k, r1 x k]."""
    return map_state(state, lambda t: t.repeat_interleave(k, dim=0))


def index_state(state: Any, rows: torch.Tensor) -> Any:
    """The state of the given rows (int64 [N] indices, or bool [B] mask)."""
    return map_state(state, lambda t: t[rows])


# ------------------------------------------------------------------------------------- result
@dataclass
class PlanResult:
    """What one planning call returns for B environments (K candidates, H imagined steps)."""

    action: torch.Tensor  # [B] int64, the chosen action
    raw_q: torch.Tensor  # [B, 18] float32, the model's Q at the root (illegal actions -inf)
    candidates: torch.Tensor  # [B, K] int64, root candidates in order of raw Q (best first)
    candidate_raw_q: torch.Tensor  # [B, K] float32, raw Q of the candidates
    candidate_q: torch.Tensor  # [B, K] float32, planned (corrected) Q of the candidates; -inf if not legal
    rewards: torch.Tensor  # [B, K, H] float32, imagined rewards r_d (before discounting and masking)
    alive: torch.Tensor  # [B, K, H+1] bool, alive_d (branch not terminated before step d)
    plans: torch.Tensor  # [B, K, H] int64, the actions each beam took (plans[:, :, 0] == candidates)
    model_calls: int  # model calls of this planning call (each over all B*K rows)
    tokens: int  # tokens fed through the core by this call, all rows together

    @property
    def greedy_action(self) -> torch.Tensor:
        """[B] int64: the action greedy acting would take (the best raw Q)."""
        return self.candidates[:, 0]


@dataclass(frozen=True)
class PlannerSettings:
    """The planner's knobs (also recorded as provenance of corrected Q-values)."""

    beam_width: int = 2
    """K: root candidates, the top-K legal actions by Q (JOWA uses 2-4 per game)."""
    horizon: int = 2
    """H: imagined steps per beam (0 = greedy)."""
    gamma: float = 0.99
    """Discount of the imagined rewards and the bootstrap."""
    reward: RewardMode = "expected"
    """Imagined reward: expected value of the sign classes, or the most likely sign (argmax)."""
    backup: Backup = "mean"
    """Planned value of a candidate: `mean` of its H+1 value expansions G^(0..H) (G^(0) = the raw Q; model-based
    value expansion with equal weights, which keeps Q's ranking where imagination does not depend on the
    action), or `leaf`, G^(H) alone (JOWA). See the module docstring and docs/planning.md."""

    def __post_init__(self) -> None:
        if self.beam_width < 1:
            raise WamError(f"beam width must be >= 1, got {self.beam_width}")
        if self.horizon < 0:
            raise WamError(f"planning horizon must be >= 0, got {self.horizon}")
        if not 0.0 <= self.gamma <= 1.0:
            raise WamError(f"gamma must lie in [0, 1], got {self.gamma}")
        if self.reward not in ("expected", "argmax"):
            raise WamError(f"reward mode must be 'expected' or 'argmax', got {self.reward!r}")
        if self.backup not in ("mean", "leaf"):
            raise WamError(f"planning backup must be 'mean' or 'leaf', got {self.backup!r}")

    def as_dict(self) -> dict[str, Any]:
        """The settings as JSON-able keyword arguments (`PlannerSettings(**settings.as_dict())` round-trips)."""
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------ planner
class BeamSearchPlanner:
    """Beam search of width K over H imagined steps; see the module docstring.

    `model`: a `WorldActionModel` (or anything with its incremental API). Use `plan(state, q_logits, legal)`
    after `model.observe` (or `model.forward`) has fed the current frame, or `plan_context` to encode a
    context window first.
    """

    def __init__(self, model: Any, beam_width: int = 2, horizon: int = 2, gamma: float = 0.99,
                 reward: RewardMode = "expected", backup: Backup = "mean") -> None:
        self.model = model
        self.settings = PlannerSettings(beam_width, horizon, gamma, reward, backup)

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one imagined step: the action and the next frame's observation tokens."""
        return 1 + int(self.model.cfg.tokens_per_obs)

    def _reward_values(self, reward_logits: torch.Tensor) -> torch.Tensor:
        """reward logits [N, 3] -> imagined reward [N] (see `reward`)."""
        signs = torch.tensor(SIGN_VALUES, dtype=torch.float32, device=reward_logits.device)
        if self.settings.reward == "argmax":
            return signs[reward_logits.argmax(-1)]
        return (reward_logits.float().softmax(-1) * signs).sum(-1)

    def _check_room(self, state: Any) -> None:
        """The leaves of H imagined steps must lie at frame slots whose Q is trained (`q_frames`)."""
        max_tokens = getattr(self.model.cfg, "max_tokens", None)
        pos = getattr(state, "pos", None)
        if max_tokens is None or not isinstance(pos, int):
            return
        frames = q_frames(self.model)
        need = pos + self.settings.horizon * self.tokens_per_step  # position after the leaf frame
        if need > frames * self.tokens_per_step - 1:
            raise WamError(
                f"planning {self.settings.horizon} steps from position {pos} reads Q at frame slot "
                f"{need // self.tokens_per_step}, but the model's Q is trained at slots 0..{frames - 1}; encode at "
                f"most {frames - self.settings.horizon} frames of context before planning, or lower the horizon")

    @torch.no_grad()
    def plan(self, state: Any, q_logits: torch.Tensor, legal: torch.Tensor,
             prior_logits: torch.Tensor | None = None) -> PlanResult:
        """Plan for B environments whose current frame has been fed.

        state: the model state after the current frame's last token (B rows; not modified);
        q_logits: the Q logits there ([B, E, 18, n_atoms] for the world-action model);
        legal: [B, 18] bool legal-action mask;
        prior_logits: the behaviour prior's logits there ([B, 18]; models with a prior): the root candidates are
        the best by acting value (Q + tau log pi_b) and the choice adds the same prior term to each
        candidate's planned Q (imagined steps continue greedily on Q).
        """
        s = self.settings
        model = self.model
        legal = legal.to(torch.bool)
        raw_q = model.q_values(q_logits, legal).float()  # [B, 18]
        acting = getattr(model, "acting_values", None)
        imagine = getattr(model, "imagine_next_obs", None)
        score = acting(q_logits, legal, prior_logits).float() if acting is not None else raw_q  # [B, 18]
        b = raw_q.shape[0]
        k = min(s.beam_width, int(legal.sum(-1).max()))
        if k < s.beam_width:
            log.debug("beam width %d capped to %d (no row has more legal actions)", s.beam_width, k)
        cand_score, cand = score.topk(k, dim=-1)  # [B, K] best first
        cand_raw = raw_q.gather(1, cand)
        bonus = torch.where(torch.isfinite(cand_score), cand_score - cand_raw, torch.zeros_like(cand_raw))  # prior
        cand_legal = torch.isfinite(cand_score)  # legal, and supported by the data where acting filters
        h = s.horizon
        dev = raw_q.device
        rewards = torch.zeros(b * k, h, device=dev)
        alive = torch.ones(b * k, h + 1, dtype=torch.bool, device=dev)
        plans = torch.zeros(b * k, h, dtype=torch.long, device=dev)
        calls = tokens = 0
        if h == 0:
            value = cand_raw.clone()
        else:
            self._check_room(state)
            st = repeat_state(state, k)  # B*K rows, row b*K + j = environment b, candidate j
            legal_bk = legal.repeat_interleave(k, dim=0)  # [B*K, 18]
            action = cand.reshape(-1)  # [B*K]
            disc = s.gamma ** torch.arange(h + 1, dtype=torch.float32, device=dev)  # [H+1]
            expansions = [cand_raw.reshape(-1)]  # G^(0..H), each [B*K]; G^(0) = the raw Q
            partial = torch.zeros(b * k, device=dev)  # sum_{i<=d} gamma^i alive_i r_i, the rewards so far
            for d in range(h):
                plans[:, d] = action
                reward_logits, term_logits, first_logits, st = model.act(action, st)
                if imagine is not None:
                    _, q_next, prior_next, st = imagine(first_logits, st)
                else:
                    (_, q_next, st), prior_next = model.decode_next_obs(first_logits, st), None
                calls += self.tokens_per_step
                tokens += b * k * self.tokens_per_step
                rewards[:, d] = self._reward_values(reward_logits)
                done = term_logits.float().softmax(-1)[:, 1] > 0.5
                alive[:, d + 1] = alive[:, d] & ~done
                q_next_vals = model.q_values(q_next, legal_bk).float()  # [B*K, 18]
                if prior_next is not None and acting is not None:  # continue, and bootstrap, as acting would
                    action = acting(q_next, legal_bk, prior_next).float().argmax(-1)
                    bootstrap = q_next_vals.gather(1, action[:, None])[:, 0]
                else:
                    bootstrap, action = q_next_vals.max(-1)  # greedy continuation of each beam
                # G^(d+1) = sum_{i<=d} gamma^i alive_i r_i + gamma^(d+1) alive_(d+1) Q(s_(d+1), a_(d+1))
                partial = partial + disc[d] * alive[:, d] * rewards[:, d]
                expansions.append(partial + disc[d + 1] * alive[:, d + 1] * bootstrap)
            ret = torch.stack(expansions).mean(0) if s.backup == "mean" else expansions[-1]
            value = ret.view(b, k)
        value = value.masked_fill(~cand_legal, float("-inf"))
        # best planned value (+ the prior's term); ties go to the earlier (higher acting value) candidate
        best = (value + bonus).argmax(-1)  # argmax returns the first maximum
        chosen = cand.gather(1, best[:, None])[:, 0]
        return PlanResult(action=chosen, raw_q=raw_q, candidates=cand, candidate_raw_q=cand_raw, candidate_q=value,
                          rewards=rewards.view(b, k, h), alive=alive.view(b, k, h + 1), plans=plans.view(b, k, h),
                          model_calls=calls, tokens=tokens)

    @torch.no_grad()
    def plan_context(self, obs_tokens: torch.Tensor, actions: torch.Tensor, game_ids: torch.Tensor,
                     legal: torch.Tensor) -> PlanResult:
        """Encode a context window (parallel form), then plan from its last frame.

        obs_tokens [B, T, tokens_per_obs] int64, actions [B, T-1] int64 (the actions between the frames),
        game_ids [B] int64, legal [B, 18] bool. Frames must leave room for H imagined steps at frame slots
        whose Q is trained (at most `max_context_frames(model, H)`).
        """
        out, state = self.model(obs_tokens, actions, game_ids)
        prior = getattr(out, "prior_logits", None)
        return self.plan(state, out.q_logits[:, -1], legal, None if prior is None else prior[:, -1])


def q_frames(model: Any) -> int:
    """Frame slots at which the model's Q head is trained: H for a world-action model (a training sequence
    holds H+1 frames, and the Q losses use frames 0..H-1: the last frame has no successor, so its Q gets
    no gradient); models without a `horizon` (hand-built test models) may read Q at every slot that fits."""
    horizon = getattr(model.cfg, "horizon", None)
    if horizon is not None:
        return int(horizon)
    return (model.cfg.max_tokens + 1) // (model.cfg.tokens_per_obs + 1)


def max_context_frames(model: Any, horizon: int) -> int:
    """The most real frames a context may hold so that the Q values read at its last frame and at the
    `horizon` imagined frames after it (the leaves) all lie at slots where Q is trained (`q_frames`)."""
    frames = q_frames(model)
    if frames - horizon < 1:
        raise WamError(f"a planning horizon of {horizon} does not fit the model's {frames} frames with trained Q "
                       f"(H={frames}); lower the horizon")
    return frames - horizon


__all__ = ["BeamSearchPlanner", "PlanResult", "PlannerSettings", "index_state", "map_state", "max_context_frames",
           "q_frames", "repeat_state"]
