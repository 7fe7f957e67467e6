"""The machinery under `SegmentSampler`: the table of sampleable episodes, reusable batch buffers, windows
read from the stores (or from RAM), and the seeded source that turns a batch index into segments.

Everything here is driven by `wam.datasets.sampler.SegmentSampler`; see its module docstring for the
sampling rules and docs/sampler.md for the measurements behind them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from wam.datasets.atari import NUM_ACTIONS
from wam.datasets.batch import Batch
from wam.datasets.errors import DataError
from wam.datasets.returns import episode_mc_returns
from wam.datasets.store import TrajectoryStore

log = logging.getLogger(__name__)

# Store field names.
OBS_FIELD, TOKENS_FIELD = "observations", "obs_tokens"
STEP_FIELDS: tuple[tuple[str, type], ...] = (
    ("actions", np.int64), ("rewards", np.float32), ("terminations", np.bool_), ("truncations", np.bool_),
)


@dataclass(frozen=True)
class EpisodeTable:
    """Every used episode of every dataset, in dataset order then episode order (E rows).

    The per-step arrays of all episodes are concatenated ("step rows"); so are the observations
    when they are held in RAM ("obs rows", one more per episode than steps).
    """

    dataset: np.ndarray  # [E] int64, index into the sampler's datasets
    episode: np.ndarray  # [E] int64, episode index inside its store
    length: np.ndarray  # [E] int64, transitions used (after max_transitions), >= 1
    step_offset: np.ndarray  # [E] int64, first step row
    obs_offset: np.ndarray  # [E] int64, first obs row
    game_id: np.ndarray  # [E] int64

    @property
    def num_steps(self) -> int:
        return int(self.length.sum())


@dataclass
class SegmentBuffers:
    """One preallocated set of batch arrays and the tensors that share their memory."""

    obs: np.ndarray  # [B, H+1, 84, 84] uint8 or [B, H+1, 36] int64
    actions: np.ndarray  # [B, H] int64
    rewards: np.ndarray  # [B, H] float32
    terminations: np.ndarray  # [B, H] bool
    truncations: np.ndarray  # [B, H] bool
    mask: np.ndarray  # [B, H] bool
    game_ids: np.ndarray  # [B] int64
    legal_actions: np.ndarray  # [B, 18] bool
    next_action: np.ndarray  # [B] int64, a_H or -1
    mc_return: np.ndarray | None  # [B, H] float32 G_t (NaN where unknown), when the source computes returns
    tokens_u16: np.ndarray | None  # [B, H+1, 36] uint16 scratch for token gathers from RAM

    @classmethod
    def allocate(cls, batch_size: int, horizon: int, obs_shape: tuple[int, ...], tokens: bool,
                 returns: bool = False) -> SegmentBuffers:
        b, h = batch_size, horizon
        return cls(
            obs=np.zeros((b, h + 1, *obs_shape), np.int64 if tokens else np.uint8),
            actions=np.zeros((b, h), np.int64),
            rewards=np.zeros((b, h), np.float32),
            terminations=np.zeros((b, h), np.bool_),
            truncations=np.zeros((b, h), np.bool_),
            mask=np.zeros((b, h), np.bool_),
            game_ids=np.zeros((b,), np.int64),
            legal_actions=np.zeros((b, NUM_ACTIONS), np.bool_),
            next_action=np.zeros((b,), np.int64),
            mc_return=np.zeros((b, h), np.float32) if returns else None,
            tokens_u16=np.zeros((b, h + 1, *obs_shape), np.uint16) if tokens else None,
        )

    def batch(self) -> Batch:
        """The buffers as a Batch of tensors sharing their memory (no copy)."""
        return Batch(
            obs=torch.from_numpy(self.obs), actions=torch.from_numpy(self.actions),
            rewards=torch.from_numpy(self.rewards), terminations=torch.from_numpy(self.terminations),
            truncations=torch.from_numpy(self.truncations), mask=torch.from_numpy(self.mask),
            game_ids=torch.from_numpy(self.game_ids), legal_actions=torch.from_numpy(self.legal_actions),
            next_action=torch.from_numpy(self.next_action),
            mc_return=None if self.mc_return is None else torch.from_numpy(self.mc_return),
        )


def read_field(store: TrajectoryStore, episode: int, start: int, stop: int, field: str) -> np.ndarray:
    """`store.read_window`, with a damaged file reported as a DataError that names it."""
    try:
        return store.read_window(episode, start, stop, field)
    except OSError as e:
        raise DataError(f"{store.path}: cannot read episode {episode} {field}[{start}:{stop}] ({e}); "
                        f"run `wam data validate {store.directory}`") from e


class WindowReader:
    """Reads `[start, stop)` of one per-episode field of one dataset file straight into a caller's array.

    The hot path of `in_memory=False`. Unlike `TrajectoryStore.read_window` (which opens the episode's
    HDF5 dataset on every call and returns a new array) it keeps up to `max_open` dataset handles
    open (LRU) and reads with h5py's low-level `DatasetID.read` into the batch buffer (HDF5 converts
    the dtype), skipping the ~30 us of high-level selection parsing per read. The handles get no
    HDF5 chunk cache: with thousands of episodes per-handle caches would add up to the decompressed
    dataset, and random segments of a dataset larger than RAM rarely revisit a chunk. Fletcher32
    checksums are verified by HDF5 on every read, as elsewhere.
    """

    def __init__(self, path: Path, field: str, max_open: int = 1024) -> None:
        self.path, self.field, self.max_open = path, field, max_open
        self._file: h5py.File | None = None
        self._handles: OrderedDict[int, tuple[h5py.h5d.DatasetID, h5py.h5s.SpaceID]] = OrderedDict()
        self._mem_spaces: dict[tuple[tuple[int, ...], int], h5py.h5s.SpaceID] = {}
        self._dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
        self._dapl.set_chunk_cache(0, 0, 1.0)  # (slots, bytes, w0): no chunk cache

    def _dataset(self, episode: int) -> tuple[h5py.h5d.DatasetID, h5py.h5s.SpaceID]:
        """(dataset id, its file dataspace) of an episode, opened once and kept (LRU)."""
        handle = self._handles.get(episode)
        if handle is not None:
            self._handles.move_to_end(episode)
            return handle
        try:
            if self._file is None:
                self._file = h5py.File(self.path, "r")
            dsid = h5py.h5d.open(self._file.id, f"episode_{episode}/{self.field}".encode(), self._dapl)
        except (OSError, KeyError) as e:
            raise DataError(f"{self.path}: cannot open episode {episode} {self.field} ({e}); "
                            f"run `wam data validate {self.path.parent.parent}`") from e
        handle = self._handles[episode] = (dsid, dsid.get_space())
        if len(self._handles) > self.max_open:
            self._handles.popitem(last=False)
        return handle

    def _mem_space(self, shape: tuple[int, ...], n: int) -> h5py.h5s.SpaceID:
        """A memory dataspace of `shape` with its first n rows selected (cached per shape and n)."""
        space = self._mem_spaces.get((shape, n))
        if space is None:
            space = h5py.h5s.create_simple(shape)
            space.select_hyperslab((0,) * len(shape), (n, *shape[1:]))
            self._mem_spaces[shape, n] = space
        return space

    def read_into(self, episode: int, start: int, stop: int, out: np.ndarray) -> None:
        """`out[:stop-start] = field[start:stop]` of the episode (out: C-contiguous, rows shaped like the field's)."""
        dsid, file_space = self._dataset(episode)
        n = stop - start
        rows = file_space.shape[0]
        if not 0 <= start < stop <= rows:
            raise IndexError(f"{self.path}: episode {episode} {self.field}[{start}:{stop}] outside its {rows} rows")
        file_space.select_hyperslab((start,) + (0,) * (out.ndim - 1), (n, *out.shape[1:]))
        try:
            dsid.read(self._mem_space(out.shape, n), file_space, out)
        except OSError as e:  # HDF5 read errors, failed fletcher32 checksums included
            raise DataError(f"{self.path}: cannot read episode {episode} {self.field}[{start}:{stop}] ({e}); "
                            f"run `wam data validate {self.path.parent.parent}`") from e

    def close(self) -> None:
        self._handles.clear()
        self._mem_spaces.clear()
        if self._file is not None:
            self._file.close()
            self._file = None


class SegmentSource:
    """Everything needed to fill batch k (tables, arrays in RAM, open stores); no thread state.

    The prefetch thread holds this object, not the `SegmentSampler`, so an unclosed sampler can still
    be garbage-collected (its finalizer stops the thread).
    """

    def __init__(self, stores: list[TrajectoryStore], table: EpisodeTable, probs: np.ndarray,
                 horizon: int, batch_size: int, seed: int, tokens: bool, in_memory: bool,
                 obs_shape: tuple[int, ...], legal: np.ndarray, returns: tuple[float, str] | None = None) -> None:
        self.stores = stores
        self.table = table
        self.probs = probs  # [D] float64, sums to 1
        self.horizon = horizon
        self.batch_size = batch_size
        self.seed = seed
        self.tokens = tokens
        self.field = TOKENS_FIELD if tokens else OBS_FIELD
        self.obs_shape = obs_shape
        self.legal = legal  # [G, 18] bool
        self.returns = returns  # (gamma, reward transform) of the Monte-Carlo returns, or None
        num_datasets = len(stores)
        # First step row and number of steps of each dataset (episodes are grouped by dataset).
        self.dataset_steps = np.bincount(table.dataset, weights=table.length, minlength=num_datasets).astype(np.int64)
        self.dataset_offset = np.zeros(num_datasets, np.int64)
        self.dataset_offset[1:] = np.cumsum(self.dataset_steps)[:-1]
        self.steps = self._load_steps()  # name -> [S+1] with a zero sentinel row at S
        self.sentinel = table.num_steps
        self.obs: np.ndarray | None = self._load_obs() if in_memory else None  # [O, *obs_shape]
        self.readers = None if in_memory else [WindowReader(s.path, self.field) for s in stores]
        for store in stores:  # everything else was read above; the readers use their own handles
            store.close()

    # ----------------------------------------------------------------------------------- loading
    def _load_steps(self) -> dict[str, np.ndarray]:
        t = self.table
        out = {name: np.zeros(t.num_steps + 1, dtype) for name, dtype in STEP_FIELDS}
        stored = [s.episode_lengths() for s in self.stores]
        for d, e, n, off in zip(t.dataset, t.episode, t.length, t.step_offset):
            store = self.stores[d]
            for name, _ in STEP_FIELDS:
                out[name][off:off + n] = read_field(store, int(e), 0, int(n), name)
            if n < stored[d][e]:  # cut by max_transitions: the episode goes on in the data, so it ends truncated
                out["truncations"][off + n - 1] = True
        if self.returns is not None:
            gamma, how = self.returns
            mc = np.full(t.num_steps + 1, np.nan, np.float32)  # the sentinel row (padding) stays NaN
            for n, off in zip(t.length, t.step_offset):
                mc[off:off + n] = episode_mc_returns(out["rewards"][off:off + n], bool(out["truncations"][off + n - 1]),
                                                     gamma, how)
            out["mc_return"] = mc
        return out

    def _load_obs(self) -> np.ndarray:
        t = self.table
        rows = int((t.length + 1).sum())
        obs = np.empty((rows, *self.obs_shape), np.uint16 if self.tokens else np.uint8)
        for d, e, n, off in zip(t.dataset, t.episode, t.length, t.obs_offset):
            obs[off:off + n + 1] = read_field(self.stores[d], int(e), 0, int(n) + 1, self.field)
        return obs

    # ---------------------------------------------------------------------------------- sampling
    def plan(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Episode rows `[B]` and start steps `[B]` of batch `index` (a pure function of seed, index)."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, index])))
        datasets = rng.choice(len(self.probs), size=self.batch_size, p=self.probs)  # [B]
        within = rng.integers(0, self.dataset_steps[datasets])  # [B], uniform over the dataset's steps
        rows = self.dataset_offset[datasets] + within  # [B] global step rows
        episodes = np.searchsorted(self.table.step_offset, rows, side="right") - 1  # [B]
        starts = rows - self.table.step_offset[episodes]  # [B]
        return episodes, starts

    def fill(self, index: int, buf: SegmentBuffers) -> None:
        """Write batch `index` into `buf`."""
        t, h = self.table, self.horizon
        episodes, starts = self.plan(index)
        lengths = t.length[episodes][:, None]  # [B, 1]
        pos = starts[:, None] + np.arange(h)  # [B, H]
        np.less(pos, lengths, out=buf.mask)
        step_rows = np.where(buf.mask, t.step_offset[episodes][:, None] + pos, self.sentinel)  # [B, H]
        np.take(self.steps["actions"], step_rows, out=buf.actions, mode="clip")
        np.take(self.steps["rewards"], step_rows, out=buf.rewards, mode="clip")
        np.take(self.steps["terminations"], step_rows, out=buf.terminations, mode="clip")
        np.take(self.steps["truncations"], step_rows, out=buf.truncations, mode="clip")
        if buf.mc_return is not None:
            np.take(self.steps["mc_return"], step_rows, out=buf.mc_return, mode="clip")
        last = starts + h  # step of frame o_H: it has an action when it lies inside the episode
        has_next = last < lengths[:, 0]
        np.take(self.steps["actions"], np.where(has_next, t.step_offset[episodes] + last, self.sentinel),
                out=buf.next_action, mode="clip")
        buf.next_action[~has_next] = -1
        np.take(t.game_id, episodes, out=buf.game_ids, mode="clip")
        np.take(self.legal, buf.game_ids, axis=0, out=buf.legal_actions, mode="clip")
        if self.obs is not None:
            obs_pos = np.minimum(starts[:, None] + np.arange(h + 1), lengths)  # [B, H+1], pad = last frame
            obs_rows = t.obs_offset[episodes][:, None] + obs_pos
            if self.tokens:
                np.take(self.obs, obs_rows, axis=0, out=buf.tokens_u16, mode="clip")
                np.copyto(buf.obs, buf.tokens_u16)
            else:
                np.take(self.obs, obs_rows, axis=0, out=buf.obs, mode="clip")
        else:
            self._read_obs(episodes, starts, buf.obs)

    def _read_obs(self, episodes: np.ndarray, starts: np.ndarray, out: np.ndarray) -> None:
        """Read each segment's frames from its HDF5 file into `out` [B, H+1, ...], padding included."""
        t, h = self.table, self.horizon
        for b, (e, s) in enumerate(zip(episodes.tolist(), starts.tolist())):
            stop = min(s + h, int(t.length[e])) + 1
            self.readers[t.dataset[e]].read_into(int(t.episode[e]), s, stop, out[b])
            n = stop - s
            out[b, n:] = out[b, n - 1]

    def close(self) -> None:
        for reader in self.readers or ():
            reader.close()
