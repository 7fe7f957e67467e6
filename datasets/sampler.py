"""Random segments of H consecutive steps from one or more game datasets, as typed `Batch`es.

How it works (details and the reasons in docs/sampler.md):

- **Segments.** A segment starts at any transition of any episode: a dataset is picked by its
  weight, then a transition uniformly among the dataset's transitions (so longer episodes give more
  segments). Steps past the episode's end are padding: `mask=False`, action 0, reward 0, no
  termination/truncation; the observation of a padded position repeats the episode's last frame
  (or last token row). `obs` has H+1 entries: `obs[:, H]` is the successor of the last step.
- **Weights.** Per dataset (a sequence, in the order of `sampler.datasets`) or per game (a mapping
  game -> weight, split among that game's datasets in proportion to their transitions). Default:
  in proportion to transitions, i.e. uniform over all transitions of all datasets.
- **Sources.** `frames` (uint8 `[B, H+1, 84, 84]`) or `tokens` (the token cache, int64
  `[B, H+1, 36]`); `auto` takes tokens when every dataset has a cache from the same tokenizer.
- **Memory.** The per-step arrays (actions, rewards, flags) always live in RAM (~15 bytes a step).
  The observations are either loaded into RAM once (`in_memory=True`; one `np.take` gathers a
  batch) or read segment by segment from the HDF5 files (`in_memory=False`, `WindowReader`: open
  dataset handles kept, no chunk cache, read straight into the batch buffer).
- **Determinism.** Batch k is a pure function of `(seed, k)`: its random draws come from a generator
  seeded with `[seed, k]`. So the same seed gives the same batches with or without prefetching,
  from RAM or from disk, and `state_dict()` is just the consumer's batch counter (plus a fingerprint
  of the configuration that the counter is valid for).
- **Buffers.** Batches are written into `prefetch + 3` preallocated buffer sets used in rotation and
  returned as tensors that share their memory (`torch.from_numpy`). **Lifetime rule:** a batch stays
  valid until two more batches have been taken (you may hold the current and the previous batch);
  `.clone()` what you keep longer.
- **Prefetch.** With `prefetch > 0` a background thread fills up to `prefetch` batches ahead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from wam.datasets.atari import legal_action_mask
from wam.datasets.batch import Batch
from wam.datasets.errors import DataError
from wam.datasets.returns import REWARD_TRANSFORMS
from wam.datasets.segments import (
    OBS_FIELD,
    TOKENS_FIELD,
    EpisodeTable,
    SegmentBuffers,
    SegmentSource,
    read_field,
)
from wam.datasets.store import TrajectoryStore, find_datasets

log = logging.getLogger(__name__)

Source = Literal["frames", "tokens", "auto"]

MEMORY_BUDGET_BYTES = 8 * 2**30
"""`in_memory=None` loads the observations into RAM when they take at most this many bytes and at
most half of the memory available now."""

STATE_VERSION = 1
"""Version of the dict written by `SegmentSampler.state_dict`."""

# ---------------------------------------------------------------------------------- the sampler


class _Producer:
    """The prefetch thread: fills batches `first, first+1, ...` into rotating buffers, queues them."""

    _STOP_POLL_S = 0.05

    def __init__(self, source: SegmentSource, buffers: list[SegmentBuffers], first_index: int, first_slot: int,
                 depth: int) -> None:
        self.source = source
        self.buffers = buffers
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop_event = threading.Event()
        self.next_index = first_index
        self.next_slot = first_slot
        self.thread = threading.Thread(target=self._run, name="wam-sampler-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.is_set():
            index, slot = self.next_index, self.next_slot
            item: Any = slot
            try:
                self.source.fill(index, self.buffers[slot])
            except BaseException as exc:  # handed to the consumer, which re-raises it
                item = exc
            self.next_index, self.next_slot = index + 1, (slot + 1) % len(self.buffers)
            while not self.stop_event.is_set():
                try:
                    self.queue.put((index, item), timeout=self._STOP_POLL_S)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def get(self) -> tuple[int, int]:
        """(batch index, buffer slot) of the next batch; re-raises a producer error."""
        index, item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return index, item

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join()


def _stop_producer(holder: dict) -> None:
    """Finalizer of a SegmentSampler: stop its thread (a dict so it sees the current producer)."""
    producer = holder.get("producer")
    if producer is not None:
        producer.stop()
        holder["producer"] = None


class SegmentSampler:
    """Random segments of `horizon` steps across game datasets; see the module docstring.

    Args:
        datasets: dataset directories, or roots searched with `find_datasets`.
        horizon: steps per segment (H); `obs` holds H+1 entries.
        batch_size: segments per batch (B).
        weights: sampling weights, per dataset (sequence in the order of `self.datasets`) or per game
            (mapping game -> weight); default in proportion to each dataset's transitions.
        source: "frames", "tokens" (the obs_tokens cache, int64 in the batch) or "auto" (tokens
            when every dataset has a cache of the same tokenizer, else frames).
        seed: batch k depends only on (seed, k).
        in_memory: hold observations in RAM; None: when they fit `MEMORY_BUDGET_BYTES` and half the
            available memory.
        prefetch: batches prepared ahead by a background thread; 0 fills synchronously.
        max_transitions: use only the first N transitions of each dataset (few-shot fine-tuning).
        game_names: the game-id order (must contain every dataset's game); default the datasets'
            games, sorted.
        hold_out_episodes: never draw the last N episodes of each dataset (held out for evaluation,
            see `held_out`).
        returns: (gamma, reward transform): also give each step's Monte-Carlo return to its episode's
            end (`Batch.mc_return`, NaN where unknown; `datasets.returns`), for mixed Monte-Carlo targets.
    """

    def __init__(self, datasets: Sequence[Path | str] | Path | str, horizon: int = 8, batch_size: int = 32,
                 weights: Sequence[float] | Mapping[str, float] | None = None, source: Source = "auto",
                 seed: int = 0, in_memory: bool | None = None, prefetch: int = 2,
                 max_transitions: int | None = None, game_names: Sequence[str] | None = None,
                 hold_out_episodes: int = 0, returns: tuple[float, str] | None = None) -> None:
        if hold_out_episodes < 0:
            raise ValueError(f"hold_out_episodes must be >= 0, got {hold_out_episodes}")
        self.hold_out_episodes = hold_out_episodes
        if returns is not None:
            gamma, how = returns
            if not 0.0 <= gamma <= 1.0 or how not in REWARD_TRANSFORMS:
                raise ValueError(f"returns must be (gamma in [0, 1], one of {REWARD_TRANSFORMS}), got {returns}")
        self.returns = returns
        if horizon < 1 or batch_size < 1 or prefetch < 0:
            raise ValueError(f"need horizon >= 1, batch_size >= 1, prefetch >= 0; got {horizon}, {batch_size}, {prefetch}")
        if max_transitions is not None and max_transitions < 1:
            raise ValueError(f"max_transitions must be >= 1 or None, got {max_transitions}")
        if source not in ("frames", "tokens", "auto"):
            raise ValueError(f"source must be 'frames', 'tokens' or 'auto', got {source!r}")
        roots = [datasets] if isinstance(datasets, (str, Path)) else list(datasets)
        self.datasets: list[Path] = find_datasets(roots)
        self.horizon, self.batch_size, self.seed, self.prefetch = horizon, batch_size, seed, prefetch
        self.max_transitions = max_transitions
        self._stores = [TrajectoryStore.open(p) for p in self.datasets]
        self._closed = False
        try:
            self._setup(weights, source, in_memory, game_names)
        except BaseException:
            self._close_stores()
            raise

    def _setup(self, weights, source: Source, in_memory: bool | None, game_names) -> None:
        stores = self._stores
        dataset_games = [s.game for s in stores]
        self.games: list[str] = list(game_names) if game_names is not None else sorted(set(dataset_games))
        unknown = sorted(set(dataset_games) - set(self.games))
        if unknown:
            raise DataError(f"datasets hold games {unknown} that are not in game_names {self.games}; "
                            f"add them to game_names")
        self.source: Literal["frames", "tokens"] = self._resolve_source(source)
        table = self._episode_table([self.games.index(g) for g in dataset_games])
        probs = self._probs(weights, table)
        field = TOKENS_FIELD if self.source == "tokens" else OBS_FIELD
        shapes = [tuple(read_field(store, int(table.episode[np.argmax(table.dataset == i)]), 0, 0, field).shape[1:])
                  for i, store in enumerate(stores)]  # empty reads: shapes without decompressing
        obs_shape = shapes[0]
        for path, shape in zip(self.datasets, shapes):
            if shape != obs_shape:
                raise DataError(f"{path} has observations of shape {shape}, but {self.datasets[0]} has "
                                f"{obs_shape}; sample them separately")
        obs_rows = int((table.length + 1).sum())
        obs_bytes = obs_rows * int(np.prod(obs_shape)) * (2 if self.source == "tokens" else 1)
        self.in_memory = self._decide_in_memory(in_memory, obs_bytes)
        legal = np.stack([legal_action_mask(g) for g in self.games])  # [G, 18]
        self._source = SegmentSource(stores, table, probs, self.horizon, self.batch_size, self.seed,
                                      self.source == "tokens", self.in_memory, obs_shape, legal, self.returns)
        self._buffers = [SegmentBuffers.allocate(self.batch_size, self.horizon, obs_shape, self.source == "tokens",
                                                 self.returns is not None)
                         for _ in range(self.prefetch + 3)]
        self._batches = [buf.batch() for buf in self._buffers]
        self._fingerprint = {
            "horizon": self.horizon, "batch_size": self.batch_size, "source": self.source,
            "max_transitions": self.max_transitions, "hold_out_episodes": self.hold_out_episodes,
            **({"returns": list(self.returns)} if self.returns is not None else {}),
            "games": list(self.games),
            "datasets": [[g, int(n)] for g, n in zip(dataset_games, self._source.dataset_steps)],
            "probs": [round(float(p), 12) for p in probs],
        }
        self._next_index = 0  # index of the next batch the consumer gets
        self._last_slot = -1  # buffer slot of the batch the consumer got last
        self._holder: dict = {"producer": None}
        self._finalizer = weakref.finalize(self, _stop_producer, self._holder)
        log.info("SegmentSampler: %d dataset(s), %d games, %d transitions, source=%s, %s, prefetch=%d",
                 len(stores), len(self.games), table.num_steps, self.source,
                 "observations in RAM" if self.in_memory else "observations read from HDF5", self.prefetch)

    # ------------------------------------------------------------------------------------ setup
    def _resolve_source(self, source: Source) -> Literal["frames", "tokens"]:
        if source == "frames":
            return "frames"
        missing = [str(p) for p, s in zip(self.datasets, self._stores) if not s.has_tokens()]
        ids = {s.tokenizer_id() for s in self._stores if s.has_tokens()}
        if source == "tokens":
            if missing:
                raise DataError(f"source='tokens' but these datasets have no token cache: {', '.join(missing)}; "
                                f"encode them with a trained tokenizer first, or use source='frames'")
            if len(ids) > 1:
                raise DataError(f"the datasets' token caches come from different tokenizers {sorted(map(str, ids))}; "
                                f"re-encode them with one tokenizer")
            return "tokens"
        if not missing and len(ids) == 1:
            log.info("SegmentSampler: source=auto -> tokens (tokenizer %s)", next(iter(ids)))
            return "tokens"
        reason = f"{len(missing)} dataset(s) without a token cache" if missing else "token caches of different tokenizers"
        log.info("SegmentSampler: source=auto -> frames (%s)", reason)
        return "frames"

    def _episode_table(self, game_ids: list[int]) -> EpisodeTable:
        cols: dict[str, list[int]] = {k: [] for k in ("dataset", "episode", "length", "game_id")}
        for d, (path, store) in enumerate(zip(self.datasets, self._stores)):
            lengths = np.asarray(store.episode_lengths(), np.int64)
            if self.hold_out_episodes:
                if self.hold_out_episodes >= len(lengths):
                    raise DataError(f"dataset {path} has {len(lengths)} episode(s); holding out the last "
                                    f"{self.hold_out_episodes} leaves none to train on")
                lengths = lengths[: len(lengths) - self.hold_out_episodes]
            budget = self.max_transitions if self.max_transitions is not None else int(lengths.sum())
            used = 0
            for e, n in enumerate(lengths):
                n = min(int(n), budget - used)
                if n <= 0:
                    if used >= budget:
                        break
                    continue  # an episode with no transition (reset frame only)
                for k, v in (("dataset", d), ("episode", e), ("length", n), ("game_id", game_ids[d])):
                    cols[k].append(v)
                used += n
            if used < self.horizon:
                what = "is empty" if used == 0 else f"has only {used} transition(s)"
                raise DataError(f"dataset {path} {what}, fewer than one segment of horizon {self.horizon}; "
                                f"collect more data or lower the horizon")
        length = np.asarray(cols["length"], np.int64)
        step_offset = np.zeros_like(length)
        step_offset[1:] = np.cumsum(length)[:-1]
        obs_offset = step_offset + np.arange(len(length))  # one extra obs row per episode
        return EpisodeTable(dataset=np.asarray(cols["dataset"], np.int64), episode=np.asarray(cols["episode"], np.int64),
                             length=length, step_offset=step_offset, obs_offset=obs_offset,
                             game_id=np.asarray(cols["game_id"], np.int64))

    def _probs(self, weights, table: EpisodeTable) -> np.ndarray:
        """Probability `[D]` of drawing each dataset."""
        num_datasets = len(self._stores)
        steps = np.bincount(table.dataset, weights=table.length, minlength=num_datasets)  # [D]
        if weights is None:
            w = steps.astype(np.float64)
        elif isinstance(weights, Mapping):
            games = [s.game for s in self._stores]
            unknown = sorted(set(weights) - set(games))
            if unknown:
                raise DataError(f"weights name games {unknown} that no dataset holds (datasets hold {sorted(set(games))})")
            w = np.zeros(num_datasets)
            for game, gw in weights.items():
                members = [i for i, g in enumerate(games) if g == game]
                w[members] = float(gw) * steps[members] / steps[members].sum()
        else:
            w = np.asarray(list(weights), np.float64)
            if w.shape != (num_datasets,):
                found = "\n  ".join(str(p) for p in self.datasets)
                raise DataError(f"{len(w)} weights given for {num_datasets} datasets; the datasets are:\n  {found}")
        if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise DataError(f"weights must be finite, >= 0 and not all 0; got {w.tolist()}")
        return w / w.sum()

    def _decide_in_memory(self, in_memory: bool | None, obs_bytes: int) -> bool:
        if in_memory is not None:
            return bool(in_memory)
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = MEMORY_BUDGET_BYTES * 2
        fits = obs_bytes <= min(MEMORY_BUDGET_BYTES, available // 2)
        log.info("SegmentSampler: observations take %.1f MiB; %s", obs_bytes / 2**20,
                 "loading them into RAM" if fits else "too large for the RAM budget, reading them from HDF5")
        return fits

    # --------------------------------------------------------------------------------- sampling
    def held_out(self) -> list[tuple[Path, int]]:
        """(dataset path, episode index) of every held-out episode (`hold_out_episodes`), in dataset order."""
        out = []
        for path, store in zip(self.datasets, self._stores):
            n = store.num_episodes
            out += [(path, e) for e in range(n - self.hold_out_episodes, n)]
        return out

    @property
    def num_transitions(self) -> int:
        """Transitions that segments can start at (after max_transitions)."""
        return self._source.table.num_steps

    @property
    def probs(self) -> np.ndarray:
        """Probability `[D]` of drawing each dataset (in the order of `self.datasets`)."""
        return self._source.probs.copy()

    def segment_origins(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where batch `index` comes from: dataset [B] (index into `self.datasets`), episode [B] (index in
        its store) and start step [B]. A pure function of (seed, index), like the batch itself."""
        rows, starts = self._source.plan(index)  # [B] episode-table rows, [B] start steps
        return self._source.table.dataset[rows], self._source.table.episode[rows], starts

    def sample(self) -> Batch:
        """The next batch. Valid until two more batches have been taken (see the module docstring)."""
        if self._closed:
            raise RuntimeError("SegmentSampler is closed")
        # Slots are used in rotation after the consumer's last one, also when the producer restarts
        # (load_state_dict): the producer is at most prefetch + 1 slots ahead, so with prefetch + 3
        # slots the consumer's current and previous batches are never written.
        next_slot = (self._last_slot + 1) % len(self._buffers)
        if self.prefetch == 0:
            slot = next_slot
            self._source.fill(self._next_index, self._buffers[slot])
        else:
            producer = self._holder["producer"]
            if producer is None:
                producer = _Producer(self._source, self._buffers, self._next_index, next_slot, self.prefetch)
                self._holder["producer"] = producer
            try:
                index, slot = producer.get()
            except BaseException:  # a producer error (re-raised here) or Ctrl-C: restart it next time
                self._stop_producer()
                raise
            assert index == self._next_index, f"prefetch produced batch {index}, expected {self._next_index}"
        self._next_index += 1
        self._last_slot = slot
        return dataclasses.replace(self._batches[slot])  # a new Batch object around the slot's tensors

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.sample()

    # ----------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """The consumer's position: the next `sample()` after `load_state_dict` of this dict returns the
        batch that would have come next here. Plain ints/strings/lists (JSON- and torch.load-safe)."""
        return {"version": STATE_VERSION, "seed": self.seed, "next_batch": self._next_index,
                "fingerprint": self._fingerprint}

    def load_state_dict(self, state: Mapping, strict: bool = True) -> None:
        """Resume at the position in `state` (from `state_dict`).

        With `strict`, a state written for other data or settings (horizon, batch size, source,
        datasets, weights) is a DataError, because its batches could not be reproduced; otherwise
        the position is restored with a warning.
        """
        if state.get("version") != STATE_VERSION:
            raise DataError(f"sampler state has version {state.get('version')!r}, this wam reads {STATE_VERSION}")
        theirs = state.get("fingerprint", {})
        diff = sorted(k for k in set(theirs) | set(self._fingerprint) if theirs.get(k) != self._fingerprint.get(k))
        if diff:
            msg = (f"sampler state was saved with different {', '.join(diff)} "
                   f"(saved {[theirs.get(k) for k in diff]}, now {[self._fingerprint.get(k) for k in diff]})")
            if strict:
                raise DataError(msg + "; resume with the same data and settings, or pass strict=False")
            log.warning("%s; resuming at batch %d anyway, batches will differ", msg, state["next_batch"])
        self._stop_producer()
        self.seed = int(state["seed"])
        self._source.seed = self.seed
        self._next_index = int(state["next_batch"])

    # ------------------------------------------------------------------------------------ close
    def _stop_producer(self) -> None:
        producer = self._holder["producer"]
        if producer is not None:
            producer.stop()
            self._holder["producer"] = None

    def _close_stores(self) -> None:
        source = getattr(self, "_source", None)
        if source is not None:
            source.close()
        for store in self._stores:
            close = getattr(store, "close", None)
            if close is not None:
                close()

    def close(self) -> None:
        """Stop the prefetch thread and close the files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop_producer()
        self._finalizer.detach()
        self._close_stores()

    def __enter__(self) -> SegmentSampler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
