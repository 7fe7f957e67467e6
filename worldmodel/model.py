"""The world-action model (JOWA): one causal sequence model that is a world model and a Q-function.

Sequence layout: per timestep the 36 observation tokens of the frame, then the action taken,
`[z1 .. z36, a]` = 37 tokens. A training segment of H steps has H+1 frames (the last one is the
successor of step H-1, so TD targets can bootstrap from it), i.e. L = 37 H + 36 tokens:

    o_0: z1..z36, a_0, o_1: z1..z36, a_1, ..., a_{H-1}, o_H: z1..z36

Input = token embedding (separate observation and action tables) + learned position embedding +
task (game) embedding (separate observation and action tables, one row per game). The core is any
registered sequence core (`build_core`). Heads, on the core's output after a final LayerNorm:

- next observation token: from every position, logits over the codebook of the token that follows
  (used where the next token is an observation token);
- reward (3 classes: sign -1/0/+1) and termination (2 classes): from each action token;
- Q: from the last observation token of each frame, C51 logits `[E, 18, n_atoms]` on a fixed support
  (an MLP with LayerNorm + Mish per ensemble member). A target copy of the Q head (`target_q_head`,
  never trained, updated by `update_target()`: hard, or Polyak-averaged) gives TD targets from the same features.

Incremental use (acting, planning) runs the same computation token by token with an explicit
`WamState`: `init_state` -> `observe(frame tokens)` -> Q; `act(action)` -> reward, termination and
the first next-token logits; `decode_next_obs` imagines the next frame greedily with `core.step`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from wam.datasets.errors import WamError
from wam.worldmodel.checkpoint import config_from_dict, config_to_dict, load_checkpoint
from wam.worldmodel.cores.base import build_core
from wam.worldmodel.cores.transformer import init_linear
from wam.worldmodel.heads import QEnsemble, mlp_head
from wam.worldmodel.model_config import (
    CHECKPOINT_KIND,
    FREEZABLE_PARTS,
    INITS,
    MODEL_PRESETS,
    NUM_ACTIONS,
    REWARD_CLASSES,
    WorldActionModelConfig,
)

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------- outputs
@dataclass
class WorldActionOutput:
    """What one forward pass over a token sequence gives (T frames, T or T-1 actions, L tokens)."""

    obs_logits: torch.Tensor | None  # [B, L, V] logits of the observation token that follows each position
    reward_logits: torch.Tensor | None  # [B, A, 3] at each action token (A actions in the sequence)
    termination_logits: torch.Tensor | None  # [B, A, 2]  (these three are None when world_model=False)
    q_logits: torch.Tensor  # [B, T, E, 18, n_atoms] at the last observation token of each frame
    target_q_logits: torch.Tensor | None  # [B, T, E, 18, n_atoms] from the target head (no grad), or None
    prior_logits: torch.Tensor | None = None  # [B, T, 18] behaviour-prior logits there (models with a prior head)


@dataclass
class WamState:
    """Incremental state: the core's state, the position of the next token and each row's game."""

    core: Any
    pos: int  # position (index into the position table) of the next token; the same for every row
    game_ids: torch.Tensor  # [B] int64, rows of the task tables

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> WamState:
        """A new state with `fn` applied to every per-row tensor (batch at dim 0), e.g. `lambda t: t[idx]`
        to repeat rows for a beam, or `lambda t: t.detach()`. Every core state offers `map_tensors`."""
        return WamState(self.core.map_tensors(fn), self.pos, fn(self.game_ids))


# ------------------------------------------------------------------------------------------ model
class WorldActionModel(nn.Module):
    """JOWA's world-action model over any sequence core. See the module docstring."""

    def __init__(self, cfg: WorldActionModelConfig) -> None:
        super().__init__()
        if not cfg.games:
            raise WamError("WorldActionModelConfig.games is empty; the model needs one task row per game")
        if cfg.init not in INITS:
            raise WamError(f"init must be one of {', '.join(INITS)}, got {cfg.init!r}")
        self.cfg = cfg
        d = cfg.d_model
        self.obs_embedding = nn.Embedding(cfg.vocab_size, d)
        self.action_embedding = nn.Embedding(NUM_ACTIONS, d)
        self.pos_embedding = nn.Embedding(cfg.max_tokens, d)
        self.task_obs_embedding = nn.Embedding(len(cfg.games), d)
        self.task_action_embedding = nn.Embedding(len(cfg.games), d)
        self.drop = nn.Dropout(cfg.dropout)
        self.core = build_core(cfg.core, d_model=d, n_layers=cfg.n_layers, **self._core_kwargs(cfg))
        self.ln_f = nn.LayerNorm(d)
        self.obs_head = mlp_head(d, cfg.vocab_size)
        self.reward_head = mlp_head(d, REWARD_CLASSES)
        self.termination_head = mlp_head(d, 2)
        self.q_head = QEnsemble(cfg)
        self.prior_head = mlp_head(d, NUM_ACTIONS) if cfg.behaviour_prior > 0 else None
        heads = [self.obs_head, self.reward_head, self.termination_head] + ([self.prior_head] if self.prior_head else [])
        for m in (self.obs_embedding, self.action_embedding, self.pos_embedding, self.task_obs_embedding,
                  self.task_action_embedding, *heads, self.q_head):
            m.apply(functools.partial(_init_weights, scheme=cfg.init, d_model=d))
        for head in heads:  # outputs start near uniform
            nn.init.normal_(head[-1].weight, mean=0.0, std=0.02)
        support = torch.linspace(cfg.v_min, cfg.v_max, cfg.n_atoms)
        self.q_head.calibrate(torch.linspace(cfg.v_min, cfg.v_max, cfg.n_atoms, device="cpu"), cfg.q_init)
        self.target_q_head = QEnsemble(cfg)
        self.target_q_head.requires_grad_(False)
        self.update_target()
        self.register_buffer("support", support, persistent=False)

    @staticmethod
    def _core_kwargs(cfg: WorldActionModelConfig) -> dict[str, Any]:
        """Options of the core: n_heads/dropout/max_len where the core takes them, positions='none' for the
        transformer (the model has its own learned positions), then `core_options` (which win)."""
        from wam.worldmodel.cores.base import core_class

        params = inspect.signature(core_class(cfg.core)).parameters
        kwargs: dict[str, Any] = {}
        for key, value in (("n_heads", cfg.n_heads), ("dropout", cfg.dropout), ("max_len", cfg.max_tokens),
                           ("positions", "none"), ("init", cfg.init)):
            if key in params:
                kwargs[key] = value
        kwargs.update(cfg.parsed_core_options())
        return kwargs

    # ------------------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def count_parameters(self, part: str = "backbone+heads") -> int:
        """Parameters of `backbone+heads` (core + heads, the paper's count; no embeddings, no target head),
        `embeddings` or `all` (without the target head)."""
        emb = sum(p.numel() for n, p in self.named_parameters() if "embedding" in n)
        total = sum(p.numel() for n, p in self.named_parameters() if not n.startswith("target_q_head"))
        if part == "backbone+heads":
            return total - emb
        if part == "embeddings":
            return emb
        assert part == "all", f"unknown part {part!r}"
        return total

    def flops_per_token(self, world_model: bool = True) -> float:
        """Model FLOPs of one training step per sequence token (forward + backward = 6 x parameters used).

        The core, final norm and observation head run on every token; the reward, termination and Q heads
        on one token in 37 (the target head forward only: 2 x). The transformer adds its attention scores
        (QK^T and AV, causal: 6 x layers x L x d). Other cores count their parameters only (their scans'
        element-wise work is not counted). `world_model=False`: without the observation, reward and
        termination heads (objectives `q-only` and `bc`).
        """
        def n(m: nn.Module) -> int:
            return sum(p.numel() for p in m.parameters())

        wm = world_model
        every = n(self.core) + n(self.ln_f) + (n(self.obs_head) if wm else 0)
        sparse = (n(self.reward_head) + n(self.termination_head) if wm else 0) + n(self.q_head)
        flops = 6.0 * every + (6.0 * sparse + 2.0 * n(self.q_head)) / self.cfg.tokens_per_step
        if self.cfg.core == "transformer":
            flops += 6.0 * self.cfg.n_layers * self.cfg.max_tokens * self.cfg.d_model
        return flops

    @torch.no_grad()
    def update_target(self, tau: float = 1.0) -> None:
        """Target Q head <- (1 - tau) target + tau Q head: a hard copy with tau = 1 (default), Polyak averaging
        with 0 < tau < 1."""
        if tau >= 1.0:
            self.target_q_head.load_state_dict(self.q_head.state_dict())
            return
        for t, o in zip(self.target_q_head.state_dict().values(), self.q_head.state_dict().values()):
            if t.is_floating_point():
                t.lerp_(o.to(t.dtype), tau)
            else:
                t.copy_(o)

    def freeze(self, parts: tuple[str, ...]) -> None:
        """Stop training the named parts (see FREEZABLE_PARTS). Task embeddings always stay trainable."""
        groups = {
            "embeddings": (self.obs_embedding, self.action_embedding, self.pos_embedding),
            "core": (self.core, self.ln_f), "obs_head": (self.obs_head,), "reward_head": (self.reward_head,),
            "termination_head": (self.termination_head,),
            "q_head": (self.q_head,) + ((self.prior_head,) if self.prior_head is not None else ()),
        }
        for part in parts:
            if part not in groups:
                raise WamError(f"cannot freeze {part!r}; choose from {', '.join(FREEZABLE_PARTS)}")
            for m in groups[part]:
                m.requires_grad_(False)
        log.info("frozen: %s", ", ".join(parts) if parts else "nothing")

    @torch.no_grad()
    def recalibrate_q(self) -> None:
        """Restart the Q head's output layer at E[Q] = cfg.q_init for every action (as at construction) and copy
        it to the target head; the trunk and the head's hidden layers keep what they learned."""
        support = torch.linspace(self.cfg.v_min, self.cfg.v_max, self.cfg.n_atoms, device="cpu")
        self.q_head.calibrate(support, self.cfg.q_init)
        self.target_q_head.load_state_dict(self.q_head.state_dict())

    def add_game(self, name: str) -> int:
        """Give a new game a task-embedding row (initialised to the mean of the existing rows); its index."""
        if name in self.cfg.games:
            return self.cfg.games.index(name)
        for attr in ("task_obs_embedding", "task_action_embedding"):
            old: nn.Embedding = getattr(self, attr)
            new = nn.Embedding(old.num_embeddings + 1, old.embedding_dim, device=old.weight.device,
                               dtype=old.weight.dtype)
            with torch.no_grad():
                new.weight[:-1] = old.weight
                new.weight[-1] = old.weight.mean(0)
            new.weight.requires_grad_(old.weight.requires_grad)
            setattr(self, attr, new)
        self.cfg = dataclasses.replace(self.cfg, games=(*self.cfg.games, name))
        return len(self.cfg.games) - 1

    # ------------------------------------------------------------------------------ embeddings
    def _embed_obs(self, tokens: torch.Tensor, game_ids: torch.Tensor) -> torch.Tensor:
        """tokens [B, ..., K] -> [B, ..., K, D] (token + task; no position)."""
        task = self.task_obs_embedding(game_ids)  # [B, D]
        task = task.view(task.shape[0], *([1] * (tokens.dim() - 1)), task.shape[-1])
        return self.obs_embedding(tokens) + task

    def _embed_actions(self, actions: torch.Tensor, game_ids: torch.Tensor) -> torch.Tensor:
        """actions [B, ...] -> [B, ..., D]."""
        task = self.task_action_embedding(game_ids)
        task = task.view(task.shape[0], *([1] * (actions.dim() - 1)), task.shape[-1])
        return self.action_embedding(actions) + task

    def embed_sequence(self, obs_tokens: torch.Tensor, actions: torch.Tensor, game_ids: torch.Tensor,
                       pos: int = 0) -> torch.Tensor:
        """Interleave T frames and A in {T-1, T} actions into [B, L, D] input vectors, L = 36 T + A."""
        b, t, k = obs_tokens.shape
        a = actions.shape[1]
        assert k == self.cfg.tokens_per_obs, f"expected {self.cfg.tokens_per_obs} tokens per frame, got {k}"
        assert a in (t - 1, t), f"need T-1 or T actions for T={t} frames, got {a}"
        obs = self._embed_obs(obs_tokens, game_ids)  # [B, T, K, D]
        act = self._embed_actions(actions, game_ids)  # [B, A, D]
        if a == t - 1:
            act = F.pad(act, (0, 0, 0, 1))  # placeholder for the missing last action, cut below
        x = torch.cat([obs, act[:, :, None]], dim=2).flatten(1, 2)  # [B, T*(K+1), D]
        length = t * k + a
        x = x[:, :length]
        if pos + length > self.cfg.max_tokens:
            raise WamError(f"sequence positions {pos}..{pos + length - 1} exceed the model's context of "
                           f"{self.cfg.max_tokens} tokens ({self.cfg.horizon + 1} frames); re-encode a shorter window")
        return self.drop(x + self.pos_embedding.weight[pos:pos + length])

    # --------------------------------------------------------------------------------- forward
    def forward(self, obs_tokens: torch.Tensor, actions: torch.Tensor, game_ids: torch.Tensor,
                state: WamState | None = None, with_target: bool = False, world_model: bool = True
                ) -> tuple[WorldActionOutput, WamState]:
        """Parallel forward over T frames and T-1 (or T) actions, continuing `state` if given.

        obs_tokens [B, T, 36] int64, actions [B, A] int64 (A = T-1 or T), game_ids [B] int64.
        `world_model=False` skips the observation, reward and termination heads (their outputs are None):
        objectives that train only the Q head (`q-only`, `bc`) neither pay for nor touch them.
        Returns the heads' outputs and the state after the last token.
        """
        b, t, k = obs_tokens.shape
        a = actions.shape[1]
        if state is None:
            state = self.init_state(game_ids)
        x = self.embed_sequence(obs_tokens, actions, game_ids, state.pos)  # [B, L, D]
        y, core_state = self.core(x, state.core)
        h = self.ln_f(y)  # [B, L, D]
        length = h.shape[1]
        hp = F.pad(h, (0, 0, 0, t * (k + 1) - length)).view(b, t, k + 1, -1)  # [B, T, 37, D]
        q_feat = hp[:, :, k - 1]  # [B, T, D] last observation token of each frame
        act_feat = hp[:, :a, k]  # [B, A, D] action tokens
        q_logits = self.q_head(q_feat)
        prior = self.prior_head(q_feat) if self.prior_head is not None else None
        target = None
        if with_target:
            with torch.no_grad():
                target = self.target_q_head(q_feat.detach())
        out = WorldActionOutput(
            obs_logits=self.obs_head(h) if world_model else None,
            reward_logits=self.reward_head(act_feat) if world_model else None,
            termination_logits=self.termination_head(act_feat) if world_model else None,
            q_logits=q_logits, target_q_logits=target, prior_logits=prior)
        return out, WamState(core_state, state.pos + length, state.game_ids)

    # ----------------------------------------------------------------------------- incremental
    def init_state(self, game_ids: torch.Tensor) -> WamState:
        """An empty state for len(game_ids) rows (game_ids [B] int64)."""
        p = self.ln_f.weight
        return WamState(self.core.init_state(game_ids.shape[0], device=p.device, dtype=p.dtype), 0, game_ids)

    def _step(self, x: torch.Tensor, state: WamState) -> tuple[torch.Tensor, WamState]:
        """Feed one input vector x [B, D] (position added here); returns the normed output [B, D]."""
        if state.pos >= self.cfg.max_tokens:
            raise WamError(f"position {state.pos} is past the model's context of {self.cfg.max_tokens} tokens; "
                           "re-encode a shorter window")
        x = self.drop(x + self.pos_embedding.weight[state.pos])
        y, core_state = self.core.step(x, state.core)
        return self.ln_f(y), WamState(core_state, state.pos + 1, state.game_ids)

    def observe(self, tokens: torch.Tensor, state: WamState) -> tuple[torch.Tensor, WamState]:
        """Feed one frame's tokens [B, 36] (parallel form); returns Q logits [B, E, 18, n_atoms] at its last token."""
        q_logits, _, state = self.observe_with_prior(tokens, state)
        return q_logits, state

    def observe_with_prior(self, tokens: torch.Tensor, state: WamState
                           ) -> tuple[torch.Tensor, torch.Tensor | None, WamState]:
        """`observe`, also returning the behaviour prior's logits [B, 18] at the frame (None without a prior head)."""
        out, state = self.forward(tokens[:, None], tokens.new_zeros(tokens.shape[0], 0), state.game_ids, state,
                                  world_model=False)
        return out.q_logits[:, 0], None if out.prior_logits is None else out.prior_logits[:, 0], state

    def act(self, action: torch.Tensor, state: WamState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, WamState]:
        """Feed action [B]; returns reward logits [B, 3], termination logits [B, 2], the logits of the next
        frame's first token [B, V] and the new state."""
        h, state = self._step(self._embed_actions(action, state.game_ids), state)
        return self.reward_head(h), self.termination_head(h), self.obs_head(h), state

    @torch.no_grad()
    def decode_next_obs(self, first_logits: torch.Tensor, state: WamState) -> tuple[torch.Tensor, torch.Tensor, WamState]:
        """Greedy token-by-token imagination of the next frame with `core.step`.

        first_logits [B, V] (from `act`). Returns tokens [B, 36], the Q logits [B, E, 18, n_atoms] at
        the imagined frame's last token, and the state after all 36 tokens.
        """
        tokens, q_logits, _, state = self.imagine_next_obs(first_logits, state)
        return tokens, q_logits, state

    def imagine_next_obs(self, first_logits: torch.Tensor, state: WamState
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, WamState]:
        """`decode_next_obs` plus the behaviour prior's logits [B, 18] at the imagined frame's last token (None
        for a model without a prior head): (tokens, Q logits, prior logits, state)."""
        logits, tokens = first_logits, []
        h = torch.empty(0)
        for i in range(self.cfg.tokens_per_obs):
            tok = logits.argmax(-1)  # [B]
            tokens.append(tok)
            h, state = self._step(self._embed_obs(tok, state.game_ids), state)
            if i + 1 < self.cfg.tokens_per_obs:
                logits = self.obs_head(h)
        prior = self.prior_head(h) if self.prior_head is not None else None
        return torch.stack(tokens, 1), self.q_head(h), prior, state

    # -------------------------------------------------------------------------------- Q values
    def expected_q(self, q_logits: torch.Tensor) -> torch.Tensor:
        """C51 logits [..., n_atoms] -> expected values [...] (float32)."""
        return (q_logits.float().softmax(-1) * self.support).sum(-1)

    def q_values(self, q_logits: torch.Tensor, legal_actions: torch.Tensor) -> torch.Tensor:
        """Acting values [B, 18]: mean over the ensemble of the expected Q; illegal actions are -inf.

        q_logits [B, E, 18, n_atoms]; legal_actions [B, 18] bool.
        """
        q = self.expected_q(q_logits).mean(-2)  # [B, 18]
        return q.masked_fill(~legal_actions, float("-inf"))

    def acting_values(self, q_logits: torch.Tensor, legal_actions: torch.Tensor,
                      prior_logits: torch.Tensor | None = None) -> torch.Tensor:
        """What acting maximises [B, 18]: `q_values`, plus `behaviour_prior` * log pi_b(a | s) (the prior head's
        log-probabilities over the legal actions) when the model has a prior and `prior_logits` [B, 18] are given."""
        q = self.q_values(q_logits, legal_actions)
        tau = self.cfg.behaviour_prior
        if prior_logits is None or tau <= 0:
            return q
        logp = prior_logits.float().masked_fill(~legal_actions, float("-inf")).log_softmax(-1)
        value = q + tau * logp.masked_fill(~legal_actions, 0.0)
        if self.cfg.support_threshold > 0:  # only what the data supports: pi_b(a) >= threshold * max pi_b
            floor = logp.max(-1, keepdim=True).values + math.log(self.cfg.support_threshold)
            value = value.masked_fill(logp < floor, float("-inf"))
        return value

    # ------------------------------------------------------------------------------ checkpoint
    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu"
                        ) -> tuple[WorldActionModel, dict[str, Any]]:
        """Rebuild a model from a world-action-model checkpoint (file or run directory); returns (model, ckpt)."""
        ckpt = load_checkpoint(path, kind=CHECKPOINT_KIND)
        cfg = config_from_dict(WorldActionModelConfig, ckpt["config"]["model"])
        model = cls(cfg)
        model.load_state_dict(ckpt["model"])
        return model.to(map_location), ckpt

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.cfg)


def _init_weights(module: nn.Module, scheme: str = "gpt2", d_model: int = 768) -> None:
    """`gpt2`: N(0, 0.02) weights; `scaled`: embeddings N(0, 1/sqrt(d_model)), linear layers Xavier-uniform.
    Linear biases zero."""
    if isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02 if scheme == "gpt2" else d_model ** -0.5)
    if isinstance(module, nn.Linear):
        init_linear(module, scheme)


__all__ = ["CHECKPOINT_KIND", "MODEL_PRESETS", "WamState", "WorldActionModel", "WorldActionModelConfig",
           "WorldActionOutput"]
