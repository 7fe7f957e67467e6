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

The layout's names and the episode record live in `wam.datasets.layout`, writing in `wam.datasets.writer`,
Minari's metadata in `wam.datasets.metadata`, checks in `wam.datasets.validate`; this module is the store a
user opens, and re-exports the layout's public names beside it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from wam.datasets.errors import DataError
from wam.datasets.files import fsync_path
from wam.datasets.layout import (
    MAIN_FILE,
    METADATA_FILE,
    NAMESPACE_FILE,
    NUM_TOKENS,
    PROVENANCE_ATTR,
    RAM_FIELD,
    RAM_SIZE,
    RESERVED_ATTRS,
    SCHEMA_VERSION,
    TIME_CHUNK,
    TMP_PREFIX,
    Episode,
    attr_value,
    checked_tokens,
    dataset_dir,
    find_datasets,
    frames_crc32,
    game_dir_name,
    is_dataset,
    py_value,
    read_provenance,
)
from wam.datasets.metadata import full_provenance, legal_actions, write_metadata, write_namespaces
from wam.datasets.writer import EpisodeWriter, Transaction, create_dataset, defer_sigint, write_lock

log = logging.getLogger(__name__)

_WINDOW_FIELDS = {"observations": "observations", "obs_tokens": "obs_tokens", "actions": "actions",
                  "rewards": "rewards", "terminations": "terminations", "truncations": "truncations",
                  "lives": "infos/lives", "ram": RAM_FIELD}
_PROVENANCE_MUST_MATCH = ("game", "protocol", "policy")
_CHUNK_CACHE_BYTES = 512 * 1024
_DATASET_LRU = 128


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
        prov = full_provenance(game, provenance)
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
        with write_lock(data):
            tmp = data / f"{TMP_PREFIX}{os.getpid()}"
            with h5py.File(tmp, "w", track_order=True) as f:
                f.attrs["wam_schema_version"] = SCHEMA_VERSION
                f.attrs["num_episodes"] = 0
                f.attrs["num_steps"] = 0
                f.attrs[PROVENANCE_ATTR] = json.dumps(prov)
                for k, v in prov.items():
                    if v is not None:
                        f.attrs[k] = attr_value(v)
            fsync_path(tmp)
            os.replace(tmp, data / MAIN_FILE)
            fsync_path(data, directory=True)
            write_metadata(directory, prov, 0, 0)
            write_namespaces(directory)
        log.info("created dataset %s (%s)", directory, game)
        return cls(directory)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> TrajectoryStore:
        """The dataset at `directory`; DataError if it is missing or not a wam dataset."""
        directory = Path(directory)
        if not directory.exists():
            raise DataError(f"{directory} does not exist")
        if not is_dataset(directory):
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
            self.provenance: dict = read_provenance(f)
            self.game: str = str(self.provenance.get("game", py_value(f.attrs.get("game", ""))))
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
            self._tokenizer_id = py_value(f.attrs["tokenizer_id"]) if "tokenizer_id" in f.attrs else None
            self._num_tokenized = int(f.attrs.get("num_tokenized", 0))
            self._tokens_per_frame = int(py_value(f.attrs.get("tokens_per_frame", NUM_TOKENS)))
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
            write_metadata(self.directory, self.provenance, self.num_episodes, self.num_steps)
        except OSError as e:
            log.warning("could not rewrite %s: %s", meta_path, e)

    def refresh(self) -> None:
        """Re-read the committed file if a writer has committed since it was opened."""
        if os.stat(self.path).st_mtime_ns != self._mtime:
            self._load()

    def extend_index(self, pending: list[tuple[int, float, bool, bool]]) -> None:
        """After a writer committed the `pending` episodes ((length, return, has tokens, has RAM) each):
        add them to the in-memory index without re-reading the file."""
        self.close()
        self._lengths = np.concatenate([self._lengths, np.array([p[0] for p in pending], np.int64)])
        self._returns = np.concatenate([self._returns, np.array([p[1] for p in pending], np.float64)])
        self._num_tokenized += sum(p[2] for p in pending)
        self._num_ram += sum(p[3] for p in pending)
        self._mtime = os.stat(self.path).st_mtime_ns

    # ---- summary

    @property
    def num_tokenized(self) -> int:
        """Episodes that hold a token cache."""
        return self._num_tokenized

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
        return {k: py_value(v) for k, v in self._group(i).attrs.items()}

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
            attrs={k: v for k, v in attrs.items() if k not in RESERVED_ATTRS},
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
        with write_lock(self.data), Transaction(self) as f:
            with defer_sigint():
                if overwrite and py_value(f.attrs.get("tokenizer_id")) != tokenizer_id:
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
                tok = checked_tokens(tok, t, f"tokens of episode {i}", count)
                count = int(tok.shape[1])
                with defer_sigint():
                    g = f[f"episode_{i}"]
                    if "obs_tokens" in g:
                        del g["obs_tokens"]
                    create_dataset(g, "obs_tokens", tok, (min(TIME_CHUNK, t + 1), count))
                    g.attrs["obs_tokens_crc32"] = frames_crc32(tok)
            with defer_sigint():
                f.attrs["tokenizer_id"] = tokenizer_id
                if count is not None:
                    f.attrs["tokens_per_frame"] = count
                f.attrs["num_tokenized"] = sum("obs_tokens" in f[f"episode_{i}"] for i in range(self.num_episodes))
        self._load()


# The package's public face for datasets: the store, its writer and the layout's names callers need.
__all__ = ["MAIN_FILE", "METADATA_FILE", "NAMESPACE_FILE", "RAM_FIELD", "RAM_SIZE", "TIME_CHUNK", "Episode",
           "EpisodeWriter", "TrajectoryStore", "dataset_dir", "find_datasets", "frames_crc32", "game_dir_name",
           "legal_actions"]
