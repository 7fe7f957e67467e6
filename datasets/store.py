"""The trajectory store: one Minari-0.5-compatible HDF5 dataset directory per game.

Layout (see docs/data-format.md for every field)::

    <root>/atari/namespace_metadata.json
    <root>/atari/<game_lower>/namespace_metadata.json
    <root>/atari/<game_lower>/<name>-v<k>/data/main_data.hdf5     episodes, provenance, token cache
    <root>/atari/<game_lower>/<name>-v<k>/data/metadata.json      Minari's dataset metadata

`metadata.json` sits in `data/` because that is where Minari 0.5.4 reads it
(`MinariStorage.read_raw_metadata(<dataset>/data)`).

Atomicity: the committed `main_data.hdf5` is never modified in place. A writer works on a copy
(`data/.main_data.hdf5.tmp-<pid>`) in the same directory, appends episodes there, flushes,
closes, fsyncs and `os.replace`s it over the committed file, then replaces `metadata.json` the same
way. A crash at any moment leaves either the old or the new committed file, never a mix; stale temp
files are removed by the next writer (it holds an exclusive `flock` on `data/.write.lock`, so any temp
file it finds belongs to a dead writer). A crash between the two renames leaves `metadata.json`
behind the HDF5 file; `open` (and `validate`) rewrite it from the HDF5 file, which is the truth.

"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wam.datasets.errors import DataError, WamError
from wam.datasets.files import atomic_write_json, fsync_path

log = logging.getLogger(__name__)

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
_TMP_PREFIX = ".main_data.hdf5.tmp-"
_LOCK_FILE = ".write.lock"
FIELDS = ("observations", "actions", "rewards", "terminations", "truncations")
"""Fields every episode group holds; `infos/lives`, `infos/ram` and `obs_tokens` are optional."""
RAM_FIELD = "infos/ram"
"""Where an episode group keeps its console RAM, uint8 `[T+1, 128]` (optional)."""
_WINDOW_FIELDS = {"observations": "observations", "obs_tokens": "obs_tokens", "actions": "actions",
                  "rewards": "rewards", "terminations": "terminations", "truncations": "truncations",
                  "lives": "infos/lives", "ram": RAM_FIELD}
_RESERVED_ATTRS = {"id", "seed", "total_steps", "return", "length", "observations_crc32", "obs_tokens_crc32",
                   "ram_crc32"}
_PROVENANCE_MUST_MATCH = ("game", "protocol", "policy")
_PROVENANCE_ATTR = "wam_provenance"
_CHUNK_CACHE_BYTES = 512 * 1024
_DATASET_LRU = 128
"""Open datasets a reader keeps (bounds chunk-cache memory to ~64 MiB per process)."""


# ------------------------------------------------------------------------------------------ episode


def _checked_tokens(tokens, t: int, what: str, count: int | None = None) -> np.ndarray:
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
            self.obs_tokens = _checked_tokens(self.obs_tokens, t, "Episode.obs_tokens")
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
        clash = _RESERVED_ATTRS.intersection(self.attrs)
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


def _is_dataset(path: Path) -> bool:
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
        elif _is_dataset(p):
            found.append(p)
        elif p.is_dir():
            found.extend(sorted(f.parent.parent for f in p.rglob(f"data/{MAIN_FILE}")))
        else:
            raise DataError(f"{p} is neither a dataset directory nor a root holding datasets")
    found = list(dict.fromkeys(f.resolve() for f in found))
    if not found:
        raise DataError(f"no wam dataset (…/data/{MAIN_FILE}) under {', '.join(map(str, paths))}")
    return found


# ------------------------------------------------------------------------------------ file helpers


_COPY_PATH_LOGGED = False


def _copy_file(src: Path, dst: Path) -> None:
    """Copy `src` to a new file `dst` inside the kernel (`copy_file_range`: a reflink, i.e. O(1), on
    XFS/btrfs; an in-kernel copy elsewhere), else with shutil.copyfile (logged once)."""
    global _COPY_PATH_LOGGED
    size = os.stat(src).st_size
    if hasattr(os, "copy_file_range"):
        try:
            with open(src, "rb") as fin, open(dst, "wb") as fout:
                done = 0
                while done < size:
                    n = os.copy_file_range(fin.fileno(), fout.fileno(), size - done, done, done)
                    if n == 0:
                        break
                    done += n
            if done == size:
                return
        except OSError as e:  # e.g. EXDEV or a filesystem without support
            if not _COPY_PATH_LOGGED:
                log.info("copy_file_range unavailable (%s); copying with shutil.copyfile", e)
                _COPY_PATH_LOGGED = True
    shutil.copyfile(src, dst)


def _write_json_atomic(path: Path, obj: Any) -> None:
    """metadata.json and namespace files: crash-safe, indented by 1 as Minari writes them."""
    atomic_write_json(path, obj, indent=1, sort_keys=False)


def _box_space_json(shape: tuple[int, ...], low: int, high: int, dtype: str) -> str:
    """A Box space exactly as `minari.serialization.serialize_space` writes it."""
    return json.dumps({"type": "Box", "dtype": dtype, "shape": list(shape),
                       "low": np.full(shape, low).tolist(), "high": np.full(shape, high).tolist()})


def _discrete_space_json(n: int) -> str:
    return json.dumps({"type": "Discrete", "dtype": "int64", "start": 0, "n": int(n)})


def _attr_value(v: Any) -> Any:
    """An HDF5-storable attribute value: scalars and strings as-is, anything else as JSON."""
    if isinstance(v, (bool, int, float, str, np.integer, np.floating, np.bool_)):
        return v
    if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
        return v
    return json.dumps(v)


def _py(v: Any) -> Any:
    """An attribute read from HDF5 as a plain Python value."""
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _read_provenance(f: h5py.File) -> dict:
    raw = f.attrs.get(_PROVENANCE_ATTR)
    return json.loads(_py(raw)) if raw is not None else {}


@contextlib.contextmanager
def _write_lock(data: Path) -> Iterator[None]:
    """Exclusive, non-blocking writer lock (released by the kernel if the process dies)."""
    fd = os.open(data / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DataError(f"{data.parent} is being written by another process; wait for it to finish") from e
            raise
        for stale in data.glob(_TMP_PREFIX + "*"):  # we hold the lock: any temp file is a dead writer's
            log.warning("removing %s left by an interrupted writer", stale)
            stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def _defer_sigint() -> Iterator[None]:
    """Hold Ctrl-C until the block is done, then raise it.

    A KeyboardInterrupt raised inside h5py can leave h5py's global lock held, so the next h5py call
    (deleting the partial episode, committing) would deadlock; HDF5 sections therefore finish first.
    Only the main thread receives signals; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[tuple[int, Any]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        if callable(previous):
            previous(*received[0])  # the default handler raises KeyboardInterrupt
        elif previous == signal.SIG_DFL:
            raise KeyboardInterrupt


# -------------------------------------------------------------------------------------- the store


class TrajectoryStore:
    """A dataset directory of one game: read episodes, append them atomically, cache tokens.

    Instances are cheap and picklable (the HDF5 handle is reopened lazily, also after a fork).
    Readers see the file committed when they (re)opened it; `refresh()` picks up newer commits.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.data = self.directory / "data"
        self.path = self.data / MAIN_FILE
        self._h5: h5py.File | None = None
        self._h5_pid: int | None = None
        self._datasets: OrderedDict[tuple[int, str], h5py.Dataset] = OrderedDict()
        self._lock = threading.RLock()  # guards the handle and the LRU (a sampler may read from a thread)
        self._load()

    # ---- construction

    @classmethod
    def create(cls, directory: str | os.PathLike, *, game: str, provenance: dict,
               exist_ok: bool = True) -> TrajectoryStore:
        """A new empty dataset at `directory`, or (exist_ok) the existing one for appending more episodes.

        `provenance` is stored as file attributes; it must name the `protocol` and behaviour `policy`.
        Reopening an existing dataset raises DataError if its game, protocol or policy differ.
        """
        from wam.datasets.atari import canonical_game

        directory = Path(directory)
        game = canonical_game(game)  # `pong`, `ALE/Pong-v5` -> `Pong`, so resumes compare equal
        missing = [k for k in ("protocol", "policy") if k not in provenance]
        if missing:
            raise DataError(f"provenance for {directory} lacks {missing}; record how the data was made")
        prov = _full_provenance(game, provenance)
        data = directory / "data"
        if (data / MAIN_FILE).exists():
            if not exist_ok:
                raise DataError(f"{directory} already holds a dataset; choose another name or delete it")
            store = cls.open(directory)
            diff = {k: (store.provenance.get(k), prov.get(k)) for k in _PROVENANCE_MUST_MATCH
                    if store.provenance.get(k) != prov.get(k)}
            if diff:
                detail = ", ".join(f"{k}: stored {a!r} vs new {b!r}" for k, (a, b) in diff.items())
                raise DataError(f"{directory} holds other data ({detail}); append only the same game, "
                                f"protocol and policy, or write to another directory")
            return store
        data.mkdir(parents=True, exist_ok=True)
        with _write_lock(data):
            tmp = data / f"{_TMP_PREFIX}{os.getpid()}"
            with h5py.File(tmp, "w", track_order=True) as f:
                f.attrs["wam_schema_version"] = SCHEMA_VERSION
                f.attrs["num_episodes"] = 0
                f.attrs["num_steps"] = 0
                f.attrs[_PROVENANCE_ATTR] = json.dumps(prov)
                for k, v in prov.items():
                    if v is not None:
                        f.attrs[k] = _attr_value(v)
            fsync_path(tmp)
            os.replace(tmp, data / MAIN_FILE)
            fsync_path(data, directory=True)
            _write_metadata(directory, prov, 0, 0)
            _write_namespaces(directory)
        log.info("created dataset %s (%s)", directory, game)
        return cls(directory)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> TrajectoryStore:
        """The dataset at `directory`; DataError if it is missing or not a wam dataset."""
        directory = Path(directory)
        if not directory.exists():
            raise DataError(f"{directory} does not exist")
        if not _is_dataset(directory):
            raise DataError(f"{directory} is not a wam dataset (no data/{MAIN_FILE})")
        return cls(directory)

    def _load(self) -> None:
        """Read the index (lengths, returns) and provenance of the committed file; repair metadata.json."""
        self.close()
        try:
            f = h5py.File(self.path, "r")
        except OSError as e:
            raise DataError(f"cannot open {self.path}: {e}; run `wam data validate {self.directory}`") from e
        with f:
            if "wam_schema_version" not in f.attrs:
                raise DataError(f"{self.path} is not a wam dataset (no wam_schema_version attribute)")
            if int(f.attrs["wam_schema_version"]) > SCHEMA_VERSION:
                raise DataError(f"{self.path} has schema {int(f.attrs['wam_schema_version'])}; this wam reads "
                                f"up to {SCHEMA_VERSION}: upgrade wam")
            self.provenance: dict = _read_provenance(f)
            self.game: str = str(self.provenance.get("game", _py(f.attrs.get("game", ""))))
            n = int(f.attrs["num_episodes"])
            lengths = np.zeros(n, np.int64)
            returns = np.zeros(n, np.float64)
            num_ram = 0
            for i in range(n):
                g = f.get(f"episode_{i}")
                if g is None:
                    raise DataError(f"{self.path}: episode {i} is missing; run `wam data validate {self.directory}`")
                lengths[i] = int(g.attrs["total_steps"])
                returns[i] = float(g.attrs["return"])
                num_ram += RAM_FIELD in g
            self._lengths = lengths
            self._returns = returns
            self._num_ram = num_ram
            self._tokenizer_id = _py(f.attrs["tokenizer_id"]) if "tokenizer_id" in f.attrs else None
            self._num_tokenized = int(f.attrs.get("num_tokenized", 0))
            self._tokens_per_frame = int(_py(f.attrs.get("tokens_per_frame", NUM_TOKENS)))
            self._mtime = os.stat(self.path).st_mtime_ns
        self._repair_metadata()

    def _repair_metadata(self) -> None:
        meta_path = self.data / METADATA_FILE
        try:
            meta = json.loads(meta_path.read_text())
            ok = meta.get("total_episodes") == self.num_episodes and meta.get("total_steps") == self.num_steps
        except (OSError, ValueError):
            ok = False
        if ok:
            return
        log.warning("%s is missing or behind %s (interrupted commit); rewriting it", meta_path, MAIN_FILE)
        try:
            _write_metadata(self.directory, self.provenance, self.num_episodes, self.num_steps)
        except OSError as e:
            log.warning("could not rewrite %s: %s", meta_path, e)

    def refresh(self) -> None:
        """Re-read the committed file if a writer has committed since it was opened."""
        if os.stat(self.path).st_mtime_ns != self._mtime:
            self._load()

    # ---- summary

    @property
    def num_episodes(self) -> int:
        return int(self._lengths.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self._lengths.sum())

    def fingerprint(self) -> str:
        """A digest of what the store holds, independent of where it lies: game, dataset name, and every
        episode's length and return. A copied or moved dataset keeps it; one with an episode more does not."""
        h = hashlib.sha256(f"{self.game}|{self.directory.name}|".encode())
        h.update(self._lengths.tobytes())
        h.update(self._returns.tobytes())
        return h.hexdigest()[:16]

    def episode_lengths(self) -> np.ndarray:
        """[E] int64: transitions per episode."""
        return self._lengths.copy()

    def episode_returns(self) -> np.ndarray:
        """[E] float64: sum of raw rewards per episode."""
        return self._returns.copy()

    def has_tokens(self) -> bool:
        """True when every episode holds an `obs_tokens` cache (of `tokenizer_id()`)."""
        return self._tokenizer_id is not None and self._num_tokenized == self.num_episodes and self.num_episodes > 0

    def tokenizer_id(self) -> str | None:
        return self._tokenizer_id

    @property
    def tokens_per_frame(self) -> int:
        """Tokens per frame of the cache (36 unless `write_tokens` stored another grid's)."""
        return self._tokens_per_frame

    @property
    def has_ram(self) -> bool:
        """True when every episode holds its console RAM (`infos/ram`); False for an empty store.

        A property (not a method like `has_tokens()`): `if store.has_ram:`.
        """
        return self.num_episodes > 0 and self._num_ram == self.num_episodes

    @property
    def num_episodes_with_ram(self) -> int:
        """How many episodes hold `infos/ram` (imports from DQN-Replay have none)."""
        return self._num_ram

    def episodes_without_tokens(self) -> list[int]:
        """Indices of the episodes that have no token cache yet."""
        f = self._file()
        return [i for i in range(self.num_episodes) if "obs_tokens" not in f[f"episode_{i}"]]

    def __len__(self) -> int:
        return self.num_episodes

    def __repr__(self) -> str:
        return f"TrajectoryStore({str(self.directory)!r}, game={self.game!r}, episodes={self.num_episodes})"

    # ---- reading

    def _file(self) -> h5py.File:
        with self._lock:
            return self._open_file()

    def _open_file(self) -> h5py.File:
        if self._h5 is None or self._h5_pid != os.getpid():
            self._datasets = OrderedDict()
            # each open dataset keeps its own chunk cache: 512 KiB = 2 decompressed frame chunks
            self._h5 = h5py.File(self.path, "r", rdcc_nbytes=_CHUNK_CACHE_BYTES)
            self._h5_pid = os.getpid()
        return self._h5

    def _dataset(self, i: int, key: str) -> h5py.Dataset:
        """Open dataset `key` of episode i, from a small LRU (lookups cost more than reading a chunk)."""
        with self._lock:
            return self._lru_dataset(i, key)

    def _lru_dataset(self, i: int, key: str) -> h5py.Dataset:
        ds = self._datasets.get((i, key))
        if ds is not None and self._h5_pid == os.getpid():
            self._datasets.move_to_end((i, key))
            return ds
        g = self._group(i)
        if key not in g:
            raise DataError(f"{self.directory}: episode {i} has no {key}")
        ds = g[key]
        self._datasets[(i, key)] = ds
        if len(self._datasets) > _DATASET_LRU:
            self._datasets.popitem(last=False)
        return ds

    def close(self) -> None:
        with self._lock:
            self._datasets = OrderedDict()
            if self._h5 is not None and self._h5_pid == os.getpid():
                self._h5.close()
            self._h5 = None

    def __enter__(self) -> TrajectoryStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_h5_pid"] = None
        state["_datasets"] = OrderedDict()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    def _group(self, i: int) -> h5py.Group:
        if not 0 <= i < self.num_episodes:
            raise IndexError(f"episode {i} out of range: {self.directory} holds {self.num_episodes}")
        return self._file()[f"episode_{i}"]

    def episode_attrs(self, i: int) -> dict:
        """All attributes of episode i (Minari's `id`, `seed`, `total_steps`, wam's and the writer's)."""
        return {k: _py(v) for k, v in self._group(i).attrs.items()}

    def read_episode(self, i: int, tokens: bool = False) -> Episode:
        """Episode i (with its token cache when `tokens`; DataError if it has none)."""
        g = self._group(i)
        attrs = self.episode_attrs(i)
        obs_tokens = None
        if tokens:
            if "obs_tokens" not in g:
                raise DataError(f"{self.directory}: episode {i} has no token cache; run the tokenizer first")
            obs_tokens = g["obs_tokens"][()]
        return Episode(
            observations=g["observations"][()],
            actions=g["actions"][()],
            rewards=g["rewards"][()],
            terminations=g["terminations"][()],
            truncations=g["truncations"][()],
            lives=g["infos/lives"][()] if "infos/lives" in g else None,
            seed=attrs.get("seed"),
            obs_tokens=obs_tokens,
            attrs={k: v for k, v in attrs.items() if k not in _RESERVED_ATTRS},
            ram=g[RAM_FIELD][()] if RAM_FIELD in g else None,
        )

    def read_window(self, i: int, start: int, stop: int, field: str) -> np.ndarray:
        """`field[start:stop]` of episode i: frames `[n, 84, 84]`, tokens `[n, 36]`, RAM `[n, 128]` uint8, or a
        step field `[n]`.

        `field` is one of observations, obs_tokens, ram, actions, rewards, terminations, truncations, lives.
        `ram` rows align with frames (row t is the RAM of observation t); an episode without RAM raises
        DataError.
        """
        if field not in _WINDOW_FIELDS:
            raise ValueError(f"unknown field {field!r}; choose one of {sorted(_WINDOW_FIELDS)}")
        return self._dataset(i, _WINDOW_FIELDS[field])[start:stop]

    # ---- writing

    def writer(self, commit_every: int = 1, commit_seconds: float = 10.0) -> EpisodeWriter:
        """A context manager appending episodes; see `EpisodeWriter`."""
        return EpisodeWriter(self, commit_every=commit_every, commit_seconds=commit_seconds)

    def write_tokens(self, tokens: Iterable[tuple[int, np.ndarray]], tokenizer_id: str,
                     overwrite: bool = False) -> None:
        """Store `obs_tokens` `[T+1, K]` (K tokens a frame, one K for the store) for the given episodes, atomically (all or none of them).

        A store holds the tokens of one tokenizer: a different `tokenizer_id` than the one present
        raises DataError unless `overwrite`, which drops every existing token cache first.
        """
        if not tokenizer_id:
            raise ValueError("tokenizer_id must be a non-empty string")
        if self._tokenizer_id not in (None, tokenizer_id) and not overwrite:
            raise DataError(f"{self.directory} holds tokens of tokenizer {self._tokenizer_id!r}, not "
                            f"{tokenizer_id!r}; pass overwrite=True to replace them")
        self.close()
        with _write_lock(self.data), _Transaction(self) as f:
            with _defer_sigint():
                if overwrite and _py(f.attrs.get("tokenizer_id")) != tokenizer_id:
                    for i in range(int(f.attrs["num_episodes"])):
                        g = f[f"episode_{i}"]
                        if "obs_tokens" in g:
                            del g["obs_tokens"]
                            del g.attrs["obs_tokens_crc32"]
            count = None  # tokens per frame: one for the whole store
            for i, tok in tokens:  # the tokenizer runs here, interruptible; each HDF5 write is not
                i = int(i)
                if not 0 <= i < self.num_episodes:
                    raise IndexError(f"episode {i} out of range: {self.directory} holds {self.num_episodes}")
                t = int(self._lengths[i])
                tok = _checked_tokens(tok, t, f"tokens of episode {i}", count)
                count = int(tok.shape[1])
                with _defer_sigint():
                    g = f[f"episode_{i}"]
                    if "obs_tokens" in g:
                        del g["obs_tokens"]
                    _create_dataset(g, "obs_tokens", tok, (min(TIME_CHUNK, t + 1), count))
                    g.attrs["obs_tokens_crc32"] = frames_crc32(tok)
            with _defer_sigint():
                f.attrs["tokenizer_id"] = tokenizer_id
                if count is not None:
                    f.attrs["tokens_per_frame"] = count
                f.attrs["num_tokenized"] = sum("obs_tokens" in f[f"episode_{i}"] for i in range(self.num_episodes))
        self._load()


def _full_provenance(game: str, provenance: dict) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def _version(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    prov = {"game": game, **{k: v for k, v in provenance.items() if k != "game"}}
    prov.setdefault("ale_py_version", _version("ale-py"))
    prov.setdefault("wam_version", _version("wam"))
    prov["schema_version"] = SCHEMA_VERSION
    prov.setdefault("created_utc", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return prov


def _dataset_id(directory: Path, game: str) -> str:
    name = directory.name if re.fullmatch(r"[-\w]+?-v\d+", directory.name) else (
        re.sub(r"[^-\w]", "_", directory.name) + "-v0")
    return f"{NAMESPACE}/{game_dir_name(game)}/{name}"


def _write_metadata(directory: Path, prov: dict, episodes: int, steps: int) -> None:
    game = str(prov.get("game", ""))
    meta = {
        "dataset_id": _dataset_id(directory, game),
        "minari_version": MINARI_VERSION,
        "data_format": "hdf5",
        "jpeg_encoding": False,
        "observation_space": _box_space_json(FRAME_SHAPE, 0, 255, "uint8"),
        "action_space": _discrete_space_json(NUM_ACTIONS),
        "total_episodes": int(episodes),
        "total_steps": int(steps),
        "algorithm_name": str(prov.get("policy", "")),
        "description": f"wam Atari trajectories of {game} (84x84 grayscale, full 18-action space, raw rewards); "
                       f"protocol {prov.get('protocol')}, behaviour policy {prov.get('policy')}",
        "wam_schema_version": SCHEMA_VERSION,
        "wam_provenance": prov,
    }
    legal = legal_actions(game)
    if legal is not None:  # so other tools need not know ALE's minimal action sets (docs/data-format.md)
        meta["wam_legal_actions"] = legal
    _write_json_atomic(directory / "data" / METADATA_FILE, meta)


def legal_actions(game: str) -> dict[str, list] | None:
    """The game's legal actions in the full 18-action space: {"ids": [...], "names": [...]}, or None for a
    name ale-py does not know."""
    from wam.datasets.atari import ACTION_NAMES, legal_action_mask

    try:
        ids = [int(i) for i in np.flatnonzero(legal_action_mask(game))]
    except (WamError, ValueError, KeyError):
        return None
    return {"ids": ids, "names": [ACTION_NAMES[i] for i in ids]}


def _write_namespaces(directory: Path) -> None:
    """Minari's namespace_metadata.json for `atari` and `atari/<game>` when the directory follows the layout."""
    game_dir = directory.parent
    if game_dir.parent.name != NAMESPACE:
        return
    for ns_dir, meta in ((game_dir.parent, {}), (game_dir, {"description": f"Atari {game_dir.name} (wam)"})):
        path = ns_dir / NAMESPACE_FILE
        if not path.exists():
            _write_json_atomic(path, meta)


def _create_dataset(g: h5py.Group, name: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
    g.create_dataset(name, data=data, chunks=chunks, compression="gzip", compression_opts=GZIP_LEVEL,
                     fletcher32=True)


def _write_episode(f: h5py.File, index: int, ep: Episode) -> None:
    """Write episode group `episode_{index}`; on any failure (Ctrl-C included) remove the partial group."""
    name = f"episode_{index}"
    t = ep.length
    try:
        g = f.create_group(name)
        _create_dataset(g, "observations", ep.observations, (min(TIME_CHUNK, t + 1), *FRAME_SHAPE))
        step_chunk = (min(SCALAR_CHUNK, t),)
        _create_dataset(g, "actions", ep.actions, step_chunk)
        _create_dataset(g, "rewards", ep.rewards, step_chunk)
        _create_dataset(g, "terminations", ep.terminations, step_chunk)
        _create_dataset(g, "truncations", ep.truncations, step_chunk)
        if ep.lives is not None:
            _create_dataset(g.require_group("infos"), "lives", ep.lives, step_chunk)
        if ep.ram is not None:
            _create_dataset(g.require_group("infos"), "ram", ep.ram, (min(RAM_CHUNK, t + 1), RAM_SIZE))
            g.attrs["ram_crc32"] = frames_crc32(ep.ram)
        if ep.obs_tokens is not None:
            _create_dataset(g, "obs_tokens", ep.obs_tokens, (min(TIME_CHUNK, t + 1), ep.obs_tokens.shape[1]))
            g.attrs["obs_tokens_crc32"] = frames_crc32(ep.obs_tokens)
        g.attrs["id"] = index
        if ep.seed is not None:
            g.attrs["seed"] = ep.seed
        g.attrs["total_steps"] = t
        g.attrs["length"] = t
        g.attrs["return"] = ep.total_return
        g.attrs["observations_crc32"] = frames_crc32(ep.observations)
        for k, v in ep.attrs.items():
            g.attrs[k] = _attr_value(v)
    except BaseException:
        if name in f:
            del f[name]
        raise


class _Transaction:
    """Copy-on-write edit of the committed file: copy to a temp file, edit, fsync, rename over it.

    Used by `write_tokens` (one commit). On an exception the temp file is deleted and nothing changes.
    """

    def __init__(self, store: TrajectoryStore):
        self.store = store
        self.tmp = store.data / f"{_TMP_PREFIX}{os.getpid()}"

    def __enter__(self) -> h5py.File:
        with _defer_sigint():
            _copy_file(self.store.path, self.tmp)
            self.f = h5py.File(self.tmp, "a")
        return self.f

    def __exit__(self, exc_type, exc, tb) -> None:
        with _defer_sigint():
            self.f.close()
            if exc_type is not None:
                self.tmp.unlink(missing_ok=True)
                return
            _publish(self.tmp, self.store.path)


def _publish(tmp: Path, path: Path) -> None:
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent, directory=True)


class EpisodeWriter:
    """Appends episodes to a store; every commit is atomic (see the module docstring).

    Use as a context manager. `append(ep)` returns the episode's index; a commit happens after
    every `commit_every` appended episodes, or at the first append `commit_seconds` after the last
    commit, and always on exit (also when leaving through an exception or Ctrl-C: episodes already
    appended in full are kept; a partly written one never is).
    """

    def __init__(self, store: TrajectoryStore, commit_every: int = 1, commit_seconds: float = 10.0):
        if commit_every < 1:
            raise ValueError(f"commit_every must be >= 1, got {commit_every}")
        self.store = store
        self.commit_every = commit_every
        self.commit_seconds = commit_seconds
        self._held: contextlib.ExitStack | None = None
        self._f: h5py.File | None = None
        self._tmp = store.data / f"{_TMP_PREFIX}{os.getpid()}"
        # (length, return, has tokens, has RAM) of the uncommitted episodes
        self._pending: list[tuple[int, float, bool, bool]] = []
        self._last_commit = time.monotonic()
        self.commits = 0
        self.copy_seconds = 0.0

    def __enter__(self) -> EpisodeWriter:
        self._held = contextlib.ExitStack()
        self._held.enter_context(_write_lock(self.store.data))
        self.store.refresh()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.commit()
        finally:
            if self._f is not None:  # commit failed: drop the temp file, the committed file is intact
                with _defer_sigint():
                    self._f.close()
                    self._f = None
                    self._tmp.unlink(missing_ok=True)
            if self._held is not None:
                self._held.close()
                self._held = None

    @property
    def num_episodes(self) -> int:
        """Episodes in the store including the uncommitted ones."""
        return self.store.num_episodes + len(self._pending)

    def append(self, ep: Episode) -> int:
        """Append one episode (committed per the writer's policy); returns its index."""
        if self._held is None:
            raise RuntimeError("use EpisodeWriter as a context manager: `with store.writer() as w:`")
        if not (ep.terminations[-1] or ep.truncations[-1]):
            raise ValueError("an episode must end with a termination or a truncation (mark a cut one truncated)")
        if ep.terminations[:-1].any() or ep.truncations[:-1].any():
            raise ValueError("terminations/truncations may only be set at an episode's last step")
        if ep.obs_tokens is not None and self.store.tokenizer_id() is None:
            raise DataError(f"{self.store.directory} has no tokenizer_id; add token caches with write_tokens")
        if ep.obs_tokens is not None and ep.obs_tokens.shape[1] != self.store.tokens_per_frame:
            raise DataError(f"{self.store.directory} caches {self.store.tokens_per_frame} tokens a frame; this "
                            f"episode has {ep.obs_tokens.shape[1]}")
        if self._f is None:
            t0 = time.perf_counter()
            with _defer_sigint():
                _copy_file(self.store.path, self._tmp)
                self._f = h5py.File(self._tmp, "a")
            self.copy_seconds += time.perf_counter() - t0
        index = self.num_episodes
        with _defer_sigint():
            _write_episode(self._f, index, ep)
            self._pending.append((ep.length, ep.total_return, ep.obs_tokens is not None, ep.ram is not None))
        if len(self._pending) >= self.commit_every or time.monotonic() - self._last_commit >= self.commit_seconds:
            self.commit()
        return index

    def commit(self) -> None:
        """Make every appended episode durable (no-op when nothing is pending)."""
        if self._f is None:
            return
        with _defer_sigint():
            self._commit()

    def _commit(self) -> None:
        f = self._f
        store = self.store
        lengths = np.concatenate([store._lengths, np.array([p[0] for p in self._pending], np.int64)])
        returns = np.concatenate([store._returns, np.array([p[1] for p in self._pending], np.float64)])
        tokenized = store._num_tokenized + sum(p[2] for p in self._pending)
        with_ram = store._num_ram + sum(p[3] for p in self._pending)
        f.attrs["num_episodes"] = len(lengths)
        f.attrs["num_steps"] = int(lengths.sum())
        f.attrs["num_tokenized"] = tokenized
        f.flush()
        f.close()
        self._f = None
        _publish(self._tmp, store.path)
        # the HDF5 file is committed; metadata.json follows (a crash here is repaired at the next open)
        _write_metadata(store.directory, store.provenance, len(lengths), int(lengths.sum()))
        store.close()
        store._lengths, store._returns, store._num_tokenized = lengths, returns, tokenized
        store._num_ram = with_ram
        store._mtime = os.stat(store.path).st_mtime_ns
        self._pending.clear()
        self._last_commit = time.monotonic()
        self.commits += 1


# `validate`, `dataset_info` and `Problem` live in wam.datasets.validate and are re-exported here.
from wam.datasets.validate import Problem, dataset_info, validate  # noqa: E402

__all__ = ["RAM_FIELD", "RAM_SIZE", "Episode", "EpisodeWriter", "TrajectoryStore", "Problem", "dataset_dir",
           "dataset_info", "find_datasets", "frames_crc32", "game_dir_name", "validate"]
