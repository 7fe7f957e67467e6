"""Offline Q-correction: plan from dataset states on Ray workers and store the corrected Q-values in HDF5.

`correct_q_values(agent, data, out, settings)` loads a world-action model (a run directory or
checkpoint), picks dataset states (every `stride`-th step of every episode, or a seeded subset of
`max_states`), gives each one its context window (the last `context` frames and the actions between
them, from the datasets' token cache, or encoded on the fly by the run's tokenizer), plans from
it on a `PlannerPool` and writes, per state, the root candidates, their planned and raw Q, the chosen
action and the imagined plans. `load_q_targets(file)` reads them back (verifying checksums) as
distillation targets for fine-tuning (`wam finetune --q-targets FILE`).

File format (`format = "wam-q-targets"`, version 1), one row per state, every dataset gzip-compressed
with fletcher32 checksums, plus a SHA-256 of all rows in the file attributes:

| dataset       | shape      | dtype   | meaning                                                   |
|---------------|------------|---------|-----------------------------------------------------------|
| `dataset`     | [N]        | int16   | index into the `datasets` attribute (JSON list)           |
| `episode`     | [N]        | int32   | episode index in that dataset                             |
| `step`        | [N]        | int32   | step t: the state is frame t, where action t was taken    |
| `game_id`     | [N]        | int16   | row of the model's task tables (`games` attribute)        |
| `action`      | [N]        | int8    | the planner's chosen action (full 18-action id)           |
| `candidates`  | [N, K]     | int8    | root candidates, best raw Q first                         |
| `candidate_q` | [N, K]     | float32 | planned (corrected) Q of the candidates (-inf: not legal) |
| `raw_q`       | [N, 18]    | float32 | the model's Q at the state (-inf: not legal)              |
| `plans`       | [N, K, H]  | int8    | the imagined action sequence of each beam                 |

Attributes: `format`, `format_version`, `wam_version`, `created`, `agent`, `agent_sha256`,
`tokenizer_id`, `model_config` (JSON), `games` (JSON), `planner` (JSON: beam_width, horizon, gamma,
reward, backup), `context_frames`, `stride`, `max_states`, `seed`, `datasets` (JSON: path, game, episodes,
steps, tokenizer_id), `num_states`, `content_sha256`. The file is written to a temp name, fsynced
and renamed, so a crash never leaves a file that looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wam.datasets.errors import DataError, WamError
from wam.datasets.files import sha256_file
from wam.planning.beam import PlannerSettings, max_context_frames
from wam.planning.pool import PlanAnswer, PlannerPool, PlanRequest

log = logging.getLogger(__name__)

FORMAT = "wam-q-targets"
FORMAT_VERSION = 1
ROW_FIELDS = ("dataset", "episode", "step", "game_id", "action", "candidates", "candidate_q", "raw_q", "plans")
_DTYPES = {"dataset": np.int16, "episode": np.int32, "step": np.int32, "game_id": np.int16, "action": np.int8,
           "candidates": np.int8, "candidate_q": np.float32, "raw_q": np.float32, "plans": np.int8}


@dataclass
class CorrectSummary:
    states: int = 0
    seconds: float = 0.0
    changed: int = 0  # states where planning chose another action than greedy Q
    restarted_workers: int = 0
    out: str = ""

    @property
    def states_per_second(self) -> float:
        return self.states / self.seconds if self.seconds > 0 else 0.0


@dataclass
class QTargets:
    """Corrected Q-values read by `load_q_targets` (arrays as in the module docstring)."""

    dataset: np.ndarray
    episode: np.ndarray
    step: np.ndarray
    game_id: np.ndarray
    action: np.ndarray
    candidates: np.ndarray
    candidate_q: np.ndarray
    raw_q: np.ndarray
    plans: np.ndarray
    attrs: dict[str, Any]
    datasets: list[dict[str, Any]]  # the `datasets` attribute: path, game, episodes, steps, tokenizer_id
    games: list[str]  # the model's games (`game_id` indexes them)

    def __len__(self) -> int:
        return int(self.step.shape[0])

    def row_index(self) -> dict[tuple[str, int, int], int]:
        """(resolved dataset path, episode, step) -> row, for matching sampled training steps to targets."""
        paths = [d["path"] for d in self.datasets]
        return {(paths[d], int(e), int(t)): i for i, (d, e, t) in enumerate(zip(self.dataset, self.episode, self.step))}

    def lookup(self, dataset: str | os.PathLike, episode: int, step: int) -> int | None:
        """The row of one state (dataset directory, episode index, step), or None when it was not planned."""
        if not hasattr(self, "_index"):
            self._index = self.row_index()
        return self._index.get((str(Path(dataset).resolve()), int(episode), int(step)))


# --------------------------------------------------------------------------------------- helpers
def _content_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the row arrays in ROW_FIELDS order (dtype-normalised, C order)."""
    digest = hashlib.sha256()
    for name in ROW_FIELDS:
        a = np.ascontiguousarray(arrays[name], dtype=_DTYPES[name])
        digest.update(name.encode())
        digest.update(str(a.shape).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def select_states(lengths: Sequence[Sequence[int]], stride: int, max_states: int | None, seed: int) -> np.ndarray:
    """States to plan from: int64 [N, 3] rows (dataset, episode, step), sorted.

    lengths[d][e] = transitions of episode e of dataset d; steps 0, stride, 2 stride, ... of each episode;
    with `max_states`, a uniform subset of that size drawn with `seed`.
    """
    if stride < 1:
        raise WamError(f"--stride must be >= 1, got {stride}")
    parts = [np.stack([np.full(len(range(0, n, stride)), d), np.full(len(range(0, n, stride)), e),
                       np.arange(0, n, stride)], 1)
             for d, lens in enumerate(lengths) for e, n in enumerate(lens) if n > 0]
    rows = np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, 3), np.int64)
    if max_states is not None and max_states < len(rows):
        if max_states < 1:
            raise WamError(f"--max-states must be >= 1, got {max_states}")
        pick = np.sort(np.random.default_rng(seed).choice(len(rows), size=max_states, replace=False))
        rows = rows[pick]
    return rows


class _TokenSource:
    """Token windows of dataset episodes: the token cache of the run's tokenizer, or frames encoded on the fly."""

    def __init__(self, stores: list[Any], tokenizer_meta: dict[str, Any]) -> None:
        self.stores = stores
        self.tokenizer_id = str(tokenizer_meta.get("id", "") or "")
        self.tokenizer_path = str(tokenizer_meta.get("path", "") or "")
        self._tokenizer: Any = None
        self._cache: tuple[int, int, np.ndarray] | None = None
        for s in stores:
            cached = s.has_tokens() and (not self.tokenizer_id or s.tokenizer_id() == self.tokenizer_id)
            if cached:
                log.info("%s: token cache of tokenizer %s", s.directory, s.tokenizer_id())
            elif self.tokenizer_path:
                log.info("%s: no token cache of tokenizer %s; encoding frames with %s", s.directory,
                         self.tokenizer_id or "?", self.tokenizer_path)
            else:
                raise DataError(f"{s.directory} has no complete token cache of the model's tokenizer "
                                f"({self.tokenizer_id or 'unknown'}) and the run names no tokenizer to encode frames; "
                                "tokenize the dataset first (`wam tokenize`)")

    def episode(self, d: int, e: int) -> np.ndarray:
        """Tokens [T+1, 36] int64 of episode e of dataset d (the last one is cached)."""
        if self._cache is not None and self._cache[:2] == (d, e):
            return self._cache[2]
        s = self.stores[d]
        if s.has_tokens() and (not self.tokenizer_id or s.tokenizer_id() == self.tokenizer_id):
            tok = s.read_window(e, 0, int(s.episode_lengths()[e]) + 1, "obs_tokens").astype(np.int64)
        else:
            if self._tokenizer is None:
                from wam.worldmodel.tokenizer import load_tokenizer

                self._tokenizer = load_tokenizer(self.tokenizer_path)
            tok = self._tokenizer.encode(s.read_episode(e).observations).cpu().numpy().astype(np.int64)
        self._cache = (d, e, tok)
        return tok


def _publish_targets(tmp: Path, out: Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> None:
    """Write the rows and attributes to `tmp`, make it durable and rename it to `out` (atomic: a crash leaves
    the old file or the new one)."""
    from wam.datasets.files import fsync_path

    with h5py.File(tmp, "w") as f:
        for name in ROW_FIELDS:
            a = arrays[name]
            chunks = (min(len(a), 4096), *a.shape[1:])
            f.create_dataset(name, data=a, chunks=chunks, compression="gzip", compression_opts=4,
                             fletcher32=True, shuffle=True)
        for key, value in attrs.items():
            f.attrs[key] = value
    fsync_path(tmp)
    os.replace(tmp, out)
    fsync_path(out.parent, directory=True)


def _stores_for(model: Any, ckpt_path: Path, data: Any) -> list:
    """The datasets under `data`, checked against the model: every game has a task row, and token caches
    hold as many tokens a frame as the model reads."""
    from wam.datasets.store import TrajectoryStore, find_datasets

    stores = [TrajectoryStore.open(p) for p in find_datasets(data)]
    games = list(model.cfg.games)
    unknown = sorted({s.game for s in stores} - set(games))
    if unknown:
        raise WamError(f"the data holds games {unknown} that the model has no task embedding for (model games: {games})")
    for s in stores:
        if s.has_tokens() and s.tokens_per_frame != model.cfg.tokens_per_obs:
            raise WamError(f"{ckpt_path}: the model reads {model.cfg.tokens_per_obs} tokens per frame; {s.directory} "
                           f"caches {s.tokens_per_frame}")
    return stores


def _plan_states(pool: PlannerPool, states: np.ndarray, request: Any, arrays: dict[str, np.ndarray], block: int,
                 progress: bool) -> int:
    """Plan from every state (`request(dataset, episode, step)` builds its request), `block` states per call
    of the pool, writing each answer into row i of `arrays`; returns how often planning changed the greedy
    action."""
    from tqdm import tqdm

    changed = 0
    bar = tqdm(total=len(states), unit="state", desc="plan correct", disable=not progress, dynamic_ncols=True)
    for lo in range(0, len(states), block):
        rows = states[lo:lo + block]
        answers: list[PlanAnswer] = pool.plan([request(*map(int, r)) for r in rows])
        for i, a in enumerate(answers, start=lo):
            kk = len(a.candidates)  # may be < K for games with fewer legal actions
            arrays["action"][i] = a.action
            arrays["candidates"][i, :kk] = a.candidates
            arrays["candidate_q"][i, :kk] = a.candidate_q
            arrays["raw_q"][i] = a.raw_q
            arrays["plans"][i, :kk] = a.plans
            changed += int(a.action != a.candidates[0])
        bar.update(len(rows))
    bar.close()
    return changed


# ------------------------------------------------------------------------------------- correct
def correct_q_values(agent: str | os.PathLike, data: str | os.PathLike | Sequence[str | os.PathLike],
                     out: str | os.PathLike, settings: PlannerSettings, context: int = 0, stride: int = 1,
                     max_states: int | None = None, workers: int = 2, batch_size: int = 32, seed: int = 0,
                     ray_address: str | None = None, overwrite: bool = False, progress: bool = True) -> CorrectSummary:
    """Plan from dataset states with the model of `agent` and write corrected Q-values to `out` (HDF5).

    context: frames of history per state (0 = the most that leaves room for the horizon in the model's
    context). The states and the answers depend only on the data, the model, the settings, `stride`,
    `max_states` and `seed` -- not on `workers`.
    """
    from wam.datasets.atari import legal_action_mask
    from wam.worldmodel.checkpoint import latest_checkpoint
    from wam.worldmodel.model import WorldActionModel

    out = Path(out)
    if out.exists() and not overwrite:
        raise WamError(f"{out} exists; choose another --out or pass --overwrite")
    ckpt_path = latest_checkpoint(Path(agent))
    model, ckpt = WorldActionModel.from_checkpoint(ckpt_path)
    model.eval()
    room = max_context_frames(model, settings.horizon)
    if context < 0 or context > room:
        raise WamError(f"--context {context} does not fit: with --horizon {settings.horizon} the model has room for "
                       f"at most {room} frames of context")
    frames = context or room
    stores = _stores_for(model, ckpt_path, data)
    games = list(model.cfg.games)
    tokens = _TokenSource(stores, ckpt.get("tokenizer", {}) or {})
    game_of = [games.index(s.game) for s in stores]
    legal_of = [np.asarray(legal_action_mask(s.game), dtype=bool) for s in stores]
    states = select_states([s.episode_lengths() for s in stores], stride, max_states, seed)
    if len(states) == 0:
        raise DataError(f"no states to plan from in {data}")
    actions_of: dict[tuple[int, int], np.ndarray] = {}

    def request(d: int, e: int, t: int) -> PlanRequest:
        tok = tokens.episode(d, e)
        if (d, e) not in actions_of:
            actions_of.clear()
            actions_of[(d, e)] = stores[d].read_window(e, 0, int(stores[d].episode_lengths()[e]), "actions"
                                                       ).astype(np.int64)
        start = max(0, t - frames + 1)
        return PlanRequest(obs_tokens=tok[start:t + 1], actions=actions_of[(d, e)][start:t], game_id=game_of[d],
                           legal=legal_of[d])

    k, h = settings.beam_width, settings.horizon
    n = len(states)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = CorrectSummary(out=str(out))
    t0 = time.perf_counter()
    block = max(batch_size * workers * 4, batch_size)
    arrays = {"dataset": states[:, 0], "episode": states[:, 1], "step": states[:, 2],
              "game_id": np.asarray([game_of[d] for d in states[:, 0]]),
              "action": np.zeros(n), "candidates": np.full((n, k), -1), "candidate_q": np.full((n, k), -np.inf),
              "raw_q": np.zeros((n, 18)), "plans": np.full((n, k, h), -1)}
    arrays = {name: np.asarray(a).astype(_DTYPES[name]) for name, a in arrays.items()}
    try:
        with PlannerPool(model, settings, workers=workers, batch_size=batch_size, ray_address=ray_address) as pool:
            summary.changed = _plan_states(pool, states, request, arrays, block, progress)
            summary.restarted_workers = pool.stats.restarted_workers
        attrs = _file_attrs(ckpt_path, model, tokens.tokenizer_id, games, settings, stores, arrays,
                            dict(context_frames=frames, stride=stride, seed=seed, num_states=n,
                                 max_states=-1 if max_states is None else max_states))
        _publish_targets(tmp, out, arrays, attrs)
    finally:
        if tmp.exists():
            tmp.unlink()
    summary.states = n
    summary.seconds = time.perf_counter() - t0
    log.info("corrected Q at %d states in %.1fs; planning changed the greedy action at %d", n, summary.seconds,
             summary.changed)
    return summary


def _file_attrs(ckpt_path: Path, model, tokenizer_id: str, games: list[str], settings: PlannerSettings,
                stores: list, arrays: dict[str, np.ndarray], run: dict[str, int]) -> dict[str, Any]:
    """The corrected-Q file's attributes: format, provenance (agent, tokenizer, datasets), settings and digest."""
    from importlib.metadata import version

    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "wam_version": version("wam"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "agent": str(ckpt_path.resolve()), "agent_sha256": sha256_file(ckpt_path),
        "tokenizer_id": tokenizer_id, "model_config": json.dumps(model.config_dict()),
        "games": json.dumps(games), "planner": json.dumps(dataclasses.asdict(settings)), **run,
        "content_sha256": _content_digest(arrays),
        "datasets": json.dumps([{"path": str(Path(s.directory).resolve()), "game": s.game,
                                 "episodes": int(s.num_episodes), "steps": int(s.num_steps),
                                 "tokenizer_id": s.tokenizer_id()} for s in stores]),
    }


# ---------------------------------------------------------------------------------------- load
def load_q_targets(file: str | os.PathLike) -> QTargets:
    """Read a corrected-Q file written by `correct_q_values`, verifying format, checksums and content hash.

    Raises DataError for a missing, foreign, damaged or edited file.
    """
    path = Path(file)
    if not path.is_file():
        raise DataError(f"Q-target file {path} not found; write one with `wam plan correct`")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
            if attrs.get("format") != FORMAT:
                raise DataError(f"{path} is not a wam Q-target file (format {attrs.get('format')!r})")
            if int(attrs.get("format_version", 0)) > FORMAT_VERSION:
                raise DataError(f"{path} has Q-target format {attrs['format_version']}; this wam reads up to "
                                f"{FORMAT_VERSION}")
            missing = [name for name in ROW_FIELDS if name not in f]
            if missing:
                raise DataError(f"{path} lacks datasets {missing}; rewrite it with `wam plan correct`")
            arrays = {name: f[name][()] for name in ROW_FIELDS}  # fletcher32 checks every chunk here
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"{path} is damaged ({type(e).__name__}: {e}); rewrite it with `wam plan correct`") from None
    if _content_digest(arrays) != attrs.get("content_sha256"):
        raise DataError(f"{path}: the rows do not match the recorded SHA-256; the file was edited or damaged")
    return QTargets(**arrays, attrs=attrs, datasets=json.loads(attrs["datasets"]), games=json.loads(attrs["games"]))


__all__ = ["CorrectSummary", "FORMAT", "QTargets", "correct_q_values", "load_q_targets", "select_states"]
