"""Filling the token caches of datasets with a frozen tokenizer (`wam tokenize`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wam.datasets.errors import DataError
from wam.datasets.store import TrajectoryStore
from wam.worldmodel.frame_pool import resolve_data
from wam.worldmodel.tokenizer import (
    VQTokenizer,
)

log = logging.getLogger(__name__)


@dataclass
class EncodeSummary:
    """What `encode_datasets` did."""

    tokenizer_id: str
    datasets: list[Path]
    encoded: list[Path]
    """Datasets whose cache was written (or completed) now."""
    skipped: list[Path]
    """Datasets already fully cached by this tokenizer."""
    frames: int
    """Frames encoded now."""
    usage: float | None
    """Fraction of the codebook occurring in the frames encoded now (None when nothing was encoded)."""
    seconds: float


def encode_datasets(tokenizer: VQTokenizer, dirs: Sequence[str | Path], batch_size: int = 256,
                    progress: bool = True) -> EncodeSummary:
    """Encode every frame of the datasets `dirs` into their token caches (uint16, tagged with the tokenizer id).

    Idempotent: a dataset fully cached by this tokenizer is skipped, one partly cached by it (episodes
    appended since) gets the missing episodes. A dataset cached by another tokenizer raises DataError
    before anything is encoded. Encoding runs in fp32, eval mode, on the tokenizer's device.
    """
    t0 = time.perf_counter()
    paths = resolve_data(dirs)
    tid = tokenizer.tokenizer_id()
    stores = [TrajectoryStore.open(p) for p in paths]
    clash = [(s.directory, s.tokenizer_id()) for s in stores if s.tokenizer_id() not in (None, tid)]
    if clash:
        detail = "; ".join(f"{d} holds tokens of tokenizer {other}" for d, other in clash)
        raise DataError(f"{detail}, not of {tid}: a dataset holds the tokens of one tokenizer. Tokenize a copy of "
                        f"the dataset, or name the tokenizer that made the cache")
    todo = [(s, s.episodes_without_tokens()) for s in stores]
    total = int(sum(int((s.episode_lengths()[eps] + 1).sum()) for s, eps in todo if eps))
    was_training = tokenizer.training
    tokenizer.eval()
    counts = torch.zeros(tokenizer.cfg.codebook_size, dtype=torch.int64)
    encoded, skipped, frames_done = [], [], 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="tokenize", unit="frame", dynamic_ncols=True)

    def episodes(reader: TrajectoryStore, ids: list[int]) -> Iterator[tuple[int, np.ndarray]]:
        nonlocal frames_done
        lengths = reader.episode_lengths()
        for i in ids:
            obs = reader.read_window(i, 0, int(lengths[i]) + 1, "observations")  # [T+1, 84, 84]
            tokens = tokenizer.encode(obs, batch_size=batch_size).cpu()  # [T+1, 36]
            counts.add_(torch.bincount(tokens.flatten(), minlength=tokenizer.cfg.codebook_size))
            frames_done += len(obs)
            if bar is not None:
                bar.update(len(obs))
            yield i, tokens.numpy().astype(np.uint16)

    try:
        for store, ids in todo:
            if not ids:
                log.info("%s: token cache of %s already complete; skipped", store.directory, tid)
                skipped.append(store.directory)
                continue
            with TrajectoryStore.open(store.directory) as reader:  # a separate handle: the writer swaps files
                store.write_tokens(episodes(reader, ids), tid)
            encoded.append(store.directory)
            log.info("%s: encoded %d episode(s) with tokenizer %s", store.directory, len(ids), tid)
    finally:
        tokenizer.train(was_training)
        if bar is not None:
            bar.close()
    usage = float((counts > 0).double().mean()) if frames_done else None
    return EncodeSummary(tokenizer_id=tid, datasets=paths, encoded=encoded, skipped=skipped, frames=frames_done,
                         usage=usage, seconds=time.perf_counter() - t0)
