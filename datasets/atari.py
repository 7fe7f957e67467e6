"""Atari environments with wam's fixed preprocessing and named evaluation protocols.

Every env built here has the same interface, whatever the game and protocol:

- observation: one 84x84 grayscale frame, uint8 `[84, 84]`: the pixel-wise max of the last two raw
  frames of the 4-frame skip, resized with `cv2.INTER_AREA` (Dopamine / gymnasium
  `AtariPreprocessing` conventions); no frame stacking (the sequence model supplies the history);
- actions: the FULL 18-action ALE set (`ACTION_NAMES`); each game's minimal action set is given as
  a boolean mask `legal_action_mask(game)` / `env.legal_action_mask` over those 18 ids;
- rewards: raw game score differences (never clipped here);
- no noop starts, no fire-on-reset, no life-loss termination; `info["lives"]` carries the lives;
- sticky-action probability and the episode cap (in agent steps; reaching it gives
  `truncated=True`) come from the `Protocol` (`PROTOCOLS["jowa"]`, `PROTOCOLS["machado"]`).

The env talks to `ale_py.ALEInterface` directly rather than stacking gymnasium wrappers
(`gym.make(...)` + `AtariPreprocessing` + `TimeLimit`): grayscale screens only (no RGB copy per
emulator frame), an exact max-pool when an episode ends inside the frame skip (gymnasium's wrapper
then returns the previous step's frames), and the RAM (`get_ram(env)`) at hand for scripted
policies. Apart from that terminal frame, observations equal gymnasium's wrapper pixel for pixel
(tested).
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
from dataclasses import dataclass
from typing import Any

import ale_py
import ale_py.roms
import cv2
import gymnasium as gym
import numpy as np
from ale_py.registration import rom_id_to_name
from gymnasium import spaces

from wam.datasets.config import preset_value
from wam.datasets.errors import WamError

log = logging.getLogger(__name__)

NUM_ACTIONS = 18
"""Size of the full ALE action space, shared by every game."""

_ALE_ACTIONS: tuple[ale_py.Action, ...] = tuple(ale_py.Action(i) for i in range(NUM_ACTIONS))
ACTION_NAMES: tuple[str, ...] = tuple(action.name for action in _ALE_ACTIONS)
"""Meaning of each full-space action id: `ACTION_NAMES[3] == "RIGHT"`."""
assert len(ACTION_NAMES) == NUM_ACTIONS, f"ale_py has {len(ACTION_NAMES)} actions, expected 18"

FRAME_SKIP = 4
"""Emulator frames per agent step; the observation max-pools the last two of them."""
SCREEN_SIZE = 84
"""Side of the square grayscale observation."""


@dataclass(frozen=True)
class Protocol:
    """A named evaluation protocol: how the emulator is configured and when an episode is cut."""

    name: str
    sticky_action_prob: float
    """ALE `repeat_action_probability`: chance, per emulator frame, of repeating the previous action."""
    max_agent_steps: int
    """Episode cap in agent steps (each = `FRAME_SKIP` emulator frames); reaching it truncates."""
    eval_epsilon: float
    """Epsilon of the epsilon-greedy agent at evaluation time."""


PROTOCOLS: dict[str, Protocol] = {
    # JOWA's evaluation code: Dopamine-style env, no sticky actions, 108,000 agent steps, eps 0.001.
    "jowa": Protocol("jowa", sticky_action_prob=0.0, max_agent_steps=108_000, eval_epsilon=0.001),
    # Machado et al. 2018: sticky actions 0.25 and 108,000 emulator frames = 27,000 agent steps.
    # The paper reports scores averaged during training and fixes no evaluation epsilon; wam reads
    # it as Dopamine does (Dopamine runs Machado's sticky-action settings with epsilon_eval 0.001),
    # so the two protocols differ only in the emulator settings and the cap.
    "machado": Protocol("machado", sticky_action_prob=0.25, max_agent_steps=27_000, eval_epsilon=0.001),
}


def get_protocol(name: str) -> Protocol:
    """The protocol called `name`; a WamError listing the known ones otherwise."""
    return preset_value(PROTOCOLS, name, what="protocol")


# --------------------------------------------------------------------------------------- game names


def _squash(name: str) -> str:
    """Lower case without separators: `Space_Invaders`, `space-invaders` -> `spaceinvaders`."""
    return re.sub(r"[\s_\-]", "", name).lower()


@functools.lru_cache(maxsize=1)
def _games_by_key() -> dict[str, str]:
    """squashed name -> ROM id (snake case) for every ROM that ale-py ships."""
    return {_squash(rom): rom for rom in ale_py.roms.get_all_rom_ids()}


def _rom_id(game: str) -> str:
    """The ale-py ROM id (`space_invaders`) of any accepted spelling of a game name."""
    name = game.strip()
    name = re.sub(r"^ALE/", "", name)
    name = re.sub(r"(NoFrameskip|Deterministic)?-v\d+$", "", name)
    key = _squash(name)
    games = _games_by_key()
    if key in games:
        return games[key]
    close = difflib.get_close_matches(key, list(games), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(rom_id_to_name(games[k]) for k in close)}?" if close else (
        "see wam.datasets.atari.all_games() for the names"
    )
    raise WamError(f"unknown Atari game {game!r}; {hint}")


def canonical_game(name: str) -> str:
    """The ALE CamelCase name of a game: `pong`, `ALE/Pong-v5` -> `Pong`; `space_invaders` -> `SpaceInvaders`.

    Raises WamError for a name that matches no ROM shipped with ale-py, suggesting close matches.
    """
    return rom_id_to_name(_rom_id(name))


def game_rom_id(name: str) -> str:
    """The snake-case ROM id ale-py and score tables use: `SpaceInvaders` -> `space_invaders`."""
    return _rom_id(name)


def all_games() -> list[str]:
    """CamelCase names of every ROM that ale-py ships (sorted)."""
    return sorted(rom_id_to_name(rom) for rom in _games_by_key().values())


# ---------------------------------------------------------------------------------- action masks


def _new_ale(sticky_action_prob: float) -> ale_py.ALEInterface:
    """A quiet ALEInterface with its sticky-action probability set; no ROM loaded yet.

    ALE reads its settings when a ROM is loaded, so they must be made before `loadROM`.
    """
    ale = ale_py.ALEInterface()
    ale.setLoggerMode(ale_py.LoggerMode.Error)
    ale.setFloat("repeat_action_probability", float(sticky_action_prob))
    return ale


@functools.cache
def _cached_mask(rom_id: str) -> np.ndarray:
    ale = _new_ale(sticky_action_prob=0.0)
    ale.loadROM(ale_py.roms.get_rom_path(rom_id))
    mask = np.zeros(NUM_ACTIONS, dtype=np.bool_)
    mask[[action.value for action in ale.getMinimalActionSet()]] = True
    mask.setflags(write=False)
    return mask


def legal_action_mask(game: str) -> np.ndarray:
    """bool `[18]`: True for the full-space action ids in the game's minimal action set (read-only)."""
    return _cached_mask(_rom_id(game))


# ------------------------------------------------------------------------------------------- env


class AtariEnv(gym.Env):
    """One ALE game behind wam's preprocessing (see the module docstring); build it with `make_env`.

    Attributes beside the gymnasium ones: `game` (CamelCase), `protocol`, `max_episode_steps`,
    `legal_action_mask` (bool `[18]`, read-only) and `ale` (the live `ale_py.ALEInterface`).
    """

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(
        self,
        game: str,
        protocol: str | Protocol = "jowa",
        seed: int = 0,
        max_episode_steps: int | None = None,
        render_mode: str | None = None,
    ):
        self.protocol = protocol if isinstance(protocol, Protocol) else get_protocol(protocol)
        self.rom_id = game_rom_id(game)
        self.game = rom_id_to_name(self.rom_id)
        self.max_episode_steps = int(self.protocol.max_agent_steps if max_episode_steps is None else max_episode_steps)
        if self.max_episode_steps <= 0:
            raise WamError(f"max_episode_steps must be positive, got {max_episode_steps}")
        if render_mode not in (None, "rgb_array"):
            raise WamError(f"render_mode {render_mode!r} is not supported; use None or 'rgb_array'")
        self.render_mode = render_mode

        # OpenCV resizes with its own thread pool; for one 210x160 frame that only steals the cores that
        # other environments (Ray workers) run on: 2 workers were no faster than 1 on 2 cores.
        cv2.setNumThreads(1)
        self.ale = _new_ale(self.protocol.sticky_action_prob)
        self._seed_and_load(seed)
        self.legal_action_mask = legal_action_mask(self.game)  # bool [18], shared and read-only

        self.action_space = spaces.Discrete(NUM_ACTIONS)
        self.observation_space = spaces.Box(0, 255, shape=(SCREEN_SIZE, SCREEN_SIZE), dtype=np.uint8)
        height, width = self.ale.getScreenDims()
        # The last two raw grayscale frames of the skip; `_frames[self._newest]` is the latest.
        self._frames = np.zeros((2, height, width), dtype=np.uint8)  # [2, 210, 160]
        self._newest = 0
        self._steps = 0

    # -- seeding ---------------------------------------------------------------------------------

    def _seed_and_load(self, seed: int) -> None:
        """Seed the ALE (sticky actions, game randomness) and gymnasium's `np_random`, then (re)load the ROM.

        Same derivation as ale-py's own `AtariEnv.seed_game`, so a seed means the same thing here.
        """
        np_seed, ale_seed = np.random.SeedSequence(seed).generate_state(n_words=2)
        self._np_random, _ = gym.utils.seeding.np_random(int(np_seed))
        if self.protocol.sticky_action_prob == 0.0 and getattr(self, "_rom_loaded", False):
            # Without sticky actions the ALE's RNG is never drawn from, so reloading the ROM (~0.1 s, as
            # long as a short episode) would change nothing: `reset_game` alone replays exactly.
            return
        self.ale.setInt("random_seed", int(np.int32(ale_seed)))
        self.ale.loadROM(ale_py.roms.get_rom_path(self.rom_id))
        self._rom_loaded = True

    # -- gymnasium API ---------------------------------------------------------------------------

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start a new episode; `seed` reseeds the emulator so the episode replays exactly."""
        super().reset(seed=None, options=options)
        if seed is not None:
            self._seed_and_load(seed)
        self.ale.reset_game()
        self._steps = 0
        self._newest = 0
        self.ale.getScreenGrayscale(self._frames[0])
        self._frames[1] = self._frames[0]
        return self._observation(), self._info()

    def step(self, action: int):
        """One agent step: `action` (full-space id, 0..17) for `FRAME_SKIP` emulator frames."""
        if not 0 <= int(action) < NUM_ACTIONS:
            raise ValueError(f"action {action} is outside the full action space 0..{NUM_ACTIONS - 1}")
        ale_action = _ALE_ACTIONS[int(action)]
        reward = 0
        terminated = False
        for _ in range(FRAME_SKIP):
            reward += self.ale.act(ale_action)
            # Every raw frame is read (~9 us each) so that the pool is exact even when the game
            # ends inside the skip; gymnasium's AtariPreprocessing returns stale frames then.
            self._newest ^= 1
            self.ale.getScreenGrayscale(self._frames[self._newest])
            terminated = self.ale.game_over(with_truncation=False)
            if terminated:
                break
        self._steps += 1
        truncated = not terminated and self._steps >= self.max_episode_steps
        return self._observation(), float(reward), terminated, truncated, self._info()

    def render(self) -> np.ndarray | None:
        """The raw RGB screen `[210, 160, 3]` when `render_mode="rgb_array"`."""
        return self.ale.getScreenRGB() if self.render_mode == "rgb_array" else None

    # -- helpers ---------------------------------------------------------------------------------

    def _observation(self) -> np.ndarray:
        pooled = np.maximum(self._frames[0], self._frames[1])  # [210, 160]
        return cv2.resize(pooled, (SCREEN_SIZE, SCREEN_SIZE), interpolation=cv2.INTER_AREA)  # [84, 84]

    def _info(self) -> dict[str, int]:
        return {
            "lives": self.ale.lives(),
            "episode_frame_number": self.ale.getEpisodeFrameNumber(),
            "agent_step": self._steps,
        }

    def get_action_meanings(self) -> list[str]:
        """Meanings of the 18 full-space action ids (gymnasium Atari convention)."""
        return list(ACTION_NAMES)


def make_env(
    game: str,
    protocol: str = "jowa",
    seed: int = 0,
    max_episode_steps: int | None = None,
    render_mode: str | None = None,
) -> AtariEnv:
    """An Atari env with wam's preprocessing under a named protocol (`jowa` or `machado`).

    `seed` seeds the emulator at construction, so the first `reset()` is reproducible too;
    `max_episode_steps` overrides the protocol's cap (agent steps).
    """
    env = AtariEnv(game, protocol=protocol, seed=seed, max_episode_steps=max_episode_steps, render_mode=render_mode)
    log.debug("made %s under protocol %s (sticky %.2f, cap %d)", env.game, env.protocol.name,
              env.protocol.sticky_action_prob, env.max_episode_steps)
    return env


ENV_NAMESPACE = "wam"


def register_envs() -> None:
    """Register every game with gymnasium as `wam/<Game>-v0` (entry point `make_env`), so outside tools play on
    wam's exact protocol: `gym.make("wam/Pong-v0", protocol="jowa", seed=0)` after importing wam, or
    `gym.make("wam.datasets.atari:wam/Pong-v0")` without. Runs when this module is imported."""
    for game in all_games():
        env_id = f"{ENV_NAMESPACE}/{game}-v0"
        if env_id not in gym.registry:
            gym.register(env_id, entry_point="wam.datasets.atari:make_env", kwargs={"game": game},
                         disable_env_checker=True)


def get_ram(env: gym.Env) -> np.ndarray:
    """The Atari RAM, uint8 `[128]` (a fresh copy), of an env built by `make_env` (possibly wrapped)."""
    return env.unwrapped.ale.getRAM()


register_envs()
