"""The `Agent` interface: one agent acting in N environments of one game at once, with explicit state.

An agent never keeps per-environment data on itself. Everything that belongs to one environment row
(the frame history, a sequence core's recurrent state, a scripted policy's step counter) lives in the
state object the agent returns, so the evaluation loop can hold several independent batches and a
crashed worker can start over from `init_state`:

    state = agent.init_state(n_envs)
    state = agent.reset(state, rows, rngs)                      # rows: bool [N], the rows starting an episode
    actions, state, info = agent.act(state, obs, legal, rngs, ram=ram)
    # obs uint8 [N, 84, 84], legal bool [N, 18], ram uint8 [N, 128] -> actions int64 [N]

Randomness: `rngs` holds one `np.random.Generator` per row, seeded per episode by the evaluation, so
an episode's actions depend on its own seed only, never on which other episodes share its batch or
worker. `act` is *greedy* in the sense of the evaluation protocol: epsilon-greedy exploration is
applied by the evaluation loop (`wam.agents.evaluate`), the same way for every agent.
`info` may carry `"q_values"` (float32 [N, 18], illegal actions as -inf or any value) for videos and
logs; agents may add more keys.

`load_agent(spec, game)` builds an agent from a spec: `random`, `scripted`, or a run directory /
checkpoint file. Checkpoint-backed agents are found by the checkpoint's `kind` in `AGENT_LOADERS`; a
module that implements one (e.g. `wam.agents.world_action`) calls `register_agent_loader(kind, fn)`
at import, and `load_agent` imports the modules listed in `AGENT_MODULES` before looking a kind up.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from wam.datasets.errors import WamError
from wam.planning.beam import PlannerSettings

log = logging.getLogger(__name__)

BASELINE_SPECS: tuple[str, ...] = ("random", "scripted")
"""Agent specs that need no checkpoint (`wam.agents.baselines`)."""

AGENT_MODULES: tuple[str, ...] = ("wam.agents.world_action", "wam.agents.d3rlpy_agent")
"""Modules imported by `load_agent` (when they exist) so that they register their checkpoint kinds."""



@dataclass
class AgentState:
    """State of an agent over N environment rows; agents subclass it to add their per-row data.

    `steps[i]` counts the agent steps since row i was last reset (every agent keeps it up to date
    through `AgentState.advance`/`AgentState.clear`).
    """

    steps: np.ndarray  # int64 [N]

    @classmethod
    def zeros(cls, n_envs: int, **fields: Any) -> AgentState:
        return cls(steps=np.zeros(n_envs, dtype=np.int64), **fields)

    @property
    def n_envs(self) -> int:
        return int(self.steps.shape[0])

    def clear(self, rows: np.ndarray) -> None:
        """Zero the step counters of `rows` (bool [N])."""
        self.steps[rows] = 0

    def advance(self) -> None:
        self.steps += 1


@runtime_checkable
class Agent(Protocol):
    """An agent for one game acting in N environments at once (see the module docstring)."""

    name: str
    """Short name for tables: `random`, `scripted`, `wam-40m`, ..."""
    checkpoint_id: str
    """Identifies the weights (`""` for agents without a checkpoint); recorded with every episode."""
    game: str
    """CamelCase game the agent was built for."""

    def init_state(self, n_envs: int) -> AgentState:
        """A fresh state for `n_envs` rows (every row must still be `reset` before its first `act`)."""
        ...

    def reset(self, state: AgentState, rows: np.ndarray,
              rngs: Sequence[np.random.Generator] | None = None) -> AgentState:
        """Start a new episode in the rows where `rows` (bool [N]) is True; other rows are untouched."""
        ...

    def act(self, state: AgentState, obs: np.ndarray, legal: np.ndarray, rngs: Sequence[np.random.Generator],
            ram: np.ndarray | None = None) -> tuple[np.ndarray, AgentState, dict[str, Any]]:
        """obs uint8 [N, 84, 84], legal bool [N, 18], ram uint8 [N, 128] -> (actions int64 [N], state, info)."""
        ...


AgentLoader = Callable[..., Agent]
"""`loader(path: Path, checkpoint: dict, game: str, plan: PlannerSettings | None, **kwargs) -> Agent`."""

AGENT_LOADERS: dict[str, AgentLoader] = {}
"""checkpoint `kind` -> loader of an agent from such a checkpoint."""


def register_agent_loader(kind: str, loader: AgentLoader) -> None:
    """Make `load_agent` build agents from checkpoints of `kind` with `loader` (duplicates are rejected)."""
    if kind in AGENT_LOADERS and AGENT_LOADERS[kind] is not loader:
        raise ValueError(f"an agent loader for checkpoint kind {kind!r} is already registered")
    AGENT_LOADERS[kind] = loader


def _import_agent_modules() -> None:
    for name in AGENT_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
        else:
            log.debug("agent module %s is not there; its checkpoint kinds are unavailable", name)


def load_agent(spec: str, game: str, plan: PlannerSettings | None = None, **kwargs: Any) -> Agent:
    """Build the agent named by `spec` for `game`.

    `game` may be any accepted spelling; loaders receive the CamelCase name.
    `spec`: `random` (uniform over legal actions), `scripted` (the game's RAM rule from
    `wam.datasets.policies`), or a run directory / checkpoint file whose checkpoint `kind` has a
    registered loader. `plan` is passed to checkpoint agents; the baselines ignore it (logged).
    `kwargs` go to the loader (e.g. `device`, `memory`).
    """
    from wam.agents import baselines
    from wam.datasets.atari import canonical_game

    game = canonical_game(game)
    if spec in BASELINE_SPECS:
        return baselines.make_baseline(spec, game, plan=plan)
    path = Path(spec)
    if not path.exists():
        raise WamError(f"agent {spec!r} is neither {' nor '.join(BASELINE_SPECS)} nor an existing run directory "
                       "or checkpoint file")
    from wam.worldmodel.checkpoint import latest_checkpoint, load_checkpoint

    ckpt_path = latest_checkpoint(path)
    ckpt = load_checkpoint(ckpt_path)
    kind = ckpt.get("kind")
    _import_agent_modules()
    if kind not in AGENT_LOADERS:
        known = ", ".join(sorted(AGENT_LOADERS)) or "none registered yet"
        raise WamError(f"{ckpt_path} holds a {kind!r} checkpoint, which is not an agent; agent checkpoint kinds: {known}")
    log.info("loading %s agent from %s for %s", kind, ckpt_path, game)
    return AGENT_LOADERS[kind](ckpt_path, ckpt, game, plan, **kwargs)


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run directory of a checkpoint file (`RUN/checkpoints/step_N.pt`, or a file directly in RUN)."""
    path = Path(checkpoint)
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def checkpoint_id(path: str | Path, step: int | None = None) -> str:
    """A stable id for a checkpoint file: `<run>/<file>@<step>#<sha256[:12]>` (what evaluation records)."""
    from wam.datasets.files import sha256_file

    path = Path(path)
    at = f"@{step}" if step is not None else ""
    return f"{run_dir_of(path).name}/{path.name}{at}#{sha256_file(path)[:12]}"

