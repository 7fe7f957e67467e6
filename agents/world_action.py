"""`WorldActionAgent`: frames -> tokens (frozen VQ tokenizer) -> world-action model -> Q; greedy or planned.

Built by `load_agent(RUN, game)` from a checkpoint of kind "world-action-model" (`wam pretrain` /
`wam finetune`); the checkpoint names its tokenizer (path and id), which is loaded and checked.

Two kinds of context (`memory`):

- `"window"` (default): each env row keeps the tokens of its last `context` frames and the actions
  between them. At every step the window is re-encoded from a fresh state with the model's parallel
  forward (one call over at most 37 H - 1 tokens per row, the cheapest exact choice: stepping the
  same tokens one by one gives the same Q, tested) and Q is read at the last observation token. Like a
  training segment, a window always starts at position 0. A window holds at most H frames, not the H+1
  of a training sequence: Q is read only at frame slots the Q losses train (0..H-1; the last frame of a
  training sequence only serves as the TD bootstrap and its Q gets no gradient). With planning the root's
  Q and prior still come from the whole window, and the planner imagines from a second encoding of its
  last `max_context_frames(model, horizon)` = H - horizon frames (`plan_context`), so the imagined leaves
  too are read at trained slots. (Shortening the whole window instead cost the `small` recipe's Boxing
  agent two thirds of its score, greedy or planned: docs/planning.md.)
- `"episode"` (recurrent cores `mamba`, `mamba2`, `atlas`): the core state is carried through the whole
  episode (`model.observe(frame)`, then `model.act(action)` before the next frame) and reset at episode
  starts. The model's learned position table covers one training segment only, so frame t of an
  episode takes the positions of frame slot `min(t, cap)` of a segment (`cap = H - 1 - horizon`: the
  last slot from which Q is read, at the frame and at the planner's leaves, only at trained slots).
  A transformer's state is a bounded KV cache: episode memory is refused for it.

Actions taken: the agent feeds the action of step t into its context lazily, at the start of step t+1.
An evaluation loop that replaces an action (epsilon-greedy) calls `record_actions(state, actions)` in
between so the context holds what was actually played; without that call the agent's own choice is used.

Rows are independent: rows whose windows (or episode positions) have the same length are run as one
batch, others in separate calls, and a row's result depends only on its own frames and actions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from wam.agents.base import AgentState, checkpoint_id, register_agent_loader
from wam.datasets.errors import WamError
from wam.planning.beam import BeamSearchPlanner, PlannerSettings, index_state, map_state, max_context_frames
from wam.worldmodel.model import CHECKPOINT_KIND, NUM_ACTIONS, WamState, WorldActionModel

log = logging.getLogger(__name__)

Memory = Literal["window", "episode"]
RECURRENT_CORES = ("mamba", "mamba2", "atlas")
"""Cores whose state summarises any history in constant memory (episode memory is allowed for them)."""


@dataclass
class WorldActionState(AgentState):
    """Per-row context of a `WorldActionAgent` over N env rows.

    Window mode: `tokens[i, :length[i]]` are the row's last frames (oldest first) and
    `actions[i, j]` the action played after frame j. Episode mode: `core` holds the model state after
    the row's last observed frame and `slot[i]` that frame's position slot (-1: nothing observed yet).
    `pending[i]` is the action chosen at the last step, not yet fed into the context (-1: none).
    """

    tokens: np.ndarray | None = None  # int64 [N, W, 36] (window mode)
    actions: np.ndarray | None = None  # int64 [N, W] (window mode)
    length: np.ndarray | None = None  # int64 [N] frames in each row's window
    pending: np.ndarray | None = None  # int64 [N]
    core: WamState | None = None  # episode mode: N rows
    slot: np.ndarray | None = None  # int64 [N] (episode mode)


def _gather_tensors(state: Any) -> list[torch.Tensor]:
    """The batch-first tensors of a state, in `map_state`'s traversal order."""
    found: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        found.append(t)
        return t

    map_state(state, keep)
    return found


def scatter_state(full: Any, rows: torch.Tensor, part: Any) -> Any:
    """A copy of `full` whose rows `rows` (int64 [G]) are replaced by the G rows of `part` (same structure)."""
    parts = iter(_gather_tensors(part))
    return map_state(full, lambda t: t.index_copy(0, rows.to(t.device), next(parts).to(t.dtype)))


class WorldActionAgent:
    """An `Agent` acting with a world-action model (see the module docstring).

    model: a `WorldActionModel` (put in eval mode here); tokenizer: its frozen `VQTokenizer` (anything with
    `encode(uint8 [N, 84, 84]) -> int64 [N, 36]`); game: CamelCase, one of `model.cfg.games`;
    plan: planner settings (None = greedy on Q; horizon 0 plans nothing: greedy through the planner); memory: "window" or "episode"; context: frames in the window (default: as many
    as the model's positions allow); bf16: bfloat16 autocast for the model calls.
    """

    def __init__(self, model: WorldActionModel, tokenizer: Any, game: str,
                 plan: PlannerSettings | None = None, memory: Memory = "window",
                 context: int | None = None, bf16: bool = False, name: str | None = None,
                 checkpoint_id: str = "") -> None:
        cfg = model.cfg
        if game not in cfg.games:
            raise WamError(f"the model was not trained on {game}; it knows {', '.join(cfg.games)} "
                           "(fine-tune it on the new game with `wam finetune --game`)")
        if memory not in ("window", "episode"):
            raise WamError(f"memory must be 'window' or 'episode', got {memory!r}")
        if memory == "episode" and cfg.core not in RECURRENT_CORES:
            raise WamError(f"episode memory needs a recurrent core ({', '.join(RECURRENT_CORES)}); this model's core "
                           f"is {cfg.core!r}: use the default memory='window'")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.game = game
        self.game_id = cfg.games.index(game)
        self.memory: Memory = memory
        self.bf16 = bool(bf16)
        self.checkpoint_id = checkpoint_id
        self.device = model.ln_f.weight.device
        self.planner: BeamSearchPlanner | None = None
        horizon = 0
        if plan is not None:
            horizon = int(plan.horizon)
            self.planner = BeamSearchPlanner(model, beam_width=plan.beam_width, horizon=horizon,
                                             gamma=plan.gamma, reward=plan.reward, backup=plan.backup)
        room = max_context_frames(model, 0)  # frames whose Q is read at trained slots
        if context is None:
            context = room
        if not 1 <= context <= room:
            raise WamError(f"context of {context} frames does not fit: this model's Q is trained at {cfg.horizon} "
                           f"frame slots (H={cfg.horizon}), so a window holds at most {room} real frames")
        self.context = int(context)
        # the planner imagines from the window's last frames, leaving room for its leaves at trained slots
        self.plan_context = min(self.context, max_context_frames(model, horizon))
        # episode mode: the last frame slot whose Q and whose planner leaves are read at trained slots
        self.slot_cap = max_context_frames(model, horizon) - 1
        suffix = "-episode" if memory == "episode" else ""
        self.name = name or f"wam-{cfg.core}{suffix}"
        log.info("world-action agent for %s: %s core, memory=%s (%s), %s, %s", game, cfg.core, memory,
                 (f"window of {self.context} frames" + (f", planning from its last {self.plan_context}" if horizon
                                                         else "")) if memory == "window"
                 else f"position slots capped at {self.slot_cap}",
                 f"beam search K={plan.beam_width} H={horizon} backup={plan.backup}" if plan is not None else "greedy on Q",
                 "bf16 autocast" if self.bf16 else "fp32")

    # ------------------------------------------------------------------------------ state
    def _game_ids(self, n: int) -> torch.Tensor:
        return torch.full((n,), self.game_id, dtype=torch.long, device=self.device)  # [n]

    def init_state(self, n_envs: int) -> WorldActionState:
        k = self.model.cfg.tokens_per_obs
        state = WorldActionState(steps=np.zeros(n_envs, dtype=np.int64),
                                 pending=np.full(n_envs, -1, dtype=np.int64))
        if self.memory == "window":
            state.tokens = np.zeros((n_envs, self.context, k), dtype=np.int64)
            state.actions = np.zeros((n_envs, self.context), dtype=np.int64)
            state.length = np.zeros(n_envs, dtype=np.int64)
        else:
            state.core = self.model.init_state(self._game_ids(n_envs))
            state.slot = np.full(n_envs, -1, dtype=np.int64)
        return state

    def reset(self, state: WorldActionState, rows: np.ndarray,
              rngs: Sequence[np.random.Generator] | None = None) -> WorldActionState:
        rows = np.asarray(rows, dtype=bool)
        assert rows.shape == (state.n_envs,), f"rows {rows.shape} for {state.n_envs} envs"
        state.pending[rows] = -1
        if self.memory == "window":
            state.length[rows] = 0
            state.tokens[rows] = 0
            state.actions[rows] = 0
        elif rows.any():
            core = state.core
            fresh = self.model.core.reset_state(core.core, torch.as_tensor(rows, device=self.device))
            state.core = WamState(fresh, core.pos, core.game_ids)
            state.slot[rows] = -1
        state.clear(rows)
        return state

    def record_actions(self, state: WorldActionState, actions: np.ndarray) -> WorldActionState:
        """Tell the agent which actions were played (after epsilon replaced some of its choices), int64 [N]."""
        actions = np.asarray(actions, dtype=np.int64)
        assert actions.shape == (state.n_envs,), f"actions {actions.shape} for {state.n_envs} envs"
        chosen = state.pending >= 0
        state.pending[chosen] = actions[chosen]
        return state

    # -------------------------------------------------------------------------------- act
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def encode(self, obs: np.ndarray) -> np.ndarray:
        """uint8 [N, 84, 84] -> int64 [N, 36] with the frozen tokenizer."""
        return self.tokenizer.encode(np.ascontiguousarray(obs)).cpu().numpy().astype(np.int64)

    @torch.no_grad()
    def act(self, state: WorldActionState, obs: np.ndarray, legal: np.ndarray, rngs: Sequence[np.random.Generator],
            ram: np.ndarray | None = None) -> tuple[np.ndarray, WorldActionState, dict[str, Any]]:
        n = state.n_envs
        assert obs.shape == (n, 84, 84) and legal.shape == (n, NUM_ACTIONS), (
            f"obs {obs.shape} / legal {legal.shape} for {n} rows")
        tokens = self.encode(obs)  # [N, 36]
        legal_t = torch.as_tensor(np.array(legal, dtype=bool), device=self.device)  # [N, 18]
        raw_q = torch.empty(n, NUM_ACTIONS)
        planned_q = torch.full((n, NUM_ACTIONS), float("-inf"))
        changed = np.zeros(n, dtype=bool)  # planning chose another action than greedy acting would have
        actions = torch.empty(n, dtype=torch.long)
        groups = self._window_groups(state, tokens) if self.memory == "window" else self._episode_groups(state, tokens)
        for idx, compute in groups:
            idx_t = torch.as_tensor(idx, device=self.device)
            with self._autocast():
                model_state, q_logits, prior = compute()
                if self.planner is not None:
                    res = self.planner.plan(model_state, q_logits, legal_t[idx_t], prior)
                    chosen, q = res.action, res.raw_q
                    changed[idx] = (res.action != res.greedy_action).cpu().numpy()
                    planned_q[idx] = torch.full((len(idx), NUM_ACTIONS), float("-inf")).scatter(
                        1, res.candidates.cpu(), res.candidate_q.cpu().float())
                else:
                    q = self.model.q_values(q_logits, legal_t[idx_t]).float()  # [G, 18]
                    # greedy on Q, plus tau log pi_b(a | s) for a model with a behaviour prior
                    chosen = self.model.acting_values(q_logits, legal_t[idx_t], prior).argmax(-1)  # ties: lowest id
            raw_q[idx] = q.cpu()
            actions[idx] = chosen.cpu()
        acts = actions.numpy().astype(np.int64)  # [N]
        state.pending = acts.copy()
        state.advance()
        info: dict[str, Any] = {"q_values": raw_q.numpy().astype(np.float32)}
        if self.planner is not None:
            info["raw_q"] = info["q_values"]
            info["planned_q"] = planned_q.numpy().astype(np.float32)
            info["plan_changed"] = changed
        return acts, state, info

    def _window_groups(self, state: WorldActionState, tokens: np.ndarray) -> list[tuple[np.ndarray, Any]]:
        """Append the pending actions and the new frames to the windows; one model call per window length."""
        fed = (state.pending >= 0) & (state.length > 0)
        rows = np.flatnonzero(fed)
        state.actions[rows, state.length[rows] - 1] = state.pending[rows]
        full = state.length == self.context
        if full.any():  # slide: drop the oldest frame and its action
            state.tokens[full] = np.roll(state.tokens[full], -1, axis=1)
            state.actions[full] = np.roll(state.actions[full], -1, axis=1)
            state.length[full] -= 1
        state.tokens[np.arange(state.n_envs), state.length] = tokens
        state.length += 1
        groups = []
        for t in np.unique(state.length):
            idx = np.flatnonzero(state.length == t)
            obs_t = torch.as_tensor(state.tokens[idx, :t], device=self.device)  # [G, T, 36]
            act_t = torch.as_tensor(state.actions[idx, :t - 1], device=self.device)  # [G, T-1]
            groups.append((idx, functools.partial(self._window_q, obs_t, act_t)))
        return groups

    def _window_q(self, obs_t: torch.Tensor, act_t: torch.Tensor
                  ) -> tuple[WamState, torch.Tensor, torch.Tensor | None]:
        """Encode windows (parallel form, from position 0): the state after them, Q logits [G, E, 18, n_atoms]
        and the behaviour prior's logits [G, 18] (None without a prior head) at the last frame. With a planner
        and a window longer than `plan_context`, the state returned is that of its last `plan_context` frames
        (encoded again from position 0), where the planner's imagination starts."""
        game_ids = self._game_ids(obs_t.shape[0])
        # acting reads only Q and the prior: the observation, reward and termination heads are skipped
        out, model_state = self.model(obs_t, act_t, game_ids, world_model=False)
        t = obs_t.shape[1]
        if self.planner is not None and t > self.plan_context:
            keep = self.plan_context
            _, model_state = self.model(obs_t[:, t - keep:], act_t[:, t - keep:], game_ids, world_model=False)
        return model_state, out.q_logits[:, -1], None if out.prior_logits is None else out.prior_logits[:, -1]

    def _episode_groups(self, state: WorldActionState, tokens: np.ndarray) -> list[tuple[np.ndarray, Any]]:
        """Feed each row's pending action and its new frame into the carried core state, one call per slot."""
        groups = []
        for slot in np.unique(state.slot):
            idx = np.flatnonzero(state.slot == slot)
            groups.append((idx, functools.partial(self._episode_q, state, int(slot), idx, tokens[idx])))
        return groups

    def _episode_q(self, state: WorldActionState, slot: int, idx: np.ndarray, tokens: np.ndarray
                   ) -> tuple[WamState, torch.Tensor, torch.Tensor | None]:
        """Rows `idx` (all at position slot `slot`, -1 = fresh): feed the pending action, then the frame
        tokens [G, 36]; updates `state.core`/`state.slot`; returns the rows' state, Q logits and prior logits."""
        per_step, k = self.model.cfg.tokens_per_step, self.model.cfg.tokens_per_obs
        idx_t = torch.as_tensor(idx, device=self.device)
        sub = index_state(state.core, idx_t)
        if slot >= 0:  # the rows have seen a frame: feed the action played after it
            pending = torch.as_tensor(state.pending[idx], device=self.device)  # [G]
            assert (pending >= 0).all(), "episode rows with a frame must have an action to feed"
            *_, sub = self.model.act(pending, WamState(sub.core, slot * per_step + k, sub.game_ids))
        new_slot = min(slot + 1, self.slot_cap)
        q_logits, prior, sub = self.model.observe_with_prior(torch.as_tensor(tokens, device=self.device),
                                                             WamState(sub.core, new_slot * per_step, sub.game_ids))
        state.core = scatter_state(state.core, idx_t, sub)
        state.slot[idx] = new_slot
        return sub, q_logits, prior


# ------------------------------------------------------------------------------------ loading
def load_world_action_agent(path: Path, ckpt: dict[str, Any], game: str, plan: PlannerSettings | None,
                            device: str = "cpu", memory: Memory = "window", context: int | None = None,
                            bf16: bool = False, tokenizer: str | None = None,
                            support_threshold: float | None = None,
                            behaviour_prior: float | None = None) -> WorldActionAgent:
    """The `load_agent` loader of "world-action-model" checkpoints.

    The tokenizer is the one the checkpoint names (`ckpt["tokenizer"]["path"]`), or `tokenizer` when
    given (e.g. after moving run directories); its id must equal the one recorded in the checkpoint.
    `support_threshold` overrides the model's acting filter (`WorldActionModelConfig.support_threshold`),
    `behaviour_prior` its acting weight tau on log pi_b (`WorldActionModelConfig.behaviour_prior`; only for a
    model trained with a prior head).
    """
    from wam.worldmodel.tokenizer import load_tokenizer

    meta = ckpt.get("tokenizer") or {}
    want_id, tok_path = meta.get("id", ""), tokenizer or meta.get("path", "")
    if want_id == "synthetic" and not tokenizer:
        raise WamError(f"{path} was trained on synthetic tokens (no tokenizer); it cannot act on frames")
    if not tok_path:
        raise WamError(f"{path} names no tokenizer; pass tokenizer=RUN (the one the model was trained with)")
    if not Path(tok_path).exists():
        raise WamError(f"the tokenizer {tok_path} named by {path} is not there; pass tokenizer=RUN pointing at it")
    tok = load_tokenizer(tok_path, device=device)
    if want_id and tok.tokenizer_id() != want_id:
        raise WamError(f"tokenizer {tok_path} has id {tok.tokenizer_id()}, but {path} was trained with {want_id}; "
                       "use the tokenizer the model was trained with")
    model, _ = WorldActionModel.from_checkpoint(path, map_location=device)
    if support_threshold is not None:  # the config checks its range
        model.cfg = dataclasses.replace(model.cfg, support_threshold=float(support_threshold))
    if behaviour_prior is not None:
        if model.prior_head is None:
            raise WamError(f"{path} was trained without a behaviour prior head (behaviour_prior 0); "
                           "--behaviour-prior can only reweight a prior the model has")
        if not behaviour_prior > 0:
            raise WamError(f"--behaviour-prior must be > 0 for a model with a prior head, got {behaviour_prior}")
        model.cfg = dataclasses.replace(model.cfg, behaviour_prior=float(behaviour_prior))
    if tok.cfg.codebook_size != model.cfg.vocab_size:
        raise WamError(f"tokenizer {tok_path} has {tok.cfg.codebook_size} codes, the model a vocabulary of "
                       f"{model.cfg.vocab_size}")
    return WorldActionAgent(model, tok, game, plan=plan, memory=memory, context=context, bf16=bf16,
                            checkpoint_id=checkpoint_id(path, int(ckpt.get("step", 0))))


register_agent_loader(CHECKPOINT_KIND, load_world_action_agent)

__all__ = ["RECURRENT_CORES", "WorldActionAgent", "WorldActionState", "load_world_action_agent", "scatter_state"]
