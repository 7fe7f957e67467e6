"""d3rlpy baselines (DiscreteCQL, DiscreteBC) as wam agents: the data export, the checkpoint, the agent.

`wam baseline train` (`wam.runs.baseline_cmds`) trains a d3rlpy policy in the separate environment
`.venv-baselines` and leaves a run directory that `wam eval --agent RUN` plays like any wam agent:

    RUN/d3rlpy_data.h5                  the training data as d3rlpy reads it (`export_for_d3rlpy`)
    RUN/policy.pt                       d3rlpy's `save_policy`: TorchScript, float32 [N, 4, 84, 84] (0..255) -> int64 [N]
    RUN/d3rlpy_model.d3                 d3rlpy's `algo.save` (for `d3rlpy.load_learnable`)
    RUN/checkpoints/step_XXXXXXXX.pt    kind "d3rlpy-policy": algo, game, legal ids, frame stack, policy file + sha256, config
    RUN/config.json, RUN/metrics.jsonl  like every wam run

**Actions.** d3rlpy's discrete head has one output per action of the game's minimal set:
index k is the full-space id `legal_ids[k]`, with `legal_ids` the ids where
`wam.datasets.atari.legal_action_mask(game)` is True, in increasing order (ALE's minimal action set,
the `wam_legal_actions` of a dataset's metadata). The export maps every stored full-space id to its
index (an id outside the set is refused), the agent maps the policy's index back, so the agent
never plays an illegal action.

**Frames.** Like d3rlpy's Atari pipeline (`FrameStackTransitionPicker(4)` in training,
`d3rlpy.envs.FrameStack` when acting), the policy sees the last 4 frames, oldest first; at an
episode start the 3 frames before the first one are zeros. `D3rlpyAgent` keeps those 4 frames per
environment row in its state and zeroes them at `reset`.

**Rewards.** The export stores `sign(r)`, the clipping wam trains with; on Atari's integer rewards it
equals d3rlpy's `ClipRewardScaler(-1, 1)` of its Atari scripts. Terminations and truncations stay
apart (`terminals`, `timeouts`): only a termination ends the TD bootstrap.

The policy is run with plain `torch.jit.load` (no d3rlpy needed; both environments have torch 2.13.0).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wam.agents.base import AgentState, checkpoint_id, register_agent_loader, run_dir_of
from wam.datasets.errors import WamError
from wam.datasets.files import sha256_file
from wam.planning.beam import PlannerSettings

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "d3rlpy-policy"
ALGOS = ("discrete-cql", "discrete-bc")
"""d3rlpy algorithms `wam baseline train` offers (d3rlpy's `DiscreteCQL`, `DiscreteBC`)."""
FRAME_STACK = 4
"""Frames a policy sees (d3rlpy's Atari setting, `num_stack=4`)."""
EXPORT_FILE = "d3rlpy_data.h5"
EXPORT_FORMAT = "wam-d3rlpy-export"
EXPORT_VERSION = 1
POLICY_FILE = "policy.pt"
WORKER_SCRIPT = Path(__file__).with_name("d3rlpy_worker.py")
"""The training script run by `.venv-baselines/bin/python` (imports numpy, h5py, torch, d3rlpy; never wam)."""
_FRAME_CHUNK = 64


def legal_ids(game: str) -> np.ndarray:
    """int64 [K]: the full-space ids of the game's legal actions, increasing (d3rlpy index k <-> `legal_ids[k]`)."""
    from wam.datasets.atari import legal_action_mask

    return np.flatnonzero(legal_action_mask(game)).astype(np.int64)


def action_indices(actions: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Full-space ids [T] -> indices into `ids` [T] (int64); -1 where an id is not in `ids`."""
    lut = np.full(18, -1, dtype=np.int64)
    lut[ids] = np.arange(len(ids))
    return lut[np.asarray(actions, dtype=np.int64)]


# ------------------------------------------------------------------------------------------ export


@dataclass
class ExportSummary:
    """What `export_for_d3rlpy` wrote."""

    path: Path
    game: str
    legal_ids: list[int]
    datasets: list[str]
    fingerprints: list[str]
    episodes: int
    steps: int
    terminated: int
    """Episodes ending in a termination (the game ended)."""
    truncated: int
    """Episodes cut by a cap (their last frame is kept as a next observation to bootstrap from)."""
    action_counts: list[int] = field(default_factory=list)
    """How often each legal-action index occurs in the data."""

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def _metadata_legal_ids(store: Any) -> list[int] | None:
    from wam.datasets.store import METADATA_FILE

    try:
        meta = json.loads((store.data / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None
    legal = meta.get("wam_legal_actions")
    return [int(i) for i in legal["ids"]] if isinstance(legal, dict) and "ids" in legal else None


def _episode_plan(lengths: np.ndarray, max_transitions: int | None, hold_out: int) -> list[tuple[int, int]]:
    """(episode index, transitions used) of one dataset: its episodes but the last `hold_out`, in order, cut
    after its first `max_transitions` transitions (the episode where the cut falls keeps its first part)."""
    plan, left = [], max_transitions if max_transitions is not None else int(lengths.sum())
    for i, t in enumerate(lengths[:max(0, len(lengths) - hold_out)]):
        if left <= 0:
            break
        used = min(int(t), left)
        plan.append((i, used))
        left -= used
    return plan


def export_for_d3rlpy(data: Sequence[str | os.PathLike], path: str | os.PathLike, max_transitions: int | None = None,
                      hold_out_episodes: int = 0) -> ExportSummary:
    """Write the episodes of the datasets under `data` (one game) into one HDF5 file that the d3rlpy
    worker reads, and return what it holds.

    As wam's training runs select their data: `hold_out_episodes` leaves out the last K episodes of each
    dataset (wam's `--calibration-episodes`), `max_transitions` keeps only the first N transitions of each
    dataset (`wam finetune --transitions`); an episode cut short by it ends in a timeout (truncation).

    Layout (F = sum over episodes of T_i + 1 frames, N = sum of T_i steps):
    `observations` uint8 [F, 84, 84] (each episode's T_i + 1 frames), `actions` int64 [N] (indices
    into the legal ids), `rewards` float32 [N] (sign of the raw reward), `terminals` / `timeouts`
    bool [N] (a step ending the episode by the game / by a cap; a step holding both counts as a
    termination), `episode_lengths` int64 [E]; attributes `format`, `version`, `game`, `legal_ids`
    (JSON), `reward_transform` ("sign"), `datasets` (JSON). Written to a temp file and renamed.

    Raises WamError for: no dataset, datasets of several games, no transitions, an action outside the
    game's legal set, a dataset whose recorded legal actions differ from this ALE's, an episode
    without an end flag.
    """
    import h5py

    stores, game, ids = _one_game(data)
    if max_transitions is not None and max_transitions < 1:
        raise WamError(f"--transitions must be >= 1, got {max_transitions}")
    if hold_out_episodes < 0:
        raise WamError(f"--hold-out-episodes must be >= 0, got {hold_out_episodes}")
    plans = [_episode_plan(s.episode_lengths(), max_transitions, hold_out_episodes) for s in stores]
    lengths = np.asarray([used for plan in plans for _, used in plan], dtype=np.int64)
    if lengths.size == 0 or lengths.sum() == 0:
        raise WamError(f"the datasets under {', '.join(map(str, data))} hold no transitions")
    n_steps, n_frames = int(lengths.sum()), int((lengths + 1).sum())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    counts = np.zeros(len(ids), dtype=np.int64)
    terminated = truncated = 0
    try:
        with h5py.File(tmp, "w") as f:
            frames = f.create_dataset("observations", (n_frames, 84, 84), np.uint8,
                                      chunks=(min(_FRAME_CHUNK, n_frames), 84, 84), compression="gzip",
                                      compression_opts=1)
            acts = np.empty(n_steps, np.int64)
            rews = np.empty(n_steps, np.float32)
            terms = np.zeros(n_steps, bool)
            outs = np.zeros(n_steps, bool)
            f0 = s0 = 0
            for s, plan in zip(stores, plans):
                for i, t in plan:
                    ep, idx, term, trunc = _episode_rows(s, i, t, ids, game)
                    frames[f0:f0 + t + 1] = ep.observations[:t + 1]
                    acts[s0:s0 + t] = idx
                    rews[s0:s0 + t] = np.sign(ep.rewards[:t])
                    terms[s0 + t - 1] = term
                    outs[s0 + t - 1] = trunc and not term
                    counts += np.bincount(idx, minlength=len(ids))
                    terminated += term
                    truncated += not term
                    f0 += t + 1
                    s0 += t
            assert (f0, s0) == (n_frames, n_steps), f"wrote {f0} frames / {s0} steps, expected {n_frames} / {n_steps}"
            f.create_dataset("actions", data=acts)
            f.create_dataset("rewards", data=rews)
            f.create_dataset("terminals", data=terms)
            f.create_dataset("timeouts", data=outs)
            f.create_dataset("episode_lengths", data=lengths)
            f.attrs["format"] = EXPORT_FORMAT
            f.attrs["version"] = EXPORT_VERSION
            f.attrs["game"] = game
            f.attrs["legal_ids"] = json.dumps(ids.tolist())
            f.attrs["reward_transform"] = "sign"
            f.attrs["datasets"] = json.dumps([str(s.directory) for s in stores])
            f.attrs["max_transitions"] = -1 if max_transitions is None else int(max_transitions)
            f.attrs["hold_out_episodes"] = int(hold_out_episodes)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportSummary(path=path, game=game, legal_ids=ids.tolist(), datasets=[str(s.directory) for s in stores],
                         fingerprints=[s.fingerprint() for s in stores], episodes=int(lengths.size), steps=n_steps,
                         terminated=terminated, truncated=truncated, action_counts=counts.tolist())


def _one_game(data: Sequence[str | os.PathLike]) -> tuple[list, str, np.ndarray]:
    """(stores, game, legal ids) of the datasets under `data`; a WamError when there are none, when they hold
    several games, or when one recorded other legal actions than this ALE has."""
    from wam.datasets.store import TrajectoryStore, find_datasets

    paths = find_datasets(list(data)) if data else []
    if not paths:
        raise WamError("give the training data with --data DIR (a dataset directory or a root holding datasets)")
    stores = [TrajectoryStore.open(p) for p in paths]
    games = sorted({s.game for s in stores})
    if len(games) > 1:
        by_game = "; ".join(f"{g}: {', '.join(str(s.directory) for s in stores if s.game == g)}" for g in games)
        raise WamError(f"the datasets hold several games ({by_game}); a d3rlpy baseline is trained on one game: "
                       "give the datasets of one game")
    game = games[0]
    ids = legal_ids(game)
    for s in stores:
        recorded = _metadata_legal_ids(s)
        if recorded is not None and recorded != ids.tolist():
            raise WamError(f"{s.directory} records the legal actions {recorded} for {game}, but this ALE has "
                           f"{ids.tolist()}: the data was made with another ale-py; re-collect or re-import it")
    return stores, game, ids


def _episode_rows(store: Any, i: int, t: int, ids: np.ndarray, game: str) -> tuple[Any, np.ndarray, bool, bool]:
    """Episode `i` of `store` cut to its first `t` steps: (the episode, its actions as indices into the legal
    ids [t], terminated, truncated). A cut episode ends in a truncation; an illegal action or an episode
    without an end flag is a WamError."""
    ep = store.read_episode(i)
    cut = t < ep.length  # cut by max_transitions: the episode goes on in the data
    idx = action_indices(ep.actions[:t], ids)  # [t]
    if (idx < 0).any():
        from wam.datasets.atari import ACTION_NAMES

        bad = sorted({ACTION_NAMES[a] for a in ep.actions[:t][idx < 0]})
        raise WamError(f"{store.directory} episode {i} plays {', '.join(bad)}, not in {game}'s legal "
                       f"actions ({len(ids)}); d3rlpy's head has one output per legal action")
    term, trunc = (False, True) if cut else (bool(ep.terminations[-1]), bool(ep.truncations[-1]))
    if not (term or trunc):
        raise WamError(f"{store.directory} episode {i} has no termination or truncation at its last "
                       f"step; run `wam data validate {store.directory}`")
    return ep, idx, term, trunc


# -------------------------------------------------------------------------------------- checkpoint


def save_policy_checkpoint(run_dir: str | os.PathLike, step: int, *, algo: str, game: str, legal: Sequence[int],
                           config: dict[str, Any], policy_file: str = POLICY_FILE,
                           extra: dict[str, Any] | None = None) -> Path:
    """Write `RUN/checkpoints/step_<step>.pt` of kind "d3rlpy-policy" for the TorchScript `RUN/<policy_file>`.

    It names the policy file and holds its sha256 (checked when the agent loads it), the algorithm,
    the game and its legal ids (index k of the policy = full-space id `legal[k]`), the frame stack and
    the training `config` (plain JSON-like values only: it is read with `weights_only=True`).
    """
    from wam.worldmodel.checkpoint import RunDir

    run = RunDir(run_dir)
    policy = run.path / policy_file
    if not policy.is_file():
        raise WamError(f"no policy at {policy}: the d3rlpy worker did not save one")
    payload = {"kind": CHECKPOINT_KIND, "algo": algo, "game": game, "legal_actions": [int(i) for i in legal],
               "frame_stack": FRAME_STACK, "policy_file": policy_file, "policy_sha256": sha256_file(policy),
               "config": config, **(extra or {})}
    return run.save(step, payload)


# ------------------------------------------------------------------------------------------- agent


@dataclass
class D3rlpyState(AgentState):
    """Per-row frame stacks: `frames[i]` holds row i's last 4 frames, oldest first (zeros before the episode)."""

    frames: np.ndarray | None = None  # uint8 [N, 4, 84, 84]


class D3rlpyAgent:
    """An `Agent` playing a d3rlpy TorchScript policy (`save_policy`) over the game's legal actions.

    `policy_bytes` is the TorchScript file's content: the agent pickles with it and reloads the module
    on unpickling. The policy maps float32 [N, 4, 84, 84] (raw pixel values) to indices into `legal`.
    """

    def __init__(self, policy_bytes: bytes, game: str, legal: Sequence[int], name: str = "d3rlpy",
                 checkpoint: str = "", frame_stack: int = FRAME_STACK) -> None:
        self.name, self.game, self.checkpoint_id = name, game, checkpoint
        self.legal = np.asarray(legal, dtype=np.int64)  # [K]
        self.frame_stack = int(frame_stack)
        self._policy_bytes = policy_bytes
        self._policy = self._load(policy_bytes)

    @staticmethod
    def _load(policy_bytes: bytes) -> torch.jit.ScriptModule:
        try:
            with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript, the format of d3rlpy's save_policy
                warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=DeprecationWarning)
                return torch.jit.load(io.BytesIO(policy_bytes), map_location="cpu").eval()
        except Exception as e:  # noqa: BLE001 - any failure here means "not a TorchScript policy"
            raise WamError(f"the d3rlpy policy is not loadable TorchScript ({type(e).__name__}: {e})") from None

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_policy"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._policy = self._load(self._policy_bytes)

    def init_state(self, n_envs: int) -> D3rlpyState:
        return D3rlpyState(steps=np.zeros(n_envs, dtype=np.int64),
                           frames=np.zeros((n_envs, self.frame_stack, 84, 84), dtype=np.uint8))

    def reset(self, state: D3rlpyState, rows: np.ndarray,
              rngs: Sequence[np.random.Generator] | None = None) -> D3rlpyState:
        state.frames[np.asarray(rows, dtype=bool)] = 0  # d3rlpy pads an episode's first stacks with zeros
        state.clear(rows)
        return state

    def act(self, state: D3rlpyState, obs: np.ndarray, legal: np.ndarray, rngs: Sequence[np.random.Generator],
            ram: np.ndarray | None = None) -> tuple[np.ndarray, D3rlpyState, dict[str, Any]]:
        n = state.n_envs
        assert obs.shape == (n, 84, 84) and legal.shape == (n, 18), f"obs {obs.shape} / legal {legal.shape} for {n} rows"
        state.frames = np.concatenate([state.frames[:, 1:], np.asarray(obs, np.uint8)[:, None]], axis=1)  # [N, 4, 84, 84]
        with torch.inference_mode():
            idx = self._policy(torch.from_numpy(state.frames).float()).numpy().astype(np.int64).reshape(n)  # [N]
        if idx.min() < 0 or idx.max() >= len(self.legal):
            raise WamError(f"the d3rlpy policy returned action index {int(idx.max())} for {len(self.legal)} legal "
                           f"actions of {self.game}: it was trained for another action set")
        actions = self.legal[idx]  # [N] full-space ids
        assert legal[np.arange(n), actions].all(), f"legal ids {self.legal.tolist()} disagree with the mask given to act"
        state.advance()
        return actions, state, {}


def load_d3rlpy_agent(path: Path, ckpt: dict[str, Any], game: str, plan: PlannerSettings | None,
                      device: str = "cpu", **kwargs: Any) -> D3rlpyAgent:
    """The `load_agent` loader of "d3rlpy-policy" checkpoints (written by `wam baseline train`).

    The policy file the checkpoint names must lie in its run directory with the recorded sha256; the
    game must be the one trained on and its legal actions those recorded. The policy runs on the CPU
    (`device` is accepted for the loader interface); planning settings are ignored (no model to plan
    with) and model-agent options (`memory`, `context`, ...) are refused.
    """
    if kwargs:
        opts = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(kwargs))
        raise WamError(f"{path} is a d3rlpy policy: it takes no {opts} (options of world-action model agents)")
    missing = [k for k in ("algo", "game", "legal_actions", "policy_file", "policy_sha256") if k not in ckpt]
    if missing:
        raise WamError(f"{path} is a {CHECKPOINT_KIND!r} checkpoint without {missing}; retrain it with "
                       "`wam baseline train`")
    if ckpt["game"] != game:
        raise WamError(f"{path} is a d3rlpy policy for {ckpt['game']}; it cannot play {game}")
    now = legal_ids(game).tolist()
    if list(ckpt["legal_actions"]) != now:
        raise WamError(f"{path} was trained on the legal actions {list(ckpt['legal_actions'])} of {game}, but this "
                       f"ALE has {now}")
    if int(ckpt.get("frame_stack", FRAME_STACK)) != FRAME_STACK:
        raise WamError(f"{path} stacks {ckpt['frame_stack']} frames; this wam plays d3rlpy policies of {FRAME_STACK}")
    policy = run_dir_of(path) / ckpt["policy_file"]
    if not policy.is_file():
        raise WamError(f"{path} names the policy {policy}, which is not there; keep the run directory together")
    data = policy.read_bytes()
    if hashlib.sha256(data).hexdigest() != ckpt["policy_sha256"]:
        raise WamError(f"{policy} is not the policy {path} was saved with (sha256 differs); retrain or restore it")
    if device != "cpu":
        log.info("d3rlpy policies run on the CPU; ignoring device=%s", device)
    if plan is not None:
        log.info("a d3rlpy policy has no model to plan with: ignoring planning settings %s", plan.as_dict())
    return D3rlpyAgent(data, game, ckpt["legal_actions"], name=f"d3rlpy-{ckpt['algo']}",
                       checkpoint=checkpoint_id(path, ckpt.get("step")))


register_agent_loader(CHECKPOINT_KIND, load_d3rlpy_agent)

__all__ = ["ALGOS", "CHECKPOINT_KIND", "D3rlpyAgent", "D3rlpyState", "ExportSummary", "action_indices",
           "export_for_d3rlpy", "legal_ids", "load_d3rlpy_agent", "save_policy_checkpoint"]
