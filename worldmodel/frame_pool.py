"""The tokenizer's training frames: episodes split into training and held-out ones, a pool of frame windows
sampled uniformly (refreshed when the data does not fit) and the held-out evaluation frames."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wam.datasets.errors import DataError, WamError
from wam.datasets.store import TrajectoryStore, find_datasets
from wam.worldmodel.tokenizer import (
    FRAME_SIZE,
)

log = logging.getLogger(__name__)


def split_episodes(stores: Sequence[TrajectoryStore], holdout_fraction: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per dataset: (training episode ids, held-out episode ids); the held-out ones are the last episodes.

    A dataset of E >= 2 episodes holds out max(1, round(fraction * E)) of them; a single-episode dataset
    only trains. At least one episode over all datasets must be held out, and one trained on.
    """
    splits = []
    for s in stores:
        e = s.num_episodes
        n_out = 0 if e < 2 else min(e - 1, max(1, round(holdout_fraction * e)))
        splits.append((np.arange(e - n_out), np.arange(e - n_out, e)))
    if not any(len(h) for _, h in splits):
        raise DataError("tokenizer training holds out whole episodes for evaluation, but every dataset has fewer "
                        "than 2 episodes; collect more episodes (e.g. `wam data collect --episodes 10`)")
    if not any(len(t) for t, _ in splits):
        raise DataError("no training episodes left after holding out the evaluation episodes")
    return splits


class FramePool:
    """Training frames in RAM, as a list of windows `(dataset, episode, start, stop)` and their frames.

    When every training frame fits in `capacity`, the windows are whole episodes and never change;
    otherwise they are random `window`-frame windows (dataset by frame count, episode by length, start
    uniform) and `refresh` replaces a share of them. `state_dict` holds the windows, so a resumed run
    reloads exactly the same frames.
    """

    def __init__(self, stores: Sequence[TrajectoryStore], train_episodes: Sequence[np.ndarray], capacity: int,
                 window: int, rng: np.random.Generator, windows: np.ndarray | None = None):
        self.stores, self.capacity, self.window = list(stores), int(capacity), int(window)
        self.lengths = [s.episode_lengths()[ep] + 1 for s, ep in zip(self.stores, train_episodes)]  # frames
        self.train_episodes = [np.asarray(ep, dtype=np.int64) for ep in train_episodes]
        self.total_frames = int(sum(int(n.sum()) for n in self.lengths))
        self.fits = self.total_frames <= self.capacity
        if windows is None:
            windows = self._all_windows() if self.fits else self._random_windows(max(1, capacity // window), rng)
        self.windows = np.asarray(windows, dtype=np.int64).reshape(-1, 4)  # [W, 4]
        self.frames, self.dataset_of = self._load(self.windows)
        log.info("frame pool: %d frames in RAM (%s) of %d training frames", len(self.frames),
                 "all episodes" if self.fits else f"{len(self.windows)} random windows of {window}", self.total_frames)

    def _all_windows(self) -> np.ndarray:
        rows = [(d, ep, 0, n) for d, (eps, ns) in enumerate(zip(self.train_episodes, self.lengths))
                for ep, n in zip(eps.tolist(), ns.tolist())]
        return np.array(rows, dtype=np.int64).reshape(-1, 4)

    def _random_windows(self, count: int, rng: np.random.Generator) -> np.ndarray:
        per_dataset = np.array([n.sum() for n in self.lengths], dtype=np.float64)
        rows = np.zeros((count, 4), dtype=np.int64)
        for k in range(count):
            d = int(rng.choice(len(per_dataset), p=per_dataset / per_dataset.sum()))
            lengths = self.lengths[d]
            j = int(rng.choice(len(lengths), p=lengths / lengths.sum()))
            n = int(lengths[j])
            start = int(rng.integers(0, max(1, n - self.window + 1)))
            rows[k] = (d, self.train_episodes[d][j], start, min(n, start + self.window))
        return rows

    def _load(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = int((windows[:, 3] - windows[:, 2]).sum())
        frames = np.empty((n, FRAME_SIZE, FRAME_SIZE), dtype=np.uint8)  # [N, 84, 84]
        dataset_of = np.empty(n, dtype=np.int64)
        at = 0
        for d, ep, start, stop in windows.tolist():
            frames[at:at + stop - start] = self.stores[d].read_window(ep, start, stop, "observations")
            dataset_of[at:at + stop - start] = d
            at += stop - start
        return frames, dataset_of

    def refresh(self, fraction: float, rng: np.random.Generator) -> None:
        """Replace `fraction` of the windows by new random ones (no-op when every frame is in RAM)."""
        if self.fits:
            return
        k = max(1, int(len(self.windows) * fraction))
        replace = rng.choice(len(self.windows), size=k, replace=False)
        self.windows[replace] = self._random_windows(k, rng)
        self.frames, self.dataset_of = self._load(self.windows)

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """([B, 84, 84] uint8 frames, [B] dataset index) drawn uniformly (with replacement) from the pool."""
        idx = rng.integers(0, len(self.frames), size=batch_size)
        return self.frames[idx], self.dataset_of[idx]

    def median_frames(self, games: Sequence[str], max_frames: int = 4096) -> np.ndarray:
        """[n_datasets, 84, 84] uint8: each dataset gets the per-pixel median frame of its *game* (all the
        pool's frames of the datasets of that game, or `max_frames` of them drawn evenly): the background
        that foreground fidelity and the foreground-weighted loss measure objects against."""
        out = np.zeros((len(self.stores), FRAME_SIZE, FRAME_SIZE), dtype=np.uint8)
        for game in dict.fromkeys(games):
            members = [d for d, g in enumerate(games) if g == game]
            idx = np.flatnonzero(np.isin(self.dataset_of, members))
            if not len(idx):
                continue
            if len(idx) > max_frames:
                idx = idx[np.linspace(0, len(idx) - 1, num=max_frames).round().astype(np.int64)]
            med = np.median(self.frames[idx], axis=0).round().astype(np.uint8)
            out[members] = med
        return out

    def mean_frames(self) -> np.ndarray:
        """[n_datasets, 84, 84] float32 in [0, 1]: each dataset's per-pixel mean frame over the pool."""
        out = np.zeros((len(self.stores), FRAME_SIZE, FRAME_SIZE), dtype=np.float64)
        for d in range(len(self.stores)):
            sel = self.frames[self.dataset_of == d]
            if len(sel):
                out[d] = sel.mean(axis=0, dtype=np.float64) / 255.0
        return out.astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"windows": torch.from_numpy(self.windows.copy())}


def heldout_frames(stores: Sequence[TrajectoryStore], heldout: Sequence[np.ndarray], count: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(frames uint8 [M, 84, 84], dataset index [M]): up to `count` frames spread evenly over every dataset's
    held-out episodes (an equal share per dataset that has any)."""
    with_heldout = [d for d, h in enumerate(heldout) if len(h)]
    share = max(1, count // len(with_heldout))
    frames, owner = [], []
    for d in with_heldout:
        s = stores[d]
        lengths = s.episode_lengths()[heldout[d]] + 1  # frames per held-out episode
        total = int(lengths.sum())
        picks = np.unique(np.linspace(0, total - 1, num=min(share, total)).round().astype(np.int64))
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        for j, ep in enumerate(heldout[d].tolist()):
            local = picks[(picks >= starts[j]) & (picks < starts[j] + lengths[j])] - starts[j]
            if len(local):
                obs = s.read_window(ep, int(local[0]), int(local[-1]) + 1, "observations")
                frames.append(obs[local - local[0]])
                owner.append(np.full(len(local), d, dtype=np.int64))
    return np.concatenate(frames), np.concatenate(owner)


def resolve_data(data: Sequence[str | Path]) -> list[Path]:
    """The dataset directories named by `data`; a WamError when none is given."""
    if not data:
        raise WamError("no datasets given; pass --data DIR [DIR ...] (dataset directories or roots holding them)")
    return find_datasets(list(data))
