"""The on-disk layout of a wam dataset: names, constants, the episode record, dataset paths and the
encoding of HDF5 attributes. Everything here is pure (no file is written); `store.py` reads and
`writer.py` writes files in this layout (docs/data-format.md describes every field).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wam.datasets.errors import DataError

SCHEMA_VERSION = 1
"""Version of wam's layout inside the Minari file; bump on any incompatible change."""
MINARI_VERSION = "0.5.4"
"""The Minari dataset version written into metadata.json (Minari 0.4.0-0.5.4 read it)."""
NAMESPACE = "atari"
FRAME_SHAPE = (84, 84)
NUM_TOKENS = 36
"""Tokens per frame of the default tokenizer grid (6x6, JOWA's)."""
TOKEN_COUNTS = (36, 121)
"""Tokens per frame a cache may hold: the supported tokenizer grids, 6x6 and 11x11 (one count per store)."""
NUM_ACTIONS = 18
RAM_SIZE = 128
"""Bytes of Atari 2600 console RAM stored per frame in `infos/ram`."""
TIME_CHUNK = 16  # frames per chunk: 16 reads ~40 % faster than 32 for ~4 % more bytes (docs/sampler.md)
"""Frames (or token rows) per HDF5 chunk of `observations` / `obs_tokens`."""
SCALAR_CHUNK = 1024
"""Steps per HDF5 chunk of the 1-D fields (actions, rewards, flags, lives)."""
RAM_CHUNK = 256
"""Rows per HDF5 chunk of `infos/ram` (256 x 128 B = 32 KiB uncompressed)."""
GZIP_LEVEL = 1
"""gzip level of every dataset. On Pong frames level 1 stores 107 B/frame vs 73 at level 4, but reads ~2x
faster (145k vs 69k frames/s, 2-core CPU), and the sampler is read-bound."""
MAIN_FILE = "main_data.hdf5"
METADATA_FILE = "metadata.json"
NAMESPACE_FILE = "namespace_metadata.json"
TMP_PREFIX = ".main_data.hdf5.tmp-"
FIELDS = ("observations", "actions", "rewards", "terminations", "truncations")
"""Fields every episode group holds; `infos/lives`, `infos/ram` and `obs_tokens` are optional."""
RAM_FIELD = "infos/ram"
"""Where an episode group keeps its console RAM, uint8 `[T+1, 128]` (optional)."""
RESERVED_ATTRS = {"id", "seed", "total_steps", "return", "length", "observations_crc32", "obs_tokens_crc32",
                   "ram_crc32"}
PROVENANCE_ATTR = "wam_provenance"


# ------------------------------------------------------------------------------------------ episode


def checked_tokens(tokens, t: int, what: str, count: int | None = None) -> np.ndarray:
    """`tokens` as uint16 [t + 1, K], or a ValueError naming `what`: integer, K in TOKEN_COUNTS (and == `count`
    when given: one count per store), every value within uint16."""
    tok = np.asarray(tokens)
    if (tok.ndim != 2 or tok.shape[0] != t + 1 or tok.shape[1] not in TOKEN_COUNTS
            or (count is not None and tok.shape[1] != count) or tok.dtype.kind not in "iu"):
        same = " and the same for every episode" if count is not None else ""
        raise ValueError(f"{what} must be integer [{t + 1}, K] with K in {TOKEN_COUNTS}{same}, got {tok.dtype} "
                         f"{tok.shape}")
    if tok.size and (tok.min() < 0 or tok.max() > np.iinfo(np.uint16).max):
        raise ValueError(f"{what} must fit in uint16")
    return tok.astype(np.uint16, copy=False)


@dataclass
class Episode:
    """One episode: T transitions and the T+1 frames around them.

    Step t: in frame `observations[t]` the agent took `actions[t]`, received `rewards[t]`, and
    `terminations[t]` / `truncations[t]` say whether the episode ended (by the game / by a cap) after
    that step; `observations[T]` is the frame after the last action; `lives[t]` are the lives after
    step t; `ram[t]` is the console RAM when `observations[t]` was produced (`ram[0]` after the reset,
    `ram[t]` after step t-1), so RAM rows align with frames.
    """

    observations: np.ndarray  # [T+1, 84, 84] uint8
    actions: np.ndarray  # [T] int64, full 18-action ALE ids
    rewards: np.ndarray  # [T] float32, raw
    terminations: np.ndarray  # [T] bool
    truncations: np.ndarray  # [T] bool
    lives: np.ndarray | None = None  # [T] int32
    seed: int | None = None
    obs_tokens: np.ndarray | None = None  # [T+1, K] uint16, K = 36 (6x6 grid) or 121 (11x11)
    attrs: dict = field(default_factory=dict)
    ram: np.ndarray | None = None  # [T+1, 128] uint8, console RAM aligned with observations

    def __post_init__(self) -> None:
        obs = np.asarray(self.observations)
        if obs.dtype != np.uint8 or obs.ndim != 3 or obs.shape[1:] != FRAME_SHAPE:
            raise ValueError(f"Episode.observations must be uint8 [T+1, 84, 84], got {obs.dtype} {obs.shape}")
        t = obs.shape[0] - 1
        if t < 1:
            raise ValueError(f"an Episode needs at least one transition (2 frames), got {obs.shape[0]} frame(s)")
        self.observations = obs
        self.actions = _vector(self.actions, "actions", t, np.int64, "iu")
        if self.actions.size and (self.actions.min() < 0 or self.actions.max() >= NUM_ACTIONS):
            raise ValueError(f"Episode.actions must be full-space ids in [0, {NUM_ACTIONS}), got "
                             f"[{self.actions.min()}, {self.actions.max()}]")
        self.rewards = _vector(self.rewards, "rewards", t, np.float32, "iuf")
        self.terminations = _vector(self.terminations, "terminations", t, np.bool_, "b")
        self.truncations = _vector(self.truncations, "truncations", t, np.bool_, "b")
        if self.lives is not None:
            self.lives = _vector(self.lives, "lives", t, np.int32, "iu")
        if self.obs_tokens is not None:
            self.obs_tokens = checked_tokens(self.obs_tokens, t, "Episode.obs_tokens")
        if self.ram is not None:
            ram = np.asarray(self.ram)
            if ram.shape != (t + 1, RAM_SIZE) or ram.dtype.kind not in "iu":
                raise ValueError(f"Episode.ram must be integer [{t + 1}, {RAM_SIZE}] (one RAM row per frame), "
                                 f"got {ram.dtype} {ram.shape}")
            if ram.dtype != np.uint8 and ram.size and (ram.min() < 0 or ram.max() > 255):
                raise ValueError("Episode.ram must hold bytes (0..255)")
            self.ram = ram.astype(np.uint8, copy=False)
        if self.seed is not None:
            self.seed = int(self.seed)
        clash = RESERVED_ATTRS.intersection(self.attrs)
        if clash:
            raise ValueError(f"Episode.attrs may not set the reserved attributes {sorted(clash)}")

    @property
    def length(self) -> int:
        """Number of transitions T."""
        return int(self.actions.shape[0])

    @property
    def total_return(self) -> float:
        """Sum of the raw rewards."""
        return float(self.rewards.astype(np.float64).sum())


def _vector(x: Any, name: str, t: int, dtype: type, kinds: str) -> np.ndarray:
    a = np.asarray(x)
    if a.shape != (t,) or a.dtype.kind not in kinds:
        raise ValueError(f"Episode.{name} must be a [{t}] array of kind {kinds!r} (T from observations), "
                         f"got {a.dtype} {a.shape}")
    return a.astype(dtype, copy=False)


def frames_crc32(frames: np.ndarray) -> int:
    """CRC-32 of a C-ordered array's bytes (episode checksums of frames and tokens)."""
    return zlib.crc32(np.ascontiguousarray(frames).view(np.uint8).reshape(-1)) & 0xFFFFFFFF


# ------------------------------------------------------------------------------------------ paths


def game_dir_name(game: str) -> str:
    """Directory name of a game: lower case, no separators (`SpaceInvaders` -> `spaceinvaders`)."""
    return re.sub(r"[^0-9a-z]", "", game.lower())


def dataset_dir(root: str | os.PathLike, game: str, name: str, version: int = 0) -> Path:
    """`<root>/atari/<game_lower>/<name>-v<version>`: where a dataset of `game` called `name` lives."""
    if not re.fullmatch(r"[-\w]+", name) or re.search(r"-v\d+$", name):
        raise DataError(f"dataset name {name!r} must be letters, digits, '-' or '_' and not end in -v<k>")
    return Path(root) / NAMESPACE / game_dir_name(game) / f"{name}-v{int(version)}"


def is_dataset(path: Path) -> bool:
    return (path / "data" / MAIN_FILE).is_file()


def find_datasets(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Dataset directories named by `paths`: each a dataset dir, its `main_data.hdf5`, or a root holding several.

    Raises DataError for a path that does not exist or when no dataset is found.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p} does not exist; give a dataset directory or a root holding datasets")
        if p.is_file() and p.name == MAIN_FILE:
            found.append(p.parent.parent)
        elif is_dataset(p):
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(f.parent.parent for f in p.rglob(f"data/{MAIN_FILE}")))
        else:
            raise DataError(f"{p} is neither a dataset directory nor a root holding datasets")
    found = list(dict.fromkeys(f.resolve() for f in found))
    if not found:
        raise DataError(f"no wam dataset (…/data/{MAIN_FILE}) under {', '.join(map(str, paths))}")
    return found


# ------------------------------------------------------------------------------------ HDF5 attributes


def attr_value(v: Any) -> Any:
    """An HDF5-storable attribute value: scalars and strings as-is, anything else as JSON."""
    if isinstance(v, (bool, int, float, str, np.integer, np.floating, np.bool_)):
        return v
    if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
        return v
    return json.dumps(v)


def py_value(v: Any) -> Any:
    """An attribute read from HDF5 as a plain Python value."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_provenance(f: h5py.File) -> dict:
    raw = f.attrs.get(PROVENANCE_ATTR)
    return json.loads(py_value(raw)) if raw is not None else {}
