"""Behaviour policies that generate offline data: random, scripted RAM rules, and epsilon mixes.

A behaviour policy sees what an agent acting in a `wam.datasets.atari` env can see, and returns a
full-space (18-action) id that is always legal for the game:

    policy.reset(rng)                              # at the start of every episode
    action = policy.act(obs, ram, legal, rng)      # obs uint8 [84, 84], ram uint8 [128], legal bool [18]

All randomness comes from the `rng` argument, so a collector that seeds one generator per episode
gets reproducible episodes. A trained agent can be a behaviour policy by implementing the same two
methods.

The scripted policies read object positions from the Atari RAM. Addresses follow the AtariARI
annotations (Anand et al. 2019, `atariari/benchmark/ram_annotations.py`) and were checked against
the live emulator (ale-py 0.12.1); the thresholds were tuned on short seeded runs (see
docs/environments.md for the rules and the returns they reach).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from wam.datasets.atari import canonical_game
from wam.datasets.config import preset_value
from wam.datasets.errors import WamError

# Full-space action ids (ALE order, see wam.datasets.atari.ACTION_NAMES).
NOOP, FIRE, UP, RIGHT, LEFT, DOWN = 0, 1, 2, 3, 4, 5
# (x direction, y direction) -> action id, without and with FIRE; +y points down the screen.
_MOVE: dict[tuple[int, int], int] = {
    (0, 0): NOOP, (0, -1): UP, (1, 0): RIGHT, (-1, 0): LEFT, (0, 1): DOWN,
    (1, -1): 6, (-1, -1): 7, (1, 1): 8, (-1, 1): 9,
}
_MOVE_FIRE: dict[tuple[int, int], int] = {
    (0, 0): FIRE, (0, -1): 10, (1, 0): 11, (-1, 0): 12, (0, 1): 13,
    (1, -1): 14, (-1, -1): 15, (1, 1): 16, (-1, 1): 17,
}


@runtime_checkable
class BehaviourPolicy(Protocol):
    """What the collectors call. `act` returns a full-space action id with `legal[action]` True."""

    name: str

    def reset(self, rng: np.random.Generator) -> None:
        """Start a new episode (clear any per-episode state)."""
        ...

    def act(self, obs: np.ndarray, ram: np.ndarray, legal: np.ndarray, rng: np.random.Generator) -> int:
        """obs uint8 [84, 84], ram uint8 [128], legal bool [18] -> action id in 0..17."""
        ...


def uniform_legal_action(legal: np.ndarray, rng: np.random.Generator) -> int:
    """An action id drawn uniformly among the True entries of `legal` (bool [18])."""
    ids = np.flatnonzero(legal)
    assert ids.size > 0, "legal action mask has no legal action"
    return int(ids[rng.integers(ids.size)])


@dataclass
class RandomPolicy:
    """Uniform over the game's legal actions."""

    name: str = "random"

    def reset(self, rng: np.random.Generator) -> None:
        pass

    def act(self, obs: np.ndarray, ram: np.ndarray, legal: np.ndarray, rng: np.random.Generator) -> int:
        return uniform_legal_action(legal, rng)


@dataclass
class EpsilonPolicy:
    """With probability `epsilon` a uniform legal action, otherwise the inner policy's action.

    epsilon = 0 draws nothing from `rng` (it is exactly the inner policy), epsilon = 1 never calls the
    inner policy (it is exactly `RandomPolicy`).
    """

    inner: BehaviourPolicy
    epsilon: float
    name: str = field(init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon <= 1.0:
            raise WamError(f"epsilon must be in [0, 1], got {self.epsilon}")
        self.name = f"{self.inner.name}+eps{self.epsilon:g}"

    def reset(self, rng: np.random.Generator) -> None:
        self.inner.reset(rng)

    def act(self, obs: np.ndarray, ram: np.ndarray, legal: np.ndarray, rng: np.random.Generator) -> int:
        if self.epsilon == 0.0:
            return self.inner.act(obs, ram, legal, rng)
        if self.epsilon == 1.0 or rng.random() < self.epsilon:
            return uniform_legal_action(legal, rng)
        return self.inner.act(obs, ram, legal, rng)


# ------------------------------------------------------------------------------- scripted policies


class ScriptedPolicy:
    """A deterministic rule on the RAM for one game; subclasses define `game` and `rule`."""

    name = "scripted"
    game: str = ""

    def __init__(self) -> None:
        self.t = 0  # agent steps since reset

    def reset(self, rng: np.random.Generator) -> None:
        self.t = 0

    def rule(self, ram: np.ndarray) -> int:
        raise NotImplementedError

    def act(self, obs: np.ndarray, ram: np.ndarray, legal: np.ndarray, rng: np.random.Generator) -> int:
        action = self.rule(ram)
        self.t += 1
        assert legal[action], f"{self.game} script chose illegal action {action}"
        return action


class PongScript(ScriptedPolicy):
    """Keep the paddle's centre at the ball's height (RAM: ball y 54, player paddle y 51).

    In Pong RIGHT moves the paddle up and LEFT down; ball y is 0 while no ball is in play.
    """

    game = "Pong"
    BALL_Y, PADDLE_Y = 54, 51
    PADDLE_CENTRE = 5  # ball y - paddle y when the ball meets the paddle's middle
    DEAD_ZONE = 3

    def rule(self, ram: np.ndarray) -> int:
        ball_y = int(ram[self.BALL_Y])
        if ball_y == 0:
            return NOOP
        gap = ball_y - (int(ram[self.PADDLE_Y]) + self.PADDLE_CENTRE)
        if gap > self.DEAD_ZONE:
            return LEFT  # down
        if gap < -self.DEAD_ZONE:
            return RIGHT  # up
        return NOOP


class BreakoutScript(ScriptedPolicy):
    """FIRE when no ball is in play, else move the paddle under the ball (RAM: ball x 99, y 101, paddle x 72)."""

    game = "Breakout"
    BALL_X, BALL_Y, PADDLE_X = 99, 101, 72
    PADDLE_CENTRE = 6  # ball x - paddle x when the ball is over the paddle's middle
    DEAD_ZONE = 4

    def rule(self, ram: np.ndarray) -> int:
        if int(ram[self.BALL_Y]) == 0:
            return FIRE
        gap = int(ram[self.BALL_X]) - (int(ram[self.PADDLE_X]) + self.PADDLE_CENTRE)
        if gap > self.DEAD_ZONE:
            return RIGHT
        if gap < -self.DEAD_ZONE:
            return LEFT
        return NOOP


class BoxingScript(ScriptedPolicy):
    """Stand `X_GAP` from the opponent, `Y_OFFSET` above or below him, punch on every other step when there.

    RAM: player x 32, y 34, opponent x 33, y 35 (+y is down). Punches land from the side with a
    vertical offset (one glove is above the body's centre, one below), not head-on; FIRE
    freezes the boxer, hence punching only every other step.
    """

    game = "Boxing"
    PLAYER_X, ENEMY_X, PLAYER_Y, ENEMY_Y = 32, 33, 34, 35
    X_GAP, Y_OFFSET, TOLERANCE = 16, 10, 8

    def rule(self, ram: np.ndarray) -> int:
        dx = int(ram[self.ENEMY_X]) - int(ram[self.PLAYER_X])
        dy_centre = int(ram[self.ENEMY_Y]) - int(ram[self.PLAYER_Y])
        dy = dy_centre - (self.Y_OFFSET if dy_centre >= 0 else -self.Y_OFFSET)
        toward = 1 if dx > 0 else -1
        if abs(dx) > self.X_GAP + 2:
            move_x = toward
        elif abs(dx) < self.X_GAP - 2:
            move_x = -toward
        else:
            move_x = 0
        move_y = 0 if abs(dy) <= 1 else (1 if dy > 0 else -1)
        in_range = abs(dy) <= self.TOLERANCE and abs(abs(dx) - self.X_GAP) <= self.TOLERANCE
        punch = in_range and self.t % 2 == 0
        return (_MOVE_FIRE if punch else _MOVE)[(move_x, move_y)]


class FreewayScript(ScriptedPolicy):
    """Always UP: the chicken crosses whenever it is not knocked back (RAM not needed)."""

    game = "Freeway"

    def rule(self, ram: np.ndarray) -> int:
        return UP


_SCRIPTS: dict[str, type[ScriptedPolicy]] = {
    cls.game: cls for cls in (PongScript, BreakoutScript, BoxingScript, FreewayScript)
}
SCRIPTED_GAMES: tuple[str, ...] = tuple(sorted(_SCRIPTS))
"""CamelCase names of the games that have a scripted policy."""


def scripted_policy(game: str) -> ScriptedPolicy:
    """The scripted RAM policy of `game`; WamError listing `SCRIPTED_GAMES` when it has none."""
    name = canonical_game(game)
    if name not in _SCRIPTS:
        raise WamError(
            f"no scripted policy for {name}; scripted policies exist for {', '.join(SCRIPTED_GAMES)} "
            "(use policy 'random' for other games)"
        )
    return _SCRIPTS[name]()


_FACTORIES: dict[str, Callable[[str], BehaviourPolicy]] = {
    "random": lambda game: RandomPolicy(),
    "scripted": scripted_policy,
}


def make_policy(name: str, game: str, epsilon: float = 0.0) -> BehaviourPolicy:
    """Behaviour policy `name` (`random` or `scripted`) for `game`, mixed with `epsilon` random actions."""
    canonical_game(game)  # a bad game name fails here for every policy, not only scripted ones
    inner = preset_value(_FACTORIES, name, what="behaviour policy")(game)
    if epsilon == 0.0:
        return inner
    return EpsilonPolicy(inner, epsilon)

