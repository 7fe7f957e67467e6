"""Baseline agents without a checkpoint: `random` and `scripted` (the behaviour policies of `wam.datasets.policies`).

Both wrap one `BehaviourPolicy` per environment row (the scripted rules count steps, so each row needs
its own). They ignore planning settings: there is no model to plan with (logged once when given).
Epsilon-greedy exploration is added by the evaluation loop, so the policies are built with epsilon 0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wam.agents.base import AgentState
from wam.datasets.atari import canonical_game
from wam.datasets.errors import WamError
from wam.datasets.policies import BehaviourPolicy, make_policy
from wam.planning.beam import PlannerSettings

log = logging.getLogger(__name__)


@dataclass
class PolicyState(AgentState):
    """Per-row behaviour policies (each keeps its own episode counters)."""

    policies: list[BehaviourPolicy] = field(default_factory=list)


class PolicyAgent:
    """An `Agent` that plays a behaviour policy (`random` or `scripted`) in every row."""

    checkpoint_id = ""

    def __init__(self, policy: str, game: str) -> None:
        self.name = policy
        self.game = canonical_game(game)
        make_policy(policy, self.game)  # fail now (e.g. no script for this game), not inside a worker

    def init_state(self, n_envs: int) -> PolicyState:
        policies = [make_policy(self.name, self.game, epsilon=0.0) for _ in range(n_envs)]
        return PolicyState(steps=np.zeros(n_envs, dtype=np.int64), policies=policies)

    def reset(self, state: PolicyState, rows: np.ndarray,
              rngs: Sequence[np.random.Generator] | None = None) -> PolicyState:
        for i in np.flatnonzero(rows):
            rng = rngs[i] if rngs is not None else np.random.default_rng(0)
            state.policies[i].reset(rng)
        state.clear(rows)
        return state

    def act(self, state: PolicyState, obs: np.ndarray, legal: np.ndarray, rngs: Sequence[np.random.Generator],
            ram: np.ndarray | None = None) -> tuple[np.ndarray, PolicyState, dict[str, Any]]:
        n = state.n_envs
        assert obs.shape[0] == n and legal.shape == (n, 18), f"obs {obs.shape} / legal {legal.shape} for {n} rows"
        if ram is None:
            if self.name == "scripted":
                raise WamError("the scripted agent reads the Atari RAM; pass ram=[N, 128] to act()")
            ram = np.zeros((n, 128), dtype=np.uint8)
        actions = np.fromiter((state.policies[i].act(obs[i], ram[i], legal[i], rngs[i]) for i in range(n)),
                              dtype=np.int64, count=n)  # [N]
        state.advance()
        return actions, state, {}


def make_baseline(spec: str, game: str, plan: PlannerSettings | None = None) -> PolicyAgent:
    """The `random` or `scripted` agent for `game` (planning settings are ignored, with a log line)."""
    if plan is not None:
        log.info("agent %r has no model to plan with: ignoring planning settings %s", spec, plan.as_dict())
    return PolicyAgent(spec, game)
