"""Writing a dataset: the writer lock, copy-on-write transactions and `EpisodeWriter`.

A writer never modifies the committed `main_data.hdf5` in place; see `wam.datasets.store` for the atomicity
contract these functions keep.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from wam.datasets.errors import DataError
from wam.datasets.files import fsync_path
from wam.datasets.layout import (
    FRAME_SHAPE,
    GZIP_LEVEL,
    RAM_CHUNK,
    RAM_SIZE,
    SCALAR_CHUNK,
    TIME_CHUNK,
    TMP_PREFIX,
    Episode,
    attr_value,
    frames_crc32,
)
from wam.datasets.metadata import write_metadata

if TYPE_CHECKING:
    from wam.datasets.store import TrajectoryStore

log = logging.getLogger(__name__)

_LOCK_FILE = ".write.lock"

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


@contextlib.contextmanager
def write_lock(data: Path) -> Iterator[None]:
    """Exclusive, non-blocking writer lock (released by the kernel if the process dies)."""
    fd = os.open(data / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise DataError(f"{data.parent} is being written by another process; wait for it to finish") from e
            raise
        for stale in data.glob(TMP_PREFIX + "*"):  # we hold the lock: any temp file is a dead writer's
            log.warning("removing %s left by an interrupted writer", stale)
            stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def defer_sigint() -> Iterator[None]:
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


def create_dataset(g: h5py.Group, name: str, data: np.ndarray, chunks: tuple[int, ...]) -> None:
    g.create_dataset(name, data=data, chunks=chunks, compression="gzip", compression_opts=GZIP_LEVEL,
                     fletcher32=True)


def _write_episode(f: h5py.File, index: int, ep: Episode) -> None:
    """Write episode group `episode_{index}`; on any failure (Ctrl-C included) remove the partial group."""
    name = f"episode_{index}"
    t = ep.length
    try:
        g = f.create_group(name)
        create_dataset(g, "observations", ep.observations, (min(TIME_CHUNK, t + 1), *FRAME_SHAPE))
        step_chunk = (min(SCALAR_CHUNK, t),)
        create_dataset(g, "actions", ep.actions, step_chunk)
        create_dataset(g, "rewards", ep.rewards, step_chunk)
        create_dataset(g, "terminations", ep.terminations, step_chunk)
        create_dataset(g, "truncations", ep.truncations, step_chunk)
        if ep.lives is not None:
            create_dataset(g.require_group("infos"), "lives", ep.lives, step_chunk)
        if ep.ram is not None:
            create_dataset(g.require_group("infos"), "ram", ep.ram, (min(RAM_CHUNK, t + 1), RAM_SIZE))
            g.attrs["ram_crc32"] = frames_crc32(ep.ram)
        if ep.obs_tokens is not None:
            create_dataset(g, "obs_tokens", ep.obs_tokens, (min(TIME_CHUNK, t + 1), ep.obs_tokens.shape[1]))
            g.attrs["obs_tokens_crc32"] = frames_crc32(ep.obs_tokens)
        g.attrs["id"] = index
        if ep.seed is not None:
            g.attrs["seed"] = ep.seed
        g.attrs["total_steps"] = t
        g.attrs["length"] = t
        g.attrs["return"] = ep.total_return
        g.attrs["observations_crc32"] = frames_crc32(ep.observations)
        for k, v in ep.attrs.items():
            g.attrs[k] = attr_value(v)
    except BaseException:
        if name in f:
            del f[name]
        raise


class Transaction:
    """Copy-on-write edit of the committed file: copy to a temp file, edit, fsync, rename over it.

    Used by `write_tokens` (one commit). On an exception the temp file is deleted and nothing changes.
    """

    def __init__(self, store: TrajectoryStore):
        self.store = store
        self.tmp = store.data / f"{TMP_PREFIX}{os.getpid()}"

    def __enter__(self) -> h5py.File:
        with defer_sigint():
            _copy_file(self.store.path, self.tmp)
            self.f = h5py.File(self.tmp, "a")
        return self.f

    def __exit__(self, exc_type, exc, tb) -> None:
        with defer_sigint():
            self.f.close()
            if exc_type is not None:
                self.tmp.unlink(missing_ok=True)
                return
            publish(self.tmp, self.store.path)


def publish(tmp: Path, path: Path) -> None:
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
        self._tmp = store.data / f"{TMP_PREFIX}{os.getpid()}"
        # (length, return, has tokens, has RAM) of the uncommitted episodes
        self._pending: list[tuple[int, float, bool, bool]] = []
        self._last_commit = time.monotonic()
        self.commits = 0
        self.copy_seconds = 0.0

    def __enter__(self) -> EpisodeWriter:
        self._held = contextlib.ExitStack()
        self._held.enter_context(write_lock(self.store.data))
        self.store.refresh()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.commit()
        finally:
            if self._f is not None:  # commit failed: drop the temp file, the committed file is intact
                with defer_sigint():
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
            with defer_sigint():
                _copy_file(self.store.path, self._tmp)
                self._f = h5py.File(self._tmp, "a")
            self.copy_seconds += time.perf_counter() - t0
        index = self.num_episodes
        with defer_sigint():
            _write_episode(self._f, index, ep)
            self._pending.append((ep.length, ep.total_return, ep.obs_tokens is not None, ep.ram is not None))
        if len(self._pending) >= self.commit_every or time.monotonic() - self._last_commit >= self.commit_seconds:
            self.commit()
        return index

    def commit(self) -> None:
        """Make every appended episode durable (no-op when nothing is pending)."""
        if self._f is None:
            return
        with defer_sigint():
            self._commit()

    def _commit(self) -> None:
        f = self._f
        store = self.store
        steps = store.num_steps + sum(p[0] for p in self._pending)
        f.attrs["num_episodes"] = self.num_episodes
        f.attrs["num_steps"] = steps
        f.attrs["num_tokenized"] = store.num_tokenized + sum(p[2] for p in self._pending)
        f.flush()
        f.close()
        self._f = None
        publish(self._tmp, store.path)
        # the HDF5 file is committed; metadata.json follows (a crash here is repaired at the next open)
        write_metadata(store.directory, store.provenance, self.num_episodes, steps)
        store.extend_index(self._pending)
        self._pending.clear()
        self._last_commit = time.monotonic()
        self.commits += 1
