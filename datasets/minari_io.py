"""Minari interchange: export a wam dataset to a Minari root, import Minari's Atari datasets.

A wam dataset already is a Minari 0.5 HDF5 dataset (raw uint8 frames, `"jpeg_encoding": false`), so
export validates it and copies `data/main_data.hdf5` + `data/metadata.json` to
`<minari_root>/<dataset_id>/data/` (atomically: a temp directory renamed into place), adding
Minari's `namespace_metadata.json` files. `minari.load_dataset(dataset_id)` with
`MINARI_DATASETS_PATH=<minari_root>` then reads it.

Import reads a Minari dataset with the `minari` package (the `minari` extra) and converts Minari's
Atari layout (`ALE/<Game>-v5`: 210x160x3 RGB frames, 18 actions) to wam's: each frame to grayscale
(`cv2.COLOR_RGB2GRAY`) then 84x84 (`cv2.INTER_AREA`). One frame per step is all Minari stores, so
there is no max-pool over the last two emulator frames as in wam's own env (flickering sprites may
be missing from some frames); the provenance records the conversion. A Minari action space smaller
than 18 is mapped to full ids through the game's minimal action set. Episodes that end with neither
flag are stored as truncated. Console RAM in `infos["ram"]` (T+1 rows of 128 bytes, one per frame, as
wam exports it) is kept as `infos/ram`; RAM of any other shape cannot be aligned with the frames and is
dropped with a warning. Like the DQN-Replay import, it commits once, at the end.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from wam.datasets.errors import DataError
from wam.datasets.metadata import write_json_atomic
from wam.datasets.store import (
    MAIN_FILE,
    METADATA_FILE,
    NAMESPACE_FILE,
    RAM_SIZE,
    Episode,
    TrajectoryStore,
    dataset_dir,
)
from wam.datasets.validate import validate

log = logging.getLogger(__name__)

MINARI_PROTOCOL = "minari"


def export_minari(directory: str | os.PathLike, minari_root: str | os.PathLike, overwrite: bool = False) -> Path:
    """Copy the wam dataset at `directory` into `minari_root` under its dataset id; returns the new directory."""
    store = TrajectoryStore.open(directory)
    problems = validate(store.directory)
    if problems:
        raise DataError(f"{store.directory} is damaged ({problems[0]}; {len(problems)} problem(s)); "
                        f"run `wam data validate` before exporting")
    meta = json.loads((store.data / METADATA_FILE).read_text())
    dataset_id = meta["dataset_id"]
    target = Path(minari_root) / dataset_id
    if target.exists():
        if not overwrite:
            raise DataError(f"{target} already exists; delete it or pass --overwrite")
        shutil.rmtree(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    shutil.copyfile(store.data / MAIN_FILE, tmp / "data" / MAIN_FILE)
    write_json_atomic(tmp / "data" / METADATA_FILE, {**meta, "env_spec": env_spec_json(store.game, store.provenance)})
    os.replace(tmp, target)
    parts = dataset_id.split("/")[:-1]  # namespaces: atari, atari/<game>
    for k in range(1, len(parts) + 1):
        ns = Path(minari_root, *parts[:k]) / NAMESPACE_FILE
        if not ns.exists():
            write_json_atomic(ns, {} if k < len(parts) else {"description": f"Atari {parts[-1]} (wam)"})
    log.info("exported %s to %s (%s)", store.directory, target, dataset_id)
    return target


def env_spec_json(game: str, provenance: dict) -> str:
    """Minari's `env_spec`: gymnasium's JSON of the registered `wam/<Game>-v0` with the dataset's protocol, so
    `minari.load_dataset(id).recover_environment()` builds wam's environment exactly (docs/data-format.md)."""
    import gymnasium as gym

    from wam.datasets.atari import ENV_NAMESPACE

    spec = gym.spec(f"{ENV_NAMESPACE}/{game}-v0")
    kwargs = {**spec.kwargs, "protocol": str(provenance.get("protocol") or "jowa")}
    return gym.envs.registration.EnvSpec(id=spec.id, entry_point=spec.entry_point, kwargs=kwargs,
                                         disable_env_checker=True).to_json()


def _minari():
    try:
        import minari
    except ImportError as e:
        raise DataError("importing Minari datasets needs the minari package: pip install 'wam[minari]'") from e
    return minari


def _resolve_minari_dir(src: Path) -> Path:
    """The `data` directory (holding metadata.json) of a Minari dataset given by its directory or data dir."""
    if not src.exists():
        raise DataError(f"{src} does not exist; give a Minari dataset directory (…/<name>-v<k>)")
    for cand in (src / "data", src):
        if (cand / METADATA_FILE).is_file():
            return cand
    raise DataError(f"{src} is not a Minari dataset (no data/{METADATA_FILE})")


def to_wam_frames(rgb: np.ndarray) -> np.ndarray:
    """`[N, 210, 160, 3]` RGB uint8 -> `[N, 84, 84]` grayscale uint8 (COLOR_RGB2GRAY, then INTER_AREA)."""
    out = np.empty((len(rgb), 84, 84), np.uint8)
    for k, frame in enumerate(rgb):
        out[k] = cv2.resize(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), (84, 84), interpolation=cv2.INTER_AREA)
    return out


def _game_of(meta: dict, game: str | None) -> str:
    from wam.datasets.atari import canonical_game

    if game:
        return canonical_game(game)
    spec = meta.get("env_spec")
    if spec:
        env_id = json.loads(spec).get("id", "")
        if env_id.startswith("ALE/"):
            return canonical_game(env_id)
    parts = str(meta.get("dataset_id", "")).split("/")
    if len(parts) >= 3 and parts[0] == "atari":
        return canonical_game(parts[1])
    raise DataError(f"cannot tell the game of Minari dataset {meta.get('dataset_id')!r}; pass --game")


def _ram_of(infos: dict | None, t: int) -> np.ndarray | None:
    """`infos["ram"]` as uint8 `[t+1, 128]` when it is one RAM row per frame of bytes, else None."""
    if not infos or "ram" not in infos:
        return None
    raw = np.asarray(infos["ram"])
    if raw.shape != (t + 1, RAM_SIZE) or raw.dtype.kind not in "iu" or (
            raw.size and (raw.min() < 0 or raw.max() > 255)):
        return None
    return raw.astype(np.uint8, copy=False)


@dataclass
class MinariImportSummary:
    dataset: str
    game: str
    episodes: int = 0
    steps: int = 0
    marked_truncated: int = 0
    episodes_with_ram: int = 0
    dropped_ram: int = 0


def _action_map(act_space: Any, n_actions: int, game: str, data_dir: Path) -> np.ndarray:
    """Full 18-action ids of a Minari dataset's actions: itself for the full space, else the game's minimal set;
    a DataError for any other action space."""
    if n_actions == 18:
        return np.arange(18, dtype=np.int64)
    from wam.datasets.dqn_replay import minimal_action_set

    action_map = minimal_action_set(game)
    if len(action_map) != n_actions:
        raise DataError(f"{data_dir}: action space {act_space} is neither the full 18 actions nor "
                        f"{game}'s minimal set of {len(action_map)}")
    return action_map


def import_minari(src: str | os.PathLike, out: str | os.PathLike, game: str | None = None, name: str | None = None,
                  overwrite: bool = False) -> MinariImportSummary:
    """Convert the Minari Atari dataset at `src` into `<out>/atari/<game>/<name>-v0` (name: the Minari name)."""
    minari = _minari()
    data_dir = _resolve_minari_dir(Path(src))
    meta = json.loads((data_dir / METADATA_FILE).read_text())
    game = _game_of(meta, game)
    try:
        ds = minari.MinariDataset(data_dir)
    except Exception as e:  # minari raises ValueError/AssertionError/KeyError for malformed datasets
        raise DataError(f"minari cannot read {data_dir}: {e}") from e
    obs_space, act_space = ds.observation_space, ds.action_space
    shape = tuple(getattr(obs_space, "shape", ()) or ())
    if shape not in ((210, 160, 3), (84, 84)) or getattr(obs_space, "dtype", None) != np.uint8:
        raise DataError(f"{data_dir}: observations {obs_space} are neither 210x160x3 RGB nor 84x84 grayscale uint8")
    n_actions = int(getattr(act_space, "n", 0))
    action_map = _action_map(act_space, n_actions, game, data_dir)
    src_name = re.sub(r"-v\d+$", "", str(meta.get("dataset_id", "minari")).split("/")[-1])
    directory = dataset_dir(out, game, name or src_name)
    if directory.exists():
        if overwrite:
            shutil.rmtree(directory)
        elif TrajectoryStore.open(directory).num_episodes:
            raise DataError(f"{directory} already holds episodes; pass --overwrite to replace them")
    sticky = None
    if meta.get("env_spec"):
        sticky = json.loads(meta["env_spec"]).get("kwargs", {}).get("repeat_action_probability")
    provenance = {"protocol": MINARI_PROTOCOL, "policy": f"minari:{meta.get('dataset_id')}",
                  "epsilon": None, "source": str(data_dir), "minari_dataset_id": meta.get("dataset_id"),
                  "minari_algorithm": meta.get("algorithm_name"), "sticky_action_prob": sticky,
                  "frame_conversion": "single frame per step; RGB->gray cv2.COLOR_RGB2GRAY; 84x84 cv2.INTER_AREA"
                  if shape != (84, 84) else "none (already 84x84 grayscale)",
                  "importer": "wam data import-minari"}
    store = TrajectoryStore.create(directory, game=game, provenance=provenance)
    summary = MinariImportSummary(dataset=str(directory), game=game)
    seeds = [m.get("seed") for m in ds.storage.get_episode_metadata(ds.episode_indices)]
    with store.writer(commit_every=2**62, commit_seconds=float("inf")) as writer:
        for k, ep in enumerate(ds.iterate_episodes()):
            acts = np.asarray(ep.actions, np.int64)
            if acts.size and (acts.min() < 0 or acts.max() >= n_actions):
                raise DataError(f"{data_dir}: episode {ep.id} has actions outside its action space {act_space}")
            obs = np.asarray(ep.observations)
            frames = to_wam_frames(obs) if shape != (84, 84) else obs.astype(np.uint8)
            t = len(ep.rewards)
            term = np.asarray(ep.terminations, bool).copy()
            trunc = np.asarray(ep.truncations, bool).copy()
            if not (term[-1] or trunc[-1]):
                trunc[-1] = True
                summary.marked_truncated += 1
            lives = None
            if ep.infos and "lives" in ep.infos:
                raw = np.asarray(ep.infos["lives"])
                lives = raw[1:] if len(raw) == t + 1 else raw if len(raw) == t else None
            ram = _ram_of(ep.infos, t)
            if ram is not None:
                summary.episodes_with_ram += 1
            elif ep.infos and "ram" in ep.infos:
                summary.dropped_ram += 1
            writer.append(Episode(observations=frames, actions=action_map[acts],
                                  rewards=np.asarray(ep.rewards, np.float32), terminations=term, truncations=trunc,
                                  lives=None if lives is None else lives.astype(np.int32),
                                  seed=seeds[k], ram=ram,
                                  attrs={"source": "minari", "minari_episode_id": int(ep.id)}))
            summary.episodes += 1
            summary.steps += t
    if summary.marked_truncated:
        log.warning("%d episode(s) of %s ended with neither flag and were stored as truncated",
                    summary.marked_truncated, data_dir)
    if summary.dropped_ram:
        log.warning("%d episode(s) of %s have infos['ram'] that is not [T+1, %d] bytes (one row per frame); "
                    "their RAM was not imported", summary.dropped_ram, data_dir, RAM_SIZE)
    log.info("imported %d episodes (%d steps) of %s into %s", summary.episodes, summary.steps, game, directory)
    return summary
